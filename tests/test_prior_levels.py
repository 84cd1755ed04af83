"""The two-level prior of VQ-VAE-2 (hierarchical_prior.py) and the scripts on 2-level codes, each against an
independent reference: causality by the Jacobian of the logits with respect to continuous (one-hot) inputs, the
cached sampler against running the whole network once per position, a resumed run against an uninterrupted one,
validation NLLs against log-softmax by hand, unigram baselines counted here, sample.py's PNG against the decoded
maps drawn with the same seed, and the one-line errors of the wrong kind of file.

Everything is tiny (maps of at most 6x6, K <= 8, 32x32 images, freshly initialised VQ-VAEs) and on the CPU."""
import json
import math
from dataclasses import replace
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
import sample
import train_prior
from hierarchical_prior import HierarchicalPrior
from image_data import build_data
from prior import GatedPixelCNN
from test_cli_errors import assert_clean_error, call_main
from test_prior import decoder_nats_by_hand, earlier, make_class_folder, naive_sample, prior_config, write_codes


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread (conftest.py)


# ---------------------------------------------------------------------------------------------------------------
# Causality: the Jacobian of the logits with respect to one-hot code inputs


def one_hot(codes: torch.Tensor, k: int) -> torch.Tensor:
    """(1, h, w) codes -> (1, K, h, w) float64 one-hot, requiring grad: a continuous stand-in for the codes."""
    return F.one_hot(codes, k).permute(0, 3, 1, 2).double().requires_grad_(True)


def embed(onehot: torch.Tensor, embedding: torch.nn.Embedding) -> torch.Tensor:
    """(1, K, h, w) one-hot -> (1, C, h, w), what `embedding` gives for the codes (linear in the one-hot input)."""
    return torch.einsum("bkhw,kc->bchw", onehot, embedding.weight)


def dependencies(logits: torch.Tensor, inputs: list[torch.Tensor]) -> dict:
    """For each output position (i, j) of logits (1, K, H, W): for each input (1, K, h, w), the set of positions
    whose input has a non-zero gradient on a random projection of the logits at (i, j)."""
    torch.manual_seed(1)
    deps = {}
    for i in range(logits.shape[2]):
        for j in range(logits.shape[3]):
            w = torch.randn(logits.shape[1], dtype=torch.float64)
            grads = torch.autograd.grad((logits[0, :, i, j] * w).sum(), inputs, retain_graph=True, allow_unused=True)
            deps[i, j] = [set() if g is None else {tuple(p) for p in (g[0].abs().sum(0) != 0).nonzero().tolist()}
                          for g in grads]
    return deps


def two_level_logits(model: HierarchicalPrior, top: torch.Tensor, bottom: torch.Tensor, labels=None):
    """The model's top and bottom logits from one-hot inputs of both maps: (top logits, bottom logits, one-hot top,
    one-hot bottom). The top codes feed both the top prior and the conditioning stack, each through its embedding."""
    k = model.num_embeddings
    x_top, x_bottom = one_hot(top, k), one_hot(bottom, k)
    top_logits = model.top.forward_embedded(embed(x_top, model.top.embedding), labels)
    cond = model.conditioning.forward_embedded(embed(x_top, model.conditioning.embedding))
    bottom_logits = model.bottom.forward_embedded(embed(x_bottom, model.bottom.embedding), labels, cond)
    # the one-hot path is the model's own forward
    reference = model(top, bottom, labels)
    assert torch.allclose(top_logits, reference.top) and torch.allclose(bottom_logits, reference.bottom)
    return top_logits, bottom_logits, x_top, x_bottom


def conv_reach(i: int, j: int, reach: int, size: int) -> set:
    """The positions the two stacks of `reach` = L * (k // 2) can see from (i, j) of a size x size map."""
    above = {(r, c) for r in range(i - 1 - reach, i) for c in range(j - reach, j + reach + 1)}
    left = {(i, c) for c in range(j - 1 - reach, j)}
    return {(r, c) for r, c in above | left if 0 <= r < size and 0 <= c < size}


def test_top_prior_without_attention_sees_exactly_the_earlier_top_codes_and_no_bottom_code():
    """Reach 4 * (3 // 2) = 4 covers a 5x5 map: every earlier top position, nothing at or after it, no bottom code."""
    torch.manual_seed(0)
    model = HierarchicalPrior(6, 2, channels=8, num_layers=4, kernel_size=3, cond_channels=4, cond_blocks=1).double()
    top, bottom = torch.randint(6, (1, 5, 5)), torch.randint(6, (1, 10, 10))
    top_logits, _, x_top, x_bottom = two_level_logits(model.eval(), top, bottom, torch.tensor([1]))
    for (i, j), (found_top, found_bottom) in dependencies(top_logits, [x_top, x_bottom]).items():
        assert found_top == earlier(i, j, 5), (i, j, sorted(found_top ^ earlier(i, j, 5)))
        assert found_bottom == set(), (i, j)


def test_top_prior_with_attention_is_strictly_causal_and_reaches_beyond_the_convolutions():
    """Two layers of k = 3 reach 2 rows up; the attention block after the first lets the last position see the first
    (the same model without attention cannot), and no position sees itself or anything later, in training mode too
    (dropout on)."""
    deps = {}
    for attention in (False, True):
        torch.manual_seed(0)
        model = GatedPixelCNN(6, 0, channels=8, num_layers=2, kernel_size=3, dropout=0.2, attention=attention,
                              heads=2).double().train()
        x = one_hot(torch.randint(6, (1, 5, 5)), 6)
        deps[attention] = dependencies(model.forward_embedded(embed(x, model.embedding)), [x])
    for (i, j), (found,) in deps[True].items():
        assert found <= earlier(i, j, 5), (i, j, sorted(found - earlier(i, j, 5)))
        assert found >= deps[False][i, j][0], (i, j)
    for (i, j), (found,) in deps[False].items():
        assert found == conv_reach(i, j, 2, 5), (i, j)
    assert (0, 0) in deps[True][4, 4][0] and (0, 0) not in deps[False][4, 4][0]


def test_bottom_prior_sees_every_top_code_and_only_earlier_bottom_codes():
    """Reach 3 * (5 // 2) = 6 covers a 6x6 bottom map; the conditioning stack (3x3 convolution and one residual block
    at the top resolution) covers the whole 3x3 top map from every bottom position, (0, 0) included."""
    torch.manual_seed(0)
    model = HierarchicalPrior(7, 0, channels=8, num_layers=3, kernel_size=5, dropout=0.3, attention=True, heads=2,
                              cond_channels=4, cond_blocks=1).double()
    top, bottom = torch.randint(7, (1, 3, 3)), torch.randint(7, (1, 6, 6))
    _, bottom_logits, x_top, x_bottom = two_level_logits(model.eval(), top, bottom)
    every_top = {(r, c) for r in range(3) for c in range(3)}
    for (i, j), (found_top, found_bottom) in dependencies(bottom_logits, [x_top, x_bottom]).items():
        assert found_bottom == earlier(i, j, 6), (i, j, sorted(found_bottom ^ earlier(i, j, 6)))
        assert found_top == every_top, (i, j)


# ---------------------------------------------------------------------------------------------------------------
# The cached sampler against the whole network run once per position


def randomise(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Every weight drawn from N(0, scale^2): a freshly initialised prior's logits are so near uniform that the
    conditioning map or the attention block barely moves a sample, so a sampler that mishandled them would pass."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


@pytest.mark.parametrize("kind", ["attention", "attention+classes", "map"])
def test_fast_sampling_with_attention_or_a_conditioning_map_equals_the_naive_sampler(kind):
    torch.manual_seed(0)
    classes = 3 if "classes" in kind else 0
    model = GatedPixelCNN(9, classes, channels=8, num_layers=3, kernel_size=3, dropout=0.2,
                          attention="attention" in kind, heads=2, cond_channels=5 if kind == "map" else 0)
    randomise(model.double())
    labels = torch.tensor([2, 0, 1]) if classes else None
    cond = torch.randn(3, 5, 5, 6, dtype=torch.float64) if kind == "map" else None
    fast = model.sample(3, (5, 6), 0.8, labels, torch.Generator().manual_seed(3), cond)
    model.eval()
    with torch.no_grad():
        reference = naive_sample(lambda z, y: model(z, y, cond), 3, (5, 6), 0.8, labels,
                                 torch.Generator().manual_seed(3))
    assert torch.equal(fast, reference)


def test_two_level_sampling_equals_drawing_top_then_bottom_by_full_recompute():
    torch.manual_seed(0)
    model = randomise(HierarchicalPrior(7, 2, channels=8, num_layers=3, kernel_size=3, dropout=0.2, attention=True,
                                        heads=2, cond_channels=4, cond_blocks=1).double())
    labels = torch.tensor([1, 0, 1])
    fast = model.sample(3, (6, 4), 0.9, labels, torch.Generator().manual_seed(11))
    assert model.training                                                            # mode restored
    g = torch.Generator().manual_seed(11)
    model.eval()
    with torch.no_grad():
        top = naive_sample(lambda z, y: model(z, torch.zeros(3, 6, 4, dtype=torch.long), y).top, 3, (3, 2), 0.9,
                           labels, g)
        bottom = naive_sample(lambda z, y: model(top, z, y).bottom, 3, (6, 4), 0.9, labels, g)
    assert torch.equal(fast.top, top) and torch.equal(fast.bottom, bottom)
    assert fast.top.shape == (3, 3, 2) and fast.bottom.shape == (3, 6, 4)


# ---------------------------------------------------------------------------------------------------------------
# train_prior.py on a 2-level codes file made here


def write_codes2(path: Path, train: tuple, val: tuple, k: int, classes: list[str] = (), vqvae: Path | None = None,
                 vqvae_config: dict | None = None):
    """A 2-level codes file in extract_codes.py's format: train and val are (top, bottom, labels)."""
    (tt, tb, tl), (vt, vb, vl) = train, val
    torch.save({"format": extract_codes.CODES_FORMAT, "levels": 2,
                "train_codes": tb.to(torch.uint8), "val_codes": vb.to(torch.uint8),
                "train_codes_top": tt.to(torch.uint8), "val_codes_top": vt.to(torch.uint8),
                "train_labels": tl, "val_labels": vl, "classes": list(classes), "num_embeddings": k,
                "vqvae_checkpoint": str(vqvae or path.parent / "none.pt"), "vqvae_config": vqvae_config or {},
                "vqvae_step": 0, "data": "synthetic", "description": "synthetic", "passes": 1}, path)
    return path


def copied_maps(n: int, k: int, seed: int) -> tuple:
    """Uniform random 2x2 top maps, and bottom maps that repeat each top code over its 2x2 block; labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(k, (n, 2, 2), generator=g)
    return top, top.repeat_interleave(2, 1).repeat_interleave(2, 2), torch.arange(n) % 2


def log_likelihood_by_hand(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """-sum over the map of log softmax(logits)[code]: (B, K, h, w), (B, h, w) -> (B,) nats, float64."""
    return -torch.log_softmax(logits.double(), 1).gather(1, codes[:, None]).sum((1, 2, 3))


def two_level_config(codes: Path, out: Path, **kw):
    return prior_config(codes, out, attention=True, heads=2, cond_channels=4, cond_blocks=1, **kw)


def test_two_level_run_writes_one_folder_and_resumes_exactly(tmp_path):
    codes = write_codes2(tmp_path / "codes.pt", copied_maps(32, 4, 0), copied_maps(8, 4, 1), 4, ["a", "b"])
    straight = train_prior.train_prior(two_level_config(codes, tmp_path / "a", steps=6, eval_every=3, dropout=0.3))
    train_prior.train_prior(two_level_config(codes, tmp_path / "b", steps=3, eval_every=3, dropout=0.3))
    resumed = train_prior.train_prior(two_level_config(codes, tmp_path / "b", steps=6, eval_every=3, dropout=0.3,
                                                       resume=True))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"top", "conditioning", "bottom"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.final == resumed.final
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for name in ("top_nll_nats", "bottom_nll_nats", "nll_nats_per_image"):
        assert [r[name] for r in records] == [json.loads(line)[name] for line in
                                              (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (ckpt["levels"], ckpt["map_shape"], ckpt["top_map_shape"], ckpt["step"]) == (2, [4, 4], [2, 2], 6)
    assert ckpt["model_args"]["attention"] and ckpt["model_args"]["cond_channels"] == 4
    model, _, _ = prior_checkpoint.load_prior(tmp_path / "b" / "checkpoint.pt")
    assert isinstance(model, HierarchicalPrior) and model.top.attention is not None
    assert model.bottom.attention is None and model.num_classes == 2


def test_two_level_validation_nll_per_level_and_per_image_by_hand(tmp_path):
    codes = write_codes2(tmp_path / "codes.pt", copied_maps(32, 4, 0), copied_maps(8, 4, 1), 4, ["a", "b"])
    result = train_prior.train_prior(two_level_config(codes, tmp_path / "run", steps=2, eval_every=2))
    top, bottom, labels = copied_maps(8, 4, 1)
    with torch.no_grad():
        logits = result.model(top, bottom, labels)
    nll = [log_likelihood_by_hand(l, z) for l, z in zip(logits, (top, bottom))]
    final = result.final
    assert final["top_nll_nats"] == pytest.approx(nll[0].sum().item() / (8 * 4), rel=1e-5)
    assert final["bottom_nll_nats"] == pytest.approx(nll[1].sum().item() / (8 * 16), rel=1e-5)
    assert final["top_nll_bits"] == pytest.approx(final["top_nll_nats"] / math.log(2))
    assert final["nll_nats_per_image"] == pytest.approx((nll[0] + nll[1]).mean().item(), rel=1e-5)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_bottom_nll_nats"] == final["bottom_nll_nats"] and "val_nll_nats" not in last


def test_the_bottom_prior_learns_to_copy_the_top_map(tmp_path):
    """Each bottom code repeats its top code: without the top map one code in four is a uniform guess, at least
    ln(4) / 4 = 0.347 nats per bottom code; given it, every bottom code is determined."""
    codes = write_codes2(tmp_path / "codes.pt", copied_maps(64, 4, 0), copied_maps(16, 4, 1), 4)
    config = prior_config(codes, tmp_path / "run", channels=8, num_layers=1, steps=30, batch_size=16, lr=3e-2,
                          eval_every=30, log_every=10, cond_channels=8, cond_blocks=1)
    final = train_prior.train_prior(config).final
    assert final["bottom_nll_nats"] < 0.15, final
    assert final["top_nll_nats"] > 1.0, final                   # the top maps are uniform: ln 4 = 1.386 per code


# ---------------------------------------------------------------------------------------------------------------
# The scripts on a 2-level VQ-VAE: a freshly initialised VQVAE2 on 32x32 images, its codes, a tiny prior

TINY_VQ = dict(image_size=32, hidden_channels=8, residual_channels=4, num_residual_blocks=1, embedding_dim=4,
               num_embeddings=8, device="cpu", amp="off", num_workers=0)


def save_vqvae(path: Path, config: checkpoint.Config) -> Path:
    torch.manual_seed(0)
    model = checkpoint.build_model(config)
    checkpoint.save_checkpoint(path, model, torch.optim.Adam(model.parameters()), 0, config, 1.0, 0.0)
    return path


@pytest.fixture(scope="module")
def levels2(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels2")
    data = make_class_folder(root / "photos")
    base = checkpoint.Config(data=str(data), prepared_dir=str(root / "prepared"), **TINY_VQ)
    vq2 = save_vqvae(root / "vq2.pt", replace(base, levels=2, top_num_embeddings=4))   # K = 4 top, 8 bottom
    vq1 = save_vqvae(root / "vq1.pt", base)
    extract_codes.extract_codes(vq2, root / "codes.pt", passes=2, device="cpu", progress=False)
    config = two_level_config(root / "codes.pt", root / "prior", steps=2, eval_every=2, batch_size=4)
    train_prior.train_prior(config)
    return {"root": root, "data": data, "vq1": vq1, "vq2": vq2, "prior": root / "prior" / "checkpoint.pt"}


def png_tiles(path: Path, num: int, size: int) -> list[np.ndarray]:
    """The tiles of a one-row grid written by sample.save_grid (padding 2)."""
    grid = np.asarray(Image.open(path))
    return [grid[2:2 + size, 2 + t * (size + 2):2 + t * (size + 2) + size] for t in range(num)]


def test_sample_draws_top_then_bottom_and_decodes_the_pair(levels2, tmp_path, capsys):
    argv = ["--checkpoint", levels2["prior"], "--num", 3, "--nrow", 3, "--device", "cpu", "--class", "dogs",
            "--temperature", 0.7, "--seed", 4]
    assert call_main(sample.main, [*argv, "--out", tmp_path / "a.png"], capsys)[0] == 0
    assert call_main(sample.main, [*argv, "--out", tmp_path / "b.png", "--seed", 5], capsys)[0] == 0
    # independent: the same draw by hand, decoded with decode((top, bottom)), as torchvision writes it to uint8
    prior, _, _ = prior_checkpoint.load_prior(levels2["prior"])
    vqvae, _, _ = checkpoint.load_checkpoint(levels2["vq2"])
    top, bottom = prior.sample(3, (8, 8), 0.7, torch.full((3,), 1), torch.Generator().manual_seed(4))
    assert top.shape == (3, 4, 4) and bottom.shape == (3, 8, 8)
    images = (vqvae.decode((top, bottom)) + 0.5).clamp(0, 1)
    expected = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    tiles = png_tiles(tmp_path / "a.png", 3, 32)
    for t in range(3):
        assert np.array_equal(tiles[t], expected[t]), t
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_evaluate_prior_reports_each_level_and_the_image(levels2, capsys):
    rc, out, err = call_main(evaluate_prior.main, ["--checkpoint", levels2["prior"], "--device", "cpu"], capsys)
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert "bottom nats/code" in out and "per image, both levels" in out
    codes = torch.load(levels2["root"] / "codes.pt", weights_only=True)
    assert (codes["num_embeddings_top"], codes["num_embeddings"]) == (4, 8)
    prior, _, _ = prior_checkpoint.load_prior(levels2["prior"])
    top, bottom, labels = codes["val_codes_top"].long(), codes["val_codes"].long(), codes["val_labels"]
    with torch.no_grad():
        logits = prior(top, bottom, labels)
    assert [l.shape[1] for l in logits] == [4, 8]                                   # each level's own K
    nll = [log_likelihood_by_hand(l, z) for l, z in zip(logits, (top, bottom))]
    per_image = 0.0
    for name, n, k, level_nll, train_maps, val_maps in (("top", 16, 4, nll[0], codes["train_codes_top"], top),
                                                         ("bottom", 64, 8, nll[1], codes["train_codes"], bottom)):
        assert r[name]["prior_nats_per_code"] == pytest.approx(level_nll.mean().item() / n, rel=1e-5)
        assert r[name]["uniform_nats_per_code"] == pytest.approx(math.log(k))
        counts = np.bincount(train_maps.numpy().ravel(), minlength=k) + 1.0        # add-one, counted on training
        unigram = -np.log(counts / counts.sum())[val_maps.numpy().ravel()].mean()
        assert r[name]["unigram_nats_per_code"] == pytest.approx(unigram)
        per_image += unigram * n
    assert r["unigram_nats_per_image"] == pytest.approx(per_image)
    assert r["prior_nats_per_image"] == pytest.approx((nll[0] + nll[1]).mean().item(), rel=1e-5)
    assert r["reduction_vs_unigram"] == pytest.approx(1 - r["prior_nats_per_image"] / per_image, rel=1e-5)
    assert (f"PixelCNN {r['prior_nats_per_image']:.2f} nats, unigram {per_image:.2f} nats: "
            f"{1 - (nll[0] + nll[1]).mean().item() / per_image:.1%} lower\n") in out          # the figures, no verdict
    assert not {"PASS", "FAIL", "floor"} & set(out.replace(":", " ").replace("(", " ").split())
    dims = 3 * 32 * 32
    assert r["bpd_prior_term"]["uniform"] == pytest.approx((16 * math.log(4) + 64 * math.log(8)) / (dims * math.log(2)))
    assert r["bpd_prior_term"]["pixelcnn"] == pytest.approx(r["prior_nats_per_image"] / (dims * math.log(2)))
    # the decoder term, independently: each validation image through the VQ-VAE-2's forward pass
    vqvae, _, _ = checkpoint.load_checkpoint(levels2["vq2"])
    val = build_data(str(levels2["data"]), 32, prepared_dir=str(levels2["root"] / "prepared")).val
    assert r["decoder_nats_per_image"] == pytest.approx(decoder_nats_by_hand(vqvae, val, r["decoder_sigma"]),
                                                        rel=1e-6)
    for name in ("uniform", "unigram", "pixelcnn"):
        assert r["bits_per_dim_bound"][name] == pytest.approx(r["bpd_prior_term"][name] + r["decoder_bits_per_dim"])


# ---------------------------------------------------------------------------------------------------------------
# The wrong kind of file: one error line that says what to pass


@pytest.fixture
def plain_warnings(monkeypatch):
    import warnings
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


def test_sample_and_evaluate_with_a_vqvae_of_the_other_kind(levels2, tmp_path, capsys, plain_warnings):
    base = ["--device", "cpu", "--num", 2, "--out", tmp_path / "s.png"]
    rc, _, err = call_main(sample.main, ["--checkpoint", levels2["prior"], *base, "--vqvae", levels2["vq1"]], capsys)
    assert_clean_error(rc, err, "vq1.pt", "1-level VQ-VAE", "2-level codes", "--vqvae", "--levels 2")
    # a prior whose codes came from a 1-level VQ-VAE, given (or naming) the 2-level one
    one = write_codes(tmp_path / "codes1.pt", torch.zeros(8, 8, 8), torch.zeros(2, 8, 8), 8)
    codes = torch.load(one, weights_only=True)
    codes["vqvae_checkpoint"] = str(levels2["vq2"])
    torch.save(codes, one)
    train_prior.train_prior(prior_config(one, tmp_path / "prior1", steps=1, eval_every=1))
    prior1 = tmp_path / "prior1" / "checkpoint.pt"
    for extra in ([], ["--vqvae", levels2["vq2"]]):
        rc, _, err = call_main(sample.main, ["--checkpoint", prior1, *base, *extra], capsys)
        assert_clean_error(rc, err, "vq2.pt", "2-level VQ-VAE", "1-level codes", "--vqvae", "--levels 1")
    rc, _, err = call_main(evaluate_prior.main, ["--checkpoint", prior1, "--device", "cpu"], capsys)
    assert_clean_error(rc, err, "2-level VQ-VAE", "--vqvae")
    rc, _, err = call_main(evaluate_prior.main, ["--checkpoint", levels2["prior"], "--device", "cpu", "--vqvae",
                                                 levels2["vq1"]], capsys)
    assert_clean_error(rc, err, "1-level VQ-VAE", "--vqvae")
    # a 2-level VQ-VAE whose top codebook is not the prior's (8 codes, not 4)
    other = save_vqvae(tmp_path / "vq2k8.pt", replace(checkpoint.load_checkpoint(levels2["vq2"])[1],
                                                      top_num_embeddings=8))
    rc, _, err = call_main(sample.main, ["--checkpoint", levels2["prior"], *base, "--vqvae", other], capsys)
    assert_clean_error(rc, err, "vq2k8.pt", "8 and 8 codes", "models 4 and 8", "the VQ-VAE the prior was trained on")
    assert not (tmp_path / "s.png").exists()
    rc, _, err = call_main(sample.main, ["--checkpoint", levels2["prior"], *base], capsys)   # the positive control
    assert rc == 0, err


def test_evaluate_prior_when_the_codes_file_became_the_other_kind(levels2, tmp_path, capsys, plain_warnings):
    write_codes(tmp_path / "codes1.pt", torch.zeros(8, 8, 8), torch.zeros(2, 8, 8), 8)
    ckpt = torch.load(levels2["prior"], weights_only=True)
    ckpt["codes"] = str(tmp_path / "codes1.pt")
    torch.save(ckpt, tmp_path / "prior.pt")
    rc, _, err = call_main(evaluate_prior.main, ["--checkpoint", tmp_path / "prior.pt", "--device", "cpu"], capsys)
    assert_clean_error(rc, err, "2-level codes", "1-level codes", "extract")


def test_train_prior_given_the_other_kind(tmp_path, capsys, plain_warnings):
    tiny = ["--channels", "4", "--num-layers", "2", "--kernel-size", "3", "--steps", "1", "--eval-every", "1",
            "--batch-size", "4", "--no-progress", "--device", "cpu", "--amp", "off"]
    codes = tmp_path / "codes.pt"
    write_codes2(codes, copied_maps(8, 4, 0), copied_maps(4, 4, 1), 4)
    out = ["--codes", codes, "--out", tmp_path / "run"]
    assert call_main(train_prior.main, [*out, *tiny], capsys)[0] == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    write_codes(codes, torch.zeros(8, 4, 4), torch.zeros(4, 4, 4), 4)         # the same path, now 1-level codes
    rc, _, err = call_main(train_prior.main, [*out, *tiny, "--resume", "--steps", "2"], capsys)
    assert_clean_error(rc, err, "2-level codes", "1-level codes", "another --out")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    rc, _, err = call_main(train_prior.main, ["--codes", codes, "--out", tmp_path / "r1", *tiny, "--cond-channels", 8],
                           capsys)
    assert_clean_error(rc, err, "--cond-channels", "1-level codes")
    broken = torch.load(codes, weights_only=True)
    broken["levels"] = 2                                                          # says 2 levels, has no top maps
    torch.save(broken, tmp_path / "broken.pt")
    rc, _, err = call_main(train_prior.main, ["--codes", tmp_path / "broken.pt", "--out", tmp_path / "r2", *tiny],
                           capsys)
    assert_clean_error(rc, err, "2 levels", "top maps", "extract_codes.py")
    rc, _, err = call_main(train_prior.main, [*out, *tiny, "--overwrite", "--attention", "--heads", "3"], capsys)
    assert_clean_error(rc, err, "--channels", "--heads")
