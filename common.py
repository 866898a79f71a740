"""What the scripts share: --key=value options, the device, checkpoints on disk, and the rule that a
bad input ends a script with one line, "error: ...", and exit status 1.

Checkpoints are read with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts
only. A file someone hands you cannot run code when it is opened; one that tries is refused.
"""

import difflib
import importlib
import inspect
import os
import random
import re
import signal
import socket
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from tokenizers import Tokenizer

try:
    import fcntl  # the run lock; Windows has no fcntl, and there a run goes without one
except ImportError:
    fcntl = None


class CheckpointError(ValueError):
    """A checkpoint or tokenizer file that cannot be used: unreadable, not ours, or not matching the model."""


# ------------------------------------------------------------------------------------ options

def parse_args(argv, doc, *configs):
    """--key=value arguments -> one dict of changes per config dataclass, each value parsed to its
    field's type. --help (or -h) prints `doc` and every option with its default and comment, then exits."""
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
    """{field: the comment at the end of its line} in the dataclass's source."""
    found = (re.match(r"\s+(\w+)\s*:[^=#]*=[^#]*#\s*(.*)", line) for line in inspect.getsource(config).splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def call_hook(name, model):
    """--model_hook=module.function: that function applied to a freshly built model (an exercise's module)."""
    module, _, function = name.rpartition(".")
    try:
        hook = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"--model_hook={name}: {err}") from None
    return hook(model)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
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


# ------------------------------------------------------------------------------------ files

def write_atomically(path, write):
    """write(file object) into a temporary file beside path, flushed to disk, then renamed onto path:
    a crash at any moment leaves the old file or the new one, never half of one. The temporary name
    holds the process id, so two processes never write into the same one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(folder):
    """Make a rename in folder durable: it lives in the folder's own entry, which fsync writes out."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, state):
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu", keys=("model", "model_config")):
    """A checkpoint dict written by save_checkpoint, or a one-line CheckpointError that names the file.
    keys: what it must hold (an --fsdp run's train_state.pt has no "model": its weights are shards)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py) or set --out_dir")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch.load raises many kinds; all of them mean "not a checkpoint we can read"
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        if "weights only load failed" in str(err).lower():
            reason = "it holds objects other than tensors and plain data, which could run code when loaded"
        raise CheckpointError(f"{path}: refused, not a readable panda checkpoint: {reason}") from None
    if not (isinstance(state, dict) and set(keys) <= state.keys()):
        raise CheckpointError(f"{path}: not a panda checkpoint (it lacks {' and '.join(map(repr, keys))}; "
                              f"a bare state_dict has no configuration to build the model from)")
    return state


def uninitialised_model(cfg, dtype, device):
    """VideoPanda(cfg) with storage but no initialisation work, for weights that a file or another model
    fills: a 7B decoder is never randomly initialised only to be overwritten, nor held twice."""
    from panda import VideoPanda
    with torch.device("meta"):
        model = VideoPanda(cfg)  # shapes only: no memory, no init work
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives every parameter its own new storage, which unties them
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    return model


def build_model(ckpt, path, device, weights=True, **overrides):
    """The VideoPanda a checkpoint describes (its model_config; overrides may change what does not
    change a weight's shape, e.g. grad_checkpoint), with its weights unless weights=False."""
    from panda import PandaConfig, VideoPanda
    try:
        cfg = PandaConfig(**(ckpt["model_config"] | overrides))
        if not weights:
            return VideoPanda(cfg).to(device)  # to be filled from sharded files, which need initialised shapes
        model = uninitialised_model(cfg, torch.float32, device)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as err:  # unknown config fields, impossible configs, shapes
        raise CheckpointError(f"{path}: its weights and model_config do not fit together: "
                              f"{' '.join(str(err).split())[:300]}") from None
    return model


def read_tokenizer(file):
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise CheckpointError(f"{file}: not a readable tokenizer.json: {str(err).strip()}") from None


def rng_state():
    """The random state of this process: torch's, its GPU's and Python's. (numpy's global state is
    never used: the synthetic task and the data order draw from their own seeded generators.)"""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # this process's GPU only: the _all variant would open a context on every GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())  # .cpu(): map_location may have moved it
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ------------------------------------------------------------------------------------ runs

class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks a run to stop after the current step, which it then saves; a
    second Ctrl-C stops at once. Steps are never cut in half, so what is saved is always a whole step."""

    def __init__(self):
        self.asked = False
        self.previous = {s: signal.signal(s, self.ask) for s in (signal.SIGINT, signal.SIGTERM)}

    def ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nstopping after this step (Ctrl-C again to stop at once, without saving)", file=sys.stderr)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)



class RunLock:
    """One training run per out_dir. out_dir/run.lock holds an exclusive lock (flock) while the run
    lives and names it: pid, host, start time, command. The kernel drops the lock when the process
    ends, however it ends, so a lock file left by a killed run is seen to be stale and taken over."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / "run.lock"
        self.file = None

    def acquire(self):
        if fcntl is None:
            return self
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process that has not yet written its name"
            file.close()
            raise FileExistsError(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                                  f"finish or pick another --out_dir") from None
        file.seek(0)
        left = file.read().strip()
        if left:
            print(f"note: {self.path} names a run that no longer holds it ({left}); taking it over")
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join(sys.argv)}\n")
        file.flush()
        self.file = file
        return self

    def release(self):
        if self.file is not None:
            self.file.truncate(0)  # an empty file: the last run ended cleanly
            self.file.close()  # and with it the lock
            self.file = None
