"""Put the repository root on sys.path so the tests import models, train, image_data like a user does, and
benchmarks/ so they import the benchmark scripts as those scripts import each other."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "benchmarks", ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
