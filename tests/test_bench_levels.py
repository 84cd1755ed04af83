"""bench_levels.py: the gap between the levels read over several seeds (mean and standard error, by hand), each
seed's run folders, and --reuse reading a finished run back instead of training it again."""
import json
import math

import pytest
import torch

import bench_levels


def row(size, levels, seed, unseen, strips, bits):
    return {"size": size, "levels": levels, "seed": seed, "steps": 10, "unseen_psnr": unseen, "strips_psnr": strips,
            "bits_per_image": bits}


def test_the_gap_over_seeds_is_their_mean_with_its_standard_error():
    rows = []
    for seed, (one, two) in enumerate([(28.0, 28.1), (27.9, 27.8), (28.0, 28.3), (28.2, 27.9)]):
        rows += [row(128, 1, seed, one, 28.5, 1000), row(128, 2, seed, two, 28.5 + seed / 10, 1250)]
    assert bench_levels.gaps(rows, 128) == pytest.approx({0: 0.1, 1: -0.1, 2: 0.3, 3: -0.3})
    # gaps +0.1, -0.1, +0.3, -0.3: mean 0, sample sd sqrt(0.2 / 3) = 0.2582, standard error 0.2582 / 2 = 0.1291
    assert bench_levels.mean_and_error([0.1, -0.1, 0.3, -0.3]) == pytest.approx((0.0, math.sqrt(0.2 / 3) / 2))
    assert bench_levels.mean_and_error([0.5]) == (0.5, None)
    (line,) = bench_levels.verdicts(rows)
    assert "seeds 0, 1, 2, 3" in line and "PSNR is +0.00 dB (standard error 0.13; per seed +0.10, -0.10, +0.30, " \
        "-0.30)" in line and "+25% bits per image" in line
    # strips gaps 0, 0.1, 0.2, 0.3: mean 0.15, sd 0.1291, standard error 0.0645
    assert "on the held-out strips +0.15 dB (standard error 0.06)" in line
    (single,) = bench_levels.verdicts([r for r in rows if r["seed"] == 2])
    assert "PSNR is +0.30 dB against the 1-level model's with the same 32x32 bottom grid" in single
    assert bench_levels.verdicts([r for r in rows if r["levels"] == 1]) == []


def test_each_seed_has_its_own_run_folders_and_reuse_reads_them_back(tmp_path, capsys):
    out = tmp_path / "bl"
    assert bench_levels.seed_folder(out, 0) == out and bench_levels.seed_folder(out, 3) == tmp_path / "bl-seed3"
    args = ["--sizes", "16", "--steps", "2", "--seeds", "0,1", "--out", str(out), "--json", str(tmp_path / "a.json")]
    assert bench_levels.main(args) == 0
    first = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [(r["seed"], r["levels"]) for r in first] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    checkpoints = [out / "16px-1-level" / "checkpoint.pt", out / "16px-2-level" / "checkpoint.pt",
                   tmp_path / "bl-seed1" / "16px-1-level" / "checkpoint.pt",
                   tmp_path / "bl-seed1" / "16px-2-level" / "checkpoint.pt"]
    assert [r["checkpoint"] for r in first] == [str(p) for p in checkpoints]
    assert first[0]["unseen_psnr"] != first[2]["unseen_psnr"]          # the seeds trained different models
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    assert bench_levels.main([*args[:-1], str(tmp_path / "b.json"), "--reuse"]) == 0
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps        # read back, not trained again
    again = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["unseen_psnr"] for r in again] == [r["unseen_psnr"] for r in first]
    assert "seeds 0, 1: the 2-level model's unseen-photo PSNR is" in capsys.readouterr().out


def test_clip_grad_norm_and_warmup_reach_every_run_and_a_different_one_is_trained_again(tmp_path):
    out = tmp_path / "bl"
    args = ["--sizes", "16", "--steps", "2", "--out", str(out), "--warmup-steps", "1", "--clip-grad-norm", "0.5",
            "--reuse"]
    assert bench_levels.main(args) == 0
    checkpoints = [out / f"16px-{n}-level" / "checkpoint.pt" for n in (1, 2)]
    assert [torch.load(p, weights_only=False)["config"]["clip_grad_norm"] for p in checkpoints] == [0.5, 0.5]
    assert [torch.load(p, weights_only=False)["config"]["warmup_steps"] for p in checkpoints] == [1, 1]
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    assert bench_levels.main([*args[:-2], "0.25", "--reuse"]) == 0      # not the same run: trained again
    assert all(p.stat().st_mtime_ns != s for p, s in zip(checkpoints, stamps))
    assert [torch.load(p, weights_only=False)["config"]["clip_grad_norm"] for p in checkpoints] == [0.25, 0.25]


def test_the_gpu_screen_tables_each_setting_over_the_seeds_whose_two_runs_finished():
    import gpu_levels_screen

    def m(psnr, s):
        return {"unseen_psnr": psnr, "elapsed": s}
    found = {("clip1", 0, 1): m(28.0, 10), ("clip1", 0, 2): m(28.1, 20), ("clip1", 1, 1): m(27.9, 12),
             ("clip1", 1, 2): m(27.8, 22), ("clip1", 2, 1): m(28.4, 11),           # seed 2's 2-level run unfinished
             ("clip0", 3, 2): m(27.0, 20)}                                            # no pair at all: no row
    header, rule, *rows = gpu_levels_screen.table(found)
    assert len(rows) == 1 and header.startswith("| setting |")
    # gaps +0.1 and -0.1: mean 0, sample sd sqrt(0.02) = 0.1414, standard error 0.1414 / sqrt 2 = 0.10
    assert rows[0] == "| clip1 | 0,1 | 27.95 dB | 27.95 dB | +0.00 dB (SE 0.10) | +0.10, -0.10 | 11, 21 |"


def test_the_gpu_screen_compares_a_two_level_only_setting_with_the_reference_one_level_runs():
    import gpu_levels_screen

    def m(psnr, s):
        return {"unseen_psnr": psnr, "elapsed": s}
    found = {("clip1", 0, 1): m(28.0, 10), ("clip1", 1, 1): m(27.9, 12), ("clip1", 1, 2): m(27.7, 20),
             ("top512", 0, 2): m(28.3, 30), ("top512", 1, 2): m(28.1, 32), ("top512", 2, 2): m(28.5, 31)}
    _, _, *rows = gpu_levels_screen.table(found, reference="clip1")
    # clip1 pairs only seed 1 (-0.20, no error); top512 borrows clip1's 1-level runs of seeds 0 and 1 (+0.30,
    # +0.20: mean +0.25, sd 0.0707, SE 0.05); its seed 2 has no 1-level run anywhere and is left out
    assert rows == ["| clip1 | 1 | 27.90 dB | 27.70 dB | -0.20 dB | -0.20 | 12, 20 |",
                    "| top512 (1 level: clip1) | 0,1 | 27.95 dB | 28.20 dB | +0.25 dB (SE 0.05) | +0.30, +0.20 | 11, 31 |"]
    assert gpu_levels_screen.table(found, reference="none")[2:] == rows[:1]     # no such reference: no borrowed row
