"""A training run's own files in its out_dir: ckpt.pt (model, optimizer, the run's place),
tokenizer.json, results.json and the run lock; written atomically, read back with every key checked.
Also what train.py reads to start a run (a pretrained checkpoint directory) or to resume one, and
the check that each of its options is sorted for resuming.

Checkpoints are read with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts
only. A file someone hands you cannot run code when it is opened; one that tries is refused.
"""

import os
import random
import re
import socket
import stat
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

try:
    import fcntl  # the run lock; Windows has no fcntl, and there a run goes without one
except ImportError:
    fcntl = None

class CheckpointError(ValueError):
    """A checkpoint or tokenizer file that cannot be used: unreadable, not ours, or not matching the
    model."""

# ------------------------------------------------------------------------------------ files

def write_atomically(path, write):
    """write(file object) into a temporary file beside path, flushed to disk, then renamed onto
    path: a crash at any moment leaves the old file or the new one, never half of one. The temporary
    name holds the process id, so two processes never write into the same one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a link planted at this name is removed, never written through
    try:
        with open(tmp, "xb") as f:  # x: a new file, or an error
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(folder):
    """Make a rename in folder durable: it lives in the folder's own entry, which fsync writes
    out."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, state):
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu", keys=("model", "model_config")):
    """A checkpoint dict written by save_checkpoint, or a one-line CheckpointError that names the
    file. keys: what it must hold (an --fsdp run's train_state.pt has no "model": its weights are
    shards)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py) or "
                                "set --out_dir")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch.load raises many kinds: all mean "not one we can read"
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        if "weights only load failed" in str(err).lower():
            reason = ("it holds objects other than tensors and plain data, which could run code "
                      "when loaded")
        raise CheckpointError(f"{path}: refused, not a readable panda checkpoint: "
                              f"{reason}") from None
    if not (isinstance(state, dict) and set(keys) <= state.keys()):
        raise CheckpointError(f"{path}: not a panda checkpoint (it lacks "
                              f"{' and '.join(map(repr, keys))}; a bare state_dict has no "
                              "configuration to build the model from)")
    return state


class ModelTooLarge(ValueError):
    """A model whose weights alone would not fit the memory of the device it is to be made on."""


def check_fits(cfg, dtype, *devices):
    """cfg, once it is known that VideoPanda(cfg)'s weights alone fit each device's memory: sizes
    that cannot fit are one line before anything is allocated, not a process the kernel kills or a
    machine that swaps for an hour. The parameters are counted on the meta device (shapes only:
    free)."""
    from panda import VideoPanda
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in VideoPanda(cfg).parameters())
    except RuntimeError as err:  # sizes near 2**63 overflow even the meta device's arithmetic
        raise ModelTooLarge(f"a model of d_model={cfg.d_model}, vocab_size={cfg.vocab_size} cannot "
                            f"be built: {' '.join(str(err).split())[:120]}") from None
    for device in map(torch.device, devices):
        have = memory_of(device)
        if have is not None and n * dtype.itemsize > have:
            sizes = ", ".join(f"{k}={getattr(cfg, k)}"
                              for k in ("stab_dim", "d_model", "n_layers", "ffn_dim", "vocab_size"))
            weights = (f"{n * dtype.itemsize / 2 ** 30:,.1f} GiB of "
                       f"{str(dtype).removeprefix('torch.')} weights")
            raise ModelTooLarge(f"a model of {sizes} has {n:,} parameters, {weights} alone: more "
                                f"than the {have / 2 ** 30:,.1f} GiB of memory of {device}")
    return cfg


def memory_of(device):
    """Bytes a model could take on device: the machine's physical memory for the CPU, what this
    process can still allocate on a GPU (free, plus what PyTorch holds cached); None where it cannot
    be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        if device.type != "cpu":
            return None
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or not these names
        return None


def uninitialised_model(cfg, dtype, device):
    """VideoPanda(cfg) with storage but no initialisation work, for weights that a file or another
    model fills: a 7B decoder is never randomly initialised only to be overwritten, nor held
    twice."""
    from panda import VideoPanda
    with torch.device("meta"):
        model = VideoPanda(check_fits(cfg, dtype, device))  # shapes only: no memory, no init work
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
            check_fits(cfg, torch.float32, "cpu", device)  # made on the CPU, then moved
            # to be filled from sharded files, which need initialised shapes
            return VideoPanda(cfg).to(device)
        model = uninitialised_model(cfg, torch.float32, device)
        model.load_state_dict(ckpt["model"])
    except ModelTooLarge as err:  # sizes the file asks for, not a mismatch
        raise CheckpointError(f"{path}: {err}") from None
    except (TypeError, ValueError, RuntimeError) as err:  # unknown fields, bad configs, shapes
        raise CheckpointError(f"{path}: its weights and model_config do not fit together: "
                              f"{' '.join(str(err).split())[:300]}") from None
    return model


def read_tokenizer(file, vocab_size=None):
    """The tokenizer in file; with vocab_size, one whose ids fit the model's embedding
    (check_tokenizer)."""
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise CheckpointError(f"{file}: not a readable tokenizer.json: "
                              f"{str(err).strip()}") from None
    return tokenizer if vocab_size is None else check_tokenizer(tokenizer, vocab_size, file)


def write_tokenizer(out, tokenizer):
    """out/tokenizer.json: the run's vocabulary, which a resumed run and sample.py read back."""
    text = tokenizer.to_str().encode()
    write_atomically(Path(out) / "tokenizer.json", lambda f: f.write(text))


def check_tokenizer(tokenizer, vocab_size, file):
    """A tokenizer (None: file was missing) whose ids all fit the model's embedding (vocab_size
    rows); an id past it would fail deep inside the embedding, or worse, read another token's row on
    a GPU."""
    if tokenizer is None:
        raise FileNotFoundError(f"{file} is missing: the model's text cannot be read without it "
                                "(checkpoint_dirs.from_pretrained's docstring says how to make "
                                "one)")
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= vocab_size:
        raise CheckpointError(f"{file}: its token ids go up to {largest}, but the model's "
                              f"embedding has {vocab_size} rows: the tokenizer belongs to another "
                              "model")
    return tokenizer


def load_train_state(path, device, kind, sharded):
    """(checkpoint, its train config: a kind) of the run to resume, every key it needs checked as it
    is read. sharded: the command line's --fsdp, which alone decides whether a sharded run is
    resumed (DCP reads its .metadata with pickle): a checkpoint saved with the other setting is
    refused."""
    keys = ("model_config",) if sharded else ("model", "model_config")
    ckpt = load_checkpoint(path, device, keys=keys)
    check_train_state(ckpt, path, sharded)
    saved = config_from(kind, ckpt["train_config"], path, "train_config")
    if saved.fsdp != sharded:
        setting = str(saved.fsdp).lower()
        raise CheckpointError(f"{path}: saved by a run with --fsdp={setting}: resume it with "
                              f"--fsdp={setting}" + (" under torchrun" if saved.fsdp else ""))
    return ckpt, saved


def check_fresh(out):
    """A new run's out_dir holds no checkpoint: the run there is resumed, never written over."""
    for path in (out / "ckpt.pt", out / "ckpt_dcp"):
        if path.exists():
            raise FileExistsError(f"{path} exists; resume it with --init_from=resume or pick "
                                  "another --out_dir")


def load_pretrained(folder, device, preset, **model_options):
    """(model, tokenizer) for a run from a pretrained checkpoint directory (checkpoint_dirs.
    from_pretrained; preset sizes a STAB the directory does not describe), in float32 master
    weights whatever the device; its tokenizer.json must be there and fit the embedding."""
    from checkpoints import checkpoint_dirs  # safetensors: a pretrained start needs it, no other
    model, tokenizer = checkpoint_dirs.from_pretrained(
        folder, dtype=torch.float32, device=device, preset=preset, **model_options)
    check_tokenizer(tokenizer, model.cfg.vocab_size, Path(folder) / "tokenizer.json")
    return model, tokenizer


def read_run(config, options, model_options, resumable, device):
    """(model, tokenizer, config, checkpoint) of the run in config.out_dir, for train.py to resume:
    its checkpoint (ckpt.pt, or with config.fsdp the sharded folder's train_state.pt, the weights
    left in the shards), the model it describes, its tokenizer.json, and the config it began with
    but for the options the command line set (options: the config's, model_options: PandaConfig's)
    that are in resumable. One that is not, set to another value than the run's, is an error."""
    from multi_gpu import distributed  # the sharded folder's layout (it imports this module)
    out = Path(config.out_dir)
    path = distributed.resume_file(out, config.fsdp)
    ckpt, saved = load_train_state(path, device, type(config), sharded=config.fsdp)
    differs = [f"--{k}={v} ({getattr(saved, k) if k in ckpt['train_config'] else 'unset'} there)"
               for k, v in options.items() if k not in resumable and v != getattr(saved, k)]
    differs += [f"--{k}={v} ({ckpt['model_config'].get(k)} there)" for k, v in model_options.items()
                if k not in resumable and v != ckpt["model_config"].get(k)]
    if differs:
        raise ValueError(f"{path}: a run resumes with the options it began with; these differ: "
                         f"{', '.join(differs)}. Drop them, or start a new run (a new stage: "
                         "--export this one, then --init_from=EXPORT)")
    model = build_model(ckpt, path, device, weights=not config.fsdp, **model_options)
    tokenizer = read_tokenizer(out / "tokenizer.json", model.cfg.vocab_size)  # checked
    return model, tokenizer, replace(saved, **options), ckpt


def check_export(target):
    """--export=DIR, checked before a run: what checkpoint_dirs.save_pretrained would refuse to
    replace at the end."""
    if target:
        from checkpoints import checkpoint_dirs  # safetensors: only an export needs it
        try:
            checkpoint_dirs.check_target(Path(target), overwrite=False)
        except FileExistsError as err:  # its advice, overwrite=True, is no option of the scripts
            reason = str(err).split(";")[0]
            raise FileExistsError(f"--export: {reason}: pick another --export or "
                                  "remove it") from None


def config_from(kind, values, path, key):
    """kind(**values) for a config a checkpoint holds under key, checked as the command line's
    options are: fields kind has, each of its field's type (an int where a float goes too), in range
    (kind's __post_init__). A field missing takes its default, as in a file saved before that option
    existed."""
    types = {f.name: type(f.default) for f in fields(kind)}
    for name, value in values.items():
        wanted = types.get(name)
        if wanted is None:
            raise CheckpointError(f"{path}: its {key} has an option this code does not know: "
                                  f"{name!r}")
        if type(value) is not wanted and not (wanted is float and type(value) is int):
            raise CheckpointError(f"{path}: its {key}[{name!r}] is {value!r:.60}: "
                                  f"{type(value).__name__}, not {wanted.__name__}")
    try:
        return kind(**values)
    except ValueError as err:
        raise CheckpointError(f"{path}: its {key}: {err}") from None


def check_sorted(config_class, resumable, fixed):
    """Every option of train.py's config_class is in resumable or in fixed, not both: a new one is
    sorted as it is added, or a resume would refuse a harmless change or take a harmful one."""
    names = {f.name for f in fields(config_class)}
    unsorted = sorted(names - resumable - fixed) + sorted(names & resumable & fixed)
    if unsorted:
        raise TypeError(f"train.py: put each {config_class.__name__} option in RESUMABLE or FIXED "
                        f"(one of them): {', '.join(unsorted)}")


def check_train_state(ckpt, path, sharded):
    """What a resumed run reads of a checkpoint train.py saved, checked when it is read: each key
    there and of the kind train.py writes, or one CheckpointError naming the file and the key.
    sharded: an --fsdp run's train_state.pt, whose optimizer and head are in the shards."""
    def count(v):  # not a bool, a float or a string
        return type(v) is int and v >= 0

    def data_place(v):  # a process's: the synthetic stream's index, or (epoch, position)
        if ckpt["train_config"].get("data"):  # train_config is checked first
            return isinstance(v, (list, tuple)) and len(v) == 2 and all(map(count, v))
        return count(v)

    def rng(v):  # a random state per process, as many as data places
        return (isinstance(v, list) and len(v) == len(ckpt["data_place"])
                and all(map(is_rng_state, v)))

    rules = {"train_config": dict, "model_config": dict, "step": count, "skipped": list,
             "data_size": lambda v: v is None or count(v),
             "data_place": lambda v: isinstance(v, list) and len(v) > 0 and all(map(data_place, v)),
             "rng": rng}  # after data_place, whose length it checks
    if not sharded:  # in ckpt.pt: the optimizer, and the distillation head's weights (or None)
        rules |= {"optimizer": dict, "distill_head": lambda v: isinstance(v, dict) or
                  v is None and not ckpt["train_config"].get("distill")}
    for key, rule in rules.items():
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a checkpoint train.py can resume: it has no "
                                  f"{key!r}")
        if not (isinstance(ckpt[key], rule) if isinstance(rule, type) else rule(ckpt[key])):
            raise CheckpointError(f"{path}: its {key!r} (a {type(ckpt[key]).__name__}) is not what "
                                  "train.py saves there: the run cannot be resumed from it")


def load_optimizer(optimizer, state, path):
    """optimizer.load_state_dict(state), or one CheckpointError naming the file: the state must be
    of these parameters (as many in each group, and every moment of its parameter's shape)."""
    try:
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: its 'optimizer' does not fit this model's parameters: "
                              f"{err}") from None
    if any(torch.is_tensor(t) and t.dim() and t.shape != p.shape
           for p, moments in optimizer.state.items() for t in moments.values()):
        raise CheckpointError(f"{path}: its 'optimizer' holds moments of other shapes than their "
                              "parameters")


def is_rng_state(state):
    """Whether set_rng_state can restore state: tried on throwaway generators, not this
    process's."""
    try:
        torch.Generator().set_state(state["torch"].cpu())
        python = state["python"]
        random.Random().setstate((python[0], tuple(python[1]), python[2]))
        return "cuda" not in state or torch.is_tensor(state["cuda"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError):
        return False


def rng_state():
    """The random state of this process: torch's, its GPU's and Python's. (numpy's global state is
    never used: the synthetic task and the data order draw from their own seeded generators.)"""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    # this process's GPU only: the _all variant would open a context on every GPU
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())  # .cpu(): map_location may have moved it
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class RunLock:
    """One training run per out_dir. out_dir/run.lock holds an exclusive lock (flock) while the run
    lives and names it: pid, host, start time, command. The kernel drops the lock when the process
    ends, however it ends, so a lock file left by a killed run is seen to be stale and taken
    over."""

    # train.py's files in out_dir (write_atomically)
    WRITTEN = ("ckpt.pt", "tokenizer.json", "results.json")

    def __init__(self, out_dir):
        self.path = Path(out_dir) / "run.lock"
        self.file = None

    def acquire(self):
        if fcntl is None:
            return self
        file = self.open()
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read(1000).strip() or "a process that has not yet written its name"
            file.close()
            raise FileExistsError(f"{self.path.parent} is in use by another run ({holder}); wait "
                                  "for it to finish or pick another --out_dir") from None
        file.seek(0)
        left = file.read(1000).strip()  # a name, not a file to hold in memory
        if left:
            print(f"note: {self.path} names a run that no longer holds it ({left}); taking it over")
        file.seek(0)
        file.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}: "
                   f"{' '.join(sys.argv)}\n")
        file.flush()
        self.file = file
        # A process forked from the run (a DataLoader worker) shares the lock through its copy of
        # the file: it closes that copy, so the lock ends with the run, not with the last of its
        # workers.
        os.register_at_fork(after_in_child=self.forget)
        self.remove_stale_temporaries()
        return self

    def forget(self):  # in a forked child: its copy of the file only; the run keeps the lock
        if self.file is not None:
            self.file.close()
            self.file = None

    def open(self):
        """run.lock for reading and writing, made if missing. Never through a link: a link planted
        there would have the run empty and overwrite the file it points to (O_NOFOLLOW refuses a
        symbolic link; a hard link shows as a second name of the file)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:
            if self.path.is_symlink():
                raise FileExistsError(f"{self.path} is a symbolic link, which the run lock never "
                                      "follows: remove the link") from None
            raise  # a directory, no permission, ...: the OSError names the file
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            what = ("a hard link: another name of a file elsewhere" if info.st_nlink > 1
                    else "not a regular file")
            raise FileExistsError(f"{self.path} is {what}, which the run lock never writes into: "
                                  "remove it")
        return os.fdopen(fd, "r+", errors="replace")

    def remove_stale_temporaries(self):
        """What a save killed mid-write leaves (write_atomically's NAME.tmp-PID beside each file a
        run writes here): with the lock held no other run writes into this folder, so any left are
        stale."""
        stale = re.compile("(" + "|".join(map(re.escape, self.WRITTEN)) + r")\.tmp-\d+")
        for entry in os.scandir(self.path.parent):
            if stale.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                print(f"note: removed {entry.path}, left by a save that did not finish")

    def release(self):
        if self.file is not None:
            self.file.truncate(0)  # an empty file: the last run ended cleanly
            self.file.close()  # and with it the lock
            self.file = None
