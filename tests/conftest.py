"""Shared test setup: the repo root on sys.path, a bounded thread count, fixed seeds."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# CI machines have 2 cores: more threads than cores only adds contention (TEST_THREADS=1 when
# the cores are busy with something else: oversubscribed OpenMP threads slow everything down)
torch.set_num_threads(int(os.environ.get("TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

# Real-data tests read COCO128 from here and skip when it is absent (never committed).
COCO128 = os.environ.get("COCO128", os.path.join(ROOT, "data", "coco128"))
# The key manifests of published weights (names and shapes, no weights; tests/weights/README.md):
# tests/test_weights.py fabricates state dicts from them.
WEIGHTS_MANIFESTS = os.environ.get("WEIGHTS_MANIFESTS", os.path.join(ROOT, "tests", "weights"))


def pytest_configure(config):
    # The fast tier for an edit loop (README, "Tests"): `python -m pytest -q -m "not slow" tests`
    # runs the hand-worked formulas, shapes, parity checks and bad input; CI runs everything.
    config.addinivalue_line("markers", "slow: trains, spawns processes, compiles or reads real images "
                                       "(seconds to minutes each); deselected by -m \"not slow\"")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
