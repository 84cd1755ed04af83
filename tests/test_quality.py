"""The quality options beyond the paper, against independent references: SSIM against scikit-image, VQGAN's
residual block and attention written out by hand, the 8x downsampling shapes, the learning-rate schedule worked
by hand, the sample's unseen-photo metrics against their own evaluation."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

import evaluate
import image_data
import train
from checkpoint import Config, learning_rate
from models import VQVAE, Decoder, Encoder, ModernResidualBlock, SelfAttention


def test_ssim_equals_scikit_image_with_the_same_settings():
    rng = np.random.default_rng(0)
    clean = rng.random((3, 3, 24, 30))
    for noise in (0.02, 0.1, 0.3):
        noisy = np.clip(clean + noise * rng.standard_normal(clean.shape), 0, 1)
        ours = evaluate.ssim_per_image(torch.tensor(clean), torch.tensor(noisy)).numpy()
        reference = [structural_similarity(c.transpose(1, 2, 0), n.transpose(1, 2, 0), gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2)
                     for c, n in zip(clean, noisy)]
        np.testing.assert_allclose(ours, reference, atol=2e-6)
    assert evaluate.ssim_per_image(torch.tensor(clean), torch.tensor(clean)).numpy() == pytest.approx([1, 1, 1])


def test_evaluate_reports_the_mean_ssim_of_the_images():
    torch.manual_seed(0)
    model = VQVAE(hidden_channels=8, residual_channels=4, num_residual_blocks=1, embedding_dim=4, num_embeddings=8)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    loader = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(2))]
    got = evaluate.evaluate(model, loader, torch.device("cpu"))
    x = images.double() / 255
    with torch.no_grad():
        r = (model.eval()(x.float() - 0.5).reconstruction.double() + 0.5).clamp(0, 1)
    expected = np.mean([structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(),
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1.0, channel_axis=2) for a, b in zip(x, r)])
    assert got["ssim"] == pytest.approx(expected, abs=1e-5)


def test_the_modern_block_is_gn_silu_conv_twice_plus_identity():
    torch.manual_seed(0)
    block = ModernResidualBlock(8, 4).double()
    h = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    inner = F.conv2d(F.silu(F.group_norm(h, 8, block.norm1.weight, block.norm1.bias)), block.conv1.weight,
                     block.conv1.bias, padding=1)
    expected = h + F.conv2d(F.silu(F.group_norm(inner, 4, block.norm2.weight, block.norm2.bias)),
                            block.conv2.weight, block.conv2.bias, padding=1)
    torch.testing.assert_close(block(h), expected)


def test_attention_is_softmax_attention_over_positions_by_hand():
    torch.manual_seed(0)
    attention = SelfAttention(8).double()
    h = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    n = F.group_norm(h, 8, attention.norm.weight, attention.norm.bias).flatten(2)          # (B, C, HW)
    w, b = attention.qkv.weight[:, :, 0, 0], attention.qkv.bias
    q, k, v = ((w[i * 8:(i + 1) * 8] @ n + b[i * 8:(i + 1) * 8, None]) for i in range(3))    # (B, C, HW) each
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)                   # (B, HW, HW)
    out = v @ weights.transpose(1, 2)                                                       # (B, C, HW)
    expected = h + (attention.proj.weight[:, :, 0, 0] @ out + attention.proj.bias[:, None]).view(2, 8, 3, 4)
    torch.testing.assert_close(attention(h), expected)


@pytest.mark.parametrize("block, attention, downsample", [("modern", False, 4), ("modern", True, 4),
                                                         ("paper", False, 8), ("modern", True, 8)])
def test_the_options_keep_the_shapes_and_the_round_trip(block, attention, downsample):
    model = VQVAE(hidden_channels=16, residual_channels=8, num_residual_blocks=1, embedding_dim=4,
                  num_embeddings=16, block=block, attention=attention, downsample=downsample).eval()
    x = torch.rand(2, 3, 32, 48) - 0.5
    codes = model.encode(x)
    assert codes.shape == (2, 32 // downsample, 48 // downsample)
    assert model(x).reconstruction.shape == x.shape
    assert torch.equal(model.decode(codes), model(x).reconstruction)


def test_the_classes_defaults_stay_the_papers():
    assert Encoder().residual.norm is None and Encoder().attention is None and len(Encoder().down) == 0
    assert Decoder().residual.norm is None and Decoder().attention is None and len(Decoder().up) == 0


def test_the_learning_rate_schedule_by_hand():
    c = Config(lr=1e-3, steps=110, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(c, 0) == pytest.approx(1e-4) and learning_rate(c, 9) == pytest.approx(1e-3)
    assert learning_rate(c, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 60) == pytest.approx(0.5e-3)                      # half way down the cosine
    assert learning_rate(c, 109) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    paper = Config(lr=2e-4, lr_schedule="constant", warmup_steps=0)
    assert all(learning_rate(paper, s) == 2e-4 for s in (0, 500, 999))


def test_the_schedule_reaches_the_optimizer_and_a_resumed_run_continues_it(tmp_path, optimizer_lrs):
    c = Config(data="sample", image_size=16, steps=6, batch_size=4, hidden_channels=8, residual_channels=4,
               num_residual_blocks=1, embedding_dim=4, num_embeddings=16, eval_every=3, log_every=1, lr=1e-2,
               warmup_steps=2, lr_schedule="cosine", out=str(tmp_path / "whole"), progress=False, device="cpu",
               amp="off", num_workers=0)
    seen = optimizer_lrs
    whole = train.train(c)
    by_hand = [1e-2 / 2, 1e-2] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx(by_hand)
    seen.clear()
    short = replace(c, out=str(tmp_path / "short"))
    train.train(replace(short, steps=3))
    resumed = train.train(replace(short, resume=True))
    assert seen == pytest.approx(by_hand)                 # steps 0-2, then 3-5 after the resume
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_sample_reports_its_unseen_photos_and_strips_apart(tmp_path):
    c = Config(data="sample", image_size=16, steps=2, batch_size=4, hidden_channels=8, residual_channels=4,
               num_residual_blocks=1, embedding_dim=4, num_embeddings=16, eval_every=2, log_every=1,
               out=str(tmp_path / "run"), progress=False, device="cpu", amp="off", num_workers=0)
    result = train.train(c)
    parts = image_data.sample_validation_parts(image_data.build_data("sample", 16).val)
    for name, part in parts.items():
        alone = evaluate.evaluate(result.model, image_data.eval_loader(part, 64), torch.device("cpu"))
        assert result.final[f"{name}_psnr"] == pytest.approx(alone["psnr"], abs=1e-9)
        assert result.final[f"{name}_ssim"] == pytest.approx(alone["ssim"], abs=1e-9)
    assert len(parts["unseen"]) + len(parts["strips"]) == result.final["num_images"]
    assert result.history[-1]["val_unseen_psnr"] == result.final["unseen_psnr"]


@pytest.mark.parametrize("flags, words", [(dict(block="resnet"), "--block"), (dict(downsample=2), "--downsample"),
                                          (dict(downsample=8, image_size=36), "multiple of 8"),
                                          (dict(lr_schedule="step"), "--lr-schedule"),
                                          (dict(warmup_steps=-1), "--warmup-steps")])
def test_bad_quality_flags_are_one_clear_config_error(flags, words):
    from checkpoint import check_config
    from runs import ConfigError

    with pytest.raises(ConfigError, match=words):
        check_config(replace(Config(), **flags))
