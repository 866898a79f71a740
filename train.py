"""Train Video-Panda. With no arguments: the tiny synthetic-video run, minutes on a laptop CPU.

    python train.py                                   # tiny model, synthetic video QA
    python train.py --max_steps=100 --batch_size=8    # any TrainConfig or PandaConfig field
    python train.py --init_from=resume                # continue out/ckpt.pt exactly where it stopped

Every --key=value names a field of TrainConfig (below) or of panda.PandaConfig; values are parsed
to the field's type, and an unknown key or a value of the wrong type is an error.
"""

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import data
from panda import PandaConfig, VideoPanda


@dataclass
class TrainConfig:
    preset: str = "tiny"        # model size: nano, tiny or paper (panda.PRESETS)
    out_dir: str = "out"        # ckpt.pt and tokenizer.json go here
    init_from: str = "scratch"  # scratch | resume (out_dir/ckpt.pt) | a pretrained checkpoint directory
    stage: str = "finetune"     # with a pretrained decoder: prealign (decoder frozen) | pretrain | finetune
    seed: int = 1337
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1         # micro-batches per optimizer step
    max_steps: int = 1200
    lr_stab: float = 2e-3       # STAB + projector (the paper trains them at their own rate)
    lr_decoder: float = 2e-3
    warmup_steps: int = 60
    min_lr_ratio: float = 0.05  # the cosine decays to this fraction of each group's rate
    weight_decay: float = 0.0   # the paper uses none
    grad_clip: float = 1.0
    questions_per_clip: int = 4  # synthetic clips carry several question-answer turns: more signal per clip
    # evaluation and checkpoints
    eval_every: int = 300
    eval_samples: int = 200     # held-out questions per evaluation
    save_every: int = 300
    # system
    device: str = "auto"        # auto: cuda, then mps, then cpu
    compile: bool = False       # torch.compile the model
    max_new_tokens: int = 8     # answers are a word or two


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
    "prealign": dict(train_decoder=False, lr_stab=4e-4, lr_decoder=0.0),
    "pretrain": dict(train_decoder=True, lr_stab=4e-5, lr_decoder=4e-5),
    "finetune": dict(train_decoder=True, lr_stab=2e-5, lr_decoder=2e-5),
}


def make_optimizer(model, tc, train_decoder=True):
    model.decoder.requires_grad_(train_decoder)
    visual = list(model.stab.parameters()) + list(model.projector.parameters())
    groups = [{"params": visual, "lr": tc.lr_stab, "base_lr": tc.lr_stab}]
    if train_decoder:
        groups.append({"params": list(model.decoder.parameters()), "lr": tc.lr_decoder, "base_lr": tc.lr_decoder})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=tc.weight_decay)


def save_checkpoint(path, **state):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path, device):
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py) or set --out_dir")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = VideoPanda(PandaConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, tokenizer, n_samples, device, split="heldout", shuffle=False, max_new_tokens=8, batch_size=100):
    """Exact-match accuracy per question family on the first n_samples of a synthetic split,
    answering greedily. shuffle=True feeds each clip's frames in a fixed scrambled order."""
    was_training = model.training
    model.eval()
    eos = tokenizer.token_to_id("</s>")
    records = []
    for start in range(0, n_samples, batch_size):
        samples = [data.make_sample(i, split, model.cfg.n_frames, model.cfg.image_size)
                   for i in range(start, min(n_samples, start + batch_size))]
        batch = data.collate([{"video": data.shuffle_frames(s.video, seed=i) if shuffle else s.video,
                               "input_ids": ids, "labels": labels}
                              for i, s in enumerate(samples, start)
                              for ids, labels in [data.encode_example(tokenizer, s.question)]])
        answers = model.generate(batch["videos"].to(device), batch["input_ids"].to(device),
                                 batch["lengths"].to(device), max_new_tokens=max_new_tokens, eos_id=eos)
        for s, ids in zip(samples, answers.tolist()):
            records.append((s.family, s.answer, tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)))
    model.train(was_training)
    return data.exact_match(records)


def report(accuracy):
    return ", ".join(f"{family} {value:.1%}" for family, value in sorted(accuracy.items()))


# ------------------------------------------------------------------------------------ training

def main(argv):
    tc_changes, cfg_changes = parse_overrides(argv, TrainConfig, PandaConfig)
    tc = replace(TrainConfig(), **tc_changes)
    device = pick_device(tc.device)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"

    if tc.init_from == "resume":
        model, ckpt = load_checkpoint(ckpt_path, device)
        tc = replace(TrainConfig(**ckpt["train_config"]), **tc_changes, init_from="resume")
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    elif tc.init_from == "scratch":
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists; resume it with --init_from=resume or pick another --out_dir")
        torch.manual_seed(tc.seed)
        tokenizer = data.build_tokenizer()
        cfg = PandaConfig.preset(tc.preset, vocab_size=tokenizer.get_vocab_size(), **cfg_changes)
        model, ckpt = VideoPanda(cfg).to(device), None
    else:
        raise ValueError(f"--init_from must be scratch, resume or a checkpoint directory; got {tc.init_from!r}")
    tokenizer.save(str(out / "tokenizer.json"))

    optimizer = make_optimizer(model, tc)
    step, next_sample = 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, next_sample = ckpt["step"], ckpt["next_sample"]
        set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(tc.seed)
    stream = data.SyntheticQA(tokenizer, "train", model.cfg.n_frames, model.cfg.image_size, tc.questions_per_clip)
    train_model = torch.compile(model) if tc.compile else model
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    n = model.num_params()
    print(f"model: {n['stab']:,} STAB + {n['projector']:,} projector + {n['decoder']:,} decoder parameters "
          f"on {device}; steps {step} -> {tc.max_steps}")

    def checkpoint():
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                        next_sample=next_sample, rng=rng_state(), train_config=asdict(tc),
                        model_config=model.cfg.to_dict())

    model.train()
    bar = tqdm(total=tc.max_steps, initial=step, dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    while step < tc.max_steps:
        scale = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        micro = []
        for _ in range(tc.grad_accum):
            micro.append(stream.batch(next_sample, tc.batch_size))
            next_sample += tc.batch_size
        # Normalise by the supervised tokens of the whole step, not per micro-batch, so that
        # accumulating k micro-batches gives exactly the gradient of one k-times-larger batch.
        n_supervised = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in micro)
        total = 0.0
        for b in micro:
            with autocast:
                loss = train_model(b["videos"].to(device), b["input_ids"].to(device), b["labels"].to(device),
                                   b["lengths"].to(device), reduction="sum") / n_supervised
            loss.backward()
            total += loss.item()
            tokens_seen += int(b["lengths"].sum()) + len(b["lengths"]) * model.cfg.n_frames * model.cfg.tokens_per_frame
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        tok_s=f"{tokens_seen / (time.time() - t0):.0f}")
        if step % tc.eval_every == 0 or step == tc.max_steps:
            acc = evaluate(model, tokenizer, tc.eval_samples, device, max_new_tokens=tc.max_new_tokens)
            bar.write(f"step {step}: loss {total:.4f}, held-out exact match: {report(acc)}")
        if step % tc.save_every == 0 or step == tc.max_steps:
            checkpoint()
    bar.close()
    for split, shuffle in (("test", False), ("heldout", True)):
        acc = evaluate(model, tokenizer, tc.eval_samples, device, split, shuffle, tc.max_new_tokens)
        print(f"{split}{', frames shuffled' if shuffle else ''}: {report(acc)}")
    print(f"done in {time.time() - t0:.0f} s; checkpoint: {ckpt_path}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
