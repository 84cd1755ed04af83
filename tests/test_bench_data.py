"""bench_data.py: its Food101-layout copy is read by torchvision's own Food101 and by build_data, and its report
gives each ratio of hand-picked numbers, with no verdicts."""
import json

import pytest
import torch
import torchvision
from PIL import Image

import bench_data
from image_data import build_data


@pytest.fixture(scope="module")
def copy24(tmp_path_factory):
    return bench_data.make_food101_copy(tmp_path_factory.mktemp("copy"), 24, classes=3)


def test_torchvision_food101_reads_both_splits_of_the_copy(copy24):
    train = torchvision.datasets.Food101(str(copy24), split="train")
    test = torchvision.datasets.Food101(str(copy24), split="test")
    assert (len(train), len(test)) == (18, 6)
    assert train.classes == test.classes == ["class_00", "class_01", "class_02"]
    assert (copy24 / "food-101" / "meta" / "classes.txt").read_text().split() == train.classes
    assert sorted(train._labels) == [0] * 6 + [1] * 6 + [2] * 6 and sorted(test._labels) == [0, 0, 1, 1, 2, 2]
    assert not set(train._image_files) & set(test._image_files)
    image, label = train[0]
    assert image.mode == "RGB" and 448 <= max(image.size) <= 512 and 0.74 <= min(image.size) / max(image.size) <= 1
    sizes = {Image.open(f).size for f in train._image_files + test._image_files}
    assert len(sizes) > 5                                             # the images are not all one size
    with Image.open(train._image_files[0]) as img:
        assert img.format == "JPEG"


def test_build_data_prepares_the_copy(copy24, tmp_path):
    data = build_data("food101", 32, root=str(copy24), prepared_dir=str(tmp_path), num_workers=0)
    assert len(data.train) + len(data.val) == 24 and len(data.val) == 6
    assert data.classes == ["class_00", "class_01", "class_02"]
    x, label = data.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and label in (0, 1, 2)
    assert x.float().std() > 5                                       # a photo, not a blank


def test_the_copy_is_reused_while_its_marker_matches_and_rebuilt_otherwise(copy24, tmp_path):
    first = copy24 / "food-101" / "images" / "class_00" / "0.jpg"
    stamp = first.stat().st_mtime_ns
    assert bench_data.make_food101_copy(copy24, 24, classes=3) == copy24
    assert first.stat().st_mtime_ns == stamp                         # not written again
    other = bench_data.make_food101_copy(tmp_path, 8, classes=2)
    assert json.loads((other / "food-101" / "copy.json").read_text())["images"] == 8
    bench_data.make_food101_copy(tmp_path, 12, classes=2)             # another count: made again
    assert len(list((tmp_path / "food-101" / "images").rglob("*.jpg"))) == 12
    assert not list(tmp_path.glob(".food-101-building-*"))


def results(prepare_ratio=2.0, second_ratio=0.5, e2e=(0.97, 0.92)) -> dict:
    """A results dict as main() builds it, with hand-picked numbers."""
    e2e_rows = [{"size": s, "batch": b, "steps": 300, "end_to_end_images_per_s": 100 * r,
                 "model_only_images_per_s": 100.0, "ratio": r}
                for (s, b), r in zip(((64, 32), (128, 128)), e2e)]
    return {"machine": "test machine", "device": "cuda", "threads": 2, "workers": 4, "image_size": 64,
            "copy": {"images": 1000, "files": 1003, "megabytes": 60.0},
            "preparing": {"images": 1000, "size": 64, "workers": 4, "repeats": 3, "ratio": prepare_ratio,
                          "ours_seconds": 1.0, "ours_images_per_s": 1000.0, "ours_images_per_s_per_worker": 250.0,
                          "torchvision_seconds": prepare_ratio, "torchvision_images_per_s": 1000 / prepare_ratio,
                          "torchvision_images_per_s_per_worker": 250 / prepare_ratio},
            "first_second": {"first_seconds": 10.0, "second_seconds": 10 * second_ratio, "ratio": second_ratio,
                             "repeats": 3},
            "end_to_end": e2e_rows,
            "reading": {"images": 750, "batch": 32, "batches": 23, "workers": 4, "memory_kind": "CachedImages",
                        "mapped_kind": "MappedImages", "in_memory_images_per_s": 50000.0,
                        "memory_mapped_images_per_s": 20000.0}}


def test_the_report_gives_each_ratio_and_no_verdict():
    r = results(prepare_ratio=1.5, second_ratio=0.6, e2e=(0.95, 0.90))
    assert bench_data.ratios(r) == [("preparing: ours vs torchvision", "1.50x"),
                                    ("train.py second run vs first", "0.60"),
                                    ("end to end vs model-only, 64x64 batch 32", "95.0%"),
                                    ("end to end vs model-only, 128x128 batch 128", "90.0%")]
    text, line = bench_data.report(r), bench_data.summary(r)
    for verdict in ("PASS", "FAIL", "floor"):
        assert verdict not in text and verdict not in line
    assert line.startswith("summary: ") and "\n" not in line
    assert "1.50x" in line and "0.60" in line and "95.0%" in line and "90.0%" in line
    assert "| 1000 | 250 |" in text and "| 64x64, 32, 300 | 95 | 100 | 95.0% |" in text
    assert "50000 images/s" in text and "20000 images/s" in text and "test machine" in text


def test_a_cpu_report_has_one_end_to_end_ratio():
    r = results()
    r["end_to_end"] = r["end_to_end"][:1]
    assert len(bench_data.ratios(r)) == 3 and "128x128" not in bench_data.summary(r)



def test_peak_rss_is_the_largest_process_of_the_command(tmp_path):
    """A child that holds 200 MiB at its peak (and a parent that holds little): 200 MiB plus Python's own."""
    import sys
    script = "import multiprocessing as m, sys\n" \
             "def hold(): b = b'x' * (200 * 2**20)\n" \
             "if __name__ == '__main__':\n" \
             "    p = m.get_context('spawn').Process(target=hold); p.start(); p.join(); sys.exit(p.exitcode)\n"
    (tmp_path / "hold.py").write_text(script)
    mb = bench_data.peak_rss_mb([sys.executable, "hold.py"], tmp_path)
    assert 200 <= mb < 200 + 100
    with pytest.raises(RuntimeError, match="failed"):
        bench_data.peak_rss_mb([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path)


def test_the_memory_report_puts_before_beside_after():
    results = {"machine": "m", "device": "cpu", "copy": {"images": 100}, "before_label": "commit abc",
               "memory": [{"size": 64, "train_mb": 1300.0, "evaluate_mb": 1310.4},
                          {"size": 256, "train_mb": 2500.0, "evaluate_mb": 2100.0}],
               "before": [{"size": 64, "train_mb": 1745.0, "evaluate_mb": 1755.0},
                          {"size": 256, "train_mb": 7400.0, "evaluate_mb": 7300.0}]}
    text = bench_data.memory_report(results)
    assert "| 64x64 | 1745 | 1300 | 1755 | 1310 |" in text and "| 256x256 | 7400 | 2500 | 7300 | 2100 |" in text
    assert "75 training, 25 validation" in text and "At 256x256: train.py 2500 MiB, evaluate.py 2100 MiB" in text
