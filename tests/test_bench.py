"""bench.py as a user runs it: tiny CPU runs through the command line (a few seconds each).
Only that it runs and reports; the timings themselves are never asserted."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test runs bench.py in a subprocess

TINY = [
    os.path.join(ROOT, "config", "shapes_centermask.py"), "--device=cpu", "--input_size=64", "--batch_size=1",
    "--steps=1", "--burn_in=1", "--dla_channels=(4, 8, 8, 16, 16, 32)", "--head_conv=8", "--shape_size=8",
    "--threads=1",
]


def bench(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_smoke():
    """Guards: bench.py crashing on a shipped config (unknown train.py keys, decode under the wrong
    dtype) or not ending with the JSON line that scripts read."""
    res = bench()
    assert res["train_ms_per_img"] > 0 and res["infer_ms_per_img"] > 0
    assert 0 < res["post_ms_per_img"] and res["post_share"] > 0 and res["post_share_dense"] > 0
    assert res["mean_box_side"] >= 0 and res["to_original_dense_ms_per_img"] > 0
    assert res["peak_mem_mb"] > 0 and res["flops_train_per_img"] > res["flops_infer_per_img"] > 0
    assert res["mfu_train"] is None and res["peer_fcos_train_ratio"] is None  # CPU, no peers asked


def test_bench_peers():
    """Guards: the torchvision peers (fcos_resnet50_fpn, maskrcnn_resnet50_fpn) failing on our
    targets (label range, masks) or their ratios missing from the JSON line (~6 s at 64 px)."""
    res = bench("--peers=True")
    for name in ("fcos", "maskrcnn"):
        assert res[f"peer_{name}_train_ms_per_img"] > 0 and res[f"peer_{name}_infer_ms_per_img"] > 0
        assert res[f"peer_{name}_train_ratio"] > 0 and res[f"peer_{name}_infer_ratio"] > 0


def test_bench_fcos_family_config():
    """Guards: bench.py on an FCOS-family config (the heads()/decode() split, the fcos keys)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), os.path.join(ROOT, "config", "shapes_fcosis.py"),
                        "--device=cpu", "--input_size=64", "--batch_size=1", "--steps=1", "--burn_in=0",
                        "--threads=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["method"] == "fcosis" and res["train_ms_per_img"] > 0 and res["post_ms_per_img"] > 0


def test_bench_times_the_accumulation_recording_pass():
    """Guards the timing of gradient accumulation's normaliser recording pass (asked with
    gradient_accumulation_steps=2) that RESULTS.md reports, and its null without it."""
    res = bench("--gradient_accumulation_steps=2")
    assert res["record_ms_per_img"] > 0 and res["record_over_train"] > 0
    assert res["to_original_ms_per_img"] > 0 and bench()["record_ms_per_img"] is None
