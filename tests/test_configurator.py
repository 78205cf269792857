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


def test_prints_overrides(capsys):
    """Guards: overrides no longer being echoed (nanoGPT's "Overriding: key = value"), which
    is how logs record what a run actually used."""
    apply_overrides(defaults(), ["--batch_size=4"])
    assert "Overriding: batch_size = 4" in capsys.readouterr().out


def test_config_from_globals_filters():
    """Guards: modules, functions and private names leaking into the saved config."""
    ns = {"a": 1, "_b": 2, "os": os, "f": lambda: 0, "c": (1, 2), "d": None}
    assert config_from_globals(ns) == {"a": 1, "c": (1, 2), "d": None}


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
