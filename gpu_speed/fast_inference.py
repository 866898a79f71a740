"""Answering at the card's limit: the same decoder maths with fewer, larger matmuls, the first token's path
compiled, and the decode step compiled into one CUDA graph per token (gpt-fast's recipe).

    inference.fuse(model)                     # q/k/v and gate/up each one matmul, o and down split; in place
    inference.compile_prefill(model)           # the first token: the video and the prompt
    cache = inference.compile_decoding(model)  # then model.generate(..., cache=cache) as usual

Decoding one token at batch 1 reads every weight once: it is bound by memory bandwidth, and what costs
beyond that is kernels (each one a launch and a pass too small to fill the card). Three projections of
the same input as one matmul read the input once and launch one kernel; a product with few outputs is split
into pieces, more rows for the kernel (SplitLinear); a CUDA graph replays a token's kernels without the
CPU. The first token is bound by compute instead (a prefill's matmuls are large): compiling fuses the
element-wise passes between them and shortens the CPU's time between kernels. The checkpoint's names
and shapes do not change: fusing happens after loading, on a model that only answers (its state_dict has
the fused names: save the unfused model).
"""

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from panda import Attention, KVCache


def fused_linear(linears):
    """One Linear whose outputs are the given Linears' outputs, concatenated: the same sums, one matmul."""
    fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                      bias=linears[0].bias is not None, device=linears[0].weight.device, dtype=linears[0].weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


class SplitLinear(nn.Linear):
    """An nn.Linear with the same weight and bias, whose product with a single vector, when compiled, sums
    each output in `splits` pieces of the input: the same products, in fp32, summed in another order. At
    batch 1 the o and down projections have only d_model outputs, one weight row each, and their
    matrix-vector kernels streamed slower than the wider q/k/v and gate/up ones (docs/bench-notes.md, runs
    25-26); in 16 pieces they are 16x as many shorter rows, then a small sum over the pieces. Eager, and for
    more than one vector, it is the plain F.linear: there the split form would write out every product."""

    # More than 8 pieces: inductor writes a sum of 8 or fewer terms into the kernel that reads it, here the
    # next RMSNorm, which one block of threads computes.
    def __init__(self, linear, splits=16):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.splits = linear.in_features, linear.out_features, splits
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x):
        if not torch.compiler.is_compiling() or x.numel() != self.in_features or self.in_features % self.splits:
            return F.linear(x, self.weight, self.bias)
        return self.split_product(x)

    def split_product(self, x):  # x (..., K) holding one vector -> (..., N)
        (N, K), s = self.weight.shape, self.splits
        parts = (self.weight.view(N, s, K // s).float() * x.reshape(1, s, K // s).float()).sum(-1)  # (N, s)
        out = parts.sum(-1) if self.bias is None else parts.sum(-1) + self.bias.float()
        return out.to(x.dtype).view(*x.shape[:-1], N)


class FusedAttention(Attention):
    """panda.Attention with its q, k and v projections as one matmul (Attention.project), o split (SplitLinear)."""

    def __init__(self, attn):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads, self.d = attn.n_heads, attn.n_kv_heads, attn.d
        self.layer = attn.layer  # its buffers in a KVCache
        self.qkv_proj = fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.o_proj = SplitLinear(attn.o_proj)

    def project(self, x):
        return self.qkv_proj(x).split(self.sizes, -1)


class FusedMLP(nn.Module):
    """panda.MLP with its gate and up projections as one matmul, down split (SplitLinear)."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_up_proj, self.down_proj = fused_linear([mlp.gate_proj, mlp.up_proj]), SplitLinear(mlp.down_proj)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU, as panda.MLP


def fuse(model):
    """Fuse every decoder block's q/k/v and gate/up projections and split its o and down ones (SplitLinear), in
    place; returns the model. The o and down weights stay the same tensors, under the same names."""
    for block in model.decoder.layers:
        block.self_attn, block.mlp = FusedAttention(block.self_attn), FusedMLP(block.mlp)
    return model


DECODE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "realize_acc_reads_threshold": 1,
                  "combo_kernels": True}


def tune_on_kernel_time():
    """Have inductor's tuner compare block sizes by each kernel's own time on the GPU. By default it times a
    candidate with CUDA events around a launch from Python; a decode step's matrix-vector kernel takes about as
    long as its launch, so the choice followed the host's noise, and the same code, compiled afresh, ended with
    faster or slower kernels each time (docs/bench-notes.md, runs 32-34). Inductor's profiler path
    (CachingAutotuner.bench's with_profiler) reads each kernel's time from the GPU's trace instead. No option
    of torch.compile sends the tuner there (torch 2.13's use_torch_profiler_benchmarker is read once, when
    inductor is imported), hence this wrapper. It changes which kernels are picked, never what they compute,
    and holds for every later compilation in the process. Left alone if inductor's bench no longer takes
    with_profiler."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    bench = CachingAutotuner.bench
    if getattr(bench, "on_kernel_time", False) or "with_profiler" not in inspect.signature(bench).parameters:
        return

    def on_kernel_time(self, launcher, *args, with_profiler=False, **kwargs):
        return bench(self, launcher, *args, with_profiler=True, **kwargs)

    on_kernel_time.on_kernel_time = True
    CachingAutotuner.bench = on_kernel_time


def compile_decoding(model, batch=1, slots=None, options=DECODE_OPTIONS):
    """Compile model.decode_step (one token per row) for a KV cache of `slots` positions (default: the
    context), kept at a fixed address so that the CUDA graph can write into it; returns the cache, to
    pass to generate() and stream(). The compiler's options (DECODE_OPTIONS), for this function only:
    - triton.cudagraphs (what mode="reduce-overhead" sets): a token's kernels replay as one CUDA graph;
    - coordinate_descent_tuning: inductor writes each batch-1 matmul as a matrix-vector reduction of its
      own and tunes its block sizes (gpt-fast's setting), here on the kernels' GPU time (tune_on_kernel_time);
    - realize_acc_reads_threshold=1: such a reduction reads its input vector, computed once, from memory.
      Left to itself, inductor folds the RMSNorm and the residual sums that make the input into the
      reduction, and every block of the kernel recomputes them; on an H200 that made the q/k/v matmul of
      half the layers 1.5x slower (docs/bench-notes.md);
    - combo_kernels: small kernels that do not depend on each other launch as one (per layer, the rotary
      embedding of q and k and the two cache writes), where each launch costs about as long as its work."""
    tune_on_kernel_time()
    param = next(model.decoder.parameters())
    cache = KVCache(model.cfg, batch, slots or model.cfg.max_seq_len, param.dtype, param.device)
    for buffer in cache.keys + cache.values:
        torch._dynamo.mark_static_address(buffer)
    model.decode_step = torch.compile(model.decode_step, fullgraph=True, options=options)
    return cache


class GraphedPrefill:
    """model.prefill replayed as one CUDA graph: the decoder's blocks run back to back, with no time on the
    CPU between their kernels. A graph is captured on the first call for each prompt shape and KV cache,
    after two warm-up calls that compile the blocks and let cuBLAS and cuDNN pick their kernels; it reads
    its inputs from buffers of its own and writes into the cache's. On a CPU, the plain call."""

    def __init__(self, prefill):
        self.prefill, self.graphs = prefill, {}

    def __call__(self, x, seq_len, cache):
        if not x.is_cuda:
            return self.prefill(x, seq_len, cache)
        key = (x.shape, x.dtype, id(cache))
        if key not in self.graphs:
            inputs, side = (x.clone(), seq_len.clone()), torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capturing stream, as torch.cuda.graph asks
                for _ in range(2):
                    self.prefill(*inputs, cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.prefill(*inputs, cache)
            self.graphs[key] = graph, inputs, logits, cache  # the cache kept alive: its id stays its own
        graph, inputs, logits, _ = self.graphs[key]
        inputs[0].copy_(x)
        inputs[1].copy_(seq_len)
        graph.replay()
        return logits.clone()  # the graph's own output is overwritten by its next replay


def compile_prefill(model, graph=True):
    """Compile the first token's path, in place, for one prompt shape at a time (a new shape compiles, and
    captures, anew): the STAB and projector replayed as one CUDA graph (a video is too little work to hide a
    launch per kernel); each decoder block compiled on its own, which fuses the norms, the rotary embedding
    and SwiGLU's product around the matmuls; and, with graph, the whole prefill captured as one CUDA graph
    by hand (GraphedPrefill). torch.compile's own CUDA graphs cannot hold the blocks: one compiled graph
    serves all the identical blocks, and each block's replay would overwrite the output the next one reads."""
    model.encode_videos = torch.compile(model.encode_videos, dynamic=False, mode="reduce-overhead")
    for block in model.decoder.layers:
        block.compile(dynamic=False)
    if graph:
        model.prefill = GraphedPrefill(model.prefill)
    return model
