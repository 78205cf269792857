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


def test_bench_coloring_counts(tmp_path):
    """Guards the FCOSIS colouring statistics (segmentation passes vs instances). Two images:
    three disjoint boxes -> 1 colour; three boxes that all overlap -> 3 colours; a crowd box is
    not an instance. Mean instances (3 + 3) / 2 = 3, mean colours (1 + 3) / 2 = 2, passes saved
    1 - 4/6 = 1/3."""
    boxes = {1: [[0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10]], 2: [[0, 0, 10, 10], [5, 5, 10, 10], [8, 2, 10, 10]]}
    anns = [{"id": i, "image_id": img, "category_id": 1, "bbox": b, "area": 100, "iscrowd": 0}
            for i, (img, b) in enumerate([(img, b) for img, bs in boxes.items() for b in bs], start=1)]
    anns.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [5, 5, 30, 3], "area": 90, "iscrowd": 1,
                 "segmentation": {"counts": [0, 90], "size": [64, 64]}})
    ann = {"images": [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)],
           "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--coloring=True", f"--real_data={tmp_path}",
                        "--val_ann=a.json", "--device=cpu", "--threads=1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (res["images"], res["instances_per_image"], res["colours_per_image"]) == (2, 3, 2)
    assert abs(res["passes_saved"] - 1 / 3) < 1e-9 and res["max_colours"] == 3


def test_bench_loader_on_coco128():
    """Guards the DataLoader throughput measurement (training transforms on real images) and
    the post-processing numbers (decode + mapping to the original size, 100 detections) that
    the speed table of RESULTS.md reports. Skipped without COCO128."""
    from conftest import COCO128
    if not os.path.isfile(os.path.join(COCO128, "annotations", "instances_train2017.json")):
        pytest.skip(f"COCO128 not found at {COCO128}")
    res = bench("--loader=True", f"--real_data={COCO128}", "--val_img_dir=train2017",
                "--val_ann=annotations/instances_train2017.json", "--num_classes=80", "--num_workers=1",
                "--loader_batches=3")
    assert res["loader_images_per_s"] > 0 and res["loader_over_train"] > 0
    assert res["detections_per_img"] == 100 and res["to_original_ms_per_img"] > 0 and 0 < res["post_share"] < 100


def test_bench_without_pycocotools(tmp_path):
    """Guards a bare GPU machine (PyTorch only): bench.py must run without pycocotools (eval.py
    imports it), skip only the mapping to the original size, and say so. A `pycocotools` package
    that raises ImportError shadows the installed one. The run also times gradient accumulation's
    normaliser recording pass (asked with gradient_accumulation_steps=2)."""
    fake = tmp_path / "pycocotools"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('pycocotools hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *TINY, "--gradient_accumulation_steps=2"],
                       cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mapping to the original size is not timed (pycocotools hidden by the test)" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["to_original_ms_per_img"] is None and res["infer_ms_per_img"] > 0
    assert res["record_ms_per_img"] > 0 and res["record_over_train"] > 0  # the accumulation's recording pass

