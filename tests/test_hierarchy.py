"""The 2-level VQ-VAE (hierarchy.VQVAE2, VQ-VAE-2 section 3.1): shapes, the nearest code at each level against a
brute-force search, the bottom code chosen given the top one, the decoder fed by both, checkpoints that rebuild the
right kind of model, exact resume, and both codebooks identical over two gloo processes."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import evaluate
import train
from checkpoint import Config, build_model, check_config, check_resume_matches, load_checkpoint, save_checkpoint
from hierarchy import VQVAE2
from image_data import build_data
from models import VQVAE
from runs import CheckpointError, ConfigError
from tests.ddp_worker import tiny


def small(**kw) -> VQVAE2:
    torch.manual_seed(0)
    return VQVAE2(hidden_channels=16, residual_channels=8, num_residual_blocks=1, embedding_dim=8,
                  num_embeddings=32, **kw).eval()


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (64, 96)])
def test_shapes_at_128_and_256_px_and_non_square(size):
    h, w = size
    model = small()
    x = torch.rand(2, 3, h, w) - 0.5
    top, bottom = model.encode(x)
    assert top.shape == (2, h // 8, w // 8) and bottom.shape == (2, h // 4, w // 4)
    assert top.dtype == bottom.dtype == torch.int64
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert [v.indices.shape for v in out.levels] == [top.shape, bottom.shape]
    assert torch.equal(out.levels[0].indices, top) and torch.equal(out.levels[1].indices, bottom)
    assert torch.equal(out.vq.indices, bottom)
    assert torch.allclose(out.vq.loss, out.levels[0].loss + out.levels[1].loss)
    assert torch.equal(model.decode((top, bottom)), out.reconstruction.detach())   # the round trip


def brute_force_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w), (K, D) -> (B, h, w) argmin_k ||z - e_k|| by an explicit distance table."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    distances = ((flat[:, None, :] - codebook.double()[None]) ** 2).sum(-1)       # (N, K)
    return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


@pytest.mark.parametrize("quantizer", ["vq", "ema"])
def test_each_level_takes_its_nearest_code_and_the_bottom_sees_the_quantized_top(quantizer):
    """Section 3.1: the top map is quantized first; its codes, decoded, are joined to the bottom features, and the
    bottom quantizer picks the code nearest to that."""
    model = small(quantizer=quantizer, cosine=False, lookup_dim=0, kmeans_init=False)
    x = torch.rand(3, 3, 32, 48) - 0.5
    with torch.no_grad():
        h_b = model.encoder(x)
        top_codes = model.top_quantizer.embedding
        top = brute_force_nearest(model.top_encoder(h_b), top_codes)
        e_top = top_codes[top].permute(0, 3, 1, 2)                                 # (B, D, h/2, w/2)
        z_bottom = model.join(torch.cat([h_b, model.top_decoder(e_top)], 1))
        bottom = brute_force_nearest(z_bottom, model.bottom_quantizer.embedding)
    got_top, got_bottom = model.encode(x)
    assert torch.equal(got_top, top) and torch.equal(got_bottom, bottom)


def test_the_bottom_code_depends_on_the_top_code_and_the_decoder_on_both():
    # with a residual block at the top: this tiny untrained model's default (no top blocks) happens to send every
    # bottom vector to one code whatever the top says, which would test nothing
    model = small(top_residual_blocks=1)
    x = torch.rand(4, 3, 64, 64) - 0.5
    top, bottom = model.encode(x)
    with torch.no_grad():
        model.top_quantizer.embedding.copy_(torch.randn_like(model.top_quantizer.embedding))
    top2, bottom2 = model.encode(x)
    assert not torch.equal(bottom, bottom2)              # same image, same bottom encoder: the top level decided
    image = model.decode((top, bottom))
    assert not torch.equal(image, model.decode(((top + 1) % 32, bottom)))
    assert not torch.equal(image, model.decode((top, (bottom + 1) % 32)))
    with pytest.raises(ValueError, match="top, bottom"):
        model.decode((top,))


def test_the_loss_reaches_every_part_of_both_levels():
    model = small(quantizer="vq").train()
    out = model(torch.rand(2, 3, 32, 32) - 0.5)
    (out.reconstruction.pow(2).mean() + out.vq.loss).backward()
    for name in ("encoder", "top_encoder", "top_decoder", "join", "upsample_top", "decoder", "top_quantizer",
                 "bottom_quantizer"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def tiny2(out, **kw) -> Config:
    return replace(tiny(str(out), 4, levels=2), **kw)


def test_a_2_level_checkpoint_rebuilds_its_model_and_evaluate_reports_both_codebooks(tmp_path, capsys):
    result = train.train(tiny2(tmp_path / "run", image_size=32, top_num_embeddings=8))   # K: 8 top, 16 bottom
    assert isinstance(result.model, VQVAE2)
    assert isinstance(build_model(Config(image_size=32)), VQVAE)
    model, config, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(model, VQVAE2) and config.levels == 2
    for key, value in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[key].cpu(), value.cpu()), key
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # each level's usage by hand: the distinct codes of encode(x) over the validation split
    val = build_data("sample", 32).val
    x = torch.stack([val[i][0] for i in range(len(val))]).float() / 255 - 0.5
    top, bottom = model.encode(x)
    assert [q.num_embeddings for q in model.quantizers] == [8, 16] and int(top.max()) < 8
    assert report["codebook_usage_top"] == pytest.approx(top.unique().numel() / 8)
    assert report["codebook_usage_bottom"] == pytest.approx(bottom.unique().numel() / 16)
    assert report["codebook_usage"] == min(report["codebook_usage_top"], report["codebook_usage_bottom"])
    assert report["perplexity"] == report["perplexity_bottom"]
    assert report["psnr"] == pytest.approx(result.final["psnr"], abs=1e-6)


def test_the_top_follows_its_flags_and_an_older_checkpoint_keeps_its_own(tmp_path):
    def depth(model):
        return (len(model.encoder.residual.blocks), len(model.top_encoder.residual.blocks),
                len(model.top_decoder.residual.blocks), len(model.decoder.residual.blocks))
    base = dict(levels=2, hidden_channels=8, residual_channels=4, num_residual_blocks=2, embedding_dim=4,
                num_embeddings=16)
    assert depth(build_model(Config(**base))) == (2, 0, 0, 2)
    assert depth(build_model(Config(**base, top_residual_blocks=3))) == (2, 3, 3, 2)
    with pytest.raises(ConfigError, match="--top-residual-blocks must be at least 0"):
        check_config(Config(**base, top_residual_blocks=-1))
    assert build_model(Config(**base)).top_quantizer.num_embeddings == 16      # 0: as many codes as the bottom
    assert build_model(Config(**base, top_num_embeddings=8)).top_quantizer.num_embeddings == 8
    with pytest.raises(ConfigError, match="--top-num-embeddings must be at least 0"):
        check_config(Config(**base, top_num_embeddings=-1))
    # explicit FSQ levels serve both levels, so a top K beside them would be silently ignored
    fsq = dict(base, quantizer="fsq", fsq_levels="4,4")
    assert [q.num_embeddings for q in build_model(Config(**fsq, top_num_embeddings=8)).quantizers] == [16, 16]
    with pytest.raises(ConfigError, match="--top-num-embeddings would be ignored: drop one of the two"):
        check_config(Config(**fsq, top_num_embeddings=8))
    check_config(Config(**fsq))
    own = Config(**dict(fsq, fsq_levels="", num_embeddings=1024), top_num_embeddings=256)   # FSQ paper's sizes
    check_config(own)
    assert [q.levels for q in build_model(own).quantizers] == [(8, 6, 5), (8, 5, 5, 5)]
    # a 2-level checkpoint written before the fields existed had the bottom's stacks and codebook size at the top
    config = Config(**base, top_residual_blocks=2)
    model = build_model(config)
    save_checkpoint(tmp_path / "old.pt", model, torch.optim.Adam(model.parameters()), 0, config, 1.0, 0.0)
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["config"]["top_residual_blocks"], ckpt["config"]["top_num_embeddings"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, loaded_config, _ = load_checkpoint(tmp_path / "old.pt")
    assert loaded_config.top_residual_blocks == 2 and depth(loaded) == (2, 2, 2, 2)
    assert loaded.top_quantizer.num_embeddings == 16
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_resuming_a_run_from_before_top_residual_blocks_names_the_flag_and_resumes_with_it(tmp_path):
    """A 2-level run written before the field existed had the bottom's stacks at the top; resumed under today's
    default (no top stacks) it must stop with the flag and the value to give, leaving the run as it was."""
    train.train(tiny2(tmp_path / "old", image_size=32, steps=4, eval_every=4, top_residual_blocks=1))
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["top_residual_blocks"]
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="--top-residual-blocks 1, not 0: resume with the same value"):
        train.train(tiny2(tmp_path / "old", image_size=32, steps=8, eval_every=4, resume=True))
    assert path.read_bytes() == before
    resumed = train.train(tiny2(tmp_path / "old", image_size=32, steps=8, eval_every=4, resume=True,
                                top_residual_blocks=1))
    assert [r["step"] for r in resumed.history][-4:] == [5, 6, 7, 8]
    assert len(resumed.model.top_encoder.residual.blocks) == 1


def test_the_resume_check_compares_the_top_codebook_sizes_the_flags_give():
    """--top-num-embeddings 0 means the bottom's K: a run started with the bottom's K spelled out resumes under the
    default, and the other way round; a different size is refused with the flag."""
    saved = Config(levels=2, num_embeddings=16, top_num_embeddings=16)
    check_resume_matches(saved, replace(saved, top_num_embeddings=0), Path("run/checkpoint.pt"))
    check_resume_matches(replace(saved, top_num_embeddings=0), saved, Path("run/checkpoint.pt"))
    with pytest.raises(CheckpointError, match="--top-num-embeddings 16, not 8: resume with the same value"):
        check_resume_matches(saved, replace(saved, top_num_embeddings=8), Path("run/checkpoint.pt"))
    with pytest.raises(CheckpointError, match="--top-num-embeddings 0, not 8"):
        check_resume_matches(replace(saved, top_num_embeddings=0), replace(saved, top_num_embeddings=8),
                             Path("run/checkpoint.pt"))
    with pytest.raises(CheckpointError, match="--num-embeddings 16, not 8"):   # 0 follows the bottom's K
        check_resume_matches(replace(saved, top_num_embeddings=0), replace(saved, top_num_embeddings=0,
                                                                            num_embeddings=8), Path("x"))


def test_a_1_level_run_resumes_whatever_the_top_flags_say():
    """--top-residual-blocks and --top-num-embeddings build nothing in a 1-level model, so a 1-level run resumes
    under any value of them; in a 2-level run they shape the top and a change is refused."""
    saved = Config(levels=1, num_embeddings=16)
    check_resume_matches(saved, replace(saved, top_num_embeddings=8, top_residual_blocks=2), Path("run/checkpoint.pt"))
    two = replace(saved, levels=2)
    with pytest.raises(CheckpointError, match="--top-residual-blocks 0, not 2"):
        check_resume_matches(two, replace(two, top_residual_blocks=2), Path("run/checkpoint.pt"))
    with pytest.raises(CheckpointError, match="--levels 1, not 2"):
        check_resume_matches(saved, two, Path("run/checkpoint.pt"))


def test_a_resumed_2_level_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = train.train(tiny2(tmp_path / "straight", image_size=32, steps=8, eval_every=4))
    train.train(tiny2(tmp_path / "split", image_size=32, steps=4, eval_every=4))
    resumed = train.train(tiny2(tmp_path / "split", image_size=32, steps=8, eval_every=4, resume=True))
    assert [r["step"] for r in resumed.history][-4:] == [5, 6, 7, 8]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert int(straight.model.bottom_quantizer.restarts) + int(straight.model.top_quantizer.restarts) > 0


def test_two_gloo_processes_hold_identical_codebooks_at_both_levels(gloo_runs):
    ranks = [torch.load(gloo_runs / "levels2" / f"rank{r}.pt", weights_only=True)["model"] for r in (0, 1)]
    codebooks = [k for k in ranks[0] if k.startswith(("top_quantizer.", "bottom_quantizer."))]
    assert any(k.startswith("top_quantizer.embedding") for k in codebooks)
    assert any(k.startswith("bottom_quantizer.embedding") for k in codebooks)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert int(ranks[0]["top_quantizer.restarts"]) + int(ranks[0]["bottom_quantizer.restarts"]) > 0
