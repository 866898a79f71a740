"""Train Video-Panda. With no options: the tiny synthetic-video run, minutes on a laptop CPU.

    python train.py                                   # tiny model, synthetic video QA
    python train.py --max_steps=100 --batch_size=8    # any option below, as --key=value
    python train.py --init_from=resume                # go on from out/ckpt.pt exactly where it stopped

The paper's three stages (Sec. 3.2) on real videos, from a pretrained LLM and a Video-ChatGPT / Valley
instruction file; each stage starts from the previous one's --export:

    python train.py --init_from=path/to/vicuna --stage=prealign --data=valley.json --video_folder=v/ --export=out/s1
    python train.py --init_from=out/s1 --stage=pretrain --data=valley.json --video_folder=v/ --export=out/s2

Several GPUs: the same command under torchrun (docs/DISTRIBUTED.md). Ctrl-C stops after a step and saves it.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import common
import data
import distill
import distributed
from panda import IGNORE_INDEX, PandaConfig, VideoPanda


@dataclass
class TrainConfig:
    preset: str = "tiny"        # model size: nano, tiny or paper (panda.PRESETS); any PandaConfig field also works
    out_dir: str = "out"        # ckpt.pt, tokenizer.json and results.json go here
    init_from: str = "scratch"  # scratch | resume (out_dir's checkpoint) | a pretrained checkpoint directory
    stage: str = "finetune"     # with a pretrained decoder: prealign (decoder frozen) | pretrain | finetune
    seed: int = 1337            # the fresh weights and the data order
    # optimisation
    batch_size: int = 32        # per process: under torchrun a micro-step takes batch_size * processes samples
    grad_accum: int = 1         # micro-batches per optimizer step
    max_steps: int = 1300       # optimizer steps
    lr_stab: float = 3e-3       # STAB, projector and distillation head (the paper trains them at their own rate)
    lr_decoder: float = 1e-3    # the decoder
    warmup_steps: int = 60      # linear warm-up, then a cosine decay
    min_lr_ratio: float = 0.05  # the cosine ends at this fraction of each group's rate
    weight_decay: float = 0.0   # the paper uses none
    grad_clip: float = 1.0      # clip the gradient norm to this; 0 = no clipping
    questions_per_clip: int = 8  # synthetic clips carry several question-answer turns: more signal per clip
    # distillation: loss = LM + distill_weight * (1 - cosine to a frozen teacher's per-cell features)
    distill: str = "auto"       # auto: oracle on the synthetic task; vit on real data with --teacher | "" (off)
    teacher: str = ""           # a local CLIP vision checkpoint (ViT-L/14 at 224 px), the teacher on real data
    distill_weight: float = 1.0  # the release's weight
    # evaluation and checkpoints
    eval_every: int = 650       # held-out accuracy every this many steps (synthetic task)
    eval_samples: int = 400     # held-out questions per evaluation
    save_every: int = 650       # a checkpoint every this many steps and at the end; 0 = never (timing runs)
    max_new_tokens: int = 8     # answers are a word or two
    # system
    device: str = "auto"        # auto: cuda, then mps, then cpu
    compile: bool = False       # torch.compile the model
    fsdp: bool = False          # under torchrun: shard weights, gradients and Adam state over the GPUs (FSDP2)
    num_workers: int = 2        # processes making the batches (synthetic clips, decoded videos) while the model trains
    # real data: a Video-ChatGPT / Valley instruction file instead of the synthetic task
    data: str = ""              # the annotation JSON; empty = the synthetic task
    video_folder: str = ""      # where its "video" names are looked up
    frame_cache: str = ""       # cache the resized frames here: later epochs and stages read them, not decode
    on_error: str = "raise"     # an unusable video or entry: raise (stop) | skip (log it, count it, go on)
    export: str = ""            # also write the model as a checkpoint directory here at the end (weights.py)
    model_hook: str = ""        # module.function(model) -> model, run on a fresh model: an experiment, an exercise

    def __post_init__(self):  # checked as parsed (and as read from a checkpoint): one line naming the option
        common.require_ranges(self, positive=("batch_size", "grad_accum", "max_steps", "eval_every", "eval_samples",
                                              "max_new_tokens", "questions_per_clip"),
                              non_negative=("lr_stab", "lr_decoder", "warmup_steps", "min_lr_ratio", "weight_decay",
                                            "grad_clip", "distill_weight", "save_every", "num_workers"),
                              choices={"stage": STAGES, "on_error": ("raise", "skip")}, non_empty=("out_dir",))


STAGES = {  # Sec. 3.2 and the release's scripts: what trains after a pretrained decoder is loaded, and how fast
    "prealign": dict(train_decoder=False, lr_stab=4e-4, lr_decoder=0.0, warmup_ratio=0.03),
    "pretrain": dict(train_decoder=True, lr_stab=4e-5, lr_decoder=4e-5, warmup_ratio=0.01),
    "finetune": dict(train_decoder=True, lr_stab=2e-5, lr_decoder=2e-5, warmup_ratio=0.01),
}
# What may change when a run resumes: how long and how often, where and on what. Anything else must
# be as the run began (its data order, its model, its rates); a different value is an error, not ignored.
RESUMABLE = {"init_from", "out_dir", "max_steps", "eval_every", "eval_samples", "save_every", "max_new_tokens",
             "device", "compile", "num_workers", "on_error", "export", "video_folder", "grad_checkpoint", "fast",
             "teacher", "frame_cache"}


def lr_at(step, tc):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps: a multiplier."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, tc, train_decoder, head):
    visual = list(model.stab.parameters()) + list(model.projector.parameters())
    if head is not None:  # the release trains its distillation head at the STAB's rate
        visual += list(head.parameters())
    groups = [{"params": visual, "lr": tc.lr_stab, "base_lr": tc.lr_stab}]
    if train_decoder:
        groups.append({"params": list(model.decoder.parameters()), "lr": tc.lr_decoder, "base_lr": tc.lr_decoder})
    # fused: one kernel for the whole update on GPUs, as nanoGPT does; the default (foreach) path makes
    # full-size temporaries (for a whole 7B decoder, the sqrt of its second moment alone is 27 GB)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=tc.weight_decay,
                             fused=next(model.parameters()).is_cuda)


# ------------------------------------------------------------------------------------ where a run starts

def start(tc, tc_changes, cfg_changes, device, out):
    """(model, tokenizer, tc, ckpt): a fresh model, a pretrained decoder with a fresh STAB (its stage's
    rates), or the run in out_dir with the options it began with (ckpt is then its checkpoint)."""
    if tc.init_from == "resume":
        return resume(tc, tc_changes, cfg_changes, device, out)
    for path in (out / "ckpt.pt", out / "ckpt_dcp"):
        if path.exists():
            raise FileExistsError(f"{path} exists; resume it with --init_from=resume or pick another --out_dir")
    torch.manual_seed(tc.seed)  # the fresh weights (all, or the STAB and projector) are the same every run
    if tc.init_from == "scratch":
        if tc.data:
            raise ValueError("--data needs a pretrained decoder and its tokenizer: pass --init_from=DIR (a model "
                             "trained from scratch knows only the synthetic task's words)")
        tokenizer = data.build_tokenizer()
        cfg = PandaConfig.preset(tc.preset, vocab_size=tokenizer.get_vocab_size(), **cfg_changes)
        model = VideoPanda(common.check_fits(cfg, torch.float32, "cpu", device))  # made on the CPU, then moved
        model = common.call_hook(tc.model_hook, model) if tc.model_hook else model
        return model.to(device), tokenizer, tc, None
    import weights  # a pretrained start needs safetensors; the synthetic run does not
    if not tc.data:
        raise ValueError("a pretrained decoder trains on real data: pass --data=FILE.json --video_folder=DIR "
                         "(the synthetic task is tokenised for its own word-level vocabulary only)")
    preset = tc.preset if "preset" in tc_changes else "paper"  # the STAB's size: the paper's unless asked
    # float32 master weights, whatever the device: a frozen decoder alone is cast to bf16 later on
    model, tokenizer = weights.from_pretrained(tc.init_from, dtype=torch.float32, device=device, preset=preset,
                                               **cfg_changes)
    common.check_tokenizer(tokenizer, model.cfg.vocab_size, Path(tc.init_from) / "tokenizer.json")
    stage = STAGES[tc.stage]  # its rates and warm-up, except those the command line set
    rates = {"lr_stab": stage["lr_stab"], "lr_decoder": stage["lr_decoder"],
             "warmup_steps": max(1, round(stage["warmup_ratio"] * tc.max_steps))}
    return model, tokenizer, replace(tc, **{k: v for k, v in rates.items() if k not in tc_changes}), None


def resume(tc, tc_changes, cfg_changes, device, out):
    path = distributed.resume_file(out, tc.fsdp)  # ckpt.pt, or with --fsdp=true the sharded folder's
    ckpt, saved = common.load_train_state(path, device, TrainConfig, sharded=tc.fsdp)
    differs = [f"--{k}={v} ({'unset' if k not in ckpt['train_config'] else getattr(saved, k)} there)"
               for k, v in tc_changes.items() if k not in RESUMABLE and v != getattr(saved, k)]
    differs += [f"--{k}={v} ({ckpt['model_config'].get(k)} there)" for k, v in cfg_changes.items()
                if k not in RESUMABLE and v != ckpt["model_config"].get(k)]
    if differs:
        raise ValueError(f"{path}: a run resumes with the options it began with; these differ: {', '.join(differs)}. "
                         f"Drop them, or start a new run (a new stage: --export this one, then --init_from=EXPORT)")
    model = common.build_model(ckpt, path, device, weights=not tc.fsdp, **cfg_changes)
    tokenizer = common.read_tokenizer(out / "tokenizer.json", model.cfg.vocab_size)  # its ids checked against the model
    return model, tokenizer, replace(saved, **tc_changes), ckpt


# ------------------------------------------------------------------------------------ data and evaluation

@torch.no_grad()
def evaluate(model, tokenizer, n_samples, device, split="heldout", shuffle=False, max_new_tokens=8, batch_size=100):
    """Exact-match accuracy per question family on the first n_samples of a synthetic split, answered
    greedily; shuffle: frames in a fixed scrambled order. Under torchrun the processes share the questions."""
    was_training, cfg, eos = model.training, model.cfg, tokenizer.token_to_id("</s>")
    model.eval()
    rank, world = distributed.rank_and_world()
    records, mine = [], range(rank, n_samples, world)
    for start_at in range(0, len(mine), batch_size):
        indices = mine[start_at:start_at + batch_size]
        samples = [data.make_sample(i, split, cfg.n_frames, cfg.image_size, cfg.grid) for i in indices]
        prompts = [data.tokenize_conversation(tokenizer, data.SYNTHETIC, [(s.question, None)]) for s in samples]
        videos = [data.shuffle_frames(s.video, seed=i) if shuffle else s.video for i, s in zip(indices, samples)]
        batch = data.collate([dict(video=v, input_ids=ids, labels=labels) for v, (ids, labels) in zip(videos, prompts)])
        answers = model.generate(batch["videos"].to(device), batch["input_ids"].to(device),
                                 batch["lengths"].to(device), max_new_tokens=max_new_tokens, eos_id=eos)
        records += [(s.family, s.answer, data.answer_text(tokenizer, ids, eos))
                    for s, ids in zip(samples, answers.tolist())]
    model.train(was_training)
    return data.accuracy([record for part in distributed.gather(records) for record in part])


def report(accuracy):
    return ", ".join(f"{family} {value:.1%}" for family, value in sorted(accuracy.items()))


# ------------------------------------------------------------------------------------ one step

def forward_backward(model, head, teacher, micro, tc, device, world, plain_model):
    """Forward and backward of one optimizer step's micro-batches; returns (loss, distill loss, tokens).

    The loss is normalised by the supervised tokens N of the whole step, of all micro-batches on all
    processes (one all-reduce of a count), so that k micro-batches on each of W processes give exactly
    the gradient of one batch k*W times larger. Process r backpropagates W * S_r / N, S_r its summed
    token losses, and DDP (FSDP too) averages the gradients over the processes:
        (1/W) * sum_r W * grad(S_r) / N  =  grad(sum_r S_r) / N,
    the gradient of the mean loss over the N tokens, as one process with the whole step computes it.
    The distillation term is a mean over each micro-batch: the average over processes is the mean
    over the global micro-batch (the processes' batches are the same size). plain_model: the model that
    `model` may wrap (DDP, torch.compile), for its config and the distillation's token positions."""
    n_supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_supervised = distributed.all_sum([n_supervised], device)[0]
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    total = total_distill = tokens = 0.0
    cfg = plain_model.cfg  # tokens counted: the text's, and a video's n_frames * tokens_per_frame (at most)
    for i, b in enumerate(micro):
        # DDP all-reduces after the last micro-batch only; FSDP reduce-scatters after each (distributed.shard)
        with distributed.gradient_sync([model, head], sync=i == len(micro) - 1), autocast:
            loss = model(b["videos"].to(device), b["input_ids"].to(device), b["labels"].to(device),
                         b["lengths"].to(device), reduction="sum", return_hidden=head is not None)
            distilled = 0.0
            if head is not None:  # weight * (1 - cosine to the teacher), a mean over the step's micro-batches
                loss, hidden = loss
                distilled = distill.distill_loss(head, teacher, b, hidden, plain_model) / len(micro)
                total_distill += distilled.item()
            loss = loss * world / n_supervised + tc.distill_weight * distilled
        loss.backward()
        total += loss.item()
        tokens += int(b["lengths"].sum()) + len(b["videos"]) * cfg.n_frames * cfg.tokens_per_frame
    # what the log shows, over all processes: the step's loss (each process holds W times its share)
    total, total_distill, tokens = distributed.all_sum([total / world, total_distill / world, tokens], device)
    return total, total_distill, tokens


class NonFiniteStep(ValueError):
    """A step whose loss or gradient is inf or NaN: the run stops before the update."""


def clip_and_check(optimizer, tc, step, loss, device):
    """Clip the gradient norm (grad_clip=0: measure it only) and stop at a non-finite one, before the
    update can write inf or NaN into the weights. Every process takes the same decision."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if distributed.all_sum([0.0 if math.isfinite(norm) and math.isfinite(loss) else 1.0], device)[0]:
        raise NonFiniteStep(f"step {step + 1}: the loss is {loss:.4g} and the gradient norm {norm:.4g}: stopped "
                            f"before the update, the last checkpoint is kept; a lower learning rate may help")


# ------------------------------------------------------------------------------------ the run

def main(argv):
    tc_changes, cfg_changes = common.parse_args(argv, __doc__, TrainConfig, PandaConfig)
    tc = replace(TrainConfig(), **tc_changes)
    # Under torchrun this script runs once per GPU, each process on its share of every batch; rank 0 alone writes.
    device, rank, world = distributed.init(common.pick_device(tc.device), tc.fsdp)
    common.check_export(tc.export)  # a target the export may not replace is refused now, not after the run
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = common.RunLock(out).acquire() if rank == 0 else None  # if it fails, torchrun stops the others too
    stop = common.StopRequest()  # Ctrl-C: finish the step, save it, say how to go on
    try:
        r = build(tc, tc_changes, cfg_changes, device, rank, world, out)
        loop(r, stop)
        if r.step < r.tc.max_steps and r.tc.save_every:  # asked to stop: the step it finished is saved
            save(r)
        finish(r, stop)
    finally:
        stop.restore()
        if lock:
            lock.release()


def stop_if_asked(r, stop):  # Ctrl-C or SIGTERM, agreed by every process: exit 130, saying how to go on
    if distributed.all_sum([float(stop.asked)], r.device)[0]:
        if r.master:
            print(f"stopped after step {r.step}; " + (f"saved: go on with python train.py --init_from=resume "
                                                      f"--out_dir={r.out}" if r.tc.save_every else "nothing saved"))
        sys.exit(130)


def build(tc, tc_changes, cfg_changes, device, rank, world, out):
    """Everything a run needs, in one namespace: the model and what trains it, the data, where it stands."""
    model, tokenizer, tc, ckpt = start(tc, tc_changes, cfg_changes, device, out)
    r = SimpleNamespace(tc=tc, device=device, rank=rank, world=world, master=rank == 0, out=out, model=model,
                        tokenizer=tokenizer, cfg=model.cfg, step=0, place=(0, 0) if tc.data else 0, skipped=[],
                        loss=math.nan, template="vicuna_v1" if tc.data else "synthetic", dataset=None)
    if r.master:
        common.write_atomically(out / "tokenizer.json", lambda f: f.write(tokenizer.to_str().encode()))
    # The synthetic task comes with a model from scratch in its own words; real data with a pretrained decoder.
    r.train_decoder = STAGES[tc.stage]["train_decoder"] if tc.data else True
    # Frozen, the decoder goes bf16: half the memory, and autocast computes in bf16 anyway. Not under
    # FSDP, whose root unit would then mix dtypes: its mixed-precision policy computes in bf16 instead.
    if not r.train_decoder and device.type == "cuda" and not tc.fsdp:
        model.decoder.to(torch.bfloat16)
    r.tc, r.head, r.teacher = tc, head, teacher = distill.setup(tc, model, ckpt, device)
    model.decoder.requires_grad_(r.train_decoder)  # before DDP or FSDP takes the model: both note what trains
    if world > 1 and device.type == "cuda":
        # The LSTE's BatchNorm normalises by statistics of the batch: with SyncBatchNorm those of the global
        # batch, gathered from all processes, as one process with the whole batch would compute them.
        # PyTorch syncs them on GPUs only: on CPUs every process normalises by its own batch's statistics.
        r.model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tc.fsdp:
        distributed.shard(model, head, device)  # before the optimizer is made: sharding replaces the parameters
    r.optimizer = make_optimizer(model, tc, r.train_decoder, head)
    if ckpt is not None:
        restore(r, ckpt)
    if tc.data:
        r.stream = real_batches(r, ckpt)
    else:
        task = data.SyntheticQA(tokenizer, "train", r.cfg.n_frames, r.cfg.image_size, tc.questions_per_clip, r.cfg.grid)
        r.stream = task.batches(r.place, tc.batch_size, rank, world, tc.num_workers)
    r.train_model, r.train_head = distributed.wrap(model, head, device, tc.fsdp)
    if tc.compile:  # after DDP, as PyTorch advises: the compiled graphs are split at DDP's buckets, so that
        r.train_model = torch.compile(r.train_model)  # the all-reduces still overlap the backward
    if r.master:
        n, processes = model.num_params(), f" x {world} processes ({'FSDP' if tc.fsdp else 'DDP'})" * (world > 1)
        trains = "everything" if r.train_decoder else "STAB + projector (decoder frozen)"
        print(f"model: {n['stab']:,} STAB + {n['projector']:,} projector + {n['decoder']:,} decoder parameters on "
              f"{device}{processes}; training {trains}{f' ({tc.stage})' if tc.data else ''}; distillation "
              f"{tc.distill or 'off'}{f' ({tc.teacher})' if tc.teacher else ''}; steps {r.step} -> {tc.max_steps}")
    return r


def real_batches(r, ckpt):
    import video  # real data needs PyAV and Pillow; the synthetic run does not
    tc = r.tc
    r.dataset = video.VideoInstructionDataset(tc.data, tc.video_folder or ".", r.tokenizer, r.cfg, train=True,
                                              on_error=tc.on_error, decode_threads=1, frame_cache=tc.frame_cache,
                                              teacher_size=r.teacher.image_size if tc.distill == "vit" else 0)
    if len(r.dataset) < r.world:
        raise ValueError(f"{tc.data} has {len(r.dataset)} usable entries, fewer than the {r.world} processes")
    if ckpt is not None and ckpt["data_size"] != len(r.dataset):
        raise ValueError(f"{tc.data} has {len(r.dataset)} usable entries, the checkpoint's file had "
                         f"{ckpt['data_size']}: its epoch and position would point at other samples")
    return video.batches(r.dataset, tc.batch_size, tc.seed, r.place, tc.on_error, r.skipped, tc.num_workers,
                         r.rank, r.world)


def loop(r, stop):
    """Train from r.step to max_steps, or until asked to stop: a step at a time, every process together."""
    tc, optimizer = r.tc, r.optimizer
    r.model.train()
    bar = tqdm(total=tc.max_steps, initial=r.step, dynamic_ncols=True, disable=not r.master)
    r.t0, r.waited, tokens_seen, first = time.time(), 0.0, 0, r.step
    while r.step < tc.max_steps and not distributed.all_sum([float(stop.asked)], r.device)[0]:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(r.step, tc)
        asked = time.time()
        micro = [next(r.stream) for _ in range(tc.grad_accum)]
        r.waited += time.time() - asked
        loss, distilled, tokens = forward_backward(r.train_model, r.train_head, r.teacher, [b for b, _ in micro], tc,
                                                   r.device, r.world, r.model)
        clip_and_check(optimizer, tc, r.step, loss, r.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        r.step, r.place, r.loss = r.step + 1, micro[-1][1], loss
        tokens_seen += tokens
        bar.update(1)
        if r.step - first == 20 and r.master:  # the steps' recent rate (tqdm's): what the rest takes here
            bar.write(f"about {(tc.max_steps - r.step) / bar.format_dict['rate'] / 60:.1f} more minutes of training")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        tok_s=f"{tokens_seen / (time.time() - r.t0):.0f}",
                        **({"distill": f"{distilled:.4f}"} if r.head else {}))
        if r.step % tc.eval_every == 0 and r.step < tc.max_steps and not tc.data:  # the last one is finish()'s
            model = distributed.whole_model(r.model, tc.fsdp)
            accuracy = evaluate(model, r.tokenizer, tc.eval_samples, r.device, max_new_tokens=tc.max_new_tokens)
            if r.master:
                bar.write(f"step {r.step}: loss {loss:.4f}, held-out exact match: {report(accuracy)}")
        if tc.save_every and (r.step % tc.save_every == 0 or r.step == tc.max_steps):
            save(r)
    bar.close()


def restore(r, ckpt):
    """Put a resumed run back where its checkpoint left it: weights (sharded ones under --fsdp), the
    optimizer, the step, each process's place in the data and random state."""
    if r.tc.fsdp:
        distributed.load_sharded(distributed.checkpoint_folder(r.out / "ckpt_dcp"), r.model, r.head, r.optimizer)
    else:
        common.load_optimizer(r.optimizer, ckpt["optimizer"], r.out / "ckpt.pt")
    places = ckpt["data_place"]
    r.step, r.skipped = ckpt["step"], ckpt["skipped"] if r.master else []  # all processes' skips, counted once
    if len(places) == r.world:  # each process saved its own random state and its place in its share of the data
        common.set_rng_state(ckpt["rng"][r.rank])
        r.place = tuple(places[r.rank]) if r.tc.data else places[r.rank]
    elif r.tc.data:
        raise ValueError(f"a run on --data resumes on as many processes as it was saved from ({len(places)}): "
                         f"each one's share of the samples depends on their number")
    else:  # the synthetic stream's index is the same for all processes: any number of them goes on from it
        torch.manual_seed(r.tc.seed + r.rank + r.step)  # fresh random streams (dropout is all that draws)
        r.place = places[0]


def save(r):
    """Write the run as it stands after r.step steps: ckpt.pt, or under --fsdp the sharded folder
    ckpt_dcp/. Every process takes part (its random state, its place in the data, its shards). Weights
    holding inf or NaN are never written: the last checkpoint stays."""
    if not distributed.all_finite([p for g in r.optimizer.param_groups for p in g["params"]], r.device):
        raise NonFiniteStep(f"step {r.step}: the weights hold inf or NaN; the last checkpoint is kept")
    state = dict(step=r.step, data_place=distributed.gather(r.place), rng=distributed.gather(common.rng_state()),
                 skipped=[m for part in distributed.gather(r.skipped) for m in part], loss=r.loss,
                 train_config=asdict(r.tc), model_config=asdict(r.cfg), template=r.template,
                 data_size=None if r.dataset is None else len(r.dataset))
    if r.tc.fsdp:
        distributed.save_sharded(r.out / "ckpt_dcp", r.model, r.head, r.optimizer, state)
    elif r.master:
        common.save_checkpoint(r.out / "ckpt.pt", state | dict(
            model=r.model.state_dict(), optimizer=r.optimizer.state_dict(),
            distill_head=None if r.head is None else r.head.state_dict()))


def finish(r, stop):
    """The end of a run: what on_error=skip left out (real data) or the final accuracies (synthetic, also in
    out_dir/results.json), --export (Ctrl-C stops before each), one line on time, data waits and memory."""
    tc = r.tc
    stop_if_asked(r, stop)
    if r.dataset is not None:
        skipped = [message for part in distributed.gather(r.skipped) for message in part]
        if r.master:
            import video
            video.report_skipped(skipped, r.dataset)
    else:
        final, results = distributed.whole_model(r.model, tc.fsdp), {}
        for name, split, shuffle in (("heldout", "heldout", False), ("test", "test", False),
                                     ("heldout_shuffled", "heldout", True)):
            stop_if_asked(r, stop)
            results[name] = evaluate(final, r.tokenizer, tc.eval_samples, r.device, split, shuffle, tc.max_new_tokens)
            if r.master:
                print(f"{name}: {report(results[name])}")
        if r.master:
            common.write_atomically(r.out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
            print("held-out: (shape, colour) pairs training never showed; test: fresh clips of training's pairs; "
                  "shuffled: held-out with frames out of order, where spatial holds and temporal falls to ~50%")
    if tc.export:
        stop_if_asked(r, stop)
        import weights  # safetensors: only an export needs it
        whole = distributed.whole_model(r.model, tc.fsdp, rank0_only=True)  # under FSDP, gathered on rank 0
        if r.master:
            weights.save_pretrained(whole, r.tokenizer, tc.export)
            print(f"exported to {tc.export} (weights.from_pretrained, or --init_from={tc.export} of the next stage)")
    if r.master:
        memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(r.device) / 2 ** 30:.1f} GiB" \
            if r.device.type == "cuda" else ""  # of this process, i.e. per GPU under torchrun
        waited = r.waited / max(time.time() - r.t0, 1e-9)
        hint = " (over 20%: more --num_workers would keep the model busy)" if waited > 0.2 and tc.data else ""
        written = f"checkpoint: {r.out / ('ckpt_dcp' if tc.fsdp else 'ckpt.pt')}" if tc.save_every \
            else "no checkpoint (--save_every=0)"
        print(f"done in {time.time() - r.t0:.0f} s, {r.waited:.0f} s of it waiting for data{hint}{memory}; {written}")


if __name__ == "__main__":
    common.run(main, sys.argv[1:])
    distributed.leave()  # under torchrun, once main() and everything it made are gone
