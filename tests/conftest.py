"""Put the repository root on sys.path so the tests import models, train, image_data like a user does, and
benchmarks/ so they import the benchmark scripts as those scripts import each other; and the fixture every
two-process test shares (one torchrun start)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "benchmarks", ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture
def one_thread():
    """For tests of tiny models: intra-op threads only add synchronisation (and, on a shared CPU, waiting)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def optimizer_lrs(monkeypatch) -> list:
    """train.py's optimizer made an Adam that appends its learning rate to the returned list at every step."""
    import torch

    import train

    seen = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(train, "make_optimizer", lambda params, lr, device: Recording(params, lr=lr))
    return seen


@pytest.fixture(scope="session")
def gloo_runs(tmp_path_factory) -> Path:
    """One torchrun start of two gloo CPU processes (batch 4 each) that trains the tiny runs of tests/ddp_worker.py
    one after the other: ROOT/ema (k-means and restarts), ROOT/vq (the plain quantizer, restarts by its usage,
    gradient clipping) and ROOT/levels2 (VQ-VAE-2), each folder with rank0.pt and rank1.pt."""
    root = tmp_path_factory.mktemp("gloo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(root), "4", "ema", "vq", "levels2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return root
