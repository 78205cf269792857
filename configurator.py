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
    """
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and isinstance(v, _CONFIG_TYPES)}


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

    `bool` is a subclass of `int` in Python, so bools are checked first and explicitly:
    True is neither accepted for an int key nor 1 for a bool key.
    """
    def bad(expected):
        return ConfigError(f"bad value for '{key}' ({source}): {value!r} is "
                           f"{type(value).__name__}, expected {expected}")

    if default is None:
        return value                                  # None defaults take any literal
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("bool (True or False)")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("int")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("float (an int is fine too)")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("str")
        return value
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise bad(f"{type(default).__name__} (e.g. {default!r})")
        return type(default)(value)                   # keep the default's container type
    raise bad(type(default).__name__)


def _parse_cli_value(raw, default):
    """Parse the text after '=' as a Python literal; raw string for str defaults."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    if isinstance(default, str) and not isinstance(value, str):
        value = raw                                   # e.g. --out_dir=123 stays "123"
    return value


def _exec_config_file(path, config):
    """Run a config file in a fresh namespace seeded with the current config values.

    Seeding lets a config file refer to earlier values (`max_iters = 2 * warmup_iters`).
    Returns the namespace after execution.
    """
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise ConfigError(f"config file '{path}' {what}")
    try:
        with open(path) as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    try:
        # builtins.compile: the calling script may have a config key named `compile`
        code = builtins.compile(source, path, 'exec')
    except SyntaxError as e:
        raise ConfigError(f"syntax error in config file '{path}', line {e.lineno}: "
                          f"{e.msg}") from None
    namespace = dict(config)
    namespace['__file__'] = os.path.abspath(path)
    namespace['__name__'] = '__config__'
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
    Returns `config`, mutated. Raises ConfigError (a ValueError) with a one-line message.
    """
    defaults = dict(config)

    def set_key(key, value, source):
        value = _check_type(key, value, defaults[key], source)
        if verbose:
            print(f"Overriding: {key} = {value!r}")
        config[key] = value

    for arg in argv:
        if not arg.startswith('-'):
            # a config file: every public, plain-literal name it leaves behind must be a key
            namespace = _exec_config_file(arg, config)
            if verbose:
                print(f"Overriding config with {arg}:")
            for key, value in namespace.items():
                if key.startswith('_') or not isinstance(value, _CONFIG_TYPES):
                    continue                          # helpers, imports, functions, classes
                if key not in defaults:
                    raise _unknown_key(key, defaults, f"in config file '{arg}'")
                old = config[key]
                if value is not old and (type(value) is not type(old) or value != old):
                    set_key(key, value, f"in config file '{arg}'")
            continue

        if not arg.startswith('--'):
            raise ConfigError(f"unrecognised argument '{arg}': expected a config file "
                              f"or --key=value")
        if '=' not in arg:
            raise ConfigError(f"argument '{arg}' has no value: expected --key=value "
                              f"(e.g. {arg}=True for a bool)")
        key, raw = arg[2:].split('=', 1)
        if key not in defaults:
            raise _unknown_key(key, defaults, "on the command line")
        set_key(key, _parse_cli_value(raw, defaults[key]), "on the command line")
    return config


def _print_help(namespace):
    doc = namespace.get('__doc__')
    if doc:
        print(doc.strip() + '\n')
    print("config keys (override with --key=value, or put them in a config file):")
    for key, value in config_from_globals(namespace).items():
        print(f"  --{key}={value!r}")


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
