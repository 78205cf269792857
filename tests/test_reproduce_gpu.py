"""reproduce_gpu.sh without a GPU: its dry run (every step on the CPU, tiny sizes, one seed)
writes a row for every run into results.md, with dtype, commit, command and wall time, and every
log into logs.tar.gz; a log whose last line is not JSON makes that row a failed one, not a crash;
a missing GPU or COCO128 folder is one line. The numbers themselves are never asserted."""
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT
from data import write_coco_subset, write_shapes_dataset

pytestmark = pytest.mark.slow  # runs the script, which runs bench.py and train.py (minutes)

SPEED = ["dla34_infer_bf16", "hg104_infer_bf16", "dla34_train_bf16", "fcos_r50_train_bf16",
         "dla34_infer_bf16_compile", "dla34_train_bf16_compile", "fcos_r50_train_bf16_compile",
         "dla34_infer_fp16", "dla34_train_fp16", "fcos_r50_train_fp16"]
METHODS = ["fcos", "fcosreg", "maskfcos", "centermask_fcos", "fcosis"]
TRAIN = (["quick: shapes_set", "quick: quick_start", "quick: full_width"]
         + [f"overfit: coco128_{m}" for m in ["centermask"] + METHODS]
         + [f"table: shapes_{m}_s1337" for m in METHODS]
         + [f"table: t3_{t}_s1337" for t in ["segm", "mu0", "bbox", "none"]])


def script(tmp_path, **env):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", os.path.join(ROOT, "reproduce_gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def results(tmp_path):
    """results.md: its text and its table rows by their first cell, as lists of cells."""
    text = (tmp_path / "out" / "results.md").read_text()
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in text.splitlines()
            if line.startswith("| ")]
    return text, {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_dry_run_writes_every_row(tmp_path):
    # a COCO128 stand-in in COCO128's layout: 8 shapes images as train2017
    write_shapes_dataset(str(tmp_path / "shapes"), n_train=8, n_val=2)
    write_coco_subset(str(tmp_path / "shapes" / "annotations" / "instances_train.json"),
                      str(tmp_path / "shapes" / "train"), str(tmp_path / "coco128"), n=8,
                      split="train2017")
    r = script(tmp_path, DRY_RUN="1", COCO128=str(tmp_path / "coco128"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text, rows = results(tmp_path)
    assert "* GPU: none: DRY_RUN=1" in text and "* CPU: " in text
    assert f"torch {torch.__version__}" in text
    commit = re.search(r"\* commit (\S+),", text).group(1)
    assert set(rows) == set(SPEED + TRAIN) | {"row", "run"}  # "row", "run": the two header rows
    for name in SPEED + TRAIN:
        cells = rows[name]
        # speed: row, status, dtype, ..., host syncs, wall s, commit, command; trainings: run, status,
        # dtype, wall s, ..., commit, command
        wall = cells[11] if name in SPEED else cells[3]
        assert name not in SPEED or cells[10] == "-"  # host syncs: counted on CUDA only
        assert cells[1] == "ok" and float(wall) >= 0 and cells[-2] == commit, cells
        assert cells[2] in ("float32", "bfloat16", "float16", "-"), cells  # -: writes data
        assert re.fullmatch(r"`python (bench|train|data)\.py .*`", cells[-1]), cells
    assert rows["quick: quick_start"][2] == "float32"
    assert rows["fcos_r50_train_bf16"][8] != "-"  # ours / torchvision's FCOS, from the same run
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"./logs/speed.{n}.log" for n in SPEED} <= names and "./quick_start/eval.json" in names
    assert not any(n.endswith(".pt") for n in names)

    # a run that crashed after its last JSON line (or printed none): a failed row, the rest stays
    with open(tmp_path / "out_runs" / "logs" / "speed.dla34_infer_bf16.log", "a") as f:
        f.write("Traceback (most recent call last):\n"
                "RuntimeError: CUDA error: an illegal memory access was encountered\n")
    r = script(tmp_path, STEP="report")
    assert r.returncode == 0, r.stderr[-3000:]
    _, rows = results(tmp_path)
    assert rows["dla34_infer_bf16"][1] == "failed: its last line is not JSON: RuntimeError: CUDA " \
                                          "error: an illegal memory access was encountered"
    assert all(rows[n][1] == "ok" for n in SPEED[1:] + TRAIN)


def test_missing_gpu_and_missing_coco128_are_one_line(tmp_path):
    if not torch.cuda.is_available():  # where there is a GPU, the script would run
        r = script(tmp_path)
        assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith("reproduce_gpu.sh: no usable CUDA GPU ("), r.stderr
    nowhere = tmp_path / "nowhere"
    r = script(tmp_path, DRY_RUN="1", STEP="overfit", COCO128=str(nowhere))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stderr.splitlines()) == 1 and f"no COCO128 at {nowhere} (" in r.stderr, r.stderr
    _, rows = results(tmp_path)
    assert rows["overfit: coco128_fcosis"][1] == f"skipped: no COCO128 at {nowhere}"
    assert rows["overfit: coco128_fcosis"][3] == "-"  # no wall time: it did not run
