"""Nothing a user trained is lost, and bad weights get a message, not a crash: train.py's refusal
to start over a checkpoint, the checks of every path that loads weights (train.py's resume and
import, eval.py, predict.py, weights.read_weights), DeformConv's refusal of non-finite offsets, the
synthetic set's own seed, and DataLoader workers under a start method that spawns.

Tiny runs through the command line, as tests/test_train.py's (a few seconds each)."""
import glob
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, WEIGHTS_MANIFESTS
from test_train import TINY, run


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def train(work, *args, shapes=None):
    return run("train.py", f"--shapes_dir={shapes or work / 'shapes'}", f"--out_dir={work / 'out'}", *TINY, *args,
               cwd=work)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny run (1 iteration, evaluated) whose out_dir holds a checkpoint."""
    work = tmp_path_factory.mktemp("first")
    r = train(work, "--max_iters=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return work


def copy_of(first_run, tmp_path):
    """A fresh work folder with a copy of the first run's checkpoint and its shapes set."""
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "ckpt.pt").write_bytes((first_run / "out" / "ckpt.pt").read_bytes())
    os.symlink(first_run / "shapes", tmp_path / "shapes")
    return tmp_path


# -- 1. a start that is not a resume never writes over a checkpoint --------------------------------

@pytest.mark.slow
def test_scratch_or_import_into_an_out_dir_with_a_checkpoint_stops_before_any_work(first_run, tmp_path):
    """Guards the runs a user would lose: the same command rerun after a kill without
    --init_from=resume (a scratch start), or weights imported into an out_dir that holds a run.
    Either stops with exit status 2 and one line naming the checkpoint and the ways on, before
    writing anything (not even the synthetic set, which is missing here); the checkpoint is
    untouched. --overwrite=True starts over there; --init_from=resume continues."""
    work = copy_of(first_run, tmp_path)
    before = digest(work / "out" / "ckpt.pt")
    for start in ("--init_from=scratch", f"--init_from={first_run / 'out' / 'ckpt.pt'}"):
        r = train(work, start, "--max_iters=1", shapes=work / "new_shapes")
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert str(work / "out" / "ckpt.pt") in lines[0] and "would write over it" in lines[0]
        assert "--init_from=resume" in lines[0] and "--out_dir" in lines[0] and "--overwrite=True" in lines[0]
        assert not (work / "new_shapes").exists() and sorted(os.listdir(work / "out")) == ["ckpt.pt"]
        assert digest(work / "out" / "ckpt.pt") == before
    r = train(work, "--max_iters=2", "--init_from=resume")           # continues: iteration 1 -> 2
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(work / "out" / "ckpt.pt", weights_only=True)["iter"] == 2
    r = train(work, "--max_iters=1", "--overwrite=True")             # starts over: iteration 0 -> 1
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(work / "out" / "ckpt.pt", weights_only=True)["iter"] == 1


# Two documented commands may share an out_dir only as launches of one run: the same resolved config
# up to these keys (1 GPU or 8, resumed or not).
SAME_RUN_KEYS = {"init_from", "batch_size", "gradient_accumulation_steps", "device"}


def documented_training_commands():
    """(file, arguments after train.py) of every training command in README.md and RESULTS.md: the
    code blocks' lines (backslash continuations joined) and the inline code spans that run train.py
    on a config; comments, shell transcripts of refused commands ("$ python ...") and lines with
    shell variables (the SLURM script) left out."""
    found = []
    for name in ("README.md", "RESULTS.md"):
        text = open(os.path.join(ROOT, name)).read()
        lines = [line for block in re.findall(r"```\n(.*?)```", text, re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
        for line in lines:
            code = line.split(" #")[0].strip()
            m = re.search(r"\btrain\.py (config/\S+\.py.*)", code)
            if m and not code.startswith(("#", "$")) and "$" not in code:
                found.append((name, tuple(shlex.split(m.group(1)))))
    return found


def test_every_documented_training_command_has_its_own_out_dir(monkeypatch):
    """Guards the runs README and RESULTS.md would have write over each other (the Table 1 rows,
    both seeds of a Table 3 row, the fine-tuning seeds, weights imported into a scratch run's
    folder): every documented training command parses with the configurator (its config exists,
    its keys are known), and two commands that resolve to one out_dir are launches of one run."""
    from configurator import apply_overrides, defaults_of
    defaults = defaults_of(os.path.join(ROOT, "train.py"))
    monkeypatch.chdir(ROOT)                                  # the commands' config paths are relative
    runs = {}
    commands = documented_training_commands()
    assert len(commands) >= 20 and {name for name, _ in commands} == {"README.md", "RESULTS.md"}
    for name, args in commands:
        config = apply_overrides(dict(defaults), list(args), verbose=False)
        same_run = {k: v for k, v in config.items() if k not in SAME_RUN_KEYS}
        if config["init_from"] == "resume":
            continue
        first = runs.setdefault(config["out_dir"], (name, args, same_run))
        differ = sorted(k for k in same_run if same_run[k] != first[2][k])
        assert not differ, (f"{name}: {' '.join(args)} writes into {config['out_dir']}, as {first[0]}: "
                            f"{' '.join(first[1])} (differing keys {differ})")


# -- 2. weights that cannot run are refused where they are loaded -----------------------------------

def spoiled(first_run, tmp_path, how):
    """A copy of the first run's checkpoint with one BatchNorm running_var made negative
    ("negative") or one weight made NaN ("nan"); returns (path, the tensor's name)."""
    ckpt = torch.load(first_run / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    if how == "negative":
        key = next(k for k in ckpt["model"] if k.endswith("running_var"))
        ckpt["model"][key][: 2] = -0.5
    else:
        key = next(k for k, v in ckpt["model"].items() if k.endswith("weight") and v.dim() == 4)
        ckpt["model"][key][0, 0, 0, 0] = float("nan")
    os.makedirs(tmp_path / "out", exist_ok=True)
    path = tmp_path / "out" / "ckpt.pt"
    torch.save(ckpt, path)
    return path, key


@pytest.mark.slow
@pytest.mark.parametrize("how", ["negative", "nan"])
def test_bad_weights_stop_every_loading_path_with_one_line(first_run, tmp_path, how):
    """Guards the crash the issue met (a DLA-34 whose running variances were partly negative
    trained its first step, then segfaulted at the first evaluation): a file holding a negative
    BatchNorm running_var or a NaN is refused by train.py's import (init_from=FILE) and resume,
    by eval.py and by predict.py, each with one line naming the file and the tensor."""
    path, key = spoiled(first_run, tmp_path, how)
    what = "negative BatchNorm running variance" if how == "negative" else "non-finite value(s) (NaN or inf)"
    os.symlink(first_run / "shapes", tmp_path / "shapes")
    os.makedirs(tmp_path / "other")
    picture = first_run / "shapes" / "val" / "000000.png"
    runs = {
        "import": train(tmp_path / "other", f"--init_from={path}", "--max_iters=1", shapes=tmp_path / "shapes"),
        "resume": train(tmp_path, "--init_from=resume", "--max_iters=2"),
        "eval": run("eval.py", f"--ckpt={path}", "--device=cpu", "--num_workers=0", cwd=tmp_path),
        "predict": run("predict.py", f"--ckpt={path}", f"--input={picture}", "--device=cpu", cwd=tmp_path),
    }
    for name, r in runs.items():
        assert r.returncode == 2, (name, r.stdout[-2000:], r.stderr[-2000:])
        last = r.stderr.strip().splitlines()
        assert len(last) == 1 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert str(path) in last[0] and f"tensor {key} " in last[0] and what in last[0], (name, last[0])


@pytest.mark.slow
def test_read_weights_refuses_a_centernet_file_with_negative_variances(tmp_path):
    """Guards the issue's file itself: CenterNet's DLA-34 layout (fabricated from its key
    manifest) whose running variances are partly negative is refused by read_weights, the door
    of every import, naming the file and the tensor; the same file with them positive is read."""
    from weights import read_weights
    with open(os.path.join(WEIGHTS_MANIFESTS, "centernet_ctdet_dla34_keys.json")) as f:
        keys = json.load(f)["keys"]
    state = {k: (torch.ones(shape) if k.endswith("running_var") else torch.zeros(shape)) for k, shape in keys.items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ctdet_coco_dla_2x.pth"
    torch.save({"epoch": 140, "state_dict": state}, path)
    assert read_weights(str(path)).kind == "centernet_dla34"
    key = "dla_up.ida_1.node_1.actf.0.running_var"
    state[key][[0, 3]] = -1.0
    torch.save({"epoch": 140, "state_dict": state}, path)
    with pytest.raises(ValueError) as e:
        read_weights(str(path))
    assert str(path) in str(e.value) and f"tensor {key} holds 2 negative BatchNorm running variance" in str(e.value)


def test_check_weights_names_the_tensor_and_passes_good_weights():
    """Guards weights.check_weights itself: inf in a weight, NaN in a bias, a negative running
    variance are each named; integer counters, zero variances and finite values pass."""
    from weights import check_weights
    good = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_var": torch.zeros(4),
            "bn.num_batches_tracked": torch.tensor(7)}
    check_weights(good, "good.pt")
    for key, value, what in (("conv.weight", float("inf"), "1 non-finite value(s) (NaN or inf) of 108"),
                             ("bn.running_var", -1e-3, "1 negative BatchNorm running variance(s) of 4")):
        bad = {k: v.clone() for k, v in good.items()}
        bad[key].view(-1)[1] = value
        with pytest.raises(ValueError, match="^" + re.escape(f"bad.pt: tensor {key} holds {what}")):
            check_weights(bad, "bad.pt")


# -- 3. non-finite values never reach torchvision's deform_conv2d ---------------------------------

def test_deform_conv_refuses_non_finite_input_instead_of_crashing():
    """Guards the segmentation fault: NaN offsets send deform_conv2d's sampling out of bounds
    (measured: all-NaN offsets kill the process with exit 139). A NaN in a DeformConv's input
    reaches its offsets; the node raises RuntimeError with model.NON_FINITE_DEFORM instead. A
    finite input runs as before."""
    from model import NON_FINITE_DEFORM, DeformConv
    node = DeformConv(4, 6, dcn=True).eval()
    x = torch.randn(2, 4, 8, 8)
    assert node(x).shape == (2, 6, 8, 8)
    x[1, 2, 3, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite values \(NaN or inf\) reach a deformable convolution"):
        node(x)
    x[1, 2, 3, 3] = float("inf")
    with pytest.raises(RuntimeError) as e:
        node(x)
    assert NON_FINITE_DEFORM in str(e.value)


@pytest.mark.slow
def test_non_finite_activations_at_a_deformable_convolution_stop_eval_with_one_line(tmp_path):
    """Guards the path no load-time check can see: finite weights so large that the activations
    overflow to inf and NaN before a deformable convolution. eval.py and predict.py stop with one
    line naming the checkpoint and the reason (exit status 2), not a segmentation fault (-11)."""
    r = train(tmp_path, "--max_iters=1", "--dcn=True")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["model"]["backbone.base.base_layer.0.weight"].fill_(1e38)           # finite, but x * 1e38 overflows
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    picture = tmp_path / "shapes" / "val" / "000000.png"
    for r in (run("eval.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--device=cpu", "--num_workers=0", cwd=tmp_path),
              run("predict.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", f"--input={picture}", "--device=cpu",
                  cwd=tmp_path)):
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "non-finite values (NaN or inf) reach a deformable convolution" in lines[0], r.stderr
        assert str(tmp_path / "out" / "ckpt.pt") in lines[0]


# -- 4. the synthetic set has its own seed ----------------------------------------------------------

@pytest.mark.slow
def test_shapes_set_has_its_own_seed_and_the_cli_writes_the_quick_starts_set(tmp_path):
    """Guards two sets that used to differ: a run with another training seed (--seed=1338)
    writes the set train.py writes by default, and `python data.py shapes --out=DIR` writes
    that same set byte for byte (here with small n and size; the CLI's defaults are the quick
    start's, checked against its config and data.SHAPES_DEFAULTS)."""
    from configurator import defaults_of
    from data import SHAPES_DEFAULTS
    quick = {}
    exec(open(os.path.join(ROOT, "config", "shapes_centermask.py")).read(), quick)
    assert SHAPES_DEFAULTS == {"n_train": quick["shapes_n_train"], "n_val": quick["shapes_n_val"],
                               "size": 128, "seed": 1337}
    assert SHAPES_DEFAULTS == {"n_train": 2000, "n_val": 200, "size": 128, "seed": 1337}
    r = train(tmp_path, "--max_iters=1", "--seed=1338", "--shapes_n_train=4", "--shapes_n_val=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shapes_seed 1337" in r.stdout
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "shapes", f"--out={tmp_path / 'cli'}",
                          "--n_train=4", "--n_val=2"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "cli")
                   for d, _, fs in os.walk(tmp_path / "cli") for f in fs)
    assert len(files) == 4 + 2 + 2
    for name in files:
        assert digest(tmp_path / "cli" / name) == digest(tmp_path / "shapes" / name), name


# -- 5. DataLoader workers where the default start method spawns -------------------------------------

SPAWN_BY_DEFAULT = """import multiprocessing
multiprocessing.set_start_method("spawn", force=True)   # as Windows, macOS and Python 3.14's Linux
"""
NO_FORK = SPAWN_BY_DEFAULT + """multiprocessing.get_all_start_methods = lambda: ["spawn"]  # as Windows
"""


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["spawn_by_default", "no_fork"])
def test_workers_under_a_spawning_start_method_do_not_rerun_train_py(tmp_path, platform):
    """Guards train.py (a script of globals, no __main__ guard) on platforms whose workers spawn:
    a spawned DataLoader worker would import the script again and rerun the training. Workers
    are forked where the platform can fork (the run trains once, with its worker), and where it
    cannot, the main process loads (one line says so). The platform is imitated by a
    sitecustomize that sets the start method before train.py runs."""
    site = tmp_path / "site"
    os.makedirs(site)
    (site / "sitecustomize.py").write_text(SPAWN_BY_DEFAULT if platform == "spawn_by_default" else NO_FORK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--shapes_dir={tmp_path / 'shapes'}",
                        f"--out_dir={tmp_path / 'out'}", *TINY, "--num_workers=1", "--max_iters=2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("training for 2 iterations") == 1 and r.stdout.count("done: 2 iterations") == 1
    said = "cannot fork DataLoader workers" in r.stdout
    assert said == (platform == "no_fork"), r.stdout[-2000:]


def test_size_script_counts_a_tree_by_hand(tmp_path):
    """Guards tests/size.py, the restructuring's yardstick, on a tree counted by hand:
    a.py: a 3-line module docstring, a comment, a blank line, `import b`, a 101-character
    assignment and a function (def line, 1-line docstring, return): code = import + assignment +
    def + return = 4 lines, 1 over 100 characters. b.py imports a inside a function (a circle a <->
    b; c.py imports only a: no circle). s.py, a configurator script: keys x and y (not _z) before
    its exec line, inside `if __name__ == "__main__":` as eval.py's; w below the line is no key.
    tests/ and config/ are not counted; README.md has 2 lines. All code: a 4 + b 3 + c 1 + s 5 = 13."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("x = 1\n")
    (tmp_path / "a.py").write_text('"""doc\nstring\n"""\n# comment\n\nimport b\n'
                                   + "v = '" + "x" * 95 + "'\n"
                                   + 'def f():\n    """one"""\n    return 1\n')
    (tmp_path / "b.py").write_text("def g():\n    import a\n    return a\n")
    (tmp_path / "c.py").write_text("import a\n")
    (tmp_path / "s.py").write_text('if __name__ == "__main__":\n    x = 1\n    y, _z = 2, 3\n'
                                   '    exec(open(os.path.join(d, "configurator.py")).read())\n    w = 4\n')
    (tmp_path / "README.md").write_text("one\ntwo\n")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import size
    finally:
        sys.path.pop(0)
    m = size.measure(str(tmp_path))
    files = {f[0]: f for f in m["files"]}
    assert set(files) == {"a.py", "b.py", "c.py", "s.py"}
    assert files["a.py"][1:] == (10, 4, 1)
    assert m["circles"] == [["a", "b"]]
    assert m["keys"] == {"s.py": ["x", "y"]}
    assert m["docs"] == {"README.md": 2}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "size.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "import circles: a <-> b" in r.stdout and "summary: code 13" in r.stdout


# Names the documents may use that are no key or file of this project: other programs' options
# (pytest's --durations, pip's --index-url, CenterNet's --fix_res, --arch and --lr of its
# experiments/*.sh, argparse's --help, the generic --key; torchrun's and SLURM's are cut out) and
# the upstream files a reading cites (CenterNet's, FCOS's, torchvision's). A foreign name is listed
# as written ("durations=" with its "="), so that a stale key of ours, say --lr=1e-4, is caught.
FOREIGN_OPTIONS = {"help", "key", "key=", "durations", "durations=", "index", "fix_res", "arch", "lr"}
UPSTREAM_FILES = {"coco.py", "ctdet.py", "fcos.py", "large_hourglass.py", "pose_dla_dcn.py", "test.py",
                  "ctdet_coco_dla_1x.sh", "ctdet_coco_dla_2x.sh"}


def named_in_the_documents():
    """(where, option names, file names) of README.md, METHODS.md and RESULTS.md (their `code` and
    code blocks), the top-level scripts' docstrings and the config files' comments."""
    import ast
    texts = []
    for doc in ("README.md", "METHODS.md", "RESULTS.md"):
        text = open(os.path.join(ROOT, doc)).read()
        blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
        texts.append((doc, " ".join(re.findall(r"`([^`\n]+)`", text) + blocks)))
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
        texts.append((os.path.basename(path), doc))
    for path in sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))):
        comments = [line for line in open(path) if line.lstrip().startswith("#")]
        texts.append((os.path.relpath(path, ROOT), "".join(comments)))
    out = []
    for where, text in texts:
        text = re.sub(r"#SBATCH[^\n]*", "", text)                           # SLURM's own options
        text = re.sub(r"torchrun.*?(?=\w+\.py)", "", text, flags=re.S)     # torchrun's, up to the script
        options = set(re.findall(r"(?<![\w-])--(\w+=?)", text))                 # "name=" or "name"
        files = set(re.findall(r"(?<![\w/.-])((?:config|tests|assets)/[\w./-]*\w\.(?:py|sh|md|json)|"
                               r"[\w-]+\.(?:py|sh))(?![\w/])", text))
        out.append((where, options, files))
    return out


def test_every_key_and_file_the_documents_name_exists():
    """Guards the documents against stale names (a key removed, a script renamed): every
    `--option` that README, METHODS.md, RESULTS.md, a script's docstring or a config's comments
    name is a key of train.py, eval.py, predict.py or bench.py, a ModelConfig field or an option of
    data.py's, pictures.py's or tests/mutate.py's command line (FOREIGN_OPTIONS aside), and every
    file they name exists (as named, or under config/ or assets/; UPSTREAM_FILES aside)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import size
    finally:
        sys.path.pop(0)
    keys = set()
    for script in ("train.py", "eval.py", "predict.py", "bench.py"):
        keys |= set(size.script_keys(open(os.path.join(ROOT, script)).read()))
    keys |= set(size.model_config_fields(open(os.path.join(ROOT, "model.py")).read()))
    for script in ("data.py", "pictures.py", "tests/mutate.py"):                  # argparse command lines
        keys |= set(re.findall(r"add_argument\(\"--(\w+)\"", open(os.path.join(ROOT, script)).read()))
    stale = []
    for where, options, files in named_in_the_documents():
        stale += [f"{where}: --{o}" for o in sorted(options)
                  if o.rstrip("=") not in keys and o not in FOREIGN_OPTIONS]
        stale += [f"{where}: {f}" for f in sorted(files - UPSTREAM_FILES)
                  if not any(os.path.exists(os.path.join(ROOT, d, f)) for d in ("", "config", "assets"))]
    assert not stale, stale
