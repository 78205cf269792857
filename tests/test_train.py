"""train.py and eval.py as a user runs them: tiny runs through the command line on a tiny
synthetic set (a few seconds each), resume, and the bad inputs of DESIGN section 7."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TINY = [
    "--shapes_n_train=8", "--shapes_n_val=4", "--shapes_size=64", "--input_size=64",
    "--dla_channels=(4, 8, 8, 16, 16, 32)", "--head_conv=8", "--shape_size=8", "--dcn=False",
    "--batch_size=4", "--num_workers=0", "--log_interval=1", "--eval_interval=2",
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
    ckpt = torch.load(tmp / "out" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert set(ckpt) >= {"model", "optimizer", "scaler", "iter", "best_ap", "model_args", "config"}
    assert ckpt["iter"] == 4 and ckpt["model_args"]["head_conv"] == 8 and ckpt["config"]["input_size"] == 64
    assert (tmp / "out" / "loss.png").stat().st_size > 1000
    assert not [p for p in os.listdir(tmp / "out") if ".tmp" in p]      # no temporary left behind


def test_resume_continues_from_checkpoint(trained, tmp_path):
    """Guards --init_from=resume: it starts at the saved iteration (not 0) and runs to max_iters."""
    tmp, _ = trained
    work = copy_of_run(tmp, tmp_path)
    r = train(work, "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter 5/6" in r.stdout and "iter 1/6" not in r.stdout
    assert torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=False)["iter"] == 6


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
    r = train(work, "--max_iters=20", "--init_from=resume", "--learning_rate=1e30", "--eval_interval=100")
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
