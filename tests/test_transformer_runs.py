"""The transformer prior in the pipeline (train_prior.py --arch transformer, sample.py, evaluate_prior.py, the codec,
2-level codes): a run writes a checkpoint that rebuilds it and resumes exactly; greedy decoding by --top-k 1 is the
argmax of the model's own full forward pass; --cfg 0 ignores the class; the validation NLL is the cross-entropy of
one forward pass; the codec round-trips a photo through it; every bad input is one line and exit status 2; and
checkpoints written before --arch existed still load and resume as PixelCNN priors.

Everything is tiny and on the CPU."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import codec
import evaluate
import evaluate_prior
import extract_codes
import prior_checkpoint
import sample
import train_prior
from hierarchical_prior import HierarchicalPrior
from prior import GatedPixelCNN
from prior_checkpoint import PriorConfig
from test_cli_errors import assert_clean_error, call_main
from test_codec import TINY_VQ, photo, save_vqvae
from test_prior import make_class_folder, pipeline, plain_warnings, prior_config  # noqa: F401 (fixtures)
from test_prior_levels import copied_maps, log_likelihood_by_hand, write_codes2
from transformer_prior import TransformerPrior

TINY = dict(arch="transformer", width=16, depth=2, heads=2, dropout=0.1, class_dropout=0.5)


def transformer_config(codes, out, **kw) -> PriorConfig:
    return prior_config(codes, out, **{**TINY, **kw})


@pytest.fixture(scope="module")
def trained(pipeline, tmp_path_factory):  # noqa: F811
    """A class-conditional transformer on the pipeline's 4x4 codes (K = 16, classes cats and dogs)."""
    root = tmp_path_factory.mktemp("transformer")
    config = transformer_config(pipeline["root"] / "codes.pt", root / "prior")
    return {**pipeline, "t_config": config, "t_result": train_prior.train_prior(config),
            "t_ckpt": root / "prior" / "checkpoint.pt", "t_root": root}


def test_a_transformer_run_writes_a_checkpoint_that_rebuilds_it(trained):
    ckpt = torch.load(trained["t_ckpt"], weights_only=True)
    assert ckpt["model_args"] == {"arch": "transformer", "width": 16, "depth": 2, "heads": 2, "class_dropout": 0.5,
                                  "num_embeddings": 16, "num_classes": 2, "shape": [4, 4], "dropout": 0.1}
    assert ckpt["config"] == {**json.loads((trained["t_root"] / "prior" / "config.json").read_text())}
    model, config, _ = prior_checkpoint.load_prior(trained["t_ckpt"])
    assert isinstance(model, TransformerPrior) and not model.training and config == trained["t_config"]
    codes, labels = trained["codes"]["val_codes"].long(), trained["codes"]["val_labels"]
    with torch.no_grad():
        logits = model(codes, labels)
        assert torch.equal(logits, trained["t_result"].model(codes, labels))
    by_hand = log_likelihood_by_hand(logits, codes).sum().item() / codes.numel()
    assert trained["t_result"].final["nll_nats"] == pytest.approx(by_hand, rel=1e-5)


def test_a_transformer_run_resumes_exactly(trained, tmp_path):
    """Dropout and class dropout draw from the RNG, so the resumed run matches only if its state came back too."""
    codes = trained["root"] / "codes.pt"
    straight = train_prior.train_prior(transformer_config(codes, tmp_path / "a", steps=8, eval_every=4, dropout=0.3))
    train_prior.train_prior(transformer_config(codes, tmp_path / "b", steps=4, eval_every=4, dropout=0.3))
    resumed = train_prior.train_prior(transformer_config(codes, tmp_path / "b", steps=8, eval_every=4, dropout=0.3,
                                                         resume=True))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.final == resumed.final


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
@pytest.mark.parametrize("shaping", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_a_tiny_top_p_decode_greedily(trained, kind, shaping):
    """Keeping one code per step gives the map whose every code is the argmax of the logits of one full forward
    pass over that map (the model's own teacher-forced prediction), for either prior."""
    prior, _, ckpt = prior_checkpoint.load_prior(trained["prior_ckpt" if kind == "pixelcnn" else "t_ckpt"])
    prior = prior.double()
    vqvae = checkpoint.load_vqvae_for(ckpt, torch.device("cpu"))
    labels = torch.tensor([0, 1, 1])
    codes, _ = sample.generate(prior, vqvae.double(), 3, (4, 4), 1.0, labels, seed=1, **shaping)
    with torch.no_grad():
        assert torch.equal(codes, prior(codes, labels).argmax(1))
    other, _ = sample.generate(prior, vqvae.double(), 3, (4, 4), 1.0, labels, seed=2, **shaping)
    assert torch.equal(codes, other)                                               # no randomness left


def run_sample(trained, tmp_path, capsys, name, *extra, checkpoint=None):
    argv = ["--checkpoint", checkpoint or trained["t_ckpt"], "--num", 4, "--device", "cpu", "--out",
            tmp_path / f"{name}.png", *extra]
    rc, out, err = call_main(sample.main, argv, capsys)
    assert rc == 0, err
    return np.asarray(Image.open(tmp_path / f"{name}.png")), out


def test_sample_cli_with_top_k_top_p_and_cfg(trained, tmp_path, capsys):
    a, out = run_sample(trained, tmp_path, capsys, "a", "--top-k", 5, "--top-p", 0.9, "--cfg", 2, "--class", "dogs")
    assert "top-k 5, top-p 0.9, cfg 2.0" in out
    b, _ = run_sample(trained, tmp_path, capsys, "b", "--top-k", 5, "--top-p", 0.9, "--cfg", 2, "--class", "dogs")
    c, _ = run_sample(trained, tmp_path, capsys, "c", "--top-k", 5, "--top-p", 0.9, "--cfg", 2, "--class", "dogs",
                      "--seed", 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # top-k and top-p sample a PixelCNN prior too
    run_sample(trained, tmp_path, capsys, "p", "--top-k", 3, "--top-p", 0.5, checkpoint=trained["prior_ckpt"])


def test_guidance_0_draws_the_same_maps_for_every_class(trained):
    """At scale 0 the guided logits are the unconditional prior's, whatever the class; the plain conditional prior
    (whose class embeddings are made far apart here, so the class matters) draws other maps for other classes."""
    prior, _, ckpt = prior_checkpoint.load_prior(trained["t_ckpt"])
    with torch.no_grad():
        prior.start.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))
    vqvae = checkpoint.load_vqvae_for(ckpt, torch.device("cpu"))

    def draw(label, guidance):
        return sample.generate(prior, vqvae, 8, (4, 4), 1.0, torch.full((8,), label), 3, guidance=guidance)[0]

    assert torch.equal(draw(0, 0.0), draw(1, 0.0))
    assert not torch.equal(draw(0, None), draw(1, None))
    assert not torch.equal(draw(0, 0.0), draw(0, None))


@pytest.fixture(scope="module")
def other_transformers(trained):
    """A transformer trained without class dropout and one without classes (one step each)."""
    codes, root = trained["root"] / "codes.pt", trained["t_root"]
    train_prior.train_prior(transformer_config(codes, root / "no-dropout", class_dropout=0.0, steps=1, eval_every=1))
    train_prior.train_prior(transformer_config(codes, root / "no-classes", conditional=False, steps=1, eval_every=1))
    return {"no-dropout": root / "no-dropout" / "checkpoint.pt", "no-classes": root / "no-classes" / "checkpoint.pt",
            "pixelcnn": trained["prior_ckpt"], "transformer": trained["t_ckpt"]}


BAD_SAMPLE_INPUTS = [
    ("transformer", ["--top-k", "0"], ["--top-k", "from 1 to", "K = 16", "got 0"]),
    ("transformer", ["--top-k", "17"], ["--top-k", "K = 16", "got 17"]),
    ("pixelcnn", ["--top-k", "17"], ["--top-k", "K = 16"]),
    ("transformer", ["--top-p", "0"], ["--top-p", "(0, 1]"]),
    ("transformer", ["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    ("transformer", ["--top-p", "nan"], ["--top-p", "(0, 1]"]),
    ("transformer", ["--cfg", "nan"], ["--cfg", "finite"]),
    ("transformer", ["--class", "horses"], ["--class", "horses", "cats"]),
    ("pixelcnn", ["--cfg", "2"], ["--cfg", "PixelCNN", "--arch transformer", "leave --cfg out"]),
    ("no-dropout", ["--cfg", "2"], ["--cfg", "--class-dropout 0", "--class-dropout 0.1"]),
    ("no-classes", ["--cfg", "2"], ["--cfg", "no classes", "leave --cfg out"]),
]


@pytest.mark.parametrize("prior, extra, words", BAD_SAMPLE_INPUTS,
                         ids=[f"{prior} {' '.join(extra)}" for prior, extra, _ in BAD_SAMPLE_INPUTS])
def test_sample_bad_inputs(prior, extra, words, other_transformers, tmp_path, capsys, plain_warnings):  # noqa: F811
    argv = ["--checkpoint", other_transformers[prior], "--device", "cpu", "--num", 2, "--out", tmp_path / "s.png",
            *extra]
    rc, _, err = call_main(sample.main, argv, capsys)
    assert rc == 2
    assert_clean_error(rc, err, *words)
    assert not (tmp_path / "s.png").exists()


def test_a_prior_where_a_vqvae_is_expected_and_the_reverse(trained, tmp_path, capsys, plain_warnings):  # noqa: F811
    for main, argv in [(evaluate.main, ["--checkpoint", trained["t_ckpt"]]),
                       (extract_codes.main, ["--checkpoint", trained["t_ckpt"], "--out", tmp_path / "codes.pt",
                                             "--no-progress"])]:
        rc, _, err = call_main(main, [*argv, "--device", "cpu"], capsys)
        assert rc == 2
        assert_clean_error(rc, err, "prior checkpoint (train_prior.py)", "VQ-VAE")
    for main in (sample.main, evaluate_prior.main):
        rc, _, err = call_main(main, ["--checkpoint", trained["vqvae_ckpt"], "--device", "cpu"], capsys)
        assert rc == 2
        assert_clean_error(rc, err, "VQ-VAE checkpoint", "prior run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, words", [
    (["--arch", "lstm"], ["--arch", "pixelcnn or transformer", "lstm"]),
    (["--arch", "transformer", "--width", "30", "--heads", "4"], ["--width", "30", "multiple of --heads"]),
    (["--arch", "transformer", "--depth", "0"], ["--depth", "at least 1"]),
    (["--arch", "transformer", "--class-dropout", "1"], ["--class-dropout", "[0, 1)"]),
    (["--arch", "transformer", "--attention"], ["--attention", "leave it out"]),
    (["--width", "64"], ["--width", "transformer", "--arch transformer"]),
    (["--class-dropout", "0.2"], ["--class-dropout", "--arch transformer"]),
    (["--compile-mode", "fast"], ["--compile-mode", "fast"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_train_prior_bad_transformer_flags(extra, words, trained, tmp_path, capsys, plain_warnings):  # noqa: F811
    rc, _, err = call_main(train_prior.main, ["--codes", trained["root"] / "codes.pt", "--out", tmp_path / "run",
                                              "--no-progress", *extra], capsys)
    assert rc == 2
    assert_clean_error(rc, err, *words)
    assert not (tmp_path / "run").exists()


def test_resuming_with_the_other_arch_is_refused(trained, tmp_path, capsys, plain_warnings):  # noqa: F811
    run = ["--codes", trained["root"] / "codes.pt", "--out", tmp_path / "run", "--no-progress", "--device", "cpu",
           "--amp", "off", "--steps", "1", "--eval-every", "1", "--width", "16", "--depth", "1", "--heads", "2"]
    assert call_main(train_prior.main, [*run, "--arch", "transformer"], capsys)[0] == 0
    rc, _, err = call_main(train_prior.main, [*run[:-6], "--resume", "--steps", "2"], capsys)
    assert_clean_error(rc, err, "--arch transformer", "not pixelcnn")
    rc, _, err = call_main(train_prior.main, [*run, "--arch", "transformer", "--resume", "--steps", "2",
                                              "--heads", "4"], capsys)
    assert_clean_error(rc, err, "--heads", "4")


def test_evaluate_prior_reports_the_transformer(trained, capsys):
    r = evaluate_prior.evaluate_prior(str(trained["t_ckpt"]), torch.device("cpu"), bits_per_dim=True, time_runs=1)
    model, _, _ = prior_checkpoint.load_prior(trained["t_ckpt"])
    codes, labels = trained["codes"]["val_codes"].long(), trained["codes"]["val_labels"]
    with torch.no_grad():
        by_hand = log_likelihood_by_hand(model(codes, labels), codes).sum().item() / codes.numel()
    assert r["arch"] == "transformer" and r["prior_nats_per_code"] == pytest.approx(by_hand, rel=1e-6)
    assert set(r["bits_per_dim_bound"]) == {"uniform", "unigram", "transformer"}
    assert r["bpd_prior_term"]["transformer"] == pytest.approx(by_hand * 16 / (3 * 16 * 16 * np.log(2)), rel=1e-6)
    evaluate_prior.print_report(r)
    out = capsys.readouterr().out
    assert "  transformer " in out and "transformer vs unigram" in out and "PixelCNN" not in out
    assert r["sampling"]["num"] == 16


def test_the_codec_round_trips_through_a_transformer_with_its_no_class_token(trained, tmp_path):
    """A transformer trained on the labelled codes with class dropout codes without a class (its "no class" token);
    the payload costs that unconditional NLL, and the round trip is exact."""
    models = codec.load_models(trained["t_ckpt"])
    image = codec.read_photo(photo(tmp_path / "p.png", 32, 16))
    data = codec.compress(models, image)
    decoded = codec.decompress(models, data)
    x = image.float().div(255)[None]
    expected = models.vqvae.decode_images(models.vqvae.encode_images(x))[0].mul(255).round().to(torch.uint8)
    assert torch.equal(decoded, expected)
    (codes,), _ = codec.encode_photo(models, image)                                 # (4, 8): two 4x4 tiles
    tiles = codes.view(1, 4, 2, 4).permute(0, 2, 1, 3).reshape(2, 4, 4)            # (th, 2, tw) -> (2, th, tw)
    with torch.no_grad():
        nll_bits = log_likelihood_by_hand(models.prior(tiles), tiles).sum().item() / np.log(2)
    payload_bits = 8 * (len(data) - codec.HEADER.size - codec.LEVEL.size - codec.TAIL.size)
    assert nll_bits - 1 <= payload_bits <= 1.01 * nll_bits + 64


def test_the_codec_refuses_a_conditional_transformer_without_class_dropout(other_transformers):
    with pytest.raises(prior_checkpoint.ConfigError, match="class-conditional prior.*--class-dropout"):
        codec.load_models(other_transformers["no-dropout"])


# ---------------------------------------------------------------------------------------------------------------
# Two levels: a transformer over the top map, the conditioned PixelCNN over the bottom map


def test_two_level_pixelcnn_arguments_are_those_of_before():
    args = prior_checkpoint.model_args(PriorConfig(), 8, ["a"], 2, 4, (2, 2))
    assert args == {"num_embeddings": 8, "num_classes": 1, "channels": 32, "num_layers": 8, "kernel_size": 5,
                    "dropout": 0.1, "attention": False, "heads": 4, "cond_channels": 32, "cond_blocks": 2,
                    "top_num_embeddings": 4}
    assert prior_checkpoint.model_args(PriorConfig(), 8, [], 1, None, (4, 4)) == {
        "num_embeddings": 8, "num_classes": 0, "channels": 32, "num_layers": 8, "kernel_size": 5, "dropout": 0.1}


def test_two_level_transformer_top_trains_samples_and_conditions_the_bottom(tmp_path):
    codes = write_codes2(tmp_path / "codes.pt", copied_maps(32, 4, 0), copied_maps(8, 4, 1), 4, ["a", "b"])
    config = transformer_config(codes, tmp_path / "run", cond_channels=4, cond_blocks=1, steps=4, eval_every=2)
    result = train_prior.train_prior(config)
    model, _, ckpt = prior_checkpoint.load_prior(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(model, HierarchicalPrior) and isinstance(model.top, TransformerPrior)
    assert isinstance(model.bottom, GatedPixelCNN) and model.top.shape == (2, 2) and ckpt["model_args"]["arch"]
    assert {k.split(".")[0] for k in model.state_dict()} == {"top", "conditioning", "bottom"}
    top, bottom, labels = copied_maps(6, 4, 2)
    other_top = (top + 1) % 4
    with torch.no_grad():
        logits = model(top, bottom, labels)
        assert torch.equal(logits.top, model.top(top, labels))
        moved = model(other_top, bottom, labels).bottom
    assert ((logits.bottom - moved).abs().amax(1) > 0).all()                   # every bottom position sees the top
    drawn = model.sample(3, (4, 4), labels=torch.tensor([0, 1, 0]), generator=torch.Generator().manual_seed(0),
                         top_k=3, top_p=0.9, guidance=2.0)
    assert drawn.top.shape == (3, 2, 2) and drawn.bottom.shape == (3, 4, 4)
    assert int(drawn.top.max()) < 4 and int(drawn.bottom.max()) < 4
    assert "top_nll_nats" in result.final


def test_the_codec_round_trips_through_a_two_level_transformer_top(tmp_path):
    data = make_class_folder(tmp_path / "photos")
    vq = save_vqvae(tmp_path / "vq2.pt", checkpoint.Config(data=str(data), image_size=32, levels=2,
                                                           prepared_dir=str(tmp_path / "prepared"), **TINY_VQ))
    extract_codes.extract_codes(vq, tmp_path / "codes.pt", passes=1, device="cpu", progress=False)
    config = transformer_config(tmp_path / "codes.pt", tmp_path / "prior", conditional=False, cond_channels=4,
                                cond_blocks=1, steps=2)
    train_prior.train_prior(config)
    models = codec.load_models(tmp_path / "prior" / "checkpoint.pt")
    assert isinstance(models.prior.top, TransformerPrior)
    image = codec.read_photo(photo(tmp_path / "p.png", 44, 28))
    x, f = image.float().div(255)[None], models.vqvae.downsampling
    x = torch.nn.functional.pad(x, (0, -x.shape[3] % f, 0, -x.shape[2] % f), mode="reflect")
    expected = models.vqvae.decode_images(models.vqvae.encode_images(x))[0, :, :28, :44].mul(255).round()
    assert torch.equal(codec.decompress(models, codec.compress(models, image)), expected.to(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints written before --arch existed


def test_a_prior_checkpoint_without_arch_loads_and_resumes_as_a_pixelcnn(trained, tmp_path):
    ckpt = torch.load(trained["prior_ckpt"], weights_only=True)
    for name in ("arch", "width", "depth", "class_dropout", "compile", "compile_mode"):
        del ckpt["config"][name]
    assert "arch" not in ckpt["model_args"]
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    model, config, _ = prior_checkpoint.load_prior(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(model, GatedPixelCNN) and config.arch == "pixelcnn"
    again = train_prior.train_prior(replace(trained["config"], out=str(tmp_path / "run"), resume=True, steps=6))
    assert isinstance(again.model, GatedPixelCNN)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6


def test_the_transformer_training_step_compiles_into_one_graph(monkeypatch):
    """train_prior --compile hands the model to torch.compile; the transformer's training forward (dropout and class
    dropout included) traces as one graph and gives the eager numbers."""
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = TransformerPrior(8, num_classes=2, shape=(3, 3), width=16, num_layers=2, heads=2, dropout=0.0,
                             class_dropout=0.5).train()
    codes, labels = torch.randint(8, (4, 3, 3)), torch.tensor([0, 1, 0, 1])
    compiled = torch.compile(model, backend=count, fullgraph=True)
    torch.manual_seed(1)
    eager = model(codes, labels)
    torch.manual_seed(1)
    assert torch.equal(compiled(codes, labels), eager) and len(graphs) == 1
