"""The gated PixelCNN prior and its pipeline: causality by Jacobian, class conditioning, learning a known
distribution, sampling, code extraction that leaves the VQ-VAE untouched, checkpoints, and the likelihood report.

Every test runs on the CPU in a few seconds. The pipeline fixture trains a tiny VQ-VAE on a folder of random images
in two class sub-folders (16x16 images, so 4x4 code maps), extracts its codes and trains a tiny prior."""
import json
import math
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import evaluate_prior
import extract_codes
import prior_checkpoint
import runs
import sample
import train
import train_prior
from image_data import build_data
from prior import GatedPixelCNN
from prior_checkpoint import PriorConfig
from test_cli_errors import assert_clean_error, call_main, script   # the helpers of the train.py CLI tests

# ---------------------------------------------------------------------------------------------------------------
# Causality: the Jacobian of the logits with respect to the input embeddings, position by position


def dependencies(model: GatedPixelCNN, height: int, width: int, labels=None) -> dict:
    """For each output position (i, j): the set of input positions whose embedding has a non-zero gradient on the
    logits at (i, j) (a random projection of the K logits, in float64)."""
    torch.manual_seed(1)
    x = torch.randn(1, model.embedding.weight.shape[1], height, width, dtype=torch.float64, requires_grad=True)
    logits = model.forward_embedded(x, labels)                                      # (1, K, H, W)
    deps = {}
    for i in range(height):
        for j in range(width):
            w = torch.randn(logits.shape[1], dtype=torch.float64)
            grad, = torch.autograd.grad((logits[0, :, i, j] * w).sum(), x, retain_graph=True)
            norm = grad[0].abs().sum(0)                                              # (H, W)
            deps[i, j] = {(r, c) for r in range(height) for c in range(width) if norm[r, c] != 0}
    return deps


def earlier(i: int, j: int, width: int) -> set:
    """Every position before (i, j) in raster order."""
    return {(r, c) for r in range(i + 1) for c in range(width) if r * width + c < i * width + j}


@pytest.mark.parametrize("num_classes", [0, 3])
def test_no_blind_spot_every_earlier_position_and_nothing_else(num_classes):
    """With reach 4 * (5 // 2) = 8 >= 7 every earlier position of an 8x8 map is in the receptive field: the logits
    at each of the 64 positions must depend on all earlier positions and on none at or after them."""
    torch.manual_seed(0)
    model = GatedPixelCNN(7, num_classes, channels=8, num_layers=4, kernel_size=5).double().eval()
    labels = torch.tensor([2]) if num_classes else None
    deps = dependencies(model, 8, 8, labels)
    for (i, j), found in deps.items():
        assert found == earlier(i, j, 8), (i, j, sorted(earlier(i, j, 8) - found), sorted(found - earlier(i, j, 8)))


@pytest.mark.parametrize("num_layers, kernel_size", [(2, 3), (1, 5), (3, 3)])
def test_receptive_field_is_exactly_the_stacks_reach(num_layers, kernel_size):
    """A shallow prior on an 8x8 map: with reach R = L * (k // 2) the logits at (i, j) depend on exactly
    rows i-1-R .. i-1 at columns j-R .. j+R (the vertical stack: a full rectangle above, no blind spot to the upper
    right as in a single masked stack) and row i at columns j-1-R .. j-1 (the horizontal stack)."""
    torch.manual_seed(0)
    model = GatedPixelCNN(5, 0, channels=6, num_layers=num_layers, kernel_size=kernel_size).double().eval()
    reach = num_layers * (kernel_size // 2)
    deps = dependencies(model, 8, 8)
    for (i, j), found in deps.items():
        above = {(r, c) for r in range(i - 1 - reach, i) for c in range(j - reach, j + reach + 1)}
        left = {(i, c) for c in range(j - 1 - reach, j)}
        expected = {(r, c) for r, c in above | left if 0 <= r < 8 and 0 <= c < 8}
        assert found == expected, (i, j, sorted(expected - found), sorted(found - expected))


def test_training_mode_with_dropout_is_still_causal():
    torch.manual_seed(0)
    model = GatedPixelCNN(7, 0, channels=8, num_layers=4, kernel_size=5, dropout=0.3).double().train()
    for (i, j), found in dependencies(model, 6, 6).items():
        assert found <= earlier(i, j, 6), (i, j)


def test_class_conditioning_changes_every_position():
    torch.manual_seed(0)
    model = GatedPixelCNN(9, 4, channels=8, num_layers=2, kernel_size=3).eval()
    codes = torch.randint(9, (1, 5, 5)).expand(4, 5, 5)
    logits = model(codes, torch.arange(4))                                          # (4, K, 5, 5)
    for a in range(4):
        for b in range(a + 1, 4):
            differs = (logits[a] - logits[b]).abs().amax(0) > 1e-6                  # (5, 5)
            assert differs.all(), (a, b)                                              # (0, 0) included
    with pytest.raises(ValueError, match="labels"):
        model(codes)
    with pytest.raises(ValueError, match="labels"):
        GatedPixelCNN(9)(codes, torch.arange(4))


# ---------------------------------------------------------------------------------------------------------------
# Learning a distribution of known entropy


def synthetic_maps(n: int, size: int, k: int, eps: float, seed: int) -> torch.Tensor:
    """Raster-order Markov maps: z_ij = (z_(i-1)j + z_i(j-1)) mod K (a missing neighbour counts as 0) with probability
    1 - eps, else one of the other K - 1 codes uniformly; z_00 is uniform. Needs both stacks to be learned."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(size):
        for j in range(size):
            if i == 0 and j == 0:
                z[:, 0, 0] = torch.randint(k, (n,), generator=g)
                continue
            target = ((z[:, i - 1, j] if i else 0) + (z[:, i, j - 1] if j else 0)) % k
            noise = torch.rand(n, generator=g) < eps
            other = (target + torch.randint(1, k, (n,), generator=g)) % k
            z[:, i, j] = torch.where(noise, other, target)
    return z


def synthetic_entropy(size: int, k: int, eps: float) -> float:
    """The exact entropy of `synthetic_maps` per code, in nats."""
    h = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps / (k - 1))
    return (math.log(k) + (size * size - 1) * h) / (size * size)


def write_codes(path: Path, train_codes, val_codes, k: int):
    """A codes file as extract_codes.py writes it, for maps made here (no classes, no VQ-VAE)."""
    torch.save({"format": extract_codes.CODES_FORMAT, "train_codes": train_codes.to(torch.uint8),
                "val_codes": val_codes.to(torch.uint8), "train_labels": torch.zeros(len(train_codes), dtype=torch.long),
                "val_labels": torch.zeros(len(val_codes), dtype=torch.long), "classes": [], "num_embeddings": k,
                "vqvae_checkpoint": str(path.parent / "none.pt"), "vqvae_config": {}, "vqvae_step": 0,
                "data": "synthetic", "description": "synthetic", "passes": 1}, path)
    return path


def prior_config(codes: Path, out: Path, **kw) -> PriorConfig:
    c = PriorConfig(codes=str(codes), out=str(out), channels=8, num_layers=2, kernel_size=3, dropout=0.0, steps=4,
                    batch_size=8, lr=3e-3, eval_every=2, log_every=1, progress=False, device="cpu", amp="off")
    return replace(c, **kw)


def test_training_drives_the_nll_to_the_true_entropy(tmp_path):
    k, size, eps = 4, 6, 0.1
    codes = write_codes(tmp_path / "codes.pt", synthetic_maps(3000, size, k, eps, 0),
                        synthetic_maps(600, size, k, eps, 1), k)
    truth = synthetic_entropy(size, k, eps)                                          # 0.4614 nats per code
    result = train_prior.train_prior(prior_config(codes, tmp_path / "run", channels=16, num_layers=2, steps=150,
                                                  batch_size=32, lr=5e-3, eval_every=150))
    nll = result.final["nll_nats"]
    assert truth - 0.02 < nll < truth + 0.03, (nll, truth)   # knowing only one neighbour would give ln 4 = 1.386
    assert result.history[0]["nll_nats"] > truth + 0.5                               # it did have to learn
    assert result.final["nll_bits"] == pytest.approx(nll / math.log(2))


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def naive_sample(model, num, shape, temperature, labels, generator):
    """The reference: run the whole network on the whole map for every position."""
    codes = torch.zeros(num, *shape, dtype=torch.long)
    for i in range(shape[0]):
        for j in range(shape[1]):
            logits = model(codes, labels)[:, :, i, j]
            probs = F.softmax(logits / temperature, dim=1)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return codes


@pytest.mark.parametrize("num_classes, kernel_size", [(0, 3), (3, 5)])
def test_fast_sampling_equals_running_the_whole_network_per_position(num_classes, kernel_size):
    torch.manual_seed(0)
    model = GatedPixelCNN(11, num_classes, channels=8, num_layers=3, kernel_size=kernel_size,
                          dropout=0.2).double().eval()
    labels = torch.tensor([0, 2, 1, 1]) if num_classes else None
    fast = model.sample(4, (6, 7), 0.8, labels, torch.Generator().manual_seed(5))
    reference = naive_sample(model, 4, (6, 7), 0.8, labels, torch.Generator().manual_seed(5))
    assert torch.equal(fast, reference)


def test_sampling_is_reproducible_with_a_seed_and_has_the_right_shape_and_range():
    torch.manual_seed(0)
    model = GatedPixelCNN(13, 0, channels=8, num_layers=2, kernel_size=3, dropout=0.5).train()
    threads = torch.get_num_threads()
    a = model.sample(5, (4, 6), generator=torch.Generator().manual_seed(1))
    b = model.sample(5, (4, 6), generator=torch.Generator().manual_seed(1))
    c = model.sample(5, (4, 6), generator=torch.Generator().manual_seed(2))
    assert a.shape == (5, 4, 6) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < 13
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training and torch.get_num_threads() == threads                    # both restored
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, (2, 2), temperature=0.0)


def test_low_temperature_sampling_is_greedy_decoding():
    torch.manual_seed(0)
    model = GatedPixelCNN(6, 0, channels=8, num_layers=2, kernel_size=3).double().eval()
    codes = model.sample(3, (4, 4), temperature=1e-4, generator=torch.Generator().manual_seed(0))
    greedy = torch.zeros(3, 4, 4, dtype=torch.long)
    for i in range(4):
        for j in range(4):
            greedy[:, i, j] = model(greedy)[:, :, i, j].argmax(1)
    assert torch.equal(codes, greedy)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline on a tiny VQ-VAE: extraction, training, checkpoints, sampling, the likelihood report

TINY_VQVAE = dict(image_size=16, steps=4, batch_size=4, hidden_channels=8, residual_channels=4, num_residual_blocks=1,
                  embedding_dim=4, num_embeddings=16, eval_every=4, log_every=2, lr=1e-3, progress=False,
                  device="cpu", amp="off", num_workers=0)


def make_class_folder(folder: Path) -> Path:
    """Random images in two class sub-folders, with fixed train/ and val/ splits."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for name in ("cats", "dogs"):
            (folder / split / name).mkdir(parents=True)
            for i in range(n):
                shade = 60 if name == "cats" else 190
                pixels = np.clip(rng.normal(shade, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / split / name / f"{i}.png")
    return folder


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    data = make_class_folder(root / "photos")
    train.train(checkpoint.Config(data=str(data), out=str(root / "vqvae"), **TINY_VQVAE))
    vqvae_ckpt = root / "vqvae" / "checkpoint.pt"
    before = vqvae_ckpt.read_bytes()
    codes = extract_codes.extract_codes(vqvae_ckpt, root / "codes.pt", passes=3, device="cpu", progress=False)
    config = prior_config(root / "codes.pt", root / "prior", dropout=0.1)
    result = train_prior.train_prior(config)
    return {"root": root, "data": data, "vqvae_ckpt": vqvae_ckpt, "vqvae_bytes": before, "codes": codes,
            "config": config, "result": result, "prior_ckpt": root / "prior" / "checkpoint.pt"}


def test_extraction_writes_the_codes_of_every_pass(pipeline):
    codes, root = pipeline["codes"], pipeline["root"]
    on_disk = torch.load(root / "codes.pt", weights_only=True)
    assert on_disk["format"] == extract_codes.CODES_FORMAT
    assert on_disk["classes"] == ["cats", "dogs"] and on_disk["num_embeddings"] == 16
    assert on_disk["train_codes"].dtype == torch.uint8 and on_disk["train_codes"].shape == (3 * 12, 4, 4)
    assert on_disk["val_codes"].shape == (4, 4, 4)
    assert on_disk["vqvae_checkpoint"] == str(pipeline["vqvae_ckpt"].resolve())
    assert on_disk["vqvae_config"] == torch.load(pipeline["vqvae_ckpt"], weights_only=True)["config"]
    # what extract_codes returns is what it wrote
    assert all(torch.equal(codes[k], on_disk[k]) for k in ("train_codes", "train_labels", "val_codes", "val_labels"))
    # independent: encode every image with a fresh copy of the model, pass 0 plain, passes 1-2 flipped by the seed
    model, config, _ = checkpoint.load_checkpoint(pipeline["vqvae_ckpt"])
    splits = build_data(str(pipeline["data"]), 16)
    for p in range(3):
        for i in range(len(splits.train)):
            key = i if p == 0 else (i, extract_codes.augmentation_seed(p, i))
            image, label = splits.train[key]
            expected = model.encode(image.float().unsqueeze(0) / 255 - 0.5)[0]
            assert torch.equal(on_disk["train_codes"][p * 12 + i].long(), expected), (p, i)
            assert on_disk["train_labels"][p * 12 + i] == label
    assert sorted(on_disk["val_labels"].tolist()) == [0, 0, 1, 1]
    for i in range(len(splits.val)):
        assert torch.equal(on_disk["val_codes"][i].long(), model.encode(splits.val[i][0].float()[None] / 255 - 0.5)[0])
    assert not torch.equal(on_disk["train_codes"][:12], on_disk["train_codes"][12:24])   # augmentation happened


def test_extraction_is_deterministic(pipeline, tmp_path):
    again = extract_codes.extract_codes(pipeline["vqvae_ckpt"], tmp_path / "codes.pt", passes=3, device="cpu",
                                        progress=False)
    for key in ("train_codes", "train_labels", "val_codes", "val_labels"):
        assert torch.equal(again[key], pipeline["codes"][key]), key


def test_code_dtype_is_compact():
    assert extract_codes.code_dtype(256) == torch.uint8
    assert extract_codes.code_dtype(257) == torch.int16
    assert extract_codes.code_dtype(32768) == torch.int16
    assert extract_codes.code_dtype(32769) == torch.int32


def test_the_vqvae_is_bit_identical_after_extraction_and_prior_training(pipeline):
    """The checkpoint file is unchanged, and encoding a dataset with a live model (even one left in training mode,
    whose EMA quantizer would update in a forward pass) changes none of its weights or buffers, nor its mode."""
    assert pipeline["vqvae_ckpt"].read_bytes() == pipeline["vqvae_bytes"]
    model, _, _ = checkpoint.load_checkpoint(pipeline["vqvae_ckpt"])
    splits = build_data(str(pipeline["data"]), 16)
    for mode in (False, True):
        model.train(mode)
        before = state(model)
        extract_codes.encode_dataset(model, splits.train, [(i, i) for i in range(len(splits.train))], 4,
                                     torch.device("cpu"))
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.training == mode


def test_prior_checkpoint_round_trip(pipeline):
    result, path = pipeline["result"], pipeline["prior_ckpt"]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == prior_checkpoint.CHECKPOINT_FORMAT and ckpt["step"] == 4
    assert ckpt["config"] == asdict(pipeline["config"])
    assert ckpt["vqvae"]["checkpoint"] == str(pipeline["vqvae_ckpt"].resolve())
    assert ckpt["vqvae"]["config"]["num_embeddings"] == 16
    assert ckpt["map_shape"] == [4, 4] and ckpt["classes"] == ["cats", "dogs"]
    assert ckpt["model_args"]["num_classes"] == 2 and ckpt["model_args"]["num_embeddings"] == 16
    model, config, _ = prior_checkpoint.load_prior(path)
    assert config == pipeline["config"] and not model.training
    for (k, a), (k2, b) in zip(result.model.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    codes, labels = pipeline["codes"]["val_codes"].long(), pipeline["codes"]["val_labels"]
    assert torch.equal(result.model(codes, labels), model(codes, labels))
    records = [json.loads(line) for line in (pipeline["root"] / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["val_nll_nats"] == pytest.approx(result.final["nll_nats"])


def test_resume_continues_exactly(pipeline, tmp_path):
    codes = pipeline["root"] / "codes.pt"
    straight = train_prior.train_prior(prior_config(codes, tmp_path / "a", steps=8, eval_every=4, dropout=0.3))
    train_prior.train_prior(prior_config(codes, tmp_path / "b", steps=4, eval_every=4, dropout=0.3))
    resumed = train_prior.train_prior(prior_config(codes, tmp_path / "b", steps=8, eval_every=4, dropout=0.3,
                                                   resume=True))
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert straight.final == resumed.final


def test_validation_nll_is_the_mean_cross_entropy(pipeline):
    model, _, _ = prior_checkpoint.load_prior(pipeline["prior_ckpt"])
    codes, labels = pipeline["codes"]["val_codes"].long(), pipeline["codes"]["val_labels"]
    nll = prior_checkpoint.nll_per_map(model, codes, labels, torch.device("cpu"), batch_size=3)
    log_p = torch.log_softmax(model(codes, labels).double(), 1)                            # (N, K, h, w)
    by_hand = -log_p.gather(1, codes[:, None]).sum((1, 2, 3))
    assert torch.allclose(nll, by_hand, rtol=1e-5)
    assert pipeline["result"].final["nll_nats"] == pytest.approx(by_hand.sum().item() / codes.numel(), rel=1e-5)


def test_sample_cli_writes_a_reproducible_grid(pipeline, tmp_path, capsys):
    args = ["--checkpoint", pipeline["prior_ckpt"], "--num", 6, "--nrow", 3, "--device", "cpu", "--class", "dogs"]
    assert sample.main([str(a) for a in [*args, "--out", tmp_path / "a.png"]]) == 0
    assert sample.main([str(a) for a in [*args, "--out", tmp_path / "b.png"]]) == 0
    assert sample.main([str(a) for a in [*args, "--out", tmp_path / "c.png", "--seed", 1]]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (2 + 2 * 18, 2 + 3 * 18, 3)                                   # 2 rows of 3 images of 16x16
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generate_decodes_with_the_named_vqvae(pipeline):
    prior, _, ckpt = prior_checkpoint.load_prior(pipeline["prior_ckpt"])
    vqvae = checkpoint.load_vqvae_for(ckpt, torch.device("cpu"))
    labels = prior_checkpoint.class_labels("1", ckpt["classes"], 3, True)
    codes, images = sample.generate(prior, vqvae, 3, (4, 4), 1.0, labels, seed=7)
    assert torch.equal(labels, torch.tensor([1, 1, 1]))
    assert codes.shape == (3, 4, 4) and images.shape == (3, 3, 16, 16)
    assert torch.equal(images, (vqvae.decode(codes) + 0.5).clamp(0, 1))
    assert torch.equal(prior_checkpoint.class_labels(None, ckpt["classes"], 5, True), torch.tensor([0, 1, 0, 1, 0]))


# ---------------------------------------------------------------------------------------------------------------
# The likelihood report


def test_discretized_gaussian_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64)
    for mean, sigma in [(127.3, 5.0), (0.0, 0.3), (-40.0, 2.0), (300.0, 10.0), (254.9, 0.05), (12.0, 400.0)]:
        log_p = evaluate_prior.discretized_gaussian_log_prob(levels, torch.full((256,), mean), sigma)
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9), (mean, sigma)
        # independent: the bin probabilities from math.erfc, each as a difference of two lower or two upper tails
        below = lambda t: 0.5 * math.erfc(-(t - mean) / (sigma * math.sqrt(2)))       # P(X < t)
        above = lambda t: 0.5 * math.erfc((t - mean) / (sigma * math.sqrt(2)))        # P(X > t)
        for x in (0, 1, 100, 128, 254, 255):
            lo, hi = (-math.inf if x == 0 else x - 0.5), (math.inf if x == 255 else x + 0.5)
            p = below(hi) - below(lo) if hi <= mean else above(lo) - above(hi)
            if p > 1e-300:
                assert log_p[x].exp().item() == pytest.approx(p, rel=1e-6), (mean, sigma, x)
    far = evaluate_prior.discretized_gaussian_log_prob(torch.tensor([200.0]), torch.tensor([10.0]), 1.0)
    assert torch.isfinite(far).all() and far.item() < -1e4                            # a deep tail, not -inf


def test_sigma_fit_recovers_the_noise_level():
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(50_000, generator=g, dtype=torch.float64) * 200 + 28
    x = (mean + 3.0 * torch.randn(50_000, generator=g, dtype=torch.float64)).round().clamp(0, 255)
    assert evaluate_prior.fit_sigma(x, mean) == pytest.approx(math.sqrt(9 - 1 / 12), rel=0.02)   # minus rounding


def decoder_nats_by_hand(vqvae, val, sigma: float) -> float:
    """The decoder term's reference: -log p(x | z) in nats, averaged over the images of `val`, each image through the
    VQ-VAE's forward pass one at a time, with the discretized Gaussian of the fitted sigma."""
    total = 0.0
    for i in range(len(val)):
        x = val[i][0].double()
        mean = (vqvae(x.float()[None] / 255 - 0.5).reconstruction[0].double() + 0.5) * 255
        total -= evaluate_prior.discretized_gaussian_log_prob(x, mean, sigma).sum().item()
    return total / len(val)


def test_unigram_baseline_by_hand():
    train_codes = torch.tensor([[0, 0], [0, 1]])                                    # counts 3, 1, 0 -> +1: 4, 2, 1
    val_codes = torch.tensor([[0, 2]])
    expected = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert evaluate_prior.unigram_cross_entropy(train_codes, val_codes, 3) == pytest.approx(expected)
    assert evaluate_prior.empirical_entropy(val_codes, 3) == pytest.approx(math.log(2))


def test_bits_per_dim_report_adds_the_two_terms(pipeline, capsys):
    assert evaluate_prior.main(["--checkpoint", str(pipeline["prior_ckpt"]), "--device", "cpu", "--time-sampling",
                                "--runs", "1"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert "bits/dim upper bound" in out and "unigram" in out
    dims = 3 * 16 * 16
    assert r["dims_per_image"] == dims
    assert r["bpd_prior_term"]["uniform"] == pytest.approx(16 * math.log(16) / (dims * math.log(2)))
    assert r["bpd_prior_term"]["pixelcnn"] == pytest.approx(r["prior_nats_per_code"] * 16 / (dims * math.log(2)))
    for name in ("uniform", "unigram", "pixelcnn"):
        assert r["bits_per_dim_bound"][name] == pytest.approx(r["bpd_prior_term"][name] + r["decoder_bits_per_dim"])
    assert r["prior_nats_per_code"] == pytest.approx(pipeline["result"].final["nll_nats"], rel=1e-5)
    # the decoder term, independently: every validation image with the fitted sigma
    model, _, _ = checkpoint.load_checkpoint(pipeline["vqvae_ckpt"])
    val = build_data(str(pipeline["data"]), 16).val
    assert r["decoder_nats_per_image"] == pytest.approx(decoder_nats_by_hand(model, val, r["decoder_sigma"]),
                                                        rel=1e-6)
    assert r["sampling"]["num"] == 16 and r["sampling"]["median_s"] > 0
    # the figures printed, without a verdict: the % below the unigram baseline, the sampling time
    assert r["reduction_vs_unigram"] == pytest.approx(1 - r["prior_nats_per_code"] / r["unigram_nats_per_code"])
    assert f"PixelCNN vs unigram: {r['reduction_vs_unigram']:.1%} lower\n" in out
    assert f"median {r['sampling']['median_s']:.2f} s of 1 runs\n" in out
    assert not {"PASS", "FAIL", "floor"} & set(out.replace(":", " ").replace("(", " ").split())


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs of the four scripts: one "error:" line, a non-zero exit, no traceback, nothing overwritten


def test_subprocess_sample_missing_checkpoint(tmp_path):
    r = script("sample.py", "--checkpoint", tmp_path / "missing.pt")
    assert_clean_error(r.returncode, r.stderr, "missing.pt", "does not exist")


def test_subprocess_train_prior_given_a_vqvae_checkpoint(pipeline, tmp_path):
    r = script("train_prior.py", "--codes", pipeline["vqvae_ckpt"], "--out", tmp_path / "run", "--no-progress")
    assert_clean_error(r.returncode, r.stderr, "VQ-VAE checkpoint", "extract_codes.py")
    assert not (tmp_path / "run").exists()


def test_subprocess_extract_codes_bad_passes(pipeline, tmp_path):
    r = script("extract_codes.py", "--checkpoint", pipeline["vqvae_ckpt"], "--passes", "0", "--out",
               tmp_path / "codes.pt")
    assert_clean_error(r.returncode, r.stderr, "--passes", "at least 1")
    assert not (tmp_path / "codes.pt").exists()


@pytest.fixture
def plain_warnings(monkeypatch):
    """main() swaps warnings.formatwarning for a one-line format; restore it after the test."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


def sample_args(pipeline, tmp_path, *extra):
    return ["--checkpoint", pipeline["prior_ckpt"], "--device", "cpu", "--num", 2, "--out", tmp_path / "s.png", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--num", "0"], ["--num", "at least 1"]),
    (["--temperature", "0"], ["--temperature", "positive"]),
    (["--temperature", "-1"], ["--temperature", "positive"]),
    (["--temperature", "nan"], ["--temperature", "positive"]),
    (["--nrow", "-2"], ["--nrow"]),
    (["--class", "horses"], ["--class", "horses", "cats"]),
    (["--class", "7"], ["--class", "index from 0 to 1"]),
    (["--device", "nonsense"], ["--device", "nonsense"]),
    (["--out", "grid.jpg"], ["--out", ".png"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_sample_bad_flags(extra, words, pipeline, tmp_path, capsys, plain_warnings):
    rc, _, err = call_main(sample.main, sample_args(pipeline, tmp_path, *extra), capsys)   # a later --out wins
    assert_clean_error(rc, err, *words)
    assert not (tmp_path / "s.png").exists()


def test_sample_wrong_kinds_of_file(pipeline, tmp_path, capsys, plain_warnings):
    for path, words in [(tmp_path / "nope.pt", ["nope.pt", "does not exist"]),
                        (pipeline["vqvae_ckpt"], ["VQ-VAE checkpoint", "prior run"]),
                        (pipeline["root"] / "codes.pt", ["codes file", "prior run"])]:
        rc, _, err = call_main(sample.main, ["--checkpoint", path, "--out", tmp_path / "s.png"], capsys)
        assert_clean_error(rc, err, *words)
    torch.save({"a": 1}, tmp_path / "other.pt")
    rc, _, err = call_main(sample.main, ["--checkpoint", tmp_path / "other.pt"], capsys)
    assert_clean_error(rc, err, "other.pt", "not a file written by this repo")
    blob = pipeline["prior_ckpt"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    rc, _, err = call_main(sample.main, ["--checkpoint", tmp_path / "truncated.pt"], capsys)
    assert_clean_error(rc, err, "truncated.pt", "cannot load")


def test_sample_when_the_vqvae_has_moved(pipeline, tmp_path, capsys, plain_warnings):
    ckpt = torch.load(pipeline["prior_ckpt"], weights_only=True)
    ckpt["vqvae"]["checkpoint"] = str(tmp_path / "moved" / "checkpoint.pt")
    torch.save(ckpt, tmp_path / "prior.pt")
    args = ["--checkpoint", tmp_path / "prior.pt", "--device", "cpu", "--num", 2, "--out", tmp_path / "s.png"]
    rc, _, err = call_main(sample.main, args, capsys)
    assert_clean_error(rc, err, "moved", "does not exist", "--vqvae")
    rc, _, err = call_main(sample.main, [*args, "--vqvae", tmp_path / "elsewhere.pt"], capsys)
    assert_clean_error(rc, err, "elsewhere.pt", "does not exist")
    rc, _, err = call_main(sample.main, [*args, "--vqvae", pipeline["vqvae_ckpt"]], capsys)   # the positive control
    assert rc == 0, err


def test_class_on_an_unconditional_prior(pipeline, tmp_path, capsys, plain_warnings):
    train_prior.train_prior(prior_config(pipeline["root"] / "codes.pt", tmp_path / "run", conditional=False, steps=1,
                                         eval_every=1))
    args = ["--checkpoint", tmp_path / "run" / "checkpoint.pt", "--device", "cpu", "--num", 2, "--out",
            tmp_path / "s.png"]
    rc, _, err = call_main(sample.main, [*args, "--class", "cats"], capsys)
    assert_clean_error(rc, err, "--class", "not class-conditional")
    rc, _, err = call_main(sample.main, args, capsys)
    assert rc == 0, err


def test_extract_codes_bad_inputs(pipeline, tmp_path, capsys, plain_warnings):
    cases = [(["--checkpoint", tmp_path / "nope.pt"], ["nope.pt", "does not exist"]),
             (["--checkpoint", pipeline["prior_ckpt"]], ["not a checkpoint written by this repo's train.py"]),
             (["--checkpoint", pipeline["vqvae_ckpt"], "--passes", "-1"], ["--passes"]),
             (["--checkpoint", pipeline["vqvae_ckpt"], "--batch-size", "0"], ["--batch-size"]),
             (["--checkpoint", pipeline["vqvae_ckpt"], "--out", tmp_path], ["--out", "is a folder"]),
             (["--checkpoint", pipeline["vqvae_ckpt"], "--data", tmp_path / "gone"], ["gone", "does not exist"])]
    for argv, words in cases:
        rc, _, err = call_main(extract_codes.main, [*argv, "--device", "cpu", "--no-progress"], capsys)
        assert_clean_error(rc, err, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--channels", "0"], ["--channels", "at least 1"]),
    (["--kernel-size", "4"], ["--kernel-size", "odd"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "nan"], ["--lr", "positive"]),
    (["--dropout", "1"], ["--dropout"]),
    (["--amp", "fp16"], ["--amp", "fp16"]),
    (["--device", "nonsense"], ["--device", "nonsense"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_train_prior_bad_flags(extra, words, pipeline, tmp_path, capsys, plain_warnings):
    rc, _, err = call_main(train_prior.main, ["--codes", pipeline["root"] / "codes.pt", "--out", tmp_path / "run",
                                              "--no-progress", *extra], capsys)
    assert_clean_error(rc, err, *words)
    assert not (tmp_path / "run").exists()


def test_train_prior_bad_codes_and_runs(pipeline, tmp_path, capsys, plain_warnings):
    tiny = ["--channels", "4", "--num-layers", "1", "--kernel-size", "3", "--steps", "2", "--eval-every", "2",
            "--no-progress", "--device", "cpu", "--amp", "off"]
    rc, _, err = call_main(train_prior.main, ["--codes", tmp_path / "nope.pt", "--out", tmp_path / "run", *tiny],
                           capsys)
    assert_clean_error(rc, err, "nope.pt", "does not exist", "extract_codes.py")
    assert not (tmp_path / "run").exists()
    codes = ["--codes", pipeline["root"] / "codes.pt", "--out", tmp_path / "run"]
    assert call_main(train_prior.main, [*codes, *tiny], capsys)[0] == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    rc, _, err = call_main(train_prior.main, [*codes, *tiny], capsys)
    assert_clean_error(rc, err, "already holds a run", "step 2", "--resume", "--overwrite")
    rc, _, err = call_main(train_prior.main, [*codes, *tiny, "--resume", "--channels", "8"], capsys)
    assert_clean_error(rc, err, "--channels", "8", "checkpoint.pt")
    other = write_codes(tmp_path / "other.pt", torch.zeros(4, 4, 4), torch.zeros(2, 4, 4), 16)
    rc, _, err = call_main(train_prior.main, ["--codes", other, "--out", tmp_path / "run", *tiny, "--resume",
                                              "--steps", "4"], capsys)
    assert_clean_error(rc, err, "--codes", "other.pt")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    # without attention --heads shapes nothing, so it does not stop a resume
    assert call_main(train_prior.main, [*codes, *tiny, "--resume", "--heads", "2", "--steps", "3"], capsys)[0] == 0
    empty = write_codes(tmp_path / "empty.pt", torch.zeros(0, 4, 4), torch.zeros(2, 4, 4), 16)
    rc, _, err = call_main(train_prior.main, ["--codes", empty, "--out", tmp_path / "run2", *tiny], capsys)
    assert_clean_error(rc, err, "no training or no validation maps")


def test_evaluate_prior_bad_inputs(pipeline, tmp_path, capsys, plain_warnings):
    for argv, words in [(["--checkpoint", tmp_path / "nope.pt"], ["nope.pt", "does not exist"]),
                        (["--checkpoint", pipeline["vqvae_ckpt"]], ["VQ-VAE checkpoint"]),
                        (["--checkpoint", pipeline["prior_ckpt"], "--runs", "0"], ["--runs", "at least 1"])]:
        rc, _, err = call_main(evaluate_prior.main, [*argv, "--device", "cpu"], capsys)
        assert_clean_error(rc, err, *words)


def test_prior_flags_come_from_the_config_fields():
    c = runs.parse_args(["--channels", "8", "--no-conditional", "--lr", "0.01", "--codes", "x.pt"], PriorConfig)
    assert (c.channels, c.conditional, c.lr, c.codes) == (8, False, 0.01, "x.pt")
    assert set(runs.field_help(PriorConfig)) == set(asdict(PriorConfig()))


def test_codes_that_differ_at_a_few_near_ties_warn_and_at_many_stop():
    with pytest.warns(UserWarning, match=r"5 of 1000 validation codes \(0\.500%\) differ"):
        evaluate_prior.check_codes_agree(5, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_prior.check_codes_agree(0, 1000)                   # no difference, no warning
    with pytest.raises(runs.CheckpointError, match=r"2\.0% of the codes differ"):
        evaluate_prior.check_codes_agree(20, 1000)


def test_evaluate_prior_stops_in_one_line_when_the_codes_file_is_not_this_vqvaes(pipeline, tmp_path, capsys,
                                                                               plain_warnings):
    codes = torch.load(pipeline["root"] / "codes.pt", weights_only=True)
    k = codes["num_embeddings"]
    codes["val_codes"] = ((codes["val_codes"].long() + 1) % k).to(codes["val_codes"].dtype)   # every code differs
    torch.save(codes, tmp_path / "codes.pt")
    prior = torch.load(pipeline["prior_ckpt"], weights_only=True)
    prior["codes"] = str(tmp_path / "codes.pt")
    torch.save(prior, tmp_path / "prior.pt")
    rc, _, err = call_main(evaluate_prior.main, ["--checkpoint", tmp_path / "prior.pt", "--device", "cpu"], capsys)
    assert_clean_error(rc, err, "100.0% of the codes differ", "extract_codes.py again")
