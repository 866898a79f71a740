"""How fast is panda? One GPU, one process, one table.

    python gpu_speed/bench.py                        # everything, on the GPU: paper preset, bf16
    python gpu_speed/bench.py --only=stab,vit        # some sections: stab, vit, decode, train
    python gpu_speed/bench.py --quick=true           # fewer sizes and repeats
    python gpu_speed/bench.py --device=cpu --quick=true  # a smoke run with tiny models
                                                         # (what tests/test_bench.py runs)

Sections
  stab    STAB + projector (the whole visual path) for 1, 4, 16, 64 videos of 8 frames: ms,
          videos/s, TFLOP/s from the nominal 105.4 GMAC per video (the paper's Table 3 counts
          105.5 G), share of the bf16 matmul peak measured in the same run; eager and
          torch.compile; the plain forms (PandaConfig.fast=False) beside the fast ones
  vit     a ViT-L/14 image encoder (CLIP-L shape, random weights) on the same 8 frames at 224
          and 336 px
  decode  the whole model at batch 1: time to first token (video + 40-token question), tokens/s
          eager and compiled (gpu_speed/fast_inference.py's options, and inductor's own fusion,
          timed in turns), and the whole answer compiled as gpu_speed/fast_inference.py says
          (compile_prefill, compile_decoding)
  train   training steps/s: the tiny preset, and stage 1 at the paper preset (decoder frozen)

GPU times are medians of CUDA-event timings after warm-up, with inputs rotated so that they do not
sit in the L2 cache. The tests only check that this runs: timings are never asserted.
"""

import copy
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

# The repository root on the path, wherever this script runs from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402
from gpu_speed import fast_inference  # noqa: E402
from distillation.teachers import ViT, ViTConfig  # noqa: E402
import panda  # noqa: E402
from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER, PandaConfig, VideoPanda  # noqa: E402

SECTIONS = ("stab", "vit", "decode", "train")
# The release's STAB + projector, measured on one H100, eager bf16
RELEASED_STAB_MS = {1: 18.7, 4: 44.0, 16: 170.0}
TARGETS = dict(stab16_ms=8.5, vit_ratio=5.0, peak_share=0.40, decode_share=0.80, ttft_ms=45.0)


@dataclass
class BenchConfig:
    device: str = "auto"        # auto: cuda if there is one, else cpu
    only: str = "stab,vit,decode,train"  # the sections to run, comma-separated
    quick: bool = False         # fewer sizes and repeats
    preset: str = "auto"        # auto: paper on a GPU, tiny on a CPU
    compile: str = "auto"       # auto: also torch.compile on a GPU | true | false
    profile: bool = True        # print torch.profiler kernel tables (GPU, not quick)
    budget: float = 1e9         # seconds; optional parts are skipped past it
    json: str = ""              # write every measurement here
    log: str = ""               # a copy of the output
    strict: str = "auto"        # stop at the first error: auto = on a CPU (tests) | true | false
    summarize: str = ""         # only print the table of a --json file (of a run cut short)


# ============================================================================================
# Timing
# ============================================================================================

class Ctx:
    """What every section shares: options, device, the log, the results, the clock."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        # Checkpointing acts in training only
        self.cfg = PandaConfig.preset(args.preset, grad_checkpoint=True)
        self.bandwidth = None
        self.results = []  # dicts, one per measurement; printed as tables at the end
        self.start = time.time()
        self.logfile = open(args.log, "w") if args.log else None
        self.peak_tflops = None
        self.model = None  # the VideoPanda (built on meta) that stab and decode share
        self.encode_compiled = None
        self.l2 = torch.cuda.get_device_properties(self.device).L2_cache_size if self.cuda else 0
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "CPU"

    def log(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.logfile:
            self.logfile.write(line + "\n")
            self.logfile.flush()

    def add(self, **row):
        self.results.append(row)
        self.log("  ->", json.dumps(row, default=str))

    def time_left(self):
        return self.args.budget - (time.time() - self.start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def warmup_repeats(self, heavy=False):
        a = self.args
        if not self.cuda:
            return 1, 2
        if a.quick:
            return 2, 5
        return (2, 5) if heavy else (5, 20)


class Clock:
    """Elapsed milliseconds between start() and stop(): CUDA events on a GPU (asynchronous: read
    after a synchronize), the host clock on a CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            self.a, self.b = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def stop(self):
        if self.cuda:
            self.b.record()
        else:
            self.t1 = time.perf_counter()
        return self

    def ms(self):
        return self.a.elapsed_time(self.b) if self.cuda else (self.t1 - self.t0) * 1e3


def measure(ctx, fn, inputs, warmup, repeats):
    """Median ms of fn(*inputs[i]), rotating through the input sets; the repeats are queued
    back to back and read after one synchronize, so host gaps show only where the GPU waits."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    ctx.sync()
    clocks = []
    for i in range(repeats):
        clock = Clock(ctx.cuda).start()
        fn(*inputs[i % len(inputs)])
        clocks.append(clock.stop())
    ctx.sync()
    return statistics.median(c.ms() for c in clocks)


def rotations(ctx, nbytes):
    """How many input sets make the rotation at least 3x the L2 cache (at most 8)."""
    return max(1, min(8, math.ceil(3 * ctx.l2 / max(nbytes, 1)))) if ctx.cuda else 1


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def failed(ctx, what, err):
    """A measurement that raised: out of memory is a result; anything else is re-raised with
    --strict (the default on a CPU, where the tests run), else logged so that the rest of the table
    still comes."""
    if not is_oom(err) and ctx.args.strict:
        raise err
    ctx.log(f"  {what}: {'out of memory' if is_oom(err) else 'FAILED'}: "
            f"{type(err).__name__}: {str(err)[:300]}")
    ctx.results.append(dict(section="errors", name=what,
                            error=f"{type(err).__name__}: {str(err)[:300]}"))
    free_memory()


def profile(ctx, label, fn, args, steps=3):
    """torch.profiler over a few calls; prints the kernels that took the most GPU time."""
    if not ctx.args.profile or ctx.args.quick:
        return
    from torch.profiler import ProfilerActivity
    fn(*args)
    ctx.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn(*args)
        ctx.sync()
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=18, max_name_column_width=90)
            break
        except Exception:  # the key was renamed between PyTorch versions
            table = None
    ctx.log(f"\n--- profile: {label} ({steps} calls) ---\n{table}")


def peak_and_bandwidth(ctx):
    """The two ceilings, measured here: a large bf16 matmul and a large device-to-device copy."""
    n = 8192 if ctx.cuda else 512
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype, generator=g)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype, generator=g)
    w, r = ctx.warmup_repeats()
    ms = measure(ctx, torch.mm, [(a, b)], w, r)
    ctx.peak_tflops = tflops(n ** 3, ms)
    ctx.add(section="peak", name=f"matmul {n}^3 {str(ctx.dtype)[6:]}", ms=ms,
            tflops=ctx.peak_tflops)
    x = torch.empty(2 ** 29 if ctx.cuda else 2 ** 22, device=ctx.device, dtype=torch.float16)
    y = torch.empty_like(x)
    ms = measure(ctx, lambda: y.copy_(x), [()], w, r)
    ctx.bandwidth = 2 * x.numel() * 2 / ms / 1e9  # TB/s, bytes read + written
    ctx.add(section="peak", name="copy", ms=ms, tb_s=ctx.bandwidth)
    del a, b, x, y
    free_memory()


# ============================================================================================
# Models with random weights, built on the meta device and materialised where they run
# ============================================================================================

def random_init_(module, std=0.02):
    """Random weights in place, on the module's own device: norms at weight 1 and bias 0, other
    biases 0, everything else N(0, std). Fast on a GPU, where a CPU init of 7B would take
    minutes."""
    with torch.no_grad():
        for m in module.modules():
            is_norm = isinstance(m, (nn.LayerNorm, nn.BatchNorm3d, panda.RMSNorm))
            for name, p in m.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.normal_(0, std)
            if isinstance(m, nn.BatchNorm3d):
                m.reset_running_stats()
    return module


def materialize(module, device, dtype):
    module.to(dtype)  # still on meta: free
    module.to_empty(device=device)
    return random_init_(module)


def shared_model(ctx, decoder=False):
    """The VideoPanda that stab and decode share (so compiled graphs carry over); parts are
    materialised on first use, in the working dtype, in eval mode."""
    if ctx.model is None:
        with torch.device("meta"):
            ctx.model = VideoPanda(ctx.cfg)
        materialize(ctx.model.stab, ctx.device, ctx.dtype)
        materialize(ctx.model.projector, ctx.device, ctx.dtype)
        ctx.model.eval()
    if decoder and ctx.model.decoder.embed_tokens.weight.is_meta:
        materialize(ctx.model.decoder, ctx.device, ctx.dtype)
    return ctx.model


def make_videos(ctx, cfg, B, channels, seed, dtype=None):
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    v = torch.randn(B, cfg.n_frames, 3, cfg.image_size, cfg.image_size, device=ctx.device,
                    dtype=dtype or ctx.dtype, generator=g)
    if channels == 4:  # a letterbox mask with every pixel valid
        v = torch.cat([v, torch.ones_like(v[:, :, :1])], 2)
    return v


# ============================================================================================
# Multiply-adds, counted as fvcore counts them (the paper's Table 3: 105.5 G for the STAB and
# projector)
# ============================================================================================

def tflops(macs, ms):
    """TFLOP/s of macs multiply-adds in ms milliseconds: a multiply-add is two floating-point
    operations, as in the matmul peak (2 n^3 for an n^3 product)."""
    return 2 * macs / ms / 1e9


def stab_macs(cfg, pooled=False):
    """Multiply-adds of STAB + projector for one square video: ~105.4 G at the paper preset, the
    nominal count used for every TFLOP/s in this file. pooled=True counts what the pooled attention
    (FastQueryAttention.pooled_attention) executes instead: the same function, fewer MACs."""
    C, Fr, p, h, d = cfg.stab_dim, cfg.n_frames, cfg.patch_size, cfg.stab_heads, cfg.d_model
    r = int(C // cfg.lste_reduction)
    n = (cfg.image_size // p) ** 2  # patches per frame
    side = cfg.image_size // (p * cfg.lsd_window)  # LSD grid side
    chunks = Fr // cfg.chunk_frames

    # q projection, keys and values, logits and weighted sum, out projection
    def attention(queries, L):
        if pooled and L > h:  # q back to token space (C^2), pooled token through W_v (C^2)
            return queries * (4 * C * C + 2 * h * L * C)
        return queries * (2 * C * C + 2 * L * C * C + 2 * L * C)

    total = Fr * n * 3 * p * p * C  # patch embedding
    # LSTE: two 1x1x1 convs, temporal and 3x3x3 depthwise
    total += Fr * n * (2 * C * r + 3 * r + 27 * C)
    total += attention(chunks, cfg.chunk_frames * n) + chunks * 8 * C * C  # GSTRA and its MLP
    total += attention(Fr * side * side, cfg.lsd_window ** 2)  # LSD
    total += attention(Fr, side * side) + Fr * C * C  # FSRA, fusion
    tokens = Fr * (1 + side * (side + 1))
    return total + tokens * (C * d + d * d)  # projector


def vit_macs(width, layers, mlp, patch, image):
    n = (image // patch) ** 2
    L = n + 1
    return n * 3 * patch * patch * width + layers * (L * (4 * width * width + 2 * width * mlp)
                                                     + 2 * L * L * width)


# ============================================================================================
# 1. STAB + projector
# ============================================================================================

def module_times(ctx, model, video, repeats=5):
    """GPU ms per STAB module inside one eager forward (events recorded by forward hooks)."""
    names = ["patch_embed", "lste", "gstra", "lsd", "fsra", "fuse"]
    mods = {n: getattr(model.stab, n) for n in names
            if getattr(model.stab, n) is not None} | {"projector": model.projector}
    spans = {n: [] for n in mods}
    hooks = []
    for n, m in mods.items():
        hooks.append(m.register_forward_pre_hook(
            lambda mod, a, n=n: spans[n].append(Clock(ctx.cuda).start())))
        hooks.append(m.register_forward_hook(  # None: keep o
            lambda mod, a, o, n=n: spans[n][-1].stop() and None))
    totals = []
    for i in range(repeats + 1):
        clock = Clock(ctx.cuda).start()
        model.encode_videos(video)
        totals.append(clock.stop())
    ctx.sync()
    for h in hooks:
        h.remove()
    out = {n: statistics.median(c.ms() for c in s[1:]) for n, s in spans.items()}
    out["total"] = statistics.median(c.ms() for c in totals[1:])
    out["other (layout, glue)"] = out["total"] - sum(out[n] for n in mods)
    return out


def plain_copy(ctx, model):
    """A VideoPanda with the same STAB and projector weights whose modules run their plain forms."""
    with torch.device("meta"):
        plain = VideoPanda(replace(ctx.cfg, fast=False))
    for part in ("stab", "projector"):
        materialize(getattr(plain, part), ctx.device, ctx.dtype).load_state_dict(
            getattr(model, part).state_dict())
    return plain.eval()


def bench_stab(ctx):
    cfg, a = ctx.cfg, ctx.args
    model = shared_model(ctx)
    nominal, executed = stab_macs(cfg), stab_macs(cfg, pooled=True)
    ctx.log(f"\n[stab] preset {a.preset}: {nominal / 1e9:.1f} GMAC per video nominal "
            f"(Table 3: 105.5), {executed / 1e9:.1f} executed with the pooled attention")
    batches = ([1, 2] if not ctx.cuda else [1, 16]) if a.quick else [1, 4, 16, 64]
    main_b = 16 if 16 in batches else batches[-1]
    if ctx.compile_ok():
        ctx.encode_compiled = torch.compile(model.encode_videos, dynamic=False)

    def row(name, B, ch, ms, **extra):
        achieved = tflops(B * nominal, ms)
        ctx.add(section="stab", name=name, batch=B, channels=ch, ms=ms, videos_s=1e3 * B / ms,
                tflops_nominal=achieved, tflops_executed=tflops(B * executed, ms),
                peak_share=achieved / ctx.peak_tflops if ctx.peak_tflops else None, **extra)

    with torch.no_grad():
        # The main batch first: it matters most
        for B in sorted(batches, key=lambda b: b != main_b):
            for ch in (3, 4):
                sets = rotations(ctx, B * cfg.n_frames * ch * cfg.image_size ** 2 * 2)
                inputs = [(make_videos(ctx, cfg, B, ch, seed),) for seed in range(sets)]
                w, r = ctx.warmup_repeats(heavy=B >= 64)
                try:
                    row("eager", B, ch, measure(ctx, model.encode_videos, inputs, w, r))
                    # Each shape compiles once (tens of seconds): past the main batch, only while
                    # time is plenty.
                    if ctx.encode_compiled is not None and (ch == 3 or B == main_b) and (
                            B == main_b and ch == 3 or ctx.time_left() > 0.85 * a.budget):
                        row("compiled", B, ch, measure(ctx, ctx.encode_compiled, inputs, w, r))
                except Exception as e:
                    failed(ctx, f"STAB + projector, batch {B}, {ch} channels", e)
                del inputs
                free_memory()

        # What the fast forms buy, at the main batch: the plain forms (fast=False) on the same
        # weights.
        video = make_videos(ctx, cfg, main_b, 3, 0)
        w, r = ctx.warmup_repeats()
        plain = plain_copy(ctx, model)
        for name, m in (("eager, plain forms", plain), ("eager", model)):
            try:
                if name != "eager":
                    row(name, main_b, 3, measure(ctx, m.encode_videos, [(video,)], w, r),
                        variant=True)
                if not a.quick:
                    ctx.add(section="stab_modules", name=name, batch=main_b,
                            **module_times(ctx, m, video))
            except Exception as e:
                failed(ctx, name, e)
        if ctx.compile_ok() and not a.quick and ctx.time_left() > 0.75 * a.budget:
            try:
                row("compiled, plain forms", main_b, 3,
                    measure(ctx, torch.compile(plain.encode_videos, dynamic=False), [(video,)], w,
                            r), variant=True)
            except Exception as e:
                failed(ctx, "compiled, plain forms", e)
        if not a.quick:
            profile(ctx, f"STAB + projector, eager, plain forms, {main_b} videos",
                    plain.encode_videos, (video,))
            profile(ctx, f"STAB + projector, eager, {main_b} videos", model.encode_videos,
                    (video,))
            if ctx.encode_compiled is not None:
                profile(ctx, f"STAB + projector, compiled, {main_b} videos", ctx.encode_compiled,
                        (video,))
    del video, plain
    free_memory()


# ============================================================================================
# 2. ViT-L/14, the encoder that encoder-free models do without
# ============================================================================================

def vit_shape(ctx):
    if ctx.args.preset == "paper":
        return dict(width=1024, layers=24, heads=16, mlp=4096, patch=14), (224, 336)
    return dict(width=64, layers=2, heads=4, mlp=256, patch=8), (ctx.cfg.image_size,)


def make_vit(ctx, kind, shape, image):
    """kind "hf": transformers' CLIPVisionModel with SDPA attention; "own": distill.ViT, the same
    model."""
    with torch.device(ctx.device):
        if kind == "hf":
            from transformers import CLIPVisionConfig, CLIPVisionModel
            config = CLIPVisionConfig(hidden_size=shape["width"], intermediate_size=shape["mlp"],
                                      num_hidden_layers=shape["layers"],
                                      num_attention_heads=shape["heads"],
                                      patch_size=shape["patch"], image_size=image,
                                      attn_implementation="sdpa")
            model = CLIPVisionModel(config).to(ctx.dtype).eval()
            ctx.log(f"  CLIPVisionModel, attention: {model.config._attn_implementation}")
            return model, lambda x: model(pixel_values=x).last_hidden_state
        # The distillation teacher's ViT
        model = ViT(ViTConfig(image=image, **shape)).to(ctx.dtype).eval()
        return model, model


def bench_vit(ctx):
    a = ctx.args
    shape, sizes = vit_shape(ctx)
    kinds = ["own"]
    try:
        import transformers  # noqa: F401
        kinds.insert(0, "hf")
    except ImportError:
        ctx.log("  transformers is not installed: only the hand-written ViT")
    batches = ([1, 2] if not ctx.cuda else [1, 16]) if a.quick else [1, 4, 16, 64]
    frames = ctx.cfg.n_frames
    for image in sizes:
        macs = vit_macs(shape["width"], shape["layers"], shape["mlp"], shape["patch"], image)
        for kind in kinds:
            model, fn = make_vit(ctx, kind, shape, image)
            n_params = sum(p.numel() for p in model.parameters())
            with torch.no_grad():
                for B in batches:
                    # A cross-check of the library model: one size
                    if kind == "own" and ctx.cuda and B != 16:
                        continue
                    n_img = B * frames
                    sets = rotations(ctx, n_img * 3 * image * image * 2)
                    g = torch.Generator(device=ctx.device).manual_seed(0)
                    inputs = [(torch.randn(n_img, 3, image, image, device=ctx.device,
                                           dtype=ctx.dtype, generator=g),)
                              for _ in range(sets)]
                    w, r = ctx.warmup_repeats(heavy=B >= 64)
                    try:
                        ms = measure(ctx, fn, inputs, w, r)
                        ctx.add(section="vit", name=f"{kind} {image}px", impl=kind, image=image,
                                batch=B, params_m=n_params / 1e6, ms=ms, videos_s=1e3 * B / ms,
                                tflops=tflops(B * frames * macs, ms),
                                gmac_per_video=frames * macs / 1e9)
                    except Exception as e:
                        failed(ctx, f"ViT {kind} {image}px, batch {B}", e)
                    del inputs
                    free_memory()
                if (kind == "own" and image == sizes[0] and ctx.compile_ok() and not a.quick
                        and ctx.time_left() > 0.7 * a.budget):
                    B = 16 if 16 in batches else batches[-1]
                    x = torch.randn(B * frames, 3, image, image, device=ctx.device, dtype=ctx.dtype)
                    compiled = torch.compile(model)
                    w, r = ctx.warmup_repeats()
                    ms = measure(ctx, compiled, [(x,)], w, r)
                    ctx.add(section="vit", name=f"own {image}px, compiled", impl="own compiled",
                            image=image, batch=B, params_m=n_params / 1e6, ms=ms,
                            videos_s=1e3 * B / ms, tflops=tflops(B * frames * macs, ms),
                            gmac_per_video=frames * macs / 1e9)
                    del x, compiled
            del model, fn
            free_memory()


# ============================================================================================
# 3. Decoding: time to first token and tokens per second, batch 1
# ============================================================================================

def decode_run(ctx, model, video, ids, n_new, cache):
    """One stream(): ms to the first token, then tokens/s for the other n_new - 1."""
    gen = model.stream(video, ids, max_new_tokens=n_new, cache=cache)
    first, rest = Clock(ctx.cuda).start(), None
    next(gen)
    first.stop()
    rest = Clock(ctx.cuda).start()
    n = 1 + sum(1 for _ in gen)
    rest.stop()
    ctx.sync()
    return first.ms(), (n - 1) / (rest.ms() / 1e3) if n > 1 else float("nan")


def decode_variants(ctx, variants, model, video, ids, n_new, runs, warmup, **extra):
    """variants: name -> (methods, KV cache), methods: {"decode_step": ..., "prefill": ...} in place
    of the model's own ({}: its own). Each is warmed up, then they are timed in turns, so that a
    slower or faster moment of the card touches all of them alike."""
    def run(methods, cache):
        vars(model).update(methods)
        return decode_run(ctx, model, video, ids, n_new, cache)

    for methods, cache in variants.values():
        for _ in range(warmup):
            run(methods, cache)
    got = {name: [] for name in variants}
    for _ in range(runs):
        for name, (methods, cache) in variants.items():
            got[name].append(run(methods, cache))
    for name, g in got.items():
        ctx.add(section="decode", name=name, ttft_ms=statistics.median(x[0] for x in g),
                tok_s=statistics.median(x[1] for x in g), new_tokens=n_new, **extra)


def bench_decode(ctx):
    a, cfg = ctx.args, ctx.cfg
    model = shared_model(ctx, decoder=True)
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    video = make_videos(ctx, cfg, 1, 3, 0)
    g = torch.Generator().manual_seed(0)
    question = 40 if a.preset == "paper" else 12
    ids = torch.randint(0, cfg.vocab_size, (1, question + 1), generator=g)
    ids[0, 5] = VIDEO_PLACEHOLDER
    ids = ids.to(ctx.device)
    n_new = 8 if not ctx.cuda else (32 if a.quick else 128)
    runs = 5 if ctx.cuda and not a.quick else 2
    L = question + model.encode_videos(video)[1].item()
    # The bytes one decode step must read at least: every weight but the embedding table, and the
    # cache.
    weight_bytes = ((n_dec - model.decoder.embed_tokens.weight.numel())
                    * model.decoder.lm_head.weight.element_size())
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.dim_per_head * (L + n_new // 2) * 2
    bound = (ctx.bandwidth * 1e12 / (weight_bytes + kv_bytes) if getattr(ctx, "bandwidth", None)
             else None)
    ctx.log(f"\n[decode] prompt {L} tokens ({question} text + video); "
            f"decoder {n_dec / 1e9:.2f} B params; "
            f"a decode step reads >= {(weight_bytes + kv_bytes) / 1e9:.2f} GB"
            + (f": at the measured copy rate, <= {bound:.0f} tokens/s" if bound else ""))
    extra = dict(prompt_tokens=L, hbm_bound_tok_s=bound)
    with torch.no_grad():
        decode_variants(ctx, {"eager": ({}, None)}, model, video, ids, n_new, runs, 1, **extra)
        if not a.quick:
            profile(ctx, "time to first token (eager): STAB + projector + prefill",
                    lambda: next(model.stream(video, ids, max_new_tokens=1)), (), steps=2)
        if ctx.compile_ok() and ctx.time_left() > 100:
            fused = fast_inference.fuse(copy.deepcopy(model))  # q/k/v and gate/up each one matmul
            own = {k: v for k, v in fast_inference.DECODE_OPTIONS.items()
                   if k != "realize_acc_reads_threshold"}
            # with and without the option that has each matrix-vector kernel read its input from
            # memory
            variants = {"compiled, fused": fast_inference.DECODE_OPTIONS,
                        "compiled, fused, inductor's own fusion": own}
            compiled_decode(ctx, variants, fused, video, ids, n_new, L, runs, extra)
            compiled_answer(ctx, fused, video, ids, n_new, L, runs, extra)
            del fused
            if ctx.compile_ok() and ctx.time_left() > 0.6 * a.budget:  # what fusing brings
                compiled_decode(ctx, {"compiled, not fused": fast_inference.DECODE_OPTIONS}, model,
                                video, ids, n_new, L, runs, extra)
    if a.compile:
        torch._dynamo.reset()  # drop compiled graphs and CUDA-graph memory pools before training
        ctx.encode_compiled = None
    del video
    free_memory()


def compiled_decode(ctx, variants, model, video, ids, n_new, L, runs, extra):
    """Tokens/s with the decode step compiled into a CUDA graph (fast_inference.compile_decoding),
    once per set of compiler options in variants (name -> options), timed in turns in this one
    process: between two processes the same code has differed by more than one option changes it."""
    try:
        compiled = {}
        for name, options in variants.items():
            cache = fast_inference.compile_decoding(model, 1, L + n_new, options)
            compiled[name] = ({"decode_step": model.decode_step}, cache)
            del model.decode_step  # back to the plain method, for the next compilation
        decode_variants(ctx, compiled, model, video, ids, n_new, runs, 2, **extra)
        if not ctx.args.quick:
            name, (methods, cache) = next(iter(compiled.items()))  # the first variant's kernels
            vars(model).update(methods)
            profile(ctx, f"decode steps, {name}",
                    lambda: list(model.stream(video, ids, max_new_tokens=4, cache=cache)),
                    (), steps=1)
    except Exception as e:
        failed(ctx, f"decode, {', '.join(variants)}", e)
    finally:
        vars(model).pop("decode_step", None)  # back to the plain method


def compiled_answer(ctx, model, video, ids, n_new, L, runs, extra):
    """The whole answer as a user compiles it: the first token through
    fast_inference.compile_prefill, the others through the compiled decode step, one KV cache for
    both; the prefill with and without its CUDA graph, timed in turns."""
    try:
        fast_inference.compile_prefill(model, graph=False)
        cache = fast_inference.compile_decoding(model, 1, L + n_new)
        step, prefill = model.decode_step, model.prefill
        variants = {"compiled prefill and decode, fused": (
                        {"decode_step": step, "prefill": prefill}, cache),
                    "the same, the prefill as one CUDA graph": (
                        {"decode_step": step, "prefill": fast_inference.GraphedPrefill(prefill)},
                        cache)}
        decode_variants(ctx, variants, model, video, ids, n_new, runs, 2, **extra)
        if not ctx.args.quick:
            profile(ctx, "time to first token, the prefill as one CUDA graph",
                    lambda: next(model.stream(video, ids, max_new_tokens=1, cache=cache)), (),
                    steps=2)
    except Exception as e:
        failed(ctx, "compiled prefill and decode", e)
    finally:
        for name in ("decode_step", "prefill"):
            vars(model).pop(name, None)


# ============================================================================================
# 4. Training throughput
# ============================================================================================

def train_batch(ctx, cfg, B, question, answer, dtype):
    """Random videos and prompts shaped as data.py makes them; labels only on the answer."""
    g = torch.Generator(device=ctx.device).manual_seed(B)
    videos = make_videos(ctx, cfg, B, 3, B, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (B, question + answer), device=ctx.device, generator=g)
    ids[:, 3] = VIDEO_PLACEHOLDER
    labels = ids.clone()
    labels[:, :question] = IGNORE_INDEX
    return videos, ids, labels


def train_steps(ctx, name, model, cfg, batches, question, answer, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=ctx.cuda)
    model.train()
    for B in batches:
        if ctx.time_left() < 30:
            ctx.log(f"  {name}: skipping batch {B} (time budget)")
            break
        free_memory()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            videos, ids, labels = train_batch(ctx, cfg, B, question, answer, torch.float32)

            def step():
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(videos, ids, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            w, r = (1, 2) if not ctx.cuda or ctx.args.quick else ((1, 3) if B < 16 else (1, 2))
            ms = measure(ctx, step, [()], w, r)
            mem = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30 if ctx.cuda else None
            ctx.add(section="train", name=name, batch=B, ms=ms, videos_s=1e3 * B / ms, peak_gib=mem)
        except Exception as e:
            failed(ctx, f"{name}, batch {B}", e)
            if is_oom(e):
                ctx.add(section="train", name=name, batch=B, ms=None, videos_s=None, peak_gib="OOM")
            break
        finally:
            videos = ids = labels = step = None
            opt.zero_grad(set_to_none=True)
    del opt
    free_memory()


def bench_train(ctx):
    a = ctx.args
    # The tiny preset, everything trainable, fp32 (the synthetic-video default run).
    torch.manual_seed(0)
    tiny = VideoPanda(PandaConfig.preset("tiny")).to(ctx.device)
    train_steps(ctx, "tiny preset, fp32, all trainable", tiny, tiny.cfg,
                [4 if not ctx.cuda else 32] if a.quick else [32], 10, 10, False)
    del tiny
    free_memory()

    # Stage 1: STAB + projector trainable (fp32 weights, bf16 autocast), decoder frozen in the
    # working dtype with gradient checkpointing; 8 frames at the preset's size, a 20-token prompt
    # and 60-token answer.
    with torch.device("meta"):
        model = VideoPanda(ctx.cfg)
    model.decoder = shared_model(ctx, decoder=True).decoder  # the same frozen weights as decode
    materialize(model.stab, ctx.device, torch.float32)
    materialize(model.projector, ctx.device, torch.float32)
    model.decoder.requires_grad_(False)
    if a.preset == "paper":
        batches = [1, 4] if a.quick else [1, 4, 8, 16, 32]
    else:
        batches = [1, 2]
    train_steps(ctx, f"stage 1, {a.preset} preset, decoder frozen", model, ctx.cfg, batches, 20, 60,
                ctx.cuda)
    model.decoder.requires_grad_(True)
    model.eval()
    del model
    free_memory()


# ============================================================================================
# The table
# ============================================================================================

def fmt(x, spec=".1f"):
    return "-" if x is None else (x if isinstance(x, str) else format(x, spec))


def summary(ctx):
    R = ctx.results
    out = []
    out.append(f"\n== panda bench on {ctx.device_name}: torch {torch.__version__}, "
               f"{str(ctx.dtype)[6:]}, preset {ctx.args.preset} ==")
    for r in R:
        if r["section"] == "peak":
            out.append(f"  {r['name']}: " + (f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else
                                             f"{r['tb_s']:.2f} TB/s (read + write)"))
    stab = [r for r in R if r["section"] == "stab"]
    if stab:
        out.append(f"\n[1] STAB + projector, {ctx.cfg.n_frames} frames x {ctx.cfg.image_size} px "
                   f"(TFLOP/s from the nominal {stab_macs(ctx.cfg) / 1e9:.1f} GMAC/video; "
                   f"the pooled attention executes {stab_macs(ctx.cfg, True) / 1e9:.1f})")
        out.append(f"  {'variant':<48} {'videos':>6} {'ch':>3} {'ms':>8} {'videos/s':>9} "
                   f"{'TFLOP/s':>8} {'%peak':>6} {'vs released':>11}")
        for r in sorted(stab, key=lambda r: (r.get("variant", False), r["batch"], r["channels"],
                                             r["name"])):
            rel = RELEASED_STAB_MS.get(r["batch"]) if ctx.args.preset == "paper" else None
            out.append(f"  {r['name']:<48} {r['batch']:>6} {r['channels']:>3} {r['ms']:>8.2f} "
                       f"{r['videos_s']:>9.0f} {r['tflops_nominal']:>8.0f} "
                       f"{fmt(r['peak_share'] and 100 * r['peak_share'], '.0f'):>6} "
                       f"{(fmt(rel / r['ms'], '.1f') + 'x') if rel else '-':>11}")
    mods = [r for r in R if r["section"] == "stab_modules"]
    for r in mods:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r.items()
                          if k not in ("section", "name", "batch"))
        out.append(f"  per module (ms), {r['name']}, {r['batch']} videos: {parts}")
    ops = [r for r in R if r["section"] == "ops"]
    if ops:
        out.append(f"  ops at {ops[0]['batch']} videos (ms): "
                   + "; ".join(f"{r['name']} {r['ms']:.3f}" for r in ops))
    vit = [r for r in R if r["section"] == "vit"]
    if vit:
        out.append("\n[2] ViT-L/14 image encoder on the same frames (CLIP-L shape, random "
                   "weights); ratio = ViT ms / our STAB + projector ms (3 channels) at the same "
                   "batch")
        out.append(f"  {'encoder':<22} {'Mparams':>7} {'videos':>6} {'ms':>8} {'videos/s':>9} "
                   f"{'TFLOP/s':>8} {'/ours eager':>11} {'/ours compiled':>14}")
        ours = {(r["batch"], r["name"]): r["ms"] for r in stab
                if r["channels"] == 3 and not r.get("variant")}
        for r in vit:
            e, c = ours.get((r["batch"], "eager")), ours.get((r["batch"], "compiled"))
            out.append(f"  {r['name']:<22} {r['params_m']:>7.0f} {r['batch']:>6} {r['ms']:>8.2f} "
                       f"{r['videos_s']:>9.0f} {r['tflops']:>8.0f} "
                       f"{fmt(e and r['ms'] / e, '.1f'):>11} "
                       f"{fmt(c and r['ms'] / c, '.1f'):>14}")
    dec = [r for r in R if r["section"] == "decode"]
    if dec:
        out.append(f"\n[3] whole model, batch 1: one video + question "
                   f"({dec[0]['prompt_tokens']} prompt tokens); decode bound by memory bandwidth "
                   f"<= {fmt(dec[0]['hbm_bound_tok_s'], '.0f')} tokens/s")
        for r in dec:
            share = r["tok_s"] and r["hbm_bound_tok_s"] and r["tok_s"] / r["hbm_bound_tok_s"]
            out.append(f"  {r['name']:<52} first token {r['ttft_ms']:>7.1f} ms   "
                       f"decode {fmt(r['tok_s'], '.1f'):>6} "
                       f"tokens/s ({fmt(share and 100 * share, '.1f')}% of the bound)")
    tr = [r for r in R if r["section"] == "train"]
    if tr:
        out.append("\n[4] training steps (forward, backward, AdamW)")
        for r in tr:
            out.append(f"  {r['name']:<46} batch {r['batch']:>3}: {fmt(r['ms'], '.0f'):>7} ms/step "
                       f"{fmt(r['videos_s'], '.1f'):>7} videos/s   "
                       f"peak {fmt(r['peak_gib'], '.1f')} GiB")
    errors = [r for r in R if r["section"] == "errors"]
    if errors:
        out.append("\nfailed measurements")
        out.extend(f"  {r['name']}: {r['error']}" for r in errors)
    if ctx.cuda and ctx.args.preset == "paper":
        out.extend(targets(ctx))
    ctx.peak_tflops = next((r["tflops"] for r in R if r["section"] == "peak" and "tflops" in r),
                           None)
    return "\n".join(out)


def targets(ctx):
    R, T = ctx.results, TARGETS
    out = ["\ntargets (each a ratio measured in this run)"]
    best16 = [r for r in R if r["section"] == "stab" and r["batch"] == 16 and r["channels"] == 3
              and not r.get("variant")]
    vit224 = [r for r in R if r["section"] == "vit" and r["batch"] == 16 and r["image"] == 224]
    if best16:
        b = min(best16, key=lambda r: r["ms"])
        out.append(f"  STAB + projector, 16 videos ({b['name']}): {b['ms']:.2f} ms "
                   f"<= {T['stab16_ms']} ({170 / b['ms']:.0f}x the released 170 ms): "
                   f"{'met' if b['ms'] <= T['stab16_ms'] else 'NOT met'}")
        if b["peak_share"]:
            out.append(f"  share of matmul peak: {100 * b['peak_share']:.0f}% "
                       f">= {100 * T['peak_share']:.0f}%: "
                       f"{'met' if b['peak_share'] >= T['peak_share'] else 'NOT met'}")
        if vit224:
            v = min(vit224, key=lambda r: r["ms"])
            ratio = v["ms"] / b["ms"]
            out.append(f"  vs the fastest ViT-L/14 at 224 px ({v['name']}, {v['ms']:.1f} ms): "
                       f"{ratio:.1f}x >= "
                       f"{T['vit_ratio']}x: {'met' if ratio >= T['vit_ratio'] else 'NOT met'}")
    dec = [r for r in R if r["section"] == "decode"]
    if dec:
        tok = max((r["tok_s"] for r in dec if r["tok_s"]), default=None)
        ttft, bound = min(r["ttft_ms"] for r in dec), dec[0]["hbm_bound_tok_s"]
        want = bound and T["decode_share"] * bound
        out.append(f"  decode: {fmt(tok)} tokens/s >= {100 * T['decode_share']:.0f}% of the "
                   f"{fmt(bound, '.0f')} tokens/s bound ({fmt(want, '.0f')}): "
                   f"{'met' if tok and want and tok >= want else 'NOT met'}")
        out.append(f"  time to first token: {ttft:.1f} ms <= {T['ttft_ms']}: "
                   f"{'met' if ttft <= T['ttft_ms'] else 'NOT met'}")
    return out


# ============================================================================================

def parse(argv):
    (changes,) = cli.parse_args(argv, __doc__, BenchConfig)
    a = replace(BenchConfig(), **changes)
    a.device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    cuda = a.device.startswith("cuda")
    a.preset = a.preset if a.preset != "auto" else "paper" if cuda else "tiny"
    a.compile = cuda if a.compile == "auto" else cli.parse_value(a.compile, bool, "compile")
    a.strict = not cuda if a.strict == "auto" else cli.parse_value(a.strict, bool, "strict")
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = set(a.only) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--only: unknown sections {sorted(unknown)}; "
                         f"choose from {', '.join(SECTIONS)}")
    return a


def write_json(ctx):
    if ctx.args.json:
        with open(ctx.args.json, "w") as f:
            json.dump({"device": ctx.device_name, "torch": torch.__version__,
                       "args": asdict(ctx.args), "results": ctx.results},
                      f, indent=1, default=str)


def summarize(path):
    """The table of a --json file, e.g. of a run cut short by a time limit."""
    with open(path) as f:
        saved = json.load(f)
    a = BenchConfig(**{**saved["args"], "log": "", "json": ""})
    ctx = Ctx(replace(a, device="cpu"))
    ctx.cuda, ctx.device_name, ctx.results = (a.device.startswith("cuda"), saved["device"],
                                              saved["results"])
    ctx.dtype = torch.bfloat16 if ctx.cuda else torch.float32
    print(summary(ctx))


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.summarize:
        return summarize(a.summarize)
    ctx = Ctx(a)
    ctx.compile_ok = lambda: a.compile and ctx.time_left() > 60
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithms for these shapes
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        ctx.log(f"device {torch.cuda.get_device_name(ctx.device)}: {p.multi_processor_count} SMs, "
                f"L2 {ctx.l2 / 2 ** 20:.0f} MiB, {p.total_memory / 2 ** 30:.0f} GiB; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    peak_and_bandwidth(ctx)
    write_json(ctx)
    for section in SECTIONS:
        if section in a.only:
            t0 = time.time()
            try:
                globals()[f"bench_{section}"](ctx)
            except Exception as e:
                failed(ctx, f"section {section}", e)
            ctx.log(f"[{section}] done in {time.time() - t0:.0f} s")
            write_json(ctx)
    ctx.log(summary(ctx))
    return ctx


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
