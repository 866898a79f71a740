"""What every script's command line shares: --key=value options parsed into config dataclasses,
--help built from the fields' comments, the device, Ctrl-C, and the rule that a bad input ends a
script with one line, "error: ...", and exit status 1.
"""

import difflib
import importlib
import inspect
import math
import re
import signal
import sys
from dataclasses import fields

import torch

# ------------------------------------------------------------------------------------ options

def parse_args(argv, doc, *configs):
    """--key=value arguments -> one dict of changes per config dataclass, each value parsed to its
    field's type. --help (or -h) prints `doc` and every option with its default and comment, then
    exits."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(doc, configs))
        sys.exit(0)
    types = [{f.name: type(f.default) for f in fields(c)} for c in configs]
    known = sorted(set().union(*types))
    changes = [{} for _ in configs]
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"options look like --key=value, got {arg!r} (--help lists them)")
        key, text = arg[2:].split("=", 1)
        owners = [i for i, t in enumerate(types) if key in t]
        if not owners:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean --{close[0]}?" if close else " (--help lists the options)"
            raise ValueError(f"unknown option --{key}{hint}")
        for i in owners:
            changes[i][key] = parse_value(text, types[i][key], key)
    return changes


def parse_value(text, kind, key):
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key} expects a bool (true/false), got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} expects {kind.__name__}, got {text!r}") from None


def require_ranges(config, positive=(), non_negative=(), finite=(), choices=None, non_empty=()):
    """Options checked as they are parsed (a config's __post_init__): the first field that breaks
    its rule is a ValueError naming --field. positive: > 0; non_negative: >= 0; finite: not inf or
    NaN (the first two imply finite); choices: {field: the values it may take}; non_empty: text
    that must say something (an empty --out_dir would be the current directory)."""
    for names, ok, rule in ((positive, lambda v: v > 0, "positive"),
                            (non_negative, lambda v: v >= 0, "zero or more"),
                            (finite, lambda v: True, "a finite number")):
        for name in names:
            value = getattr(config, name)
            finite = isinstance(value, int) or math.isfinite(value)  # an int is finite
            if not (finite and ok(value)):
                raise ValueError(f"--{name} must be {rule}, got {value}")
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}; "
                             f"got {getattr(config, name)!r}")
    for name in non_empty:
        if not getattr(config, name).strip():
            raise ValueError(f"--{name} is empty")


def help_text(doc, configs):
    """The script's docstring, then each config's options: --name=default and the comment its field
    has in the source, so that the help is the code's own words."""
    lines = [doc.strip(), ""]
    for config in configs:
        lines.append(f"{config.__name__} options (--key=value):")
        comments = field_comments(config)
        for f in fields(config):
            lines.append(f"  {f'--{f.name}={f.default}':<32} {comments.get(f.name, '')}".rstrip())
        lines.append("")
    return "\n".join(lines)


def field_comments(config):
    """{field: its comment} in the dataclass's source: the comment at the end of its line, and the
    comment-only lines below it whose # stands in the same column (a comment longer than a line)."""
    comments, column = {}, None
    for line in inspect.getsource(config).splitlines():
        field = re.match(r"\s+(\w+)\s*:[^=#]*=[^#]*#\s*(.*)", line)
        if field:
            name, column, comments[field.group(1)] = field.group(1), line.index("#"), field.group(2)
        elif column is not None and line.strip().startswith("#") and line.index("#") == column:
            comments[name] += " " + line[column + 1:].strip()
        else:
            column = None
    return comments


def call_hook(name, model):
    """--model_hook=module.function: that function applied to a freshly built model (an exercise's
    module)."""
    module, _, function = name.rpartition(".")
    try:
        hook = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"--model_hook={name}: {err}") from None
    return hook(model)


def pick_device(name):
    """--device: auto, or a device of this machine (cpu, cuda, cuda:N, mps), checked here: a device
    that is not there would otherwise fail at the first tensor put on it, deep in the run."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device={name} is not a device: auto, cpu, cuda, cuda:N "
                             "or mps") from None
        mps = getattr(torch.backends, "mps", None)
        count = {"cpu": 1, "cuda": torch.cuda.device_count(),
                 "mps": int(bool(mps and mps.is_available()))}.get(device.type, 0)
        if (device.index or 0) >= count:
            raise ValueError(f"--device={name} is not available: this machine has {count} "
                             f"{device.type} device{'s' * (count != 1)} (--device=auto picks what "
                             "there is)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def run(main, argv):
    """main(argv) as the command line runs it: a bad input (a corrupt video, a missing file, a wrong
    option) ends in one line, "error: ...", and exit status 1, instead of a traceback."""
    try:
        main(argv)
    except (ValueError, OSError) as err:  # VideoError, CheckpointError, ... are ValueErrors
        sys.exit("error: " + " ".join(str(err).split()))
    except KeyboardInterrupt:  # Ctrl-C where nothing is left to save, or a second one: one line too
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)



# ------------------------------------------------------------------------------------ runs

class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks a run to stop after the current step, which it then saves; a
    second Ctrl-C stops at once. Steps are never cut in half, so what is saved is always a whole
    step."""

    def __init__(self):
        self.asked = False
        self.previous = {s: signal.signal(s, self.ask) for s in (signal.SIGINT, signal.SIGTERM)}

    def ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (Ctrl-C again to stop at once, without saving)",
              file=sys.stderr)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


