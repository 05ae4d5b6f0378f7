"""
nanoGPT-style configuration for every script: its module globals are the keys, a config file
(Python, executed) and --key=value arguments override them in order.

    DEFAULTS = snapshot(globals())             # at the end of a script's keys
    cfg = configure(DEFAULTS, sys.argv[1:])    # a new dict; DEFAULTS is untouched
    if __name__ == '__main__':
        run(main)                              # main(sys.argv[1:]), then the process group is destroyed

Fixed against nanoGPT's configurator: None defaults take any literal, an int is accepted
where a float is expected, lists and tuples parse (--exit_layers=[4,8]), strings need no
quotes, a bare --flag sets a boolean, and an unknown key is an error naming the close ones.
"""

import ast
import difflib
import sys

import torch.distributed as dist

VALUE_TYPES = (int, float, bool, str, tuple, list, type(None))


def snapshot(namespace):
    """The keys of a script: its public module globals holding plain values."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, VALUE_TYPES)}


def is_a(value, types):
    """isinstance, except that a bool is no number and an int is accepted for a float."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def coerce(key, value, default, per_item=(), types=None):
    """Check value against the type of the key's default (or types[key] where the default is
    None); an int is accepted for a float, and a key in per_item may hold a number or a list
    (one per exit)."""
    if value is None:
        return value
    if default is None:
        want = (types or {}).get(key)
        want = want if want is None or isinstance(want, tuple) else (want,)
        if want is None or is_a(value, want) or (tuple in want and isinstance(value, list)):
            return tuple(value) if isinstance(value, list) else value
        names = ' or '.join(t.__name__ for t in want)
        raise ValueError(f'--{key}={value!r}: expected {names} (or None)')
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (list, tuple)) or (key in per_item and isinstance(value, (list, tuple))):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f'--{key}={value!r}: expected {type(default).__name__} like the default {default!r}')
    return value


def unknown(key, known):
    close = difflib.get_close_matches(key, known, n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else '; run with a valid key (see the top of the script)'
    return ValueError(f'unknown config key {key!r}{hint}')


def configure(defaults, args, per_item=(), types=None):
    """Overrides of defaults. args: config files (python, executed) and --key=value, applied in
    order; a bare --flag sets a boolean key to True. per_item: keys that take a number or a
    list; types: {key: type or tuple of types} for the keys whose default is None. Returns a
    new dict."""
    cfg = dict(defaults)
    for arg in args:
        if not arg.startswith('--'):
            scope = dict(cfg)
            with open(arg) as f:
                exec(f.read(), scope)
            for k, v in scope.items():
                if k.startswith('_') or k == '__builtins__' or (k in cfg and v is cfg[k]):
                    continue
                if k not in cfg:
                    if callable(v) or type(v).__name__ == 'module':
                        continue  # imports and helpers inside a config file
                    raise unknown(k, list(cfg))
                cfg[k] = coerce(k, v, defaults[k], per_item, types)
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in cfg:
            raise unknown(key, list(cfg))
        if not eq:
            if not isinstance(defaults[key], bool):
                raise ValueError(f'--{key} needs a value (--{key}=...); only boolean keys can be bare flags')
            value = True
        elif isinstance(defaults[key], str):
            value = raw  # strings stay strings, e.g. --out_dir=123
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word, e.g. --init_from=resume where the default is None
        cfg[key] = coerce(key, value, defaults[key], per_item, types)
    return cfg


def check(cfg, rules):
    """Range checks of a config: rules {key: (types, ok(value) -> bool, what is allowed)}, a
    value of None passing. Raises a ValueError naming the key, its value and what is allowed."""
    for key, (types, ok, allowed) in rules.items():
        v = cfg.get(key)
        if v is not None and not (is_a(v, types) and ok(v)):
            raise ValueError(f'{key}={v!r} is not allowed: {key} must be {allowed}')
    return cfg


def run(main, argv=None):
    """The __main__ of every script: main(argv, default sys.argv[1:]); whatever happens, the
    process group (under torchrun) is destroyed on the way out."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
