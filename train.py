"""Train Video-Panda. With no arguments: the tiny synthetic-video run, minutes on a laptop CPU.

    python train.py                                   # tiny model, synthetic video QA
    python train.py --max_steps=100 --batch_size=8    # any TrainConfig or PandaConfig field
    python train.py --init_from=resume                # continue out/ckpt.pt exactly where it stopped

Real videos on a pretrained LLM (spec E), a Video-ChatGPT / Valley instruction file and its videos:

    python train.py --init_from=path/to/vicuna --stage=prealign --data=valley.json --video_folder=videos/
    python train.py --init_from=out/stage1-export --stage=pretrain --data=valley.json --video_folder=videos/

--init_from=DIR loads a Llama/Mistral/Qwen2 directory (a fresh STAB and projector on its decoder, the
video geometry of --preset, default paper) or a panda export (everything, e.g. the previous stage's
--export). --stage picks what trains and at what rate (STAGES below); --on_error=skip names and
counts every unusable video instead of stopping; --grad_checkpoint=true saves activation memory.

Several GPUs, on one machine or several (DISTRIBUTED.md): the same command under torchrun, one process
per GPU. DDP keeps a whole model per GPU; --fsdp=true shards it (a 7B decoder's training state does not
fit on one 80 GB GPU). --batch_size is per process; the run equals one process with the global batch.

    torchrun --standalone --nproc_per_node=8 train.py --batch_size=4 ...

Every --key=value names a field of TrainConfig (below) or of panda.PandaConfig; values are parsed
to the field's type, and an unknown key or a value of the wrong type is an error.
"""

import contextlib
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import weights
from panda import PandaConfig, VideoPanda


@dataclass
class TrainConfig:
    preset: str = "tiny"        # model size: nano, tiny or paper (panda.PRESETS)
    out_dir: str = "out"        # ckpt.pt and tokenizer.json go here
    init_from: str = "scratch"  # scratch | resume (out_dir/ckpt.pt) | a pretrained checkpoint directory
    stage: str = "finetune"     # with a pretrained decoder: prealign (decoder frozen) | pretrain | finetune
    seed: int = 1337
    # optimisation
    batch_size: int = 32        # per process: under torchrun a micro-step takes batch_size * world_size samples
    grad_accum: int = 1         # micro-batches per optimizer step
    max_steps: int = 1300
    lr_stab: float = 3e-3       # STAB + projector (the paper trains them at their own rate)
    lr_decoder: float = 1e-3
    warmup_steps: int = 60
    min_lr_ratio: float = 0.05  # the cosine decays to this fraction of each group's rate
    weight_decay: float = 0.0   # the paper uses none
    grad_clip: float = 1.0
    questions_per_clip: int = 8  # synthetic clips carry several question-answer turns: more signal per clip
    # distillation (spec D): loss = LM + distill_weight * (1 - cosine to a frozen teacher's per-cell features)
    # auto = oracle on the synthetic task (the release distils in every stage), off on real data, which
    # needs a frozen encoder plugged into make_teacher; "" = off; oracle = data.oracle_features
    distill: str = "auto"
    distill_weight: float = 1.0
    # evaluation and checkpoints
    eval_every: int = 650
    eval_samples: int = 400     # held-out questions per evaluation
    save_every: int = 650       # and at the end; 0 = never (a timing run)
    # system
    device: str = "auto"        # auto: cuda, then mps, then cpu
    compile: bool = False       # torch.compile the model
    fsdp: bool = False          # under torchrun: shard weights, gradients and Adam state over the GPUs (FSDP2)
    max_new_tokens: int = 8     # answers are a word or two
    # real data: a Video-ChatGPT / Valley instruction file instead of the synthetic task
    data: str = ""              # the annotation JSON; empty = the synthetic task
    video_folder: str = ""      # where its "video" names are looked up (data.resolve_video)
    num_workers: int = 2        # DataLoader processes decoding videos while the model trains
    on_error: str = "raise"     # raise: stop at the first unusable video; skip: log it, count it, go on
    export: str = ""            # also write a weights.save_pretrained directory here at the end


# ------------------------------------------------------------------------------------ overrides

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


def parse_overrides(argv, *configs):
    """--key=value arguments -> one dict of changes per config, typed by the dataclass fields."""
    types = [{f.name: type(f.default) for f in fields(c)} for c in configs]
    changes = [{} for _ in configs]
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        owners = [i for i, t in enumerate(types) if key in t]
        if not owners:
            known = sorted(set().union(*types))
            raise ValueError(f"unknown option --{key}; known options: {', '.join(known)}")
        for i in owners:
            changes[i][key] = parse_value(text, types[i][key], key)
    return changes


# ------------------------------------------------------------------------------------ setup

def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_at(step, tc):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps: a multiplier."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


STAGES = {  # spec E: which parts train and at what rate, after a pretrained decoder is loaded
    "prealign": dict(train_decoder=False, lr_stab=4e-4, lr_decoder=0.0, warmup_ratio=0.03),
    "pretrain": dict(train_decoder=True, lr_stab=4e-5, lr_decoder=4e-5, warmup_ratio=0.01),
    "finetune": dict(train_decoder=True, lr_stab=2e-5, lr_decoder=2e-5, warmup_ratio=0.01),
}


def with_stage(tc, explicit):
    """tc with its stage's learning rates and warm-up (spec E), except those the command line set."""
    if tc.stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}; got {tc.stage!r}")
    stage = STAGES[tc.stage]
    changes = {"lr_stab": stage["lr_stab"], "lr_decoder": stage["lr_decoder"],
               "warmup_steps": max(1, round(stage["warmup_ratio"] * tc.max_steps))}
    return replace(tc, **{key: value for key, value in changes.items() if key not in explicit})


def make_optimizer(model, tc, train_decoder=True, head=None):
    model.decoder.requires_grad_(train_decoder)
    visual = list(model.stab.parameters()) + list(model.projector.parameters())
    if head is not None:  # a DistillHead trains at the STAB's rate, as in the release (spec D.6)
        visual += list(head.parameters())
    groups = [{"params": visual, "lr": tc.lr_stab, "base_lr": tc.lr_stab}]
    if train_decoder:
        groups.append({"params": list(model.decoder.parameters()), "lr": tc.lr_decoder, "base_lr": tc.lr_decoder})
    # fused: one kernel for the whole update on GPUs, as nanoGPT does; the default (foreach) path makes
    # full-size temporaries (for a whole 7B decoder, the sqrt of its second moment alone is 27 GB)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=tc.weight_decay, fused=fused)


def save_checkpoint(path, **state):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # this process's GPU only: the _all variant would open a context on every GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    # .cpu(): a checkpoint loaded with map_location="cuda" brings the states (byte tensors) to the GPU too
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def load_checkpoint(path, device, **config_overrides):
    """(model, checkpoint dict). config_overrides change PandaConfig fields that do not change the
    weights' shapes (grad_checkpoint, a dropout); any other change fails in load_state_dict."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py) or set --out_dir")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = VideoPanda(PandaConfig(**(ckpt["model_config"] | config_overrides))).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


# ------------------------------------------------------------------------------------ several processes

def init_distributed(device):
    """(device, rank, world_size). torchrun starts one process per GPU, all running this script, and
    tells each its RANK (0 .. WORLD_SIZE-1 over all machines), its LOCAL_RANK (0 .. GPUs per machine - 1)
    and where to meet (MASTER_ADDR, MASTER_PORT). Each process joins the group on GPU LOCAL_RANK, NCCL
    between GPUs, gloo between CPU processes. A plain `python train.py` is rank 0 of a world of 1."""
    if "RANK" not in os.environ:
        return device, 0, 1
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"torchrun trains on GPUs (NCCL) or on CPUs (gloo), not on {device.type}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # the GPU that .cuda(), NCCL and the CUDA random state mean from now on
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def leave_process_group():
    """The end of a torchrun process. Whatever holds the process group (DDP, FSDP's modules and their
    sharded parameters) must be gone before the group is destroyed: a group that outlives its
    destruction keeps gloo's threads running into the interpreter's exit, which then aborts now and
    then ("terminate called without an active exception"), seen here with DDP and with FSDP."""
    if dist.is_initialized():
        gc.unfreeze()  # objects that gc.freeze() froze (real data) are never collected otherwise
        gc.collect()  # main()'s models: FSDP's hold themselves in reference cycles
        dist.destroy_process_group()


def all_sum(values, device):
    """The numbers summed over all processes (one all-reduce for the list); themselves in a world of 1."""
    if not dist.is_initialized():
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def gather(obj):
    """[rank 0's obj, rank 1's, ...]: a small picklable object of every process, on every process."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def gradient_sync(ddp_modules, sync):
    """Context for one micro-batch's forward and backward. DDP all-reduces the gradients during every
    backward; while micro-batches accumulate, once, after the last one, is enough, and no_sync() skips
    the others (the gradients accumulate locally in .grad, and the last all-reduce averages the sums)."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in ddp_modules:
            stack.enter_context(module.no_sync())
    return stack


def shard(model, head, device):
    """FSDP2, in place: every decoder block becomes a unit of its own, and the root unit takes the rest
    (STAB, projector, embeddings, final norm, LM head). Between uses each process keeps 1/world_size of
    every weight, gradient and Adam moment; a unit's full weights exist only while it runs (all-gathered
    just before its forward and its backward, freed after), and its gradients are reduce-scattered (each
    process receives the average over processes of its own slice), so the gradient maths is DDP's. A
    7B model's 16 bytes per parameter of fp32 training state (weight, gradient, two Adam moments) is 112 GB
    on one GPU, 14 GB on each of eight. While micro-batches accumulate, FSDP reduce-scatters after each
    one: set_requires_gradient_sync(False) would save that traffic, but only by keeping whole unsharded
    gradients, the memory FSDP is here to save."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # here: not every build has it
    # On GPUs the units compute in bf16, gathered as bf16 (half the traffic); the sharded master
    # weights and the gradient reduction stay fp32. On CPUs everything stays fp32.
    bf16 = device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    for block in model.decoder.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if head is not None:  # a root of its own: it runs outside the model's forward
        fully_shard(head, mp_policy=policy)


def sharded_state(model, head, optimizer):
    """What DCP saves of an FSDP run, named as in ckpt.pt: {"model", "optimizer"(, "distill_head")}.
    Every tensor is this process's shard (a DTensor) under its parameter's name in the plain model,
    and the optimizer state is keyed by parameter names, not positions: the files say nothing of how
    the model was sharded, and DCP can load them into another sharding (another number of GPUs)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    owner = nn.ModuleDict({"model": model} | ({} if head is None else {"head": head}))  # the optimizer's parameters
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(owner, optimizer)}
    if head is not None:
        state["distill_head"] = get_model_state_dict(head)
    return state, owner


def save_sharded(path, model, head, optimizer, train_state):
    """The --fsdp checkpoint, a folder: with torch.distributed.checkpoint (DCP) every process writes
    its own shards of the weights and the optimizer state, in parallel, and rank 0 adds train_state.pt
    (step, data position, random states, configs). It is written as path.tmp and renamed into place
    once complete, so a crash mid-save leaves the previous checkpoint whole. Several machines: out_dir
    must be one shared filesystem. torch.distributed.checkpoint.format_utils.dcp_to_torch_save(path, file)
    gathers the shards into one torch.save file ("model" as in ckpt.pt, "optimizer" keyed by parameter
    names); for sample.py and the next stage, --export writes the whole model at the end of the run."""
    import torch.distributed.checkpoint as dcp
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save left behind
    dist.barrier()  # nobody writes into tmp before it is cleared
    dcp.save(sharded_state(model, head, optimizer)[0], checkpoint_id=tmp)  # returns once all have written
    if dist.get_rank() == 0:
        torch.save(train_state, tmp / "train_state.pt")
        if path.exists():
            os.replace(path, old)  # a folder cannot be renamed onto a non-empty one: the old one moves aside
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def load_sharded(path, model, head, optimizer):
    """Fill an FSDP model, its head and their optimizer from save_sharded's folder: each process
    reads the parts of the saved tensors that its own shards hold."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state, owner = sharded_state(model, head, optimizer)  # this run's shards, to be filled in place
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(owner, optimizer, state["optimizer"])
    if head is not None:
        set_model_state_dict(head, state["distill_head"])


def unsharded(model, device, rank0_only=False):
    """A plain VideoPanda with an FSDP model's full weights, all-gathered (every process takes part):
    on every process, or with rank0_only on rank 0 alone, in CPU memory (None elsewhere), which is
    how a 7B model is exported. generate() cannot run on the sharded model itself: each block's
    forward is a collective, and one process may stop generating (every answer finished) before another."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    if rank0_only and dist.get_rank() != 0:
        return None
    copy = weights.empty_model(model.cfg, torch.float32, "cpu" if rank0_only else device, fresh_visual=False)
    copy.load_state_dict(state)
    return copy


# ------------------------------------------------------------------------------------ distillation

class DistillHead(nn.Module):
    """The release's VideoCompressor (spec D.3): predicts a frozen teacher's feature for every visual
    grid token from the decoder's hidden states there. It taps the hidden states L, L-4, ..., 0 of an
    L-layer decoder (0 = the input embeddings, L = the final normed output); the last tap queries the
    others by attention over the layer axis, and a linear map of it is the base the result adds to."""

    def __init__(self, cfg, teacher_dim, every=4, heads=8):
        super().__init__()
        if teacher_dim % heads:
            raise ValueError(f"the teacher's width {teacher_dim} must be a multiple of the head's {heads} heads")
        self.taps, self.heads = [*range(cfg.n_layers, 0, -every), 0], heads  # 32 layers: [32, 28, ..., 4, 0]
        self.norm_layer = nn.ModuleList(nn.Sequential(nn.LayerNorm(cfg.d_model),
                                                      nn.Linear(cfg.d_model, teacher_dim, bias=False))
                                        for _ in self.taps)
        self.input_layer = nn.Linear(cfg.d_model, teacher_dim)
        self.output_layer = nn.Linear(teacher_dim, teacher_dim)

    def forward(self, hidden):  # hidden[i] (N, d_model) for every i in self.taps -> (N, teacher_dim)
        s = torch.stack([norm(hidden[i]) for norm, i in zip(self.norm_layer, self.taps)], 1)  # (N, taps, D)
        N, n, D = s.shape
        s = s.view(N, n, self.heads, D // self.heads).transpose(1, 2)  # (N, heads, taps, D/heads)
        # Parameter-free: the final layer's projection is the query, the other taps are keys and values.
        # The release scales the logits by D^-0.5 over the full width, not over the head's D/heads.
        o = F.scaled_dot_product_attention(s[:, :, :1], s[:, :, 1:], s[:, :, 1:], scale=D ** -0.5)
        return self.input_layer(hidden[self.taps[0]]) + self.output_layer(o.reshape(N, D))


def grid_positions(cfg, start, valid=None):
    """Where every frame's grid tokens sit in the spliced sequence, skipping the fused token and the
    split tokens (spec D.2). start (B,): the index of each prompt's video placeholder; valid (B, g, g):
    the letterbox cells (None: all). -> (B, T, g, g) positions, -1 outside the valid box. A frame is
    1 + h * (w + split) tokens, [fused, row 0 and its split, row 1, ...], frames one after another."""
    if valid is None:
        valid = torch.ones(len(start), cfg.grid, cfg.grid, dtype=torch.bool, device=start.device)
    rows, cols = valid.any(2), valid.any(1)  # (B, g) each: which rows and columns the box spans
    width = cols.sum(1) + cfg.split_tokens  # (B,) tokens per row
    per_frame = 1 + rows.sum(1) * width  # (B,)
    row, col = rows.cumsum(1) - 1, cols.cumsum(1) - 1  # (B, g) each: index inside the box
    in_frame = 1 + row[:, :, None] * width[:, None, None] + col[:, None, :]  # (B, g, g), after the fused token
    frame_start = start[:, None] + torch.arange(cfg.n_frames, device=start.device) * per_frame[:, None]  # (B, T)
    return (frame_start[:, :, None, None] + in_frame[:, None]).masked_fill(~valid[:, None], -1)


def cosine_distill_loss(pred, target, valid=None):
    """Spec D.5: per frame, 1 - the mean cosine similarity over its grid cells; then the mean over
    frames. pred, target (B, T, g, g, D); valid (B, g, g) bool letterbox cells or None (all)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, T, g, g)
    if valid is None:
        return 1 - cos.mean()
    weight = valid[:, None].float()
    return 1 - ((cos * weight).sum((2, 3)) / weight.sum((2, 3))).mean()


def distill_loss(head, teacher, batch, hidden, model):
    """The distillation term of one batch: the head's predictions at every frame's grid tokens
    against the frozen teacher's features (B, T, g, g, D) of the same frames."""
    videos, dev, g = batch["videos"], hidden[0].device, model.cfg.grid
    valid = model.stab.valid_cells(videos, g, g)  # None without letterboxing
    valid = None if valid is None else valid.to(dev)
    start = (batch["input_ids"] == data.VIDEO_PLACEHOLDER).int().argmax(1).to(dev)
    pos = grid_positions(model.cfg, start, valid)  # (B, T, g, g)
    index = pos.clamp(min=0).flatten(1)[..., None]  # (B, T*g*g, 1); cells outside the box are masked below
    taps = getattr(head, "module", head).taps  # the head's, under torchrun's DDP the wrapped head's
    picked = {i: hidden[i].gather(1, index.expand(-1, -1, hidden[i].shape[-1])).flatten(0, 1) for i in taps}
    pred = head(picked).view(*pos.shape, -1)  # (B, T, g, g, D)
    with torch.no_grad():
        target = teacher(batch).to(dev)
    return cosine_distill_loss(pred, target, valid)


def make_teacher(name, cfg):
    """(teacher, its feature width). teacher(batch) -> frozen per-cell features (B, T, g, g, D) of the
    batch's clips on the LSD grid. Any frozen video encoder plugs in the same way, e.g.
    teacher = lambda batch: encoder(batch["videos"][:, :, :3]) for an encoder (B, T, 3, S, S) -> (B, T, g, g, D)."""
    if name != "oracle":
        raise ValueError(f"--distill must be auto, empty (off) or oracle, got {name!r}")

    def oracle(batch):
        if "samples" not in batch:
            raise ValueError("--distill=oracle reads the synthetic task's ground truth; real data has none")
        return torch.from_numpy(np.stack([data.oracle_features(s, cfg.grid) for s in batch["samples"]]))
    return oracle, len(data.ORACLE_FEATURES)


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, tokenizer, n_samples, device, split="heldout", shuffle=False, max_new_tokens=8, batch_size=100):
    """Exact-match accuracy per question family on the first n_samples of a synthetic split,
    answering greedily. shuffle=True feeds each clip's frames in a fixed scrambled order. Under
    torchrun every process answers every world_size-th question, and the answers are pooled."""
    was_training = model.training
    model.eval()
    eos = tokenizer.token_to_id("</s>")
    records = []
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = range(rank, n_samples, world)
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        samples = [data.make_sample(i, split, model.cfg.n_frames, model.cfg.image_size, model.cfg.grid)
                   for i in indices]
        examples = []
        for i, s in zip(indices, samples):
            input_ids, labels = data.encode_example(tokenizer, s.question)  # the prompt alone
            video = data.shuffle_frames(s.video, seed=i) if shuffle else s.video
            examples.append({"video": video, "input_ids": input_ids, "labels": labels})
        batch = data.collate(examples)
        answers = model.generate(batch["videos"].to(device), batch["input_ids"].to(device),
                                 batch["lengths"].to(device), max_new_tokens=max_new_tokens, eos_id=eos)
        for s, ids in zip(samples, answers.tolist()):
            records.append((s.family, s.answer, answer_text(tokenizer, ids, eos)))
    model.train(was_training)
    return data.exact_match([record for part in gather(records) for record in part])


def answer_text(tokenizer, ids, eos_id):
    """Generated ids -> the answer: cut at the first eos, decoded and stripped, as the release does."""
    return tokenizer.decode(ids[:ids.index(eos_id)] if eos_id in ids else ids).strip()


def report(accuracy):
    return ", ".join(f"{family} {value:.1%}" for family, value in sorted(accuracy.items()))


# ------------------------------------------------------------------------------------ a pretrained start

def load_pretrained(tc, tc_changes, cfg_changes, device):
    """(model, tokenizer) from --init_from=DIR: an LLM directory gets a fresh STAB and projector, whose
    shapes and video geometry come from --preset (default: paper); a panda export comes back whole."""
    preset = tc.preset if "preset" in tc_changes else "paper"
    # float32 master weights, whatever the device: the frozen decoder alone is cast to bf16 later on
    model, tokenizer = weights.from_pretrained(tc.init_from, dtype=torch.float32, device=device, preset=preset,
                                               **cfg_changes)
    if tokenizer is None:
        raise FileNotFoundError(f"{tc.init_from} has no tokenizer.json, which training needs to read the "
                                f"instructions (weights.from_pretrained's docstring says how to make one)")
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:  # else an id past the embedding fails deep inside it
        raise ValueError(f"{tc.init_from}: tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model's "
                         f"embedding only {model.cfg.vocab_size}: the tokenizer belongs to another model")
    return model, tokenizer


# ------------------------------------------------------------------------------------ real data

def describe_skip(sample_id, reason):
    """One line that names the sample: most reasons name its file, and a missing video its id too."""
    return reason if reason.startswith("sample ") else f"sample {sample_id!r}: {reason}"


def apply_error_policy(batch, on_error, skipped):
    """The unusable samples a DataLoader batch reports: raise on the first (on_error="raise"), or name
    each in the log and append it to `skipped` (on_error="skip"). Never dropped without a word."""
    for sample_id, reason in batch["skipped"]:
        message = describe_skip(sample_id, reason)
        if on_error == "raise":
            raise ValueError(f"{message} (--on_error=skip would skip it and go on)")
        skipped.append(message)
        tqdm.write(f"skipped {message}")


def instruction_data(tc, tokenizer, cfg):
    """The --data instruction file in the model's frame geometry, with horizontal flips (train=True)."""
    if not tc.video_folder:
        raise ValueError("--data needs --video_folder=DIR, the folder its video names are looked up in")
    # tokenise one made-up turn now: a tokenizer without <s> or </s> fails here, in one line, not in a worker
    data.tokenize_conversation(tokenizer, data.VICUNA_V1, [("question", "answer")])
    dataset = data.VideoInstructionDataset(tc.data, tc.video_folder, tokenizer, data.VICUNA_V1, train=True,
                                           on_error=tc.on_error, **data.geometry_options(cfg))
    # Bad annotation entries were handled above, by --on_error, while the file was parsed. Bad videos
    # come back from the workers as {"id", "skipped": reason} under either policy, and real_batches
    # applies the policy here in the main process, so that a raised error keeps its one-line message
    # (a worker's exception arrives wrapped in its traceback).
    dataset.on_error = "skip"
    if len(dataset) == 0:
        raise ValueError(f"{tc.data}: no usable entry ({len(dataset.invalid_entries)} invalid)")
    return dataset


def real_batches(dataset, tc, epoch, position, skipped, rank=0, world=1):
    """Endless batches of the instruction data, as (batch, epoch, position). Epoch e visits the samples
    in the order of a permutation seeded by (seed, e); position counts the samples of the epoch used
    so far, so the (epoch, position) of a checkpoint is where a resumed run goes on. Unusable samples
    stop the run (on_error=raise) or are logged, appended to `skipped` and left out of the batch.

    Under torchrun, process r takes every world-th sample of the order from the r-th on: the k-th
    batches of all processes together are samples k*B*world .. (k+1)*B*world - 1 of the order, the
    k-th batch of one process with the global batch B*world (until a sample is skipped). Each process
    keeps its own (epoch, position) in its share, so one that skips a sample, or ends its share of an
    epoch a batch earlier, still yields one batch per micro-step, like the others: no coordination."""
    while True:
        order = np.random.default_rng([tc.seed, epoch]).permutation(len(dataset))[rank::world][position:].tolist()
        # The workers' flip RNG is seeded from (seed, epoch, position, rank): a run is reproducible from any
        # starting point, though a resumed epoch flips other clips than an uninterrupted one would.
        flips = torch.Generator().manual_seed(int(np.random.default_rng([tc.seed, epoch, position, rank])
                                                  .integers(2**62)))
        loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=order, num_workers=tc.num_workers,
                            collate_fn=data.collate_video_batch, generator=flips)
        n_kept, started_at = 0, position
        for batch in loader:
            kept = 0 if batch["lengths"] is None else len(batch["lengths"])
            position += kept + len(batch["skipped"])
            apply_error_policy(batch, tc.on_error, skipped)
            if kept:
                n_kept += kept
                yield batch, epoch, position
        if n_kept == 0 and started_at == 0:
            whose = "its" if world == 1 else f"process {rank}'s"
            raise ValueError(f"{tc.data}: not one of {whose} {len(range(rank, len(dataset), world))} samples loads; "
                             f"the last reason: {skipped[-1]}")
        epoch, position = epoch + 1, 0


def report_skipped(skipped, dataset):
    """The end-of-run account of on_error=skip: every distinct sample left out, and how often."""
    counts = {}
    for message in skipped:
        counts[message] = counts.get(message, 0) + 1
    print(f"skipped {len(skipped)} time(s), {len(counts)} distinct sample(s) with unusable videos, "
          f"and {len(dataset.invalid_entries)} invalid annotation entries")
    for message, count in counts.items():
        print(f"  {message}" + (f" ({count} times)" if count > 1 else ""))
    for message in dataset.invalid_entries:
        print(f"  {message}")


# ------------------------------------------------------------------------------------ training

def main(argv):
    tc_changes, cfg_changes = parse_overrides(argv, TrainConfig, PandaConfig)
    tc = replace(TrainConfig(), **tc_changes)
    # Under torchrun this script runs once per GPU; each process trains on its own share of every batch,
    # and rank 0 alone writes the log, the progress bar and the files.
    device, rank, world = init_distributed(pick_device(tc.device))
    master = rank == 0
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, dcp_path = out / "ckpt.pt", out / "ckpt_dcp"  # one file; under --fsdp a folder of shards

    if tc.init_from == "resume":
        if dcp_path.exists():  # an --fsdp run: the model's shape now, its weights once sharded (load_sharded)
            ckpt = torch.load(dcp_path / "train_state.pt", weights_only=False)
            cfg = PandaConfig(**(ckpt["model_config"] | cfg_changes))
            model = weights.empty_model(cfg, torch.float32, device, fresh_visual=False)
        else:
            model, ckpt = load_checkpoint(ckpt_path, device, **cfg_changes)
        saved = TrainConfig(**ckpt["train_config"])
        if tc_changes.get("stage", saved.stage) != saved.stage:
            raise ValueError(f"a run resumes in its own stage ({saved.stage}); to start the next stage from it, "
                             f"--export it and pass --init_from=EXPORT_DIR --stage={tc.stage}")
        if tc_changes.get("fsdp", saved.fsdp) != saved.fsdp:
            raise ValueError(f"a run resumes with the --fsdp it was started with ({saved.fsdp}), from "
                             f"{dcp_path if saved.fsdp else ckpt_path}")
        tc = replace(saved, **tc_changes)  # tc_changes holds init_from="resume" itself
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        decoder_from = ckpt.get("decoder_from", "scratch")  # where the run began: scratch or a directory
    else:
        for path in (ckpt_path, dcp_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; resume it with --init_from=resume or pick another --out_dir")
        torch.manual_seed(tc.seed)  # the fresh weights (all, or the STAB and projector) are the same every run
        if tc.init_from == "scratch":
            tokenizer = data.build_tokenizer()
            cfg = PandaConfig.preset(tc.preset, vocab_size=tokenizer.get_vocab_size(), **cfg_changes)
            model = VideoPanda(cfg).to(device)
        else:
            model, tokenizer = load_pretrained(tc, tc_changes, cfg_changes, device)
            tc = with_stage(tc, tc_changes)
        ckpt, decoder_from = None, tc.init_from
    if master:
        tokenizer.save(str(out / "tokenizer.json"))
    if tc.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp=true shards the model over the processes of torchrun: run "
                         "torchrun --standalone --nproc_per_node=N train.py ... (DISTRIBUTED.md)")

    # The synthetic task is written in its own word-level vocabulary, and real captions in a pretrained
    # tokenizer's: each data source goes with its own kind of start.
    pretrained = decoder_from != "scratch"
    if pretrained and not tc.data:
        raise ValueError("a pretrained decoder trains on real data: pass --data=FILE.json --video_folder=DIR "
                         "(the synthetic task is tokenised for its own word-level vocabulary only)")
    if tc.data and not pretrained:
        raise ValueError("--data needs a pretrained decoder and its tokenizer: pass --init_from=DIR (a model "
                         "trained from scratch knows only the synthetic task's words)")
    train_decoder = STAGES[tc.stage]["train_decoder"] if pretrained else True
    # Frozen, the decoder goes bf16: half the memory, and autocast computes in bf16 anyway. Not under
    # FSDP, whose root unit would then mix dtypes: its mixed-precision policy computes in bf16 instead.
    if not train_decoder and device.type == "cuda" and not tc.fsdp:
        model.decoder.to(torch.bfloat16)

    teacher, head = None, None  # distillation (spec D): a head learns a frozen teacher's per-cell features
    if tc.distill == "auto":
        tc = replace(tc, distill="" if tc.data else "oracle")
    if tc.distill:
        teacher, teacher_dim = make_teacher(tc.distill, model.cfg)
        head = DistillHead(model.cfg, teacher_dim).to(device)
    if ckpt is not None and bool(ckpt["train_config"].get("distill")) != (head is not None):
        raise ValueError("a run resumes with the --distill it was started with")
    if ckpt is not None and head is not None and not tc.fsdp:
        head.load_state_dict(ckpt["distill_head"])
    model.decoder.requires_grad_(train_decoder)  # before DDP or FSDP takes the model: both note what trains
    if world > 1 and device.type == "cuda":
        # The LSTE's BatchNorm normalises by statistics of the batch: with SyncBatchNorm those of the global
        # batch, gathered from all processes, as one process with the whole batch would compute them.
        # PyTorch syncs them on GPUs only: on CPUs every process normalises by its own batch's statistics
        # (and under FSDP, which does not copy buffers, keeps running averages of its own).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same model, its BatchNorm3d replaced
    if tc.fsdp:
        shard(model, head, device)  # before the optimizer is made: sharding replaces the parameters
    optimizer = make_optimizer(model, tc, train_decoder, head)
    step, next_sample, epoch, position, skipped = 0, 0, 0, 0, []
    if ckpt is not None:
        if tc.fsdp:
            load_sharded(dcp_path, model, head, optimizer)
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        step, next_sample = ckpt["step"], ckpt["next_sample"]
        skipped = ckpt["skipped"] if master else []  # all processes' skips so far, counted once
        # Each process saved its own random state and its place in its share of the data (checkpoint()).
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
            epoch, position = ckpt["data_epoch"][rank], ckpt["data_position"][rank]
        elif tc.data:
            raise ValueError(f"a run on --data resumes on as many processes as it was saved from "
                             f"({len(ckpt['rng'])}): each one's share of the samples depends on their number")
        else:  # next_sample counts for all processes together: any number of them goes on from it
            torch.manual_seed(tc.seed + rank + step)  # fresh random streams (dropout is all that draws)
    else:
        torch.manual_seed(tc.seed + rank)  # the processes' dropout masks differ, as different batches' do
    if tc.data:
        dataset = instruction_data(tc, tokenizer, model.cfg)
        if len(dataset) < world:
            raise ValueError(f"{tc.data} has {len(dataset)} usable entries, fewer than the {world} processes")
        if ckpt is not None and ckpt.get("data_size", len(dataset)) != len(dataset):
            raise ValueError(f"{tc.data} has {len(dataset)} usable entries, the checkpoint's file had "
                             f"{ckpt['data_size']}: its epoch and position would point at other samples")
        # imageio runs gc.collect() twice each time it closes a video, and a collection walks every
        # object the process holds (torch's are many). Frozen objects are skipped: loading 24 clips
        # through 2 workers took 4.5 s instead of 11 s on a 2-core machine. Freeze before the workers
        # fork, so that they inherit it.
        gc.freeze()
        batches = real_batches(dataset, tc, epoch, position, skipped, rank, world)
    else:
        stream = data.SyntheticQA(tokenizer, "train", model.cfg.n_frames, model.cfg.image_size,
                                  tc.questions_per_clip, model.cfg.grid)
    # DDP: every process holds the whole model, starting from rank 0's weights (DDP broadcasts them),
    # and during backward the gradients are averaged over the processes bucket by bucket, overlapping
    # the rest of the backward. The distillation head trains too: it needs its own DDP.
    train_model, train_head, ddp_modules = model, head, []
    if world > 1 and not tc.fsdp:
        gpu = [device.index] if device.type == "cuda" else None
        train_model = DDP(model, device_ids=gpu)  # it also copies rank 0's BatchNorm running averages to all
        train_head = None if head is None else DDP(head, device_ids=gpu)
        ddp_modules = [m for m in (train_model, train_head) if m is not None]
    if tc.compile:  # after DDP, as PyTorch advises: the compiled graphs are split at DDP's buckets, so that
        train_model = torch.compile(train_model)  # the all-reduces still overlap the backward
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    n = model.num_params()
    trains = "everything" if train_decoder else "STAB + projector (decoder frozen)"
    processes = f" x {world} processes ({'FSDP' if tc.fsdp else 'DDP'})" if world > 1 else ""
    if master:
        print(f"model: {n['stab']:,} STAB + {n['projector']:,} projector + {n['decoder']:,} decoder parameters "
              f"on {device}{processes}; training {trains}{f' ({tc.stage})' if pretrained else ''}; "
              f"distillation {tc.distill or 'off'}; steps {step} -> {tc.max_steps}")

    def checkpoint():
        # Every process takes part: each gives its random state and its place in its share of the data
        # (and under FSDP writes its shards); rank 0 writes the rest.
        places = gather((epoch, position))
        state = dict(step=step, next_sample=next_sample, rng=gather(rng_state()), train_config=asdict(tc),
                     model_config=model.cfg.to_dict(), decoder_from=decoder_from,
                     template="vicuna_v1" if pretrained else "synthetic",  # what sample.py prompts with
                     data_epoch=[e for e, _ in places], data_position=[p for _, p in places],
                     skipped=[message for part in gather(skipped) for message in part],
                     data_size=len(dataset) if tc.data else None, loss=total)
        if tc.fsdp:
            save_sharded(dcp_path, model, head, optimizer, state)
        elif master:
            save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            distill_head=None if head is None else head.state_dict(), **state)

    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, dynamic_ncols=True, disable=not master)
    t0, tokens_seen, waited = time.time(), 0, 0.0  # waited: seconds spent waiting for batches
    while step < tc.max_steps:
        scale = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        micro = []
        for _ in range(tc.grad_accum):
            asked = time.time()
            if tc.data:
                batch, epoch, position = next(batches)
            else:  # synthetic sample i is the same on every machine: the next index is all a resume needs.
                # A micro-step takes the next batch_size * world samples, process r the r-th batch_size of them.
                batch = stream.batch(next_sample + rank * tc.batch_size, tc.batch_size)
                next_sample += tc.batch_size * world
            waited += time.time() - asked
            micro.append(batch)
        # Normalise by the supervised tokens N of the whole step, of all micro-batches on all processes
        # (one all-reduce of a count), so that k micro-batches on each of W processes give exactly the
        # gradient of one batch k*W times larger. Process r backpropagates W * S_r / N, S_r its summed
        # token losses, and DDP (FSDP too) averages the gradients over the processes:
        #     (1/W) * sum_r W * grad(S_r) / N  =  grad(sum_r S_r) / N,
        # the gradient of the mean loss over the N tokens, as one process with the whole step computes it.
        # The distillation term is a mean over each micro-batch: the average over processes is the mean
        # over the global micro-batch (the processes' batches are the same size).
        n_supervised = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in micro)
        n_supervised = all_sum([n_supervised], device)[0]
        total = total_distill = step_tokens = 0.0
        for i, b in enumerate(micro):
            # DDP all-reduces after the last micro-batch only; FSDP reduce-scatters after each (shard())
            with gradient_sync(ddp_modules, sync=i == len(micro) - 1):
                with autocast:
                    loss = train_model(b["videos"].to(device), b["input_ids"].to(device), b["labels"].to(device),
                                       b["lengths"].to(device), reduction="sum", return_hidden=head is not None)
                    if head is not None:  # + weight * (1 - cosine to the teacher), a mean over the step's micro-batches
                        loss, hidden = loss
                        distilled = distill_loss(train_head, teacher, b, hidden, model) / len(micro)
                        total_distill += distilled.item()
                        loss = loss * world / n_supervised + tc.distill_weight * distilled
                    else:
                        loss = loss * world / n_supervised
                loss.backward()
            total += loss.item()
            step_tokens += int(b["lengths"].sum()) + len(b["lengths"]) * model.cfg.n_frames * model.cfg.tokens_per_frame
        # What the log shows, over all processes: the step's loss (each process holds W times its share)
        total, total_distill, step_tokens = all_sum([total / world, total_distill / world, step_tokens], device)
        tokens_seen += step_tokens
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        tok_s=f"{tokens_seen / (time.time() - t0):.0f}",
                        **({} if head is None else {"distill": f"{total_distill:.4f}"}))
        if step % tc.eval_every == 0 and step < tc.max_steps:  # the final scores come after the loop
            if tc.data and master:  # real answers are sentences, not words to match: sample.py --eval scores a QA set
                bar.write(f"step {step}: loss {total:.4f}, epoch {epoch}, {position * world}/{len(dataset)} "
                          f"samples into it")  # every process is about as far into its share
            elif not tc.data:  # every process answers its share of the questions (evaluate)
                acc = evaluate(unsharded(model, device) if tc.fsdp else model, tokenizer, tc.eval_samples, device,
                               max_new_tokens=tc.max_new_tokens)
                if master:
                    bar.write(f"step {step}: loss {total:.4f}, held-out exact match: {report(acc)}")
        if tc.save_every and (step % tc.save_every == 0 or step == tc.max_steps):
            checkpoint()
    bar.close()
    if tc.data:
        skipped = [message for part in gather(skipped) for message in part]
        if master:
            report_skipped(skipped, dataset)
    else:
        final = unsharded(model, device) if tc.fsdp else model
        results = {}  # the final scores, also in out_dir/results.json (ablate.py collects them)
        for name, split, shuffle in (("heldout", "heldout", False), ("test", "test", False),
                                     ("heldout_shuffled", "heldout", True)):
            results[name] = evaluate(final, tokenizer, tc.eval_samples, device, split, shuffle, tc.max_new_tokens)
            if master:
                print(f"{name}: {report(results[name])}")
        if master:
            (out / "results.json").write_text(json.dumps(results, indent=1))
    if tc.export:
        whole = unsharded(model, device, rank0_only=True) if tc.fsdp else model
        if master:
            weights.save_pretrained(whole, tokenizer, tc.export)
            print(f"exported to {tc.export} (weights.from_pretrained, or --init_from={tc.export} of the next stage)")
    if master:
        memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" \
            if device.type == "cuda" else ""  # of this process, i.e. per GPU under torchrun
        written = f"checkpoint: {dcp_path if tc.fsdp else ckpt_path}" if tc.save_every else "no checkpoint (--save_every=0)"
        print(f"done in {time.time() - t0:.0f} s, {waited:.0f} s of it waiting for data{memory}; {written}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit("error: " + " ".join(str(e).splitlines()))  # one line, even for a message that has several
    leave_process_group()  # under torchrun, once main() and everything it made are gone
