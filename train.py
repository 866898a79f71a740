"""Train Video-Panda. With no options: the tiny synthetic-video run, minutes on a laptop CPU.

    python train.py                                 # tiny model, synthetic video QA
    python train.py --max_steps=100 --batch_size=8  # any option below, as --key=value
    python train.py --init_from=resume              # go on exactly where out/ckpt.pt stopped

The paper's three stages (Sec. 3.2) on real videos, from a pretrained LLM and a Video-ChatGPT /
Valley instruction file; each stage starts from the previous one's --export:

    python train.py --init_from=path/to/vicuna --stage=prealign --data=valley.json \\
        --video_folder=v/ --export=out/s1
    python train.py --init_from=out/s1 --stage=pretrain --data=valley.json --video_folder=v/ \\
        --export=out/s2

Several GPUs: the same command under torchrun (docs/DISTRIBUTED.md). Ctrl-C stops after a step and
saves it.
"""

import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import data
from checkpoints import run_files
from distillation import teachers
from multi_gpu import distributed
from panda import IGNORE_INDEX, PandaConfig, VideoPanda
from tools import cli


@dataclass
class TrainConfig:
    preset: str = "tiny"        # model size: nano, tiny or paper (panda.PRESETS); any PandaConfig
                                # field also works
    out_dir: str = "out"        # ckpt.pt, tokenizer.json and results.json go here
    init_from: str = "scratch"  # scratch | resume (out_dir's checkpoint) | a pretrained checkpoint
                                # directory
    stage: str = "finetune"     # with a pretrained decoder: prealign (decoder frozen) | pretrain |
                                # finetune
    seed: int = 1337            # the fresh weights and the data order
    # optimisation
    batch_size: int = 32        # per process: under torchrun a micro-step takes batch_size *
                                # processes samples
    grad_accum: int = 1         # micro-batches per optimizer step
    max_steps: int = 1300       # optimizer steps
    lr_stab: float = 3e-3       # STAB, projector and distillation head (the paper trains them at
                                # their own rate)
    lr_decoder: float = 1e-3    # the decoder
    warmup_steps: int = 60      # linear warm-up, then a cosine decay
    min_lr_ratio: float = 0.05  # the cosine ends at this fraction of each group's rate
    weight_decay: float = 0.0   # the paper uses none
    grad_clip: float = 1.0      # clip the gradient norm to this; 0 = no clipping
    questions_per_clip: int = 8  # synthetic clips carry several question-answer turns: more
                                 # signal per clip
    # distillation: loss = LM + distill_weight * (1 - cosine to a frozen teacher's per-cell
    # features)
    distill: str = "auto"       # auto: oracle on the synthetic task; vit on real data with
                                # --teacher | "" (off)
    teacher: str = ""           # a local CLIP vision checkpoint (ViT-L/14 at 224 px), the teacher
                                # on real data
    distill_weight: float = 1.0  # the release's weight
    # evaluation and checkpoints
    eval_every: int = 650       # held-out accuracy every this many steps (synthetic task)
    eval_samples: int = 400     # held-out questions per evaluation
    save_every: int = 650       # a checkpoint every this many steps and at the end; 0 = never
                                # (timing runs)
    max_new_tokens: int = 8     # answers are a word or two
    # system
    device: str = "auto"        # auto: cuda, then mps, then cpu
    compile: bool = False       # torch.compile the model
    fsdp: bool = False          # under torchrun: shard weights, gradients and Adam state over the
                                # GPUs (FSDP2)
    num_workers: int = 2        # processes making the batches (synthetic clips, decoded videos)
                                # while the model trains
    # real data: a Video-ChatGPT / Valley instruction file instead of the synthetic task
    data: str = ""              # the annotation JSON; empty = the synthetic task
    video_folder: str = ""      # where its "video" names are looked up
    frame_cache: str = ""       # cache the resized frames here: later epochs and stages read them,
                                # not decode
    on_error: str = "raise"     # an unusable video or entry: raise (stop) | skip (log it, count
                                # it, go on)
    export: str = ""            # also write the model as a checkpoint directory here at the end
                                # (checkpoints/checkpoint_dirs.py)
    model_hook: str = ""        # module.function(model) -> model, run on a fresh model: an
                                # experiment, an exercise

    def __post_init__(self):  # checked as parsed and as read from a checkpoint: one line naming it
        cli.require_ranges(
            self, positive=("batch_size", "grad_accum", "max_steps", "eval_every", "eval_samples",
                            "max_new_tokens", "questions_per_clip"),
            non_negative=("lr_stab", "lr_decoder", "warmup_steps", "min_lr_ratio", "weight_decay",
                          "grad_clip", "distill_weight", "save_every", "num_workers"),
            choices={"stage": STAGES, "on_error": ("raise", "skip")}, non_empty=("out_dir",))


STAGES = {  # Sec. 3.2 and the release's scripts: what trains after a pretrained decoder, how fast
    "prealign": dict(train_decoder=False, lr_stab=4e-4, lr_decoder=0.0, warmup_ratio=0.03),
    "pretrain": dict(train_decoder=True, lr_stab=4e-5, lr_decoder=4e-5, warmup_ratio=0.01),
    "finetune": dict(train_decoder=True, lr_stab=2e-5, lr_decoder=2e-5, warmup_ratio=0.01),
}
# What may change when a run resumes: how long and how often, where and on what (and PandaConfig's
# grad_checkpoint and fast: how the model computes, not what). What is FIXED must be as the run
# began (its data order, its model, its rates): a different value is an error, not ignored.
RESUMABLE = {"init_from", "out_dir", "max_steps", "eval_every", "eval_samples", "save_every",
             "max_new_tokens", "device", "compile", "num_workers", "on_error", "export",
             "video_folder", "teacher", "frame_cache", "grad_checkpoint", "fast"}
FIXED = {"preset", "stage", "seed", "batch_size", "grad_accum", "lr_stab", "lr_decoder",
         "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "questions_per_clip",
         "distill", "distill_weight", "fsdp", "data", "model_hook"}
run_files.check_sorted(TrainConfig, RESUMABLE, FIXED)  # each option in one of them, or a TypeError


def lr_at(step, config):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps: a multiplier."""
    warmup, floor = config.warmup_steps, config.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, config, train_decoder, head):
    """AdamW over two groups at their own rates: the STAB, projector and distillation head at
    lr_stab, the decoder (when it trains) at lr_decoder. A trainable parameter (requires_grad) in
    neither group is an error naming it, not a weight that silently never changes: a module that a
    --model_hook adds outside the STAB is given a group (its rate) here, or frozen."""
    visual = list(model.stab.parameters()) + list(model.projector.parameters())
    named = list(model.named_parameters())  # all of them, to find any that no group holds
    if head is not None:  # the release trains its distillation head at the STAB's rate
        visual += list(head.parameters())
        named += list(head.named_parameters("distill_head"))
    groups = [{"params": visual, "lr": config.lr_stab, "base_lr": config.lr_stab}]
    if train_decoder:
        groups.append({"params": list(model.decoder.parameters()), "lr": config.lr_decoder,
                       "base_lr": config.lr_decoder})
    grouped = {id(p) for group in groups for p in group["params"]}
    if left_out := [name for name, p in named if p.requires_grad and id(p) not in grouped]:
        raise ValueError(f"{', '.join(left_out)}: trainable (requires_grad) but in no optimizer "
                         f"group: give it one in train.make_optimizer, or requires_grad_(False)")
    # fused: one kernel for the whole update on GPUs, as nanoGPT does; the default (foreach) path
    # makes full-size temporaries (for a whole 7B decoder, its second moment's sqrt alone is 27 GB)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                             fused=next(model.parameters()).is_cuda)


@dataclass
class Run:
    """A training run as it stands: what trains, on what, and how far it has come. build() makes it,
    loop() moves it on a step at a time, save() and restore() write it down and read it back."""
    config: TrainConfig      # the options: a resumed run's as it began, a stage's rates filled in
    out: Path                # out_dir: ckpt.pt (or ckpt_dcp/), tokenizer.json, results.json
    device: torch.device     # this process's device
    rank: int                # this process among torchrun's; rank 0 alone prints and writes files
    world: int               # the processes that take each step together (1 without torchrun)
    model: VideoPanda        # the model itself: what is saved, evaluated and exported
    head: torch.nn.Module    # the distillation head, saved with the model; or None
    teacher: object          # the frozen teacher: batch -> the features the head learns; or None
    tokenizer: object        # the model's vocabulary (a tokenizers.Tokenizer), as in tokenizer.json
    optimizer: torch.optim.Optimizer  # AdamW over make_optimizer's groups
    data: object             # the batches: data.SyntheticTask, or --data's training_data.RealVideos
    train_model: torch.nn.Module = None  # the model as a step calls it: in DDP, compiled, or itself
    train_head: torch.nn.Module = None   # the head as a step calls it: in DDP, or itself
    step: int = 0            # optimizer steps taken
    loss: float = math.nan   # the last step's loss, as logged (saved in the checkpoint)
    started: float = 0.0     # time.time() as loop() began
    waited: float = 0.0      # seconds loop() has waited for batches
    master = property(lambda self: self.rank == 0)
    params = property(lambda self: [p for g in self.optimizer.param_groups for p in g["params"]])


# ---------------------------------------------------------------------------------------- one step

def loss_terms(run, batch, n_supervised, n_micro):
    """One micro-batch's loss terms, {name: (weight, term)}: a step minimises the sum of
    weight * term over the terms and its micro-batches, and the progress bar shows each term but
    the LM's, summed over the step. A new loss term goes here, its weight a TrainConfig option
    (sorted into FIXED), scaled by how it is reduced so that the step's gradient is the one a single
    process with the step's whole batch would compute, whatever the accumulation and the number of
    processes W (run.world):

    - summed over tokens (or samples), S_r on process r: multiply by W and divide by n_supervised,
      the supervised tokens N of the whole step (every micro-batch on every process: one all-reduce
      of a count). DDP (FSDP too) averages the gradients over the processes, so
          (1/W) * sum_r W * grad(S_r) / N  =  grad(sum_r S_r) / N,
      the gradient of the mean over the step's N tokens. (A mean per micro-batch would weigh the
      tokens of a micro-batch with few answer tokens more than those of one with many.)
    - a mean over the micro-batch: divide by n_micro, the step's micro-batches on each process.
      Their gradients add up in .grad, so the 1/n_micro makes them a mean; DDP's average over the
      processes makes it the mean over the global micro-batch (the processes' are the same size)."""
    device, distilling = run.device, run.head is not None
    inputs = [batch[key].to(device) for key in ("videos", "input_ids", "labels", "lengths")]
    output = run.train_model(*inputs, reduction="sum", return_hidden=distilling)
    lm_sum, hidden = output if distilling else (output, None)  # summed over the answer tokens
    terms = {"lm": (1.0, lm_sum * run.world / n_supervised)}
    if distilling:  # 1 - cosine to the teacher's features, a mean over the micro-batch
        cosine = teachers.distill_loss(run.train_head, run.teacher, batch, hidden, run.model)
        terms["distill"] = (run.config.distill_weight, cosine / n_micro)
    return terms


def forward_backward(run, micro):
    """Forward and backward of one optimizer step's micro-batches, their gradients accumulated in
    .grad; returns (the step's loss, {term: its sum over the step}, tokens), over all processes."""
    n_supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_supervised = distributed.all_sum([n_supervised], run.device)[0]
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=run.device.type == "cuda")
    step_loss, term_sums, tokens = 0.0, {}, 0
    video_tokens = run.model.cfg.n_frames * run.model.cfg.tokens_per_frame  # a video's tokens
    for i, batch in enumerate(micro):
        # DDP all-reduces after the last micro-batch only; FSDP reduce-scatters after each
        last = i == len(micro) - 1
        with distributed.gradient_sync([run.train_model, run.train_head], sync=last), autocast:
            terms = loss_terms(run, batch, n_supervised, len(micro))
            micro_loss = sum(weight * term for weight, term in terms.values())
        micro_loss.backward()
        step_loss += micro_loss.item()
        for name, (_, term) in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + term.item()
        tokens += int(batch["lengths"].sum()) + len(batch["videos"]) * video_tokens
    # what the log shows, over all processes (each holds W times its share of the loss)
    summed = distributed.all_sum([step_loss / run.world, tokens] +
                                 [value / run.world for value in term_sums.values()], run.device)
    return summed[0], dict(zip(term_sums, summed[2:])), summed[1]


class NonFiniteStep(ValueError):
    """A step whose loss or gradient is inf or NaN: the run stops before the update."""


def clip_and_check(run, step_loss):
    """Clip the gradient norm (grad_clip=0: measure it only) and stop at a non-finite one, before
    the update can write inf or NaN into the weights. Every process takes the same decision."""
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.grad_clip or math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    finite = math.isfinite(norm) and math.isfinite(step_loss)
    if distributed.all_sum([0.0 if finite else 1.0], run.device)[0]:
        raise NonFiniteStep(f"step {run.step + 1}: the loss is {step_loss:.4g} and the gradient "
                            f"norm {norm:.4g}: stopped before the update, the last checkpoint is "
                            "kept; a lower learning rate may help")


# ----------------------------------------------------------------------------------------- the run

def main(argv):
    options, model_options = cli.parse_args(argv, __doc__, TrainConfig, PandaConfig)
    config = replace(TrainConfig(), **options)
    # Under torchrun this script runs once per GPU, each process on its share of every batch.
    device, rank, _ = distributed.init(cli.pick_device(config.device), config.fsdp)
    run_files.check_export(config.export)  # a target the export may not replace: refused now
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = run_files.RunLock(out).acquire() if rank == 0 else None  # failing, torchrun stops all
    stop = cli.StopRequest()  # Ctrl-C: finish the step, save it, say how to go on
    try:
        run = build(config, options, model_options, device, out)
        loop(run, stop)
        if run.step < run.config.max_steps and run.config.save_every:  # stopped: save the last step
            save(run)
        finish(run, stop)
    finally:
        stop.restore()
        if lock:
            lock.release()


def stop_agreed(run, stop):  # whether any process was asked to stop: every one knows it
    return distributed.all_sum([float(stop.asked)], run.device)[0]


def stop_if_asked(run, stop):  # Ctrl-C or SIGTERM, agreed by all: exit 130, saying how to go on
    if stop_agreed(run, stop):
        if run.master:
            print(f"stopped after step {run.step}; " + (
                f"saved: go on with python train.py --init_from=resume --out_dir={run.out}"
                if run.config.save_every else "nothing saved"))
        sys.exit(130)


def build(config, options, model_options, device, out):
    """The run: its model and what trains it, its data, where it stands (out_dir's, resuming)."""
    rank, world = distributed.rank_and_world()
    model, tokenizer, config, ckpt = start(config, options, model_options, device, out)
    if rank == 0:
        run_files.write_tokenizer(out, tokenizer)
    # The synthetic task comes with a model from scratch in its own words; real data with a
    # pretrained decoder, which its stage may freeze: then it goes bf16 (half the memory, and
    # autocast computes in bf16 anyway), but not under FSDP, whose root unit would then mix dtypes
    # (its mixed-precision policy computes in bf16 instead).
    train_decoder = STAGES[config.stage]["train_decoder"] if config.data else True
    if not train_decoder and device.type == "cuda" and not config.fsdp:
        model.decoder.to(torch.bfloat16)
    config, head, teacher = teachers.setup(config, model, ckpt, device)
    model.decoder.requires_grad_(train_decoder)  # before DDP or FSDP takes the model: both note it
    model = distributed.sync_batch_norm(model, device)
    if config.fsdp:
        distributed.shard(model, head, device)  # before the optimizer: it replaces the parameters
    if config.data:  # PyAV and Pillow: only real data needs them
        from real_video.training_data import RealVideos
    run = Run(config, out, device, rank, world, model, head, teacher, tokenizer,
              make_optimizer(model, config, train_decoder, head),
              RealVideos() if config.data else data.SyntheticTask())
    if ckpt is not None:
        restore(run, ckpt)
    run.data.start_stream(run, ckpt)
    run.train_model, run.train_head = distributed.wrap(model, head, device, config.fsdp)
    if config.compile:  # after DDP, as PyTorch advises: the graphs are split at DDP's buckets, so
        run.train_model = torch.compile(run.train_model)  # the all-reduces overlap the backward
    if run.master:
        n, sharding = model.num_params(), "FSDP" if config.fsdp else "DDP"
        parallel = f" x {world} processes ({sharding})" if world > 1 else ""
        trains = ("everything" if train_decoder else "STAB + projector (decoder frozen)") + \
            (f" ({config.stage})" if config.data else "")
        distill = (config.distill or "off") + (f" ({config.teacher})" if config.teacher else "")
        print(f"model: {n['stab']:,} STAB + {n['projector']:,} projector + {n['decoder']:,} "
              f"decoder parameters on {device}{parallel}; training {trains}; distillation "
              f"{distill}; steps {run.step} -> {config.max_steps}")
    return run


def start(config, options, model_options, device, out):
    """(model, tokenizer, config, checkpoint): a fresh model, a pretrained decoder with a fresh STAB
    (its stage's rates), or the run in out_dir with the options it began with, and its checkpoint.
    options, model_options: the TrainConfig and the PandaConfig options the command line set."""
    if config.init_from == "resume":  # out_dir's run, its FIXED options as they were
        return run_files.read_run(config, options, model_options, RESUMABLE, device)
    run_files.check_fresh(out)  # no checkpoint there to write over
    if (config.init_from == "scratch") == bool(config.data):  # each data source has its own start
        raise ValueError(
            "--data needs a pretrained decoder and its tokenizer: pass --init_from=DIR (a model "
            "trained from scratch knows only the synthetic task's words)" if config.data else
            "a pretrained decoder trains on real data: pass --data=FILE.json --video_folder=DIR "
            "(the synthetic task is tokenised for its own word-level vocabulary only)")
    torch.manual_seed(config.seed)  # fresh weights (all, or STAB and projector), the same every run
    if config.init_from == "scratch":
        tokenizer = data.build_tokenizer()
        vocab_size = tokenizer.get_vocab_size()
        cfg = PandaConfig.preset(config.preset, vocab_size=vocab_size, **model_options)
        model = VideoPanda(run_files.check_fits(cfg, torch.float32, "cpu", device))  # then moved
        model = cli.call_hook(config.model_hook, model) if config.model_hook else model
        return model.to(device), tokenizer, config, None
    preset = config.preset if "preset" in options else "paper"  # the STAB's size, unless asked
    model, tokenizer = run_files.load_pretrained(config.init_from, device, preset, **model_options)
    stage = STAGES[config.stage]  # its rates and warm-up, except those the command line set
    rates = {"lr_stab": stage["lr_stab"], "lr_decoder": stage["lr_decoder"],
             "warmup_steps": max(1, round(stage["warmup_ratio"] * config.max_steps))}
    config = replace(config, **{k: v for k, v in rates.items() if k not in options})
    return model, tokenizer, config, None


def loop(run, stop):
    """Train from run.step to max_steps, or until asked to stop; all processes step together."""
    config, optimizer = run.config, run.optimizer
    run.model.train()
    bar = tqdm(total=config.max_steps, initial=run.step, dynamic_ncols=True, disable=not run.master)
    run.started, run.waited, tokens_seen, first_step = time.time(), 0.0, 0, run.step
    while run.step < config.max_steps and not stop_agreed(run, stop):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(run.step, config)
        asked = time.time()
        micro = [run.data.next_batch() for _ in range(config.grad_accum)]
        run.waited += time.time() - asked
        step_loss, term_sums, tokens = forward_backward(run, micro)
        clip_and_check(run, step_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.step, run.loss, tokens_seen = run.step + 1, step_loss, tokens_seen + tokens
        bar.update(1)
        if run.step - first_step == 20 and run.master:  # the rest at the steps' rate (tqdm's)
            minutes = (config.max_steps - run.step) / bar.format_dict["rate"] / 60
            bar.write(f"about {minutes:.1f} more minutes of training")
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        tok_s=f"{tokens_seen / (time.time() - run.started):.0f}",
                        **{name: f"{sum_:.4f}" for name, sum_ in term_sums.items() if name != "lm"})
        if run.step % config.eval_every == 0 and run.step < config.max_steps:  # last: finish()'s
            run.data.evaluate_mid_run(run, bar.write)
        if config.save_every and (run.step == config.max_steps or not run.step % config.save_every):
            save(run)
    bar.close()


def restore(run, ckpt):
    """Put a resumed run back where its checkpoint left it: weights (sharded: --fsdp), optimizer,
    step, skipped samples, each process's random state (its data place: run.data.start_stream)."""
    if run.config.fsdp:
        folder = distributed.checkpoint_folder(run.out / "ckpt_dcp")
        distributed.load_sharded(folder, run.model, run.head, run.optimizer)
    else:
        run_files.load_optimizer(run.optimizer, ckpt["optimizer"], run.out / "ckpt.pt")
    run.step = ckpt["step"]
    run.data.skipped = ckpt["skipped"] if run.master else []  # all processes' skips, counted once
    if len(ckpt["data_place"]) == run.world:  # each process saved its own random state
        run_files.set_rng_state(ckpt["rng"][run.rank])
    else:  # from another number of processes: fresh random streams (dropout is all that draws)
        torch.manual_seed(run.config.seed + run.rank + run.step)


def save(run):
    """Write the run as it stands after run.step steps: ckpt.pt, or under --fsdp the sharded folder
    ckpt_dcp/. Every process takes part (its random state, its place in the data, its shards).
    Weights holding inf or NaN are never written: the last checkpoint stays."""
    if not distributed.all_finite(run.params, run.device):
        raise NonFiniteStep(f"step {run.step}: the weights hold inf or NaN; the last checkpoint "
                            "is kept")
    state = dict(step=run.step, data_place=distributed.gather(run.data.data_place),
                 rng=distributed.gather(run_files.rng_state()),
                 skipped=[m for part in distributed.gather(run.data.skipped) for m in part],
                 loss=run.loss, train_config=asdict(run.config), model_config=asdict(run.model.cfg),
                 template=run.data.template, data_size=run.data.data_size)
    if run.config.fsdp:
        distributed.save_sharded(run.out / "ckpt_dcp", run.model, run.head, run.optimizer, state)
    elif run.master:
        run_files.save_checkpoint(run.out / "ckpt.pt", state | dict(
            model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
            distill_head=None if run.head is None else run.head.state_dict()))


def finish(run, stop):
    """The end of a run: the data's own (SyntheticTask's final accuracies, RealVideos' skips),
    --export (Ctrl-C stops before each), one line on time, data waits and memory."""
    config = run.config
    stop_if_asked(run, stop)
    run.data.finish(run, lambda: stop_if_asked(run, stop))
    if config.export:
        stop_if_asked(run, stop)
        from checkpoints import checkpoint_dirs  # safetensors: only an export needs it
        whole = distributed.whole_model(run.model, config.fsdp, rank0_only=True)  # FSDP: on rank 0
        if run.master:
            checkpoint_dirs.save_pretrained(whole, run.tokenizer, config.export)
            print(f"exported to {config.export} (checkpoint_dirs.from_pretrained, or "
                  f"--init_from={config.export} of the next stage)")
    if run.master:
        elapsed = time.time() - run.started
        memory = "" if run.device.type != "cuda" else \
            f"; peak GPU memory {torch.cuda.max_memory_allocated(run.device) / 2 ** 30:.1f} GiB"
        hint = " (over 20%: more --num_workers would keep the model busy)" \
            if run.waited / max(elapsed, 1e-9) > 0.2 and run.data.decodes_files else ""
        written = f"checkpoint: {run.out / ('ckpt_dcp' if config.fsdp else 'ckpt.pt')}" \
            if config.save_every else "no checkpoint (--save_every=0)"
        print(f"done in {elapsed:.0f} s, {run.waited:.0f} s of it waiting for data{hint}{memory}; "
              f"{written}")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
    distributed.leave()  # under torchrun, once main() and everything it made are gone
