"""What the benchmark scripts (bench.py, ablation.py) share: the machine's description and the writer of their
sections of BENCHMARKS.md."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from runs import atomic_write, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]   # the repository root


def machine() -> str:
    """One line: cores, CPU model, whether it has native bf16 (so whether autocast="auto" trains in bf16), torch
    version and the GPU's name when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{os.cpu_count()}-core {cpu} ({'native bf16' if cpu_has_native_bf16() else 'no native bf16: float32'}), " \
           f"torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def write_section(key: str, title: str, command: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace (or append) the section of BENCHMARKS.md between `<!-- {key} begin -->` and `<!-- {key} end -->`,
    written under a temporary name and renamed, so an interrupted write leaves the old file whole."""
    begin, end = f"<!-- {key} begin -->", f"<!-- {key} end -->"
    body = f"{begin}\n## {title}\n\nCommand: `{command}`\n\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(new))


def publish(script: str, title: str, argv: list[str] | None, text: str, write: bool,
            json_path: str | None = None, results: dict | None = None) -> None:
    """A benchmark script's last step: the raw `results` into `json_path` (if given) and, with `write`, `text` into
    its BENCHMARKS.md section under the command that produced it (`python benchmarks/{script} {argv}`)."""
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    if write:
        args = sys.argv[1:] if argv is None else argv
        write_section(script, title, " ".join(["python", f"benchmarks/{script}", *args]), text)


def peak_extra_bytes(device: torch.device, make_call: Callable[[], Callable[[], object]], child_code: str) -> int:
    """Peak extra memory of one call. On CUDA: `make_call()`'s call, the allocator's peak over what was allocated
    before it. Elsewhere: the last integer that `child_code` prints, run as `python -c` in benchmarks/ in a fresh
    process with this process's thread count (so nothing this process holds counts)."""
    if device.type == "cuda":
        call = make_call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    code = f"import torch; torch.set_num_threads({torch.get_num_threads()}); {child_code}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"peak-memory subprocess failed: {out.stderr.strip()[-500:]}")
    return int(out.stdout.strip().splitlines()[-1])
