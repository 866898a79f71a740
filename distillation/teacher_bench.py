"""What the ViT teacher costs a training step: the paper's stage 1 (prealign: decoder frozen) on
one GPU, step time and peak memory with distillation off, with the head alone, and with head and
teacher.

    python distillation/teacher_bench.py                  # paper preset, batch 8, GPU
    python distillation/teacher_bench.py --device=cpu --preset=nano --vit=tiny
                                                          # a smoke run (tests/test_teacher.py)

The step is train.py's for --stage=prealign: STAB, projector and head trainable (fp32 weights, bf16
autocast on a GPU), the decoder frozen in bf16 with gradient checkpointing, fused AdamW. Square
8-frame videos (the full 16x16 grid: 2184 visual tokens at the paper preset), a 20-token prompt, a
60-token answer.
  off      no distillation
  head     the head and its loss against fixed targets: what the head and its hidden-state taps cost
  teacher  the head against a random-weight ViT-L/14 teacher at 224 px
           (distillation.teachers.ViTTeacher), every step
and the teacher's forward alone on the same batch. The variants run in that order, each adding
what it needs, so a peak includes the weights the earlier ones made (the teacher's only in the
last). Random weights and frames: the work is a real run's, the values mean nothing. On a GPU,
times are medians of CUDA-event timings after warm-up; on a CPU, of the host clock.
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# The repository root on the path, wherever this script runs from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402
from distillation.teachers import (  # noqa: E402
    DistillHead, ViT, ViTConfig, ViTTeacher, distill_loss)
from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER, PandaConfig, VideoPanda  # noqa: E402

# The teacher's shapes; its frames are sized so that its patch grid is the student's LSD grid
# (224 px for ViT-L/14 at the paper preset, as the release's teacher).
VITS = {"l14": dict(width=1024, layers=24, heads=16, mlp=4096, patch=14),
        "tiny": dict(width=32, layers=2, heads=2, mlp=64, patch=8)}  # for smoke runs


@dataclass
class BenchConfig:
    preset: str = "paper"  # the student's size (panda.PRESETS); nano for a smoke run
    vit: str = "l14"       # the teacher: l14 (CLIP ViT-L/14's shape) or tiny (VITS)
    batch: int = 8         # videos per step
    prompt: int = 20       # text tokens before the answer, the <video> placeholder among them
    answer: int = 60       # supervised tokens
    warmup: int = 2        # untimed steps per variant (the first also allocates AdamW's state)
    steps: int = 5         # timed steps per variant: their median is reported
    device: str = "auto"
    json: str = ""         # also write the results here

    def __post_init__(self):  # checked as parsed: one line naming the option
        cli.require_ranges(self, positive=("batch", "answer", "steps"), non_negative=("warmup",),
                              choices={"vit": VITS})
        if self.prompt < 4:  # make_batch puts the <video> placeholder at position 3
            raise ValueError(f"--prompt must be 4 or more, got {self.prompt}")


def make_batch(bc, cfg, teacher_image, device):
    """Random frames shaped as the datasets make them: student (B, T, 4, S, S) and teacher (B, T,
    4, 224, 224) at the paper preset, each with a letterbox mask of ones (a square clip); ids and
    labels."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T = bc.batch, cfg.n_frames
    videos = torch.randn(B, T, 4, cfg.image_size, cfg.image_size, device=device, generator=g)
    teacher_videos = torch.randn(B, T, 4, teacher_image, teacher_image, device=device, generator=g)
    videos[:, :, 3], teacher_videos[:, :, 3] = 1, 1
    ids = torch.randint(0, cfg.vocab_size, (B, bc.prompt + bc.answer), device=device, generator=g)
    ids[:, 3] = VIDEO_PLACEHOLDER
    labels = ids.clone()
    labels[:, :bc.prompt] = IGNORE_INDEX
    return dict(videos=videos, teacher_videos=teacher_videos, input_ids=ids, labels=labels,
                lengths=torch.full((B,), ids.shape[1], device=device))


def train_step(model, head, teacher, batch, optimizer):
    """One optimizer step as train.py takes it: LM loss (+ distillation with a head), backward,
    AdamW."""
    with torch.autocast("cuda", torch.bfloat16, enabled=batch["videos"].is_cuda):
        out = model(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"],
                    return_hidden=head is not None)
        loss = out if head is None else out[0] + distill_loss(head, teacher, batch, out[1], model)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def median_ms(fn, bc, device):
    """Median milliseconds of fn() over bc.steps calls after bc.warmup; on a GPU the calls are
    queued back to back between CUDA events and read after one synchronize."""
    cuda = device.type == "cuda"
    for _ in range(bc.warmup):
        fn()
    times = []
    for _ in range(bc.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in times]
    return statistics.median(times)


def measure(name, fn, bc, device, results):
    """Time fn and note the peak GPU memory it reaches; one row of results."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(fn, bc, device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    results.append(dict(variant=name, ms=ms, videos_s=1e3 * bc.batch / ms, peak_gib=peak))
    print(f"  {name:<15} {ms:9.1f} ms   {1e3 * bc.batch / ms:7.2f} videos/s   "
          f"peak {'-' if peak is None else f'{peak:.1f} GiB'}", flush=True)


def run(bc, device):
    """The four measurements, each variant building on the last: off, head,
    teacher, teacher alone."""
    cfg = PandaConfig.preset(bc.preset, grad_checkpoint=True)
    torch.manual_seed(0)
    with torch.device(device):
        # Random weights, made where they run (a 7B init on a CPU takes minutes)
        model = VideoPanda(cfg)
    model.decoder.requires_grad_(False)
    if device.type == "cuda":
        model.decoder.to(torch.bfloat16)  # frozen: bf16, as train.py keeps it
    model.train()
    vc = ViTConfig(**VITS[bc.vit], image=cfg.grid * VITS[bc.vit]["patch"])
    batch = make_batch(bc, cfg, vc.image, device)
    visual = [*model.stab.parameters(), *model.projector.parameters()]
    results = []
    print(f"stage 1, {bc.preset} preset, batch {bc.batch}, {cfg.n_frames} frames of "
          f"{cfg.image_size} px on {device}; "
          f"teacher: ViT {vc.width} wide, {vc.layers} layers, {vc.image} px", flush=True)

    optimizer = torch.optim.AdamW(visual, lr=1e-5, fused=device.type == "cuda")
    measure("off", lambda: train_step(model, None, None, batch, optimizer), bc, device, results)

    head = DistillHead(cfg, vc.width).to(device)
    optimizer = torch.optim.AdamW(visual + list(head.parameters()), lr=1e-5,
                                  fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fixed = torch.randn(bc.batch, cfg.n_frames, cfg.grid, cfg.grid, vc.width, device=device,
                        dtype=dtype)
    measure("head", lambda: train_step(model, head, lambda b: fixed, batch, optimizer), bc, device,
            results)

    with torch.device(device):
        teacher = ViTTeacher(ViT(vc), cfg)
    measure("teacher", lambda: train_step(model, head, teacher, batch, optimizer), bc, device,
            results)
    measure("teacher alone", lambda: teacher(batch), bc, device, results)

    ms = {r["variant"]: r["ms"] for r in results}
    print(f"the teacher's forward is {ms['teacher alone']:.1f} ms, "
          f"{ms['teacher alone'] / ms['teacher']:.0%} of the step with it; "
          f"distillation adds {ms['teacher'] - ms['off']:.1f} ms "
          f"({ms['teacher'] / ms['off'] - 1:+.0%}) to the step without it")
    return results


def main(argv):
    bc = BenchConfig(**cli.parse_args(argv, __doc__, BenchConfig)[0])
    device = cli.pick_device(bc.device)
    results = run(bc, device)
    if bc.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        Path(bc.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                             "options": vars(bc), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
