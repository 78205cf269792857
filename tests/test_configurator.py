"""Tests of configurator.py: config files and --key=value overrides, and their errors."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configurator import ConfigError, apply_overrides, config_from_globals  # noqa: E402


def defaults():
    return {
        "batch_size": 8,
        "learning_rate": 2.5e-4,
        "out_dir": "out",
        "compile": False,
        "input_size": (512, 512),
        "lr_steps": [100, 120],
        "max_images": None,
    }


def test_overrides_each_type():
    """Guards: values of every default type (int, float, str, bool, tuple, list, None) being
    parsed to the wrong type, e.g. the string "False" (truthy) for a bool."""
    cfg = apply_overrides(defaults(), [
        "--batch_size=16", "--learning_rate=1e-3", "--out_dir=runs/a b", "--compile=True",
        "--input_size=(256, 320)", "--lr_steps=[5, 7]", "--max_images=100"], verbose=False)
    assert cfg["batch_size"] == 16 and type(cfg["batch_size"]) is int
    assert cfg["learning_rate"] == 1e-3
    assert cfg["out_dir"] == "runs/a b"
    assert cfg["compile"] is True
    assert cfg["input_size"] == (256, 320) and isinstance(cfg["input_size"], tuple)
    assert cfg["lr_steps"] == [5, 7] and isinstance(cfg["lr_steps"], list)
    assert cfg["max_images"] == 100


def test_str_default_keeps_raw_string_and_quoted_strings():
    """Guards: `--out_dir=123` turning into an int, and quoted values keeping their quotes."""
    cfg = apply_overrides(defaults(), ["--out_dir=123"], verbose=False)
    assert cfg["out_dir"] == "123"
    cfg = apply_overrides(defaults(), ["--out_dir='x y'"], verbose=False)
    assert cfg["out_dir"] == "x y"
    cfg = apply_overrides(defaults(), ["--out_dir=cuda:1"], verbose=False)
    assert cfg["out_dir"] == "cuda:1"


def test_none_default_takes_any_literal_and_stays_free_after_override():
    """Guards: `None` defaults being impossible to override (nanoGPT's type assert), and the
    expected type being taken from an overridden value instead of the default."""
    cfg = apply_overrides(defaults(), ["--max_images=[1, 2]"], verbose=False)
    assert cfg["max_images"] == [1, 2]
    cfg = apply_overrides(defaults(), ["--max_images=5", "--max_images=None"], verbose=False)
    assert cfg["max_images"] is None
    cfg = apply_overrides(defaults(), ["--max_images=val2017"], verbose=False)
    assert cfg["max_images"] == "val2017"          # not a literal: the raw string


def test_int_accepted_for_float_and_converted():
    """Guards: `--learning_rate=1` being rejected, or stored as int (then e.g. `lr / 3` and
    JSON dumps differ from a float run)."""
    cfg = apply_overrides(defaults(), ["--learning_rate=1"], verbose=False)
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float


def test_tuple_default_accepts_list_and_stays_tuple():
    """Guards: a list given for a tuple key ending up a list in the saved config."""
    cfg = apply_overrides(defaults(), ["--input_size=[300, 400]"], verbose=False)
    assert cfg["input_size"] == (300, 400) and isinstance(cfg["input_size"], tuple)


def test_unknown_key_suggests_close_match():
    """Guards: a typo'd key (`--lerning_rate`) being silently ignored, so the run trains with
    the default learning rate."""
    with pytest.raises(ConfigError) as e:
        apply_overrides(defaults(), ["--lerning_rate=1e-3"], verbose=False)
    assert "lerning_rate" in str(e.value) and "learning_rate" in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("arg, expected", [
    ("--batch_size=1.5", "int"), ("--batch_size=True", "int"), ("--compile=1", "bool"),
    ("--learning_rate=fast", "float"), ("--input_size=512", "tuple"),
    ("--out_dir=None", None)])
def test_wrong_type_names_key_value_and_type(arg, expected):
    """Guards: a value of the wrong type (1.5 for an int, 1 for a bool: bool is an int
    subclass) being accepted and failing far away, or an error that does not say which key."""
    if expected is None:        # a str default takes any text, even "None"
        assert apply_overrides(defaults(), [arg], verbose=False)["out_dir"] == "None"
        return
    key, value = arg[2:].split("=")
    with pytest.raises(ConfigError) as e:
        apply_overrides(defaults(), [arg], verbose=False)
    msg = str(e.value)
    assert key in msg and value in msg and expected in msg


def test_key_without_value_is_an_error():
    """Guards: `--compile` (no `=value`) being taken as a config file path or ignored."""
    with pytest.raises(ConfigError, match="--compile"):
        apply_overrides(defaults(), ["--compile"], verbose=False)


def test_missing_config_file_names_path(tmp_path):
    """Guards: a FileNotFoundError traceback (or silence) for a mistyped config path."""
    path = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="nope.py"):
        apply_overrides(defaults(), [path], verbose=False)


def test_config_file_syntax_error_names_path(tmp_path):
    """Guards: a config file with a syntax error giving a traceback that hides the file."""
    path = tmp_path / "bad.py"
    path.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="bad.py"):
        apply_overrides(defaults(), [str(path)], verbose=False)


def test_config_file_then_cli_wins_and_helpers_allowed(tmp_path):
    """Guards: the order of application (a CLI override must beat the config file given
    before it), config files losing access to imports/helpers, and unknown names in a config
    file being ignored."""
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent("""
        import math
        _base = 4
        batch_size = _base * 4
        learning_rate = 1           # int for a float key
        out_dir = "from_file"
        input_size = [320, 320]
    """))
    cfg = apply_overrides(defaults(), [str(path), "--batch_size=2"], verbose=False)
    assert cfg["batch_size"] == 2
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float
    assert cfg["out_dir"] == "from_file"
    assert cfg["input_size"] == (320, 320)

    path.write_text("lerning_rate = 0.1\n")
    with pytest.raises(ConfigError) as e:
        apply_overrides(defaults(), [str(path)], verbose=False)
    assert "learning_rate" in str(e.value) and "cfg.py" in str(e.value)


def test_prints_overrides(capsys, tmp_path):
    """Guards: overrides no longer being echoed, which is how logs record what a run actually
    used, as ONE line (nanoGPT printed one "Overriding: key = value" line per key): each changed
    key once with its final value, then where they came from; a value equal to the default set
    by a config file is no change; no override, no line."""
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 2\nout_dir = 'out'\n")
    apply_overrides(defaults(), [str(cfg), "--batch_size=4", "--learning_rate=1"])
    assert capsys.readouterr().out == (f"overrides: batch_size=4, learning_rate=1.0 "
                                       f"({cfg}, command line)\n")
    apply_overrides(defaults(), [])
    assert capsys.readouterr().out == ""


def test_config_from_globals_filters():
    """Guards: modules, functions, private names and constants (capitals) leaking into the saved
    config."""
    ns = {"a": 1, "_b": 2, "os": os, "f": lambda: 0, "c": (1, 2), "d": None, "NON_FINITE": "a message",
          "lr_2x": 0.1}
    assert config_from_globals(ns) == {"a": 1, "c": (1, 2), "d": None, "lr_2x": 0.1}


def test_imported_message_constant_is_no_key():
    """Guards the case met: train.py imports model.NON_FINITE_DEFORM (a message) before the
    configurator line; it was the first key of `train.py --help` and was saved in config.json."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    keys = r.stdout.split("in a config file):")[1].split()
    assert r.returncode == 0 and keys[0] == "--out_dir='out'" and "NON_FINITE" not in r.stdout


SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
batch_size = 8
learning_rate = 0.1
device = "cpu"
compile = False   # a config key that shadows a builtin the configurator itself uses
exec(open(os.path.join({root!r}, 'configurator.py')).read())
print(json.dumps({{"batch_size": batch_size, "learning_rate": learning_rate, "device": device}}))
"""


def _run(tmp_path, *args):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=60)


def test_exec_usage_end_to_end(tmp_path):
    """Guards: the nanoGPT exec usage (globals overridden in the calling script) breaking,
    e.g. the override applied to a copy of the config but not to the script's globals."""
    r = _run(tmp_path, "--batch_size=3", "--device=cuda:0")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert '"batch_size": 3' in last and '"device": "cuda:0"' in last


def test_exec_config_file_with_builtin_named_key(tmp_path):
    """Guards: a script's config key named like a builtin (train.py's `compile = False`)
    shadowing the builtin that the exec'd configurator calls to read a config file."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 5\ncompile = True\n")
    r = _run(tmp_path, str(cfg))
    assert r.returncode == 0, r.stderr
    assert '"batch_size": 5' in r.stdout.strip().splitlines()[-1]


def test_exec_unknown_key_exits_2_with_one_line(tmp_path):
    """Guards: an unknown key in the exec'd configurator producing a traceback (or exit 0)
    instead of a one-line message and exit status 2."""
    r = _run(tmp_path, "--batch_sise=3")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_size" in lines[0] and "Traceback" not in r.stderr


def test_import_has_no_side_effects():
    """Guards: `import configurator` parsing pytest's own sys.argv (and exiting)."""
    import importlib
    import configurator
    importlib.reload(configurator)     # would raise SystemExit if the exec'd block ran


# -----------------------------------------------------------------------------
# train.py's model keys: grouped by method (configurator.config_groups), checked before any work

def test_every_model_field_is_in_exactly_one_group():
    """Guards configurator.config_groups against drift from ModelConfig: a new field left out of every
    group would be refused for every method, one listed twice would be ambiguous."""
    from dataclasses import fields
    from model import METHODS, ModelConfig
    from configurator import config_groups, fields_of
    listed = [f for _, _, _, names in config_groups() for f in names]
    assert sorted(listed) == sorted(f.name for f in fields(ModelConfig))
    assert len(listed) == len(set(listed))
    for method in METHODS:
        for backbone in (("dla34", "hourglass104") if method == "centermask" else ("resnet50",)):
            keys = fields_of(method, backbone)
            assert {"method", "backbone", "num_classes"} <= set(keys)
    assert "dcn" in fields_of("centermask", "dla34") and "dcn" not in fields_of("centermask", "hourglass104")
    assert "attention" in fields_of("fcosis", "resnet50") and "attention" not in fields_of("maskfcos", "resnet50")


def test_check_settings_names_the_unread_key_and_the_methods_keys():
    """Guards the check itself: a key set away from its default that the method does not read
    stops with one line naming it and the method's own keys; the defaults of every method pass,
    and a list equal to a tuple default (a config file's list) is not a change."""
    from dataclasses import fields
    from model import METHODS, ModelConfig
    from configurator import check_settings
    base = {f.name: f.default for f in fields(ModelConfig)}
    for method in METHODS:
        backbone = "dla34" if method == "centermask" else "resnet50"
        cfg = check_settings({**base, "method": method, "backbone": backbone})
        assert cfg.method == method
    check_settings({**base, "dla_channels": list(base["dla_channels"])})
    with pytest.raises(ValueError) as e:
        check_settings({**base, "attention": "mu0"})
    msg = str(e.value)
    assert "attention='mu0'" in msg and "method='centermask'" in msg and "shape_size" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="dcn=False.*hourglass104"):
        check_settings({**base, "backbone": "hourglass104", "dcn": False})
    with pytest.raises(ValueError, match="saliency"):                        # ModelConfig's own value check
        check_settings({**base, "saliency": "specifc"})


def synthetic_targets(B, S, num_classes, seed=0):
    """B random images (B, 3, S, S) and per image three boxes (xyxy) with their elliptic masks
    (uint8 (3, S, S)) and labels: what data.collate_fn hands a model."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, S, S, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")     # (S, S)
    targets = []
    for _ in range(B):
        wh = (torch.rand(3, 2, generator=gen) * 3 + 1) * S / 8                               # (3, 2)
        x0y0 = torch.rand(3, 2, generator=gen) * (S - wh)
        c, r = x0y0 + wh / 2, wh / 2
        inside = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + \
                 ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1                  # (3, S, S)
        targets.append({"boxes": torch.cat([x0y0, x0y0 + wh], 1), "masks": inside.to(torch.uint8),
                        "labels": torch.randint(0, num_classes, (3,), generator=gen)})
    return images, targets


# A value of every field other than its default, each one valid on its own (tiny models).
ALTERNATIVES = dict(
    mask_threshold=0.3, dcn=False, dla_channels=(8, 8, 16, 16, 32, 32), num_stacks=1, hg_dims=(8, 8, 16),
    hg_modules=(1, 1, 1), mask_loss_grid="input", saliency_loss=True,
    head_conv=16, shape_size=4, use_shape=False, saliency="specific",
    loss_weights=(2.0, 2.0, 0.2, 2.0), pretrained=True, norm="bn", fpn_channels=16,
    fcos_form="original", score_threshold=0.1, nms_threshold=0.5, ambiguity="mask",
    reg_weights=(0.5, 0.5, 0.0), center_sampling_at="mass", mask_proposals=8,
    attention="mu0", seg_classes="specific")

TINY_MODELS = {
    ("centermask", "dla34"): dict(dcn=False, dla_channels=(4, 8, 8, 16, 16, 32), head_conv=8, shape_size=8),
    ("centermask", "hourglass104"): dict(num_stacks=1, hg_dims=(8, 8, 16), hg_modules=(1, 1, 1), head_conv=8,
                                         shape_size=8),
    **{(m, "resnet18"): dict(norm="frozen_bn", fpn_channels=32, pretrained=False)
       for m in ("fcos", "fcosreg", "maskfcos", "centermask_fcos", "fcosis")},
}


@pytest.mark.parametrize("method,backbone", list(TINY_MODELS))
def test_keys_outside_a_methods_groups_do_not_change_it(method, backbone):
    """Guards config_groups against a key that a method does read (train.py would refuse a key
    that matters): every field outside fields_of(method) set to another value (the ones
    ModelConfig refuses for this method left out: they stop a run anyway) builds the same
    parameters, the same losses and the same detections, bit for bit. Tiny models, one batch
    of two 64 x 64 images with three objects."""
    import torch
    from model import ModelConfig, build_model
    from configurator import fields_of
    base = dict(method=method, backbone=backbone, num_classes=3, max_detections=10, **TINY_MODELS[method, backbone])
    read = set(fields_of(method, backbone))
    changed = {}
    for key, value in ALTERNATIVES.items():
        if key in read or key in base:
            continue
        try:
            ModelConfig(**{**base, **changed, key: value})
        except ValueError:                        # refused for this method (e.g. saliency_loss with FCOS)
            continue
        changed[key] = value
    assert len(changed) >= 6, changed
    images, targets = synthetic_targets(2, 64, 3, seed=0)
    results = []
    for settings in (base, {**base, **changed}):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**settings))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        losses = {k: v.detach() for k, v in model.train()(images, targets).items()}
        with torch.no_grad():
            dets = model.eval()(images)
        results.append((state, losses, dets))
    (s0, l0, d0), (s1, l1, d1) = results
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert l0.keys() == l1.keys() and all(torch.equal(l0[k], l1[k]) for k in l0), (l0, l1)
    assert len(d0) == len(d1) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                                      for a, b in zip(d0, d1))


@pytest.mark.slow
def test_train_py_stops_a_bad_model_key_before_any_work(tmp_path):
    """Guards train.py's check of the model keys, before the data set is written or read: an
    unknown method / backbone pairing, a misspelt choice and a key the method does not read
    each end with one line naming the key (and the allowed values or the method's keys),
    exit status 2, no traceback, nothing written."""
    config = ROOT / "config" / "shapes_centermask.py"
    for args, words in (([str(config), "--method=fcos"], ["method 'fcos'", "backbone"]),
                        ([str(config), "--saliency=specifc"], ["saliency", "'agnostic'", "'specific'"]),
                        ([str(config), "--attention=mu0"], ["attention='mu0'", "method='centermask'", "shape_size"])):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"--shapes_dir={tmp_path / 'shapes'}",
                            f"--out_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), r.stderr
        assert all(w in lines[0] for w in words), (words, lines[0])
        assert not (tmp_path / "shapes").exists() and not (tmp_path / "out").exists()


def test_transform_defaults_to_the_methods_own():
    """Guards the transform train.py takes for each method: CenterMask's square canvas, the FCOS
    family's short side, from each method's class (model.method_transform)."""
    from model import METHODS, method_transform
    assert {m: method_transform(m) for m in METHODS} == {
        "centermask": "centernet", "fcos": "fcos", "fcosreg": "fcos", "maskfcos": "fcos", "centermask_fcos": "fcos",
        "fcosis": "fcos"}


def test_bench_reads_train_py_defaults():
    """Guards bench.py sharing train.py's keys and defaults (configurator.defaults_of) instead of
    a copy: every train.py key is a bench.py key, with train.py's default except the ones bench.py
    declares as its own (batch_size, seed), so every config file runs in both. num_classes is no
    train.py key (the training json's), so bench.py's is its own."""
    import ast
    from configurator import defaults_of
    from dataclasses import fields
    from model import ModelConfig
    train = defaults_of(str(ROOT / "train.py"))
    assert {f.name for f in fields(ModelConfig)} - {"num_classes"} <= set(train)  # the model keys
    assert "num_classes" not in train and "transform" not in train and train["batch_size"] == 32
    tree = ast.parse((ROOT / "bench.py").read_text())
    own = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    overridden = own & set(train)
    assert overridden == {"batch_size", "seed"}, overridden


def test_defaults_of_a_script_without_configurator(tmp_path):
    """Guards defaults_of on a file that does not exec configurator.py: one ConfigError naming it.
    (Both names from the module as it is now: test_import_has_no_side_effects reloads it.)"""
    from configurator import ConfigError as CurrentConfigError, defaults_of
    p = tmp_path / "s.py"
    p.write_text("x = 1\n")
    with pytest.raises(CurrentConfigError, match="s.py"):
        defaults_of(str(p))
