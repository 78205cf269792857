"""train.py and eval.py as a user runs them: tiny runs through the command line on a tiny
synthetic set (a few seconds each), resume, and the bad inputs of README, "What happens when
things fail"."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test runs train.py, eval.py or bench.py in a subprocess

TINY = [
    "--shapes_n_train=8", "--shapes_n_val=4", "--input_size=64",
    "--dla_channels=(4, 8, 8, 16, 16, 32)", "--head_conv=8", "--shape_size=8", "--dcn=False",
    "--batch_size=4", "--num_workers=0", "--log_interval=1", "--eval_every_epochs=1",
    "--device=cpu", "--threads=1",
]


def run(script, *args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def train(tmp_path, *args):
    return run("train.py", f"--shapes_dir={tmp_path / 'shapes'}", f"--out_dir={tmp_path / 'out'}", *TINY, *args,
               cwd=tmp_path)


def copy_of_run(run_dir, tmp_path):
    """A fresh out_dir holding a copy of the shared run's checkpoint, and its shapes set."""
    work = tmp_path / "w"
    os.makedirs(work / "out")
    (work / "out" / "ckpt.pt").write_bytes((run_dir / "out" / "ckpt.pt").read_bytes())
    os.symlink(run_dir / "shapes", work / "shapes")
    return work


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 4-iteration run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    r = train(tmp, "--max_iters=4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return tmp, r


def test_train_writes_checkpoint_curve_and_logs(trained):
    """Guards the user-facing outputs of a run: progress lines with named losses, lr and ETA,
    an evaluation line, an atomic checkpoint with the documented keys, the loss-curve PNG."""
    tmp, r = trained
    assert "iter 4/4" in r.stdout and "heatmap" in r.stdout and "ETA" in r.stdout and "lr" in r.stdout
    assert "eval @ iter 4" in r.stdout and "segm_AP" in r.stdout
    ckpt = torch.load(tmp / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scaler", "iter", "best_ap", "model_args", "config", "global_batch",
                         "iters_per_epoch"}
    assert ckpt["iter"] == 4 and ckpt["model_args"]["head_conv"] == 8 and ckpt["config"]["input_size"] == 64
    assert (tmp / "out" / "loss.png").stat().st_size > 1000
    assert not [p for p in os.listdir(tmp / "out") if ".tmp" in p]      # no temporary left behind


def test_shapes_set_reused_when_big_enough_rewritten_when_not(trained, tmp_path):
    """Guards train.py with a shapes set written by another config: a bigger set is read, not
    rewritten, and only its first shapes_n_train / shapes_n_val images are used; a smaller one is
    rewritten (saying why) to the size wanted. eval.py, given only the checkpoint, reads the same
    first shapes_n_val images."""
    tmp, _ = trained
    os.makedirs(tmp_path / "a")
    os.symlink(tmp / "shapes", tmp_path / "a" / "shapes")
    r = train(tmp_path / "a", "--shapes_n_train=4", "--shapes_n_val=2", "--max_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 train / 2 val images" in r.stdout and "writing the synthetic" not in r.stdout
    r = run("eval.py", f"--ckpt={tmp_path / 'a' / 'out' / 'ckpt.pt'}", "--device=cpu", "--num_workers=0",
            cwd=tmp_path / "a")                                     # eval.py reads the same first 2
    assert r.returncode == 0, r.stderr[-2000:]
    assert "on 2 images of" in r.stdout and json.loads(r.stdout.strip().splitlines()[-1])["num_images"] == 2
    os.makedirs(tmp_path / "b")
    r = train(tmp_path / "b", "--shapes_n_train=9", "--max_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "instances_train.json is missing" in r.stdout and "9 train / 4 val images" in r.stdout
    r = train(tmp_path / "b", "--shapes_n_train=10", "--max_iters=1", "--overwrite=True")   # b/out holds a ckpt.pt
    assert r.returncode == 0, r.stderr[-2000:]
    assert "instances_train.json has 9 images, 10 wanted" in r.stdout and "10 train / 4 val images" in r.stdout


def test_resume_continues_from_checkpoint(trained, tmp_path):
    """Guards --init_from=resume: it starts at the saved iteration (not 0), says so naming the
    checkpoint, and runs to max_iters."""
    tmp, _ = trained
    work = copy_of_run(tmp, tmp_path)
    r = train(work, "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter 5/6" in r.stdout and "iter 1/6" not in r.stdout
    assert f"resuming from {work / 'out' / 'ckpt.pt'} at iteration 4 of 6 (epoch 2)" in r.stdout
    assert torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=True)["iter"] == 6


def test_metrics_file_holds_every_log_line_and_evaluation(trained):
    """Guards out_dir/metrics.jsonl: the shared run (4 iterations of 2 per epoch, a log line at
    each, an evaluation at each epoch's end) wrote 6 records: log lines at iterations 1, 2, 3, 4
    (epochs 1/2 = 0.5, 1.0, 1.5, 2.0), each with the loss terms its printed line shows (to 4
    decimals), the lr, data and step time (the loader's wait is part of the step) and images/s;
    evaluations at iterations 2 and 4 with every AP number. Both curves are drawn from them.
    The printed ETA is h:mm; before the first evaluation (iterations 1 and 2) it leaves out the
    evaluations to come, naming them: those at the multiples of 2 in [1, 4) and the last one, 2;
    those in [2, 4) and the last, 2; from iteration 3 on they are timed and counted in."""
    tmp, r = trained
    records = [json.loads(line) for line in open(tmp / "out" / "metrics.jsonl")]
    logs, evals = [x for x in records if "lr" in x], [x for x in records if "bbox_AP" in x]
    assert len(records) == 6 and [x["iter"] for x in logs] == [1, 2, 3, 4] and [x["iter"] for x in evals] == [2, 4]
    assert [x["epoch"] for x in logs] == [0.5, 1.0, 1.5, 2.0]
    for x in logs:
        line = next(line for line in r.stdout.splitlines() if line.startswith(f"iter {x['iter']}/4 "))
        for k in ("loss", "heatmap", "mask"):
            assert f"{k} {x[k]:.4f}" in line, (k, line)
        assert f"lr {x['lr']:.2e}" in line and 0 <= x["data_time"] <= x["step_time"] and x["images_per_s"] > 0
        assert f"ms/iter (data {x['data_time'] * 1000:.0f}ms)" in line and re.search(r"\| ETA \d+:\d\d", line)
        assert ("+ 2 evaluation(s) not timed yet" in line) == (x["iter"] <= 2), line
    for x in evals:
        assert {f"{kind}_AP{s}" for kind in ("bbox", "segm") for s in ("", "50", "75", "s", "m", "l")} <= set(x)
        assert f"eval @ iter {x['iter']}: bbox_AP {x['bbox_AP']:.4f}" in r.stdout
    assert (tmp / "out" / "ap.png").stat().st_size > 1000


def test_resume_keeps_the_metrics_up_to_its_checkpoint(trained, tmp_path):
    """Guards metrics.jsonl across a resume: beside the shared run's checkpoint (iteration 4), its
    6 records, then what a run killed after that checkpoint leaves: a record of iteration 5 and
    a line cut mid-append. The resume to 6 iterations keeps the records up to iteration 4 byte for
    byte, drops the other two lines and appends its own: log lines at 1-6 once each (the
    iteration-5 record is the new run's, loss 99 is gone), evaluations at 2, 4 and 6."""
    tmp, _ = trained
    work = copy_of_run(tmp, tmp_path)
    before = (tmp / "out" / "metrics.jsonl").read_text()
    stale = json.dumps({"iter": 5, "epoch": 2.5, "loss": 99.0, "lr": 0.1})
    (work / "out" / "metrics.jsonl").write_text(before + stale + '\n{"iter": 6, "lo')
    r = train(work, "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-2000:]
    after = (work / "out" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in after.splitlines()]
    assert after.startswith(before) and 99.0 not in [x.get("loss") for x in records]
    assert [x["iter"] for x in records if "lr" in x] == [1, 2, 3, 4, 5, 6]
    assert [x["iter"] for x in records if "bbox_AP" in x] == [2, 4, 6]
    assert (work / "out" / "loss.png").stat().st_size > 1000 and (work / "out" / "ap.png").stat().st_size > 1000


def test_resume_from_another_config_names_the_keys(trained, tmp_path):
    """Guards loading a checkpoint into a different architecture: a clear error naming the
    differing key, and the checkpoint untouched."""
    tmp, _ = trained
    work = copy_of_run(tmp, tmp_path)
    before = digest(work / "out" / "ckpt.pt")
    r = train(work, "--max_iters=6", "--init_from=resume", "--head_conv=16")
    assert r.returncode != 0
    assert "another model config" in r.stderr and "head_conv" in r.stderr
    assert digest(work / "out" / "ckpt.pt") == before


def test_resume_on_another_global_batch_stops_naming_both(trained, tmp_path):
    """Guards a resume on another number of processes / batch split: the saved run took 8 images
    in batches of 4, 2 iterations per epoch. --batch_size=2 would make 4 per epoch (its epoch 2
    would start at the saved iteration 4, the lr steps at twice the images): one line naming both
    global batches and both epoch lengths, the checkpoint untouched. 2 x 2 micro-batches is the
    same global batch of 4 and the same 8 // 2 // 2 = 2 iterations per epoch: it resumes."""
    tmp, _ = trained
    work = copy_of_run(tmp, tmp_path)
    before = digest(work / "out" / "ckpt.pt")
    r = train(work, "--max_iters=6", "--init_from=resume", "--batch_size=2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert ("trained with a global batch of 4 images, 2 iterations per epoch; now 2 (batch_size 2 x 1 "
            "micro-batch(es) x 1 process(es)), 4 per epoch") in r.stderr, r.stderr[-2000:]
    assert digest(work / "out" / "ckpt.pt") == before
    r = train(work, "--max_iters=6", "--init_from=resume", "--batch_size=2", "--gradient_accumulation_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter 5/6" in r.stdout and "iter 1/6" not in r.stdout


def test_init_fresh_leaves_the_named_heads_out_of_the_import(trained, tmp_path):
    """Guards init_fresh (fine-tuning: the file holds a head that should start over): the shared
    run's checkpoint starts a new run whose Local Shape and Saliency heads are not imported; the
    accounting lists their 8 file tensors as ignored (conv_relu_conv: 2 weights + 2 biases each)
    and the same 8 model tensors as newly initialised. A pattern that matches no key stops with
    one line naming it; without weights to import (a fine-tuning config resumed or run from
    scratch) init_fresh has no effect, and a line says so."""
    tmp, _ = trained
    ckpt = str(tmp / "out" / "ckpt.pt")
    fresh = '--init_fresh=("head_sets.*.local_shape.*", "head_sets.*.saliency.*")'
    r = run("train.py", f"--shapes_dir={tmp / 'shapes'}", f"--out_dir={tmp_path / 'ft'}", *TINY, "--max_iters=1",
            f"--init_from={ckpt}", fresh, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ignored: 8 tensors of the file:" in r.stdout and "newly initialised: 8 tensors of the model:" in r.stdout
    assert "init_fresh 'head_sets.*.local_shape.*': started fresh" in r.stdout
    assert "head_sets.0.local_shape.* (4), head_sets.0.saliency.* (4)" in r.stdout
    r = run("train.py", f"--shapes_dir={tmp / 'shapes'}", f"--out_dir={tmp_path / 'ft2'}", *TINY, "--max_iters=1",
            f"--init_from={ckpt}", '--init_fresh=("head_sets.*.shape.*",)', cwd=tmp_path)
    assert r.returncode != 0 and "init_fresh pattern 'head_sets.*.shape.*' matches no tensor" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "ft2" / "ckpt.pt")
    r = train(tmp_path, "--max_iters=1", fresh)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no effect with init_from='scratch' (nothing is imported)" in r.stdout and "iter 1/1" in r.stdout


def test_resume_without_checkpoint(tmp_path):
    """Guards --init_from=resume with an empty out_dir: a message naming the missing path."""
    r = train(tmp_path, "--max_iters=2", "--init_from=resume")
    assert r.returncode != 0 and "no checkpoint at" in r.stderr and "ckpt.pt" in r.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trained, tmp_path):
    """Guards a diverging run: it stops with the loss terms printed, and the last good
    checkpoint is kept byte for byte. An absurd learning rate makes the weights overflow."""
    tmp, _ = trained
    work = copy_of_run(tmp, tmp_path)
    before = digest(work / "out" / "ckpt.pt")
    r = train(work, "--max_iters=20", "--init_from=resume", "--learning_rate=1e30", "--eval_every_epochs=50")
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-1000:]
    assert "non-finite loss" in r.stdout and "heatmap=" in r.stdout and "mask=" in r.stdout
    assert digest(work / "out" / "ckpt.pt") == before


def test_unknown_key_and_bad_value(tmp_path):
    """Guards the configurator as train.py uses it: a typo suggests the key, a wrong type
    names it; both exit with status 2 before any work."""
    r = run("train.py", "--lerning_rate=1e-3", cwd=tmp_path)
    assert r.returncode == 2 and "learning_rate" in r.stderr
    r = run("train.py", "--batch_size=big", cwd=tmp_path)
    assert r.returncode == 2 and "batch_size" in r.stderr


def test_cuda_asked_without_gpu(tmp_path):
    """Guards --device=cuda on a machine without a GPU: a clear message, not a CUDA traceback."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = train(tmp_path, "--device=cuda", "--max_iters=1")
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    r = run("eval.py", "--ckpt=x.pt", "--device=cuda", cwd=tmp_path)
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr


def test_missing_dataset_names_the_file(tmp_path):
    """Guards a wrong data_root: the error names the annotation file that is missing."""
    r = run("train.py", f"--data_root={tmp_path / 'nowhere'}", "--device=cpu", cwd=tmp_path)
    assert r.returncode != 0 and "instances_train2017.json" in r.stderr and "Traceback" not in r.stderr


def test_eval_cli_reads_checkpoint_and_prints_json_last(trained, tmp_path):
    """Guards eval.py's contract: it rebuilds the model from the checkpoint alone, finds the val
    set from the saved config, and prints one JSON line with the AP numbers last."""
    tmp, _ = trained
    r = run("eval.py", f"--ckpt={tmp / 'out' / 'ckpt.pt'}", "--device=cpu", "--num_workers=0",
            f"--results_json={tmp_path / 'res.json'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= stats["segm_AP"] <= 1.0 and stats["num_images"] == 4
    assert isinstance(json.load(open(tmp_path / "res.json")), list)


def test_eval_cli_model_args_overrides(trained):
    """Guards --model_args (inference-time switches over the checkpoint's model_args): a valid
    override changes the model that is built (mask_threshold 1.0: no mask pixel survives, so
    mask AP 0), a non-dict or an unknown field stops with one line naming the problem."""
    tmp, _ = trained
    ckpt = f"--ckpt={tmp / 'out' / 'ckpt.pt'}"
    r = run("eval.py", ckpt, "--device=cpu", "--num_workers=0", "--model_args={'mask_threshold': 1.0}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["segm_AP"] == 0.0
    for bad, words in (("[1]", "dict literal"), ("{'no_such_field': 1}", "no_such_field")):
        r = run("eval.py", ckpt, "--device=cpu", f"--model_args={bad}", cwd=tmp)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr


def test_eval_cli_bad_checkpoint(tmp_path):
    """Guards a corrupt checkpoint: eval.py names the file instead of a pickle traceback."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run("eval.py", f"--ckpt={bad}", "--device=cpu", cwd=tmp_path)
    assert r.returncode != 0 and "bad.pt" in r.stderr and "Traceback" not in r.stderr


def test_fcos_solver_bias_groups_and_constant_warmup(tmp_path):
    """Guards optimizer="sgd", FCOS's solver (fcos_core/solver/build.py and config/defaults.py:
    biases at BIAS_LR_FACTOR = 2 x the lr with WEIGHT_DECAY_BIAS = 0, weight decay 1e-4;
    configs/fcos/*.yaml: WARMUP_METHOD "constant" at WARMUP_FACTOR 1/3).
    lr 0.01, warm-up for 3 iterations, 4 iterations, no step; the printed base lr:
      it 0, 1, 2: 0.01 / 3 = 3.33e-03;  it 3: 1.00e-02.
    The optimizer saved at the end has two groups: every parameter whose name holds "bias" at
    2 * 0.01 = 0.02 without weight decay, the rest at 0.01 with weight decay 1e-4 (gradient
    clipping on: it runs over both groups).
    Adam ([CM 3.5]), linear warm-up from 0 over 2 iterations: it 0: 0.01 * 1/2 = 5.00e-03,
    it 1: 0.01 * 2/2 = 1.00e-02."""
    from model import ModelConfig, build_model
    r = train(tmp_path, "--max_iters=4", "--eval_every_epochs=50", "--learning_rate=0.01", "--optimizer=sgd",
              "--warmup_iters=3", "--grad_clip=10.0", "--lr_steps=()")
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [line.split("| lr ")[1].split(" ")[0] for line in r.stdout.splitlines() if line.startswith("iter ")]
    assert lrs == ["3.33e-03", "3.33e-03", "3.33e-03", "1.00e-02"]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    weights, biases = ckpt["optimizer"]["param_groups"]
    model = build_model(ModelConfig(**ckpt["model_args"]))
    n_bias = sum("bias" in n for n, _ in model.named_parameters())
    assert len(biases["params"]) == n_bias > 0 and len(weights["params"]) == len(list(model.parameters())) - n_bias
    assert biases["lr"] == pytest.approx(0.02) and biases["weight_decay"] == 0.0
    assert weights["lr"] == pytest.approx(0.01) and weights["weight_decay"] == pytest.approx(1e-4)
    os.makedirs(tmp_path / "lin")
    r = train(tmp_path / "lin", "--max_iters=2", "--eval_every_epochs=50", "--learning_rate=0.01",
              "--warmup_iters=2")
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [line.split("| lr ")[1].split(" ")[0] for line in r.stdout.splitlines() if line.startswith("iter ")]
    assert lrs == ["5.00e-03", "1.00e-02"]
    r = train(tmp_path, "--max_iters=1", "--optimizer=adamw", "--overwrite=True")
    assert r.returncode != 0 and "optimizer must be 'adam' or 'sgd'" in r.stderr and "Traceback" not in r.stderr


def test_test_input_size_used_by_train_and_eval(tmp_path):
    """Guards test_input_size: train.py evaluates at it, saves it, and eval.py takes it from the
    checkpoint (the training input_size only when it is 0), --input_size still overriding."""
    r = train(tmp_path, "--max_iters=2", "--test_input_size=96")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "out" / "ckpt.pt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["config"]["test_input_size"] == 96
    for args, size in (((), 96), (("--input_size=80",), 80)):
        r = run("eval.py", f"--ckpt={ckpt}", "--device=cpu", "--num_workers=0", *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "on 4 images of" in r.stdout and f"at input size {size}" in r.stdout, r.stdout[-500:]


def test_keep_res_saved_and_read_by_eval(trained, tmp_path):
    """Guards keep_res (CenterNet's --keep_res test mode): a run saves it in the checkpoint's
    config (False by default), eval.py takes it from there (a copy of the checkpoint with
    keep_res True evaluates each image at its own size) and --keep_res=False/True overrides it."""
    tmp, _ = trained
    ckpt = torch.load(tmp / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["keep_res"] is False
    ckpt["config"]["keep_res"] = True
    torch.save(ckpt, tmp_path / "keep.pt")
    torch.save(dict(ckpt, config=dict(ckpt["config"], keep_res=False)), tmp_path / "fixed.pt")
    own, fixed = "centernet test transform with each image at its own size (keep_res)", "at input size 64"
    for name, args, words in (("keep.pt", (), own), ("keep.pt", ("--keep_res=False",), fixed),
                              ("fixed.pt", (), fixed), ("fixed.pt", ("--keep_res=True",), own)):
        r = run("eval.py", f"--ckpt={tmp_path / name}", "--device=cpu", "--num_workers=0", *args, cwd=tmp)
        assert r.returncode == 0, r.stderr[-2000:]
        assert words in r.stdout, r.stdout[-500:]
        assert 0.0 <= json.loads(r.stdout.strip().splitlines()[-1])["segm_AP"] <= 1.0


def test_predict_on_own_pictures(trained, tmp_path):
    """Guards predict.py, a checkpoint on a user's own pictures: from a folder holding one real
    picture (one of the shapes images), a text file and a corrupt JPEG, it writes the picture's
    drawing and its maps, and predictions.json keyed by file name with each detection's label,
    class name (from the checkpoint: train.py saves class_names and label_to_cat_id), COCO
    category id, score, xywh box in the picture's pixels and RLE mask of the picture's size;
    the two other files are named as skipped, and no temporary file is left. A checkpoint
    without the class names shows its classes by their label numbers."""
    import shutil
    run_dir, _ = trained
    ckpt = torch.load(run_dir / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["ellipse", "rectangle", "triangle", "ring"]
    assert ckpt["label_to_cat_id"] == [1, 2, 3, 4]
    pics = tmp_path / "pics"
    pics.mkdir()
    shapes_img = sorted((run_dir / "shapes" / "val").iterdir())[0]
    shutil.copy(shapes_img, pics / "mine.png")
    (pics / "notes.txt").write_text("not a picture")
    (pics / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "pred"
    r = run("predict.py", f"--ckpt={run_dir / 'out' / 'ckpt.pt'}", f"--input={pics}", f"--out_dir={out}",
            "--score_threshold=0.0", "--maps=True", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "skipping" in r.stdout and "notes.txt" in r.stdout and "bad.jpg" in r.stdout
    assert sorted(os.listdir(out)) == ["mine_maps.png", "mine_pred.png", "predictions.json"]
    preds = json.load(open(out / "predictions.json"))
    assert list(preds) == ["mine.png"] and len(preds["mine.png"]) > 0
    from PIL import Image
    W, H = Image.open(pics / "mine.png").size
    for d in preds["mine.png"]:
        assert d["class"] == ckpt["class_names"][d["label"]] and d["category_id"] == d["label"] + 1
        assert 0.0 <= d["score"] <= 1.0 and len(d["bbox"]) == 4 and d["segmentation"]["size"] == [H, W]
    # an older checkpoint, without the class names: the label numbers name the classes
    old = {k: v for k, v in ckpt.items() if k not in ("class_names", "label_to_cat_id")}
    torch.save(old, tmp_path / "old.pt")
    r = run("predict.py", f"--ckpt={tmp_path / 'old.pt'}", f"--input={pics / 'mine.png'}",
            f"--out_dir={tmp_path / 'pred_old'}", "--score_threshold=0.0", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    dets = json.load(open(tmp_path / "pred_old" / "predictions.json"))["mine.png"]
    assert dets and all(d["class"] == str(d["label"]) and d["category_id"] == d["label"] for d in dets)
    r = run("predict.py", f"--ckpt={run_dir / 'out' / 'ckpt.pt'}", f"--input={tmp_path / 'nothing*.png'}", cwd=tmp_path)
    assert r.returncode != 0 and "names no file" in r.stderr and "Traceback" not in r.stderr


def test_predict_exits_2_when_every_input_is_skipped(trained, tmp_path):
    """Guards predict.py exiting 0 (with an empty predictions.json) when no input could be read:
    one line saying so, exit status 2, nothing written."""
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = run("predict.py", f"--ckpt={trained[0] / 'out' / 'ckpt.pt'}", f"--input={tmp_path / '*.*'}",
            f"--out_dir={tmp_path / 'out'}", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"predict.py: error: none of the 2 file(s) of --input={str(tmp_path / '*.*')!r} is an image that can "
        "be read"], r.stderr
    assert not os.path.exists(tmp_path / "out")


HOST_READS = """
import atexit, os, runpy, sys, torch
TRAIN = {train!r}
reads = [0]


def counted(name):
    original = getattr(torch.Tensor, name)

    def read(self, *args, **kwargs):  # a tensor value read on the host by a line of train.py itself
        if sys._getframe(1).f_code.co_filename == TRAIN:
            reads[0] += 1
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, read)


for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
    counted(name)
atexit.register(lambda: print("HOST_READS", reads[0], flush=True))
sys.argv = [TRAIN] + sys.argv[1:]
sys.path.insert(0, os.path.dirname(TRAIN))
runpy.run_path(TRAIN, run_name="__main__")
"""


def test_training_loop_reads_the_host_per_log_line_not_per_step_and_accumulates(tmp_path):
    """Guards the loop's device-side tally (nanoGPT: the loss is read at log_interval only): the
    number of tensor reads on the host by train.py's own lines (.item(), .tolist(), bool(), float(),
    int() of a tensor) does not grow with the number of steps: 4 steps in 2 epochs with one log
    line and one evaluation read exactly as often as 8 steps in 2 epochs with one log line and one
    evaluation (a read per step, as `if not torch.isfinite(loss)` and a `.item()` per loss term
    were, gives 4 more; the checkpoint at the first epoch's end reads once in both).
    The second run also accumulates 2 micro-batches of 1 image per step: 8 images / (1 x 2) = 4
    steps per epoch, so its 8 steps are 2 epochs."""
    wrapper = tmp_path / "count_reads.py"
    wrapper.write_text(HOST_READS.format(train=os.path.join(ROOT, "train.py")))
    counts = {}
    for name, args in (("4", ["--max_iters=4", "--log_interval=4", "--eval_every_epochs=2"]),
                       ("8", ["--max_iters=8", "--log_interval=8", "--eval_every_epochs=2", "--batch_size=1",
                              "--gradient_accumulation_steps=2"])):
        work = tmp_path / name
        work.mkdir()
        r = subprocess.run([sys.executable, str(wrapper), f"--shapes_dir={tmp_path / 'shapes'}",
                            f"--out_dir={work / 'out'}", *TINY, *args], cwd=work, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        counts[name] = int(r.stdout.split("HOST_READS ")[1].split()[0])
        log = r.stdout
    assert counts["8"] == counts["4"] > 0, counts
    # the accumulating run: 8 images / (1 x 2) = 4 steps per epoch, 2 images per step
    assert "training for 8 iterations (4 per epoch, batch 1 x 1 x 2 micro-batches)" in log
    assert "iter 8/8 (epoch 2.0)" in log


def test_global_batch_and_learning_rate_printed_and_a_changed_recipe_warned(trained, tmp_path):
    """Guards the recipe's global batch: a config file gives one process batch_size x
    gradient_accumulation_steps (train.py's defaults: 32 x 1). The shared tiny run launches 4 x 1
    on one process without its own learning rate: the start names the global batch and the rate,
    and warns, naming both batches. A config file of 2 x 2 launched as batch 4 x 1 keeps its 4
    images per step (no warning); launched as 4 x 2 (8) with its own --learning_rate, it is a
    recipe the user chose (no warning)."""
    _, r = trained
    assert "global batch 4 (1 process(es) x batch_size 4 x 1 micro-batch(es)), learning rate 0.00025" in r.stdout
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning: the config's recipe")]
    assert len(warnings) == 1 and "steps on 32 images" in warnings[0] and "steps on 4," in warnings[0]
    config = tmp_path / "two_by_two.py"
    config.write_text("batch_size = 2\ngradient_accumulation_steps = 2\n")
    for extra, warned in ((["--gradient_accumulation_steps=1"], False),
                          (["--gradient_accumulation_steps=2", "--learning_rate=5e-4"], False),
                          (["--gradient_accumulation_steps=2"], True)):
        work = tmp_path / "_".join(a.split("=")[1] for a in extra)
        work.mkdir()
        r = run("train.py", str(config), f"--shapes_dir={trained[0] / 'shapes'}", f"--out_dir={work / 'out'}", *TINY,
                "--max_iters=1", "--eval_every_epochs=100", *extra, cwd=work)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert ("warning: the config's recipe steps on 4 images" in r.stdout) == warned, (extra, r.stdout[-2000:])


def test_gradient_accumulation_steps_bad_values(tmp_path):
    """Guards gradient_accumulation_steps values that cannot work: 0, and more micro-batches per
    step than the epoch holds (8 images in batches of 4: 2 batches < 3), each one line naming the
    key, no traceback."""
    r = train(tmp_path, "--max_iters=1", "--gradient_accumulation_steps=0")
    assert r.returncode != 0 and "gradient_accumulation_steps must be an integer >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr
    r = train(tmp_path, "--max_iters=1", "--gradient_accumulation_steps=3")
    assert r.returncode != 0 and "batch_size=4 x 3 micro-batch(es) x 1 process(es) is larger" in r.stderr
    assert "Traceback" not in r.stderr


def start_and_stop_after(work, line, signum, *args):
    """Start a tiny run on test_faults' shared-set layout and send it `signum` as soon as a line of
    its log starts with `line`; returns (exit status, the whole log)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--shapes_dir={work.parent / 'shapes'}",
           f"--out_dir={work / 'out'}", *TINY, *args]
    p = subprocess.Popen(cmd, cwd=work, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = []
    for text in p.stdout:
        seen.append(text)
        if line and text.startswith(line):
            p.send_signal(signum)
            line = None  # once
    return p.wait(timeout=120), "".join(seen)


def test_sigterm_and_ctrl_c_checkpoint_and_the_resumed_run_ends_as_the_uninterrupted_one(tmp_path):
    """Guards stopping (README, "What happens when things fail"). SIGTERM sent to a running
    train.py once it has logged iteration 1 stops it at the next iteration boundary N: exit status
    128 + 15 = 143, its last line names ckpt.pt, which holds iteration N. Resumed (the start names
    the checkpoint and N), Ctrl-C (SIGINT) after iteration N + 2 stops it again at M >= N + 2, exit
    status 128 + 2 = 130. Resumed to the end, the weights and Adam state equal bitwise those of
    the run never stopped (test_faults' exact setup: CPU, float32, one thread, no workers), and
    metrics.jsonl holds each iteration's log line once (1-12) with the uninterrupted run's losses,
    and its evaluations (3, 6, 9, 12) once with its APs. The uninterrupted run's ETA, until its
    first evaluation (iterations 1-3), names the 4 evaluations to come: the multiples of 3 in
    [it, 12) (3, 6, 9) and the last one."""
    from test_faults import EXACT, assert_same_state, load, train_in  # test_faults imports this file
    reference, work = tmp_path / "reference", tmp_path / "stopped"
    reference.mkdir()
    work.mkdir()
    r = train_in(reference, *EXACT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for line in (line for line in r.stdout.splitlines() if line.startswith("iter ")):
        assert ("+ 4 evaluation(s) not timed yet" in line) == (int(line.split()[1].split("/")[0]) <= 3), line
    ckpt = work / "out" / "ckpt.pt"
    stops = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        after = stops[-1] + 2 if stops else 1
        code, log = start_and_stop_after(work, f"iter {after}/12 ", signum, *EXACT,
                                         *(["--init_from=resume"] if stops else []))
        stop = re.fullmatch(rf"train.py: {signum.name} at iteration (\d+) of 12: wrote {re.escape(str(ckpt))}; "
                            r"the same command with --init_from=resume goes on from it", log.strip().splitlines()[-1])
        assert code == 128 + signum and stop and "Traceback" not in log, log[-3000:]
        assert stops == [] or f"resuming from {ckpt} at iteration {stops[-1]} of 12" in log
        stops.append(int(stop.group(1)))
        assert after <= stops[-1] < 12 and load(ckpt)["iter"] == stops[-1], (after, stops)
    r = train_in(work, *EXACT, "--init_from=resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert_same_state(load(ckpt), load(reference / "out" / "ckpt.pt"))
    metrics = [[json.loads(line) for line in open(run / "out" / "metrics.jsonl")] for run in (work, reference)]
    logs = [[(x["iter"], x["loss"]) for x in records if "lr" in x] for records in metrics]
    evals = [[(x["iter"], x["bbox_AP"], x["segm_AP"]) for x in records if "bbox_AP" in x] for records in metrics]
    assert [i for i, _ in logs[0]] == list(range(1, 13)) and logs[0] == logs[1]
    assert [i for i, _, _ in evals[0]] == [3, 6, 9, 12] and evals[0] == evals[1]
