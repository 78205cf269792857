# Poor Man's Configurator (nanoGPT's), hardened.
#
# A script defines its configuration as plain module-level globals, then runs
#
#     exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
#
# which overrides those globals from the command line:
#
#     python train.py config/centermask_dla34.py --batch_size=16 --learning_rate=1e-4
#
# * a positional argument is a config file (plain Python assignments) that is exec'd;
# * `--key=value` overrides one key; the value is parsed with `ast.literal_eval`, falling
#   back to the raw string when the key's default is a str (so `--device=cuda:1` works);
# * arguments are applied left to right, so command-line overrides after the config file win.
#
# What "hardened" adds to nanoGPT's version (every failure is a one-line message, exit code 2):
# * an unknown key, in a config file or on the command line, is an error that lists the close
#   matches (a typo such as `--lerning_rate=...` would otherwise be silently ignored);
# * a missing config file, or one with a syntax error or that raises, names the file;
# * a value whose type does not match the default names the key, the value and the type;
#   `None` defaults accept any literal, an int is accepted (as float) for a float default,
#   bools accept only True/False (`--compile=1` is rejected: is 1 "on" or a typo?), and
#   tuples/lists keep the container type of the default (they end up in saved checkpoints);
# * `--key` without `=value` is an error (nanoGPT would treat it as a config file path).
#
# Config files may use imports and helper variables; helper names must start with '_' (every
# other new top-level name must be a known key). Modules, functions and classes are ignored.
#
# The logic is a function, `apply_overrides(config, argv)`, so tests can import this file as a
# module. Only the block at the bottom touches sys.argv, and it runs only when this file is
# exec'd into another script's globals (there `__name__` is the script's name, "__main__" or
# the script's module name), never on `import configurator`.
#
# Note: this file starts with comments, not a docstring, because an exec'd docstring would
# overwrite the calling script's `__doc__` (used by `--help`).

import ast
import builtins
import difflib
import os
import sys

# the value types a config key may have; everything else in a script's globals is not config
_CONFIG_TYPES = (int, float, bool, str, tuple, list, type(None))


class ConfigError(ValueError):
    """A bad config file or command-line override. The message is meant for the user."""


def config_from_globals(namespace):
    """The config part of a script's globals: public names whose values are plain literals.

    This is nanoGPT's `config_keys` filter; scripts call it after exec'ing this file to get
    the final config dict to save in a checkpoint: `config = config_from_globals(globals())`.
    A name in capitals is a constant, not a key (model.NON_FINITE_DEFORM, a message that
    train.py and predict.py import; bench.py's HERE): not in --help, not settable, not saved.
    """
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, _CONFIG_TYPES)}


def defaults_of(script):
    """The config keys and defaults of another script: its source up to the line that execs this
    file, run in a fresh namespace (imports included). bench.py takes train.py's this way, so
    that one config file serves both and the defaults are written once."""
    with open(script) as f:
        source = f.read()
    marker = source.find('"configurator.py")).read())')
    if marker < 0:
        raise ConfigError(f"{script} does not exec configurator.py: no config defaults to read")
    head = source[:source.rfind("\n", 0, marker) + 1]           # up to the line before the exec
    namespace = {"__file__": os.path.abspath(script), "__name__": "__defaults__"}
    exec(builtins.compile(head, script, "exec"), namespace)
    return config_from_globals(namespace)


def _unknown_key(key, known, source):
    matches = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = (f"did you mean: {', '.join(matches)}?" if matches
            else f"known keys: {', '.join(sorted(known))}")
    return ConfigError(f"unknown config key '{key}' ({source}); {hint}")


def _check_type(key, value, default, source):
    """Return `value` converted to the type of `default`, or raise ConfigError.

    `bool` is a subclass of `int` in Python, so a bool is accepted only for a bool default:
    True is neither accepted for an int key nor 1 for a bool key.
    """
    if default is None:
        return value                                  # None defaults take any literal
    accepted, expected = {
        bool: (bool, "bool (True or False)"), int: (int, "int"), str: (str, "str"),
        float: ((int, float), "float (an int is fine too)"),
    }.get(type(default), ((tuple, list), f"{type(default).__name__} (e.g. {default!r})"))
    if not isinstance(value, accepted) or isinstance(value, bool) != isinstance(default, bool):
        raise ConfigError(f"bad value for '{key}' ({source}): {value!r} is "
                          f"{type(value).__name__}, expected {expected}")
    return type(default)(value)           # an int as a float; the default's container type


def _parse_cli_value(raw, default):
    """Parse the text after '=' as a Python literal; raw string for str defaults."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw
    if isinstance(default, str) and not isinstance(value, str):
        return raw                                    # e.g. --out_dir=123 stays "123"
    return value


def _exec_config_file(path, config):
    """Run a config file in a fresh namespace seeded with the current config values.

    Seeding lets a config file refer to earlier values (`max_iters = 2 * warmup_iters`).
    Returns the namespace after execution.
    """
    try:
        with open(path) as f:
            # builtins.compile: the calling script may have a config key named `compile`
            code = builtins.compile(f.read(), path, 'exec')
    except SyntaxError as e:
        raise ConfigError(f"syntax error in config file '{path}', line {e.lineno}: "
                          f"{e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:      # not found, a folder, unreadable
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    namespace = dict(config, __file__=os.path.abspath(path), __name__='__config__')
    try:
        exec(code, namespace)
    except Exception as e:
        raise ConfigError(f"config file '{path}' raised {type(e).__name__}: {e}") from None
    return namespace


def apply_overrides(config, argv, verbose=True):
    """Apply config files and `--key=value` overrides from `argv` to `config`, in order.

    config: dict of the allowed keys with their defaults (see `config_from_globals`). The
        defaults' types are the expected types; they are taken once, before any override,
        so a key with a `None` default stays free-form after a config file sets it.
    argv: e.g. sys.argv[1:]: config file paths and `--key=value` strings.
    verbose: print one line of the keys changed and where they came from, e.g.
        "overrides: batch_size=4, epochs=40 (config/shapes_centermask.py, command line)".
    Returns `config`, mutated. Raises ConfigError (a ValueError) with a one-line message.
    """
    defaults = dict(config)
    changed, sources = {}, []   # echoed as one line at the end: what this run changed, and where
    for arg in argv:
        if arg.startswith('-'):
            if not arg.startswith('--') or '=' not in arg:
                raise ConfigError(f"argument '{arg}' is neither a config file nor --key=value "
                                  "(a bool too: --key=True)")
            key, raw = arg[2:].split('=', 1)
            source, where = "command line", "on the command line"
            items = [(key, _parse_cli_value(raw, defaults.get(key)))]
        else:
            # a config file: every public, plain-literal name it leaves behind must be a key
            # (helpers, imports, functions, classes are not); an unchanged value is no override
            source, where = arg, f"in config file '{arg}'"
            namespace = _exec_config_file(arg, config)
            items = [(k, v) for k, v in namespace.items()
                     if not k.startswith('_') and isinstance(v, _CONFIG_TYPES)
                     and (k not in config or type(v) is not type(config[k]) or v != config[k])]
        for key, value in items:
            if key not in defaults:
                raise _unknown_key(key, defaults, where)
            config[key] = changed[key] = _check_type(key, value, defaults[key], where)
        sources += [] if source in sources else [source]
    if verbose and changed:
        print(f"overrides: {', '.join(f'{k}={v!r}' for k, v in changed.items())} "
              f"({', '.join(sources)})")
    return config


def _print_help(namespace):
    doc = namespace.get('__doc__')
    if doc:
        print(doc.strip() + '\n')
    print("config keys (override with --key=value, or put them in a config file):")
    for key, value in config_from_globals(namespace).items():
        print(f"  --{key}={value!r}")


# -----------------------------------------------------------------------------
# The model keys of a run, checked before any work (train.py, bench.py), the autocast dtype
# that dtype="auto" picks, and the device "auto" picks. Functions only: this file is exec'd into
# the scripts, where every plain global would be taken for a config key.

def config_groups():
    """The groups of ModelConfig's fields and the methods (and backbone: None for any) that read
    each one: (group, methods, backbone, fields). Every field is in exactly one group
    (tests/test_configurator.py); model.py's ModelConfig lists them in the same groups."""
    from model import FCOS_FAMILY, MASK_METHODS, METHODS
    return (
        ("every method", METHODS, None, ("method", "backbone", "num_classes", "max_detections")),
        ("every method that segments", MASK_METHODS, None, ("mask_threshold",)),
        ("DLA-34", ("centermask",), "dla34", ("dcn", "dla_channels")),
        ("Hourglass-104", ("centermask",), "hourglass104", ("num_stacks", "hg_dims", "hg_modules")),
        ("CenterMask: CenterNet's targets and losses", ("centermask",), None, ("mask_loss_grid",)),
        ("Local Shape x Global Saliency", ("centermask", "centermask_fcos"), None,
         ("head_conv", "shape_size", "use_shape", "use_saliency", "saliency", "saliency_loss",
          "loss_weights")),
        ("the FCOS family", FCOS_FAMILY, None,
         ("pretrained", "norm", "fpn_channels", "fcos_form", "score_threshold",
          "nms_threshold", "ambiguity", "reg_weights", "center_sampling_at")),
        ("MaskFCOS", ("maskfcos",), None, ("mask_proposals",)),
        ("FCOSIS", ("fcosis",), None, ("attention", "seg_classes")),
    )


def fields_of(method, backbone):
    """The ModelConfig fields that `method` on `backbone` reads (config_groups), in field order."""
    return [f for _, methods, bb, names in config_groups()
            if method in methods and bb in (None, backbone) for f in names]


def check_settings(settings):
    """
    Check the model keys of a run before any work: settings = {field: value} of every
    ModelConfig field (train.py's and bench.py's config). Raises ValueError with a one-line
    message naming the key: a value ModelConfig refuses (its allowed values), or a key set to
    anything but its default that the chosen method does not read (say `--attention=mu0` with
    method="centermask": silently ignored, it would make a run that is not what was asked for).
    Returns the ModelConfig.
    """
    from dataclasses import fields
    from model import ModelConfig
    cfg = ModelConfig(**settings)                  # values: ModelConfig's own checks name the key
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    used = fields_of(cfg.method, cfg.backbone)

    def norm(v):                                   # a list from a config file is a tuple
        return tuple(v) if isinstance(v, (list, tuple)) else v
    unused = [k for k, v in settings.items() if k not in used and norm(v) != norm(defaults[k])]
    if unused:
        on = f"method={cfg.method!r}"
        if cfg.method == "centermask":
            on += f" on backbone={cfg.backbone!r}"
        raise ValueError(f"{', '.join(f'{k}={settings[k]!r}' for k in unused)}: not read by {on}, "
                         f"whose keys are {', '.join(used)} (configurator.config_groups)")
    return cfg


def auto_dtype(device_type):
    """The autocast dtype train.py and bench.py use for dtype="auto": bf16 on GPUs that have
    it, else fp16; on the CPU bf16 only where oneDNN runs it natively (AMX / AVX512-BF16;
    RESULTS.md, "Machines"), else fp32 (emulated bf16 is slower)."""
    import torch
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


def device_and_dtype(device, dtype):
    """train.py's policy, for eval.py and bench.py: device "auto" is a GPU when there is one, else
    the CPU; dtype "auto" is `auto_dtype`. -> (device, dtype); ValueError with one line for a GPU
    asked for where there is none, or a dtype that is none of float32 / bfloat16 / float16."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA GPU is visible; "
                         "use --device=cpu")
    if dtype == "auto":
        dtype = auto_dtype(torch.device(device).type)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return device, dtype


# -----------------------------------------------------------------------------
# Exec'd part: runs when a script does exec(open('configurator.py').read()), i.e. when this
# code runs in the script's globals. On `import configurator` `__name__` is "configurator"
# and nothing below runs. Errors become a one-line message and exit status 2 (like argparse).
if __name__ != 'configurator':
    if any(a in ('-h', '--help') for a in sys.argv[1:]):
        _print_help(globals())
        sys.exit(0)
    try:
        globals().update(apply_overrides(config_from_globals(globals()), sys.argv[1:]))
    except ConfigError as _e:
        print(f"{os.path.basename(sys.argv[0])}: error: {_e}", file=sys.stderr)
        sys.exit(2)
