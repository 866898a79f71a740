"""Video-Panda (Yi et al., CVPR 2025, arXiv 2412.18609), an *encoder-free* video-language model, in
one file: raw frames go through a ~24M-parameter Spatio-Temporal Alignment Block (STAB) and a
~21M-parameter projector straight into a Llama-family LLM, with no pretrained image encoder. Read
top to bottom, the order in which a video flows (the paper's Sec. 3.1, Fig. 3):

  PatchEmbed      frames -> patch tokens                                          Eq. 1
  LSTE            local spatio-temporal convolutions on chunks of k frames       Eq. 2-3
  GSTRA           one query attends over a whole chunk: one token per chunk      Eq. 11-13
  LSD             each s x s window of patches becomes one token by attention    Eq. 4-7
  FSRA            one query attends over a frame's grid: one token per frame     Eq. 8-10
  STAB            fuses chunk and frame tokens, lays out rows + split tokens      Eq. 14-16
  projector       every visual token to the decoder's width                      Eq. 17
  Decoder         Llama: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache
  VideoPanda      splice, next-token loss (Eq. 20), generate
  Fast...         faster forms of PatchEmbed, LSTE and QueryAttention (GSTRA's, LSD's, FSRA's)
  letterbox       real videos: the STAB drops cells outside the box (real_video/letterbox_tokens.py)

Where the official release differs from the paper's equations, the code follows the release (so that
its weights give its outputs) and a comment says how the paper writes it. Each class is the maths as
written; the last section holds faster forms of three, which PandaConfig.fast puts in their place,
each saying why it computes the same function (tests/test_fast_path.py checks it).

Letters, one meaning each: B videos, T frames a video, k frames a chunk, S canvas side, P patch
side, p = S/P patches a side, s LSD window side, g = p/s grid cells a side, C STAB width, r LSTE
bottleneck, N queries of a QueryAttention, L tokens of a sequence, D decoder width, d head width, V
vocabulary. "tiny, B=1:" is a shape in the tiny preset, for one video (T=8, k=4, S=48, P=8, p=6,
s=2, g=3, C=96, D=128; 13 tokens a frame, 104 a video).
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from real_video import letterbox_tokens  # torch only

VIDEO_PLACEHOLDER = -200  # "<video>" in input_ids (the release's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100       # the label of positions that carry no loss


@dataclass
class PandaConfig:
    # --- video input ---
    n_frames: int = 8          # T: frames sampled per video, a multiple of chunk_frames
    image_size: int = 448      # S: the square canvas frames are letterboxed onto
    patch_size: int = 14       # P: patch embedding kernel = stride
    lsd_window: int = 2        # s: LSD merges s x s patches into one token
    chunk_frames: int = 4      # k: LSTE and GSTRA see chunks of this many frames (the release's 4)
    letterbox: bool = True     # real videos keep their aspect ratio, with a 4th mask channel
    # --- STAB ---
    stab_dim: int = 1024       # C: the width of every STAB token
    stab_heads: int = 8        # heads of LSD, FSRA and GSTRA attention
    lste_reduction: float = 1.5  # LSTE bottleneck r = int(C // reduction) channels
    gstra_mlp_ratio: int = 4   # GSTRA's MLP hidden width = ratio * C
    stab_dropout: float = 0.5  # in GSTRA's MLP and the fusion projection (the release's 0.5)
    fast: bool = True          # the faster forms of the same maths (last section); False: plain
    # --- decoder (Llama family; the fields of Hugging Face's LlamaConfig) ---
    vocab_size: int = 32000    # V
    d_model: int = 4096        # D: decoder width; the projector maps C -> D
    n_layers: int = 32         # decoder blocks
    n_heads: int = 32          # query heads
    n_kv_heads: int = 32       # key/value heads; fewer than n_heads: grouped-query attention
    head_dim: int = 0          # d; 0 means D // n_heads (Qwen2 and Mistral may set it)
    ffn_dim: int = 11008       # SwiGLU hidden width
    rms_eps: float = 1e-5      # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    rope_factor: float = 1.0   # llama3-style rope scaling; 1.0 means none
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    rope_original_max_len: int = 8192  # llama3: the context the model was trained with
    max_seq_len: int = 4096    # context: visual tokens + text + generated tokens
    qkv_bias: bool = False     # Qwen2 has biases on the q/k/v projections
    tie_embeddings: bool = False  # lm_head shares the token embedding (small models)
    grad_checkpoint: bool = False  # recompute decoder blocks in backward to save memory
    # --- the paper's Table 4 ablations; the defaults are the full model; a module off is not built
    split_tokens: bool = True  # False: rows are not closed by a split token
    fsra: bool = True          # False: the fused token is fuse(chunk token) alone
    lsd: str = "attention"     # "avgpool": each window's plain average replaces LSD's attention
    lste: bool = True          # False: patch embeddings go unchanged to GSTRA and LSD (added once)
    gstra: bool = True         # False: the fused token is fuse(frame token) alone

    def __post_init__(self):
        zero_ok = ("n_layers", "head_dim", "stab_dropout")  # a STAB alone; d_model // n_heads; none
        for name, value in vars(self).items():  # sizes and rates first: the rules below divide
            zero = name in zero_ok
            if type(value) in (int, float) and not (0 < value < math.inf or value == 0 and zero):
                raise ValueError(f"--{name} must be {'zero or more' if zero else 'positive'}, "
                                 f"got {value}")
        multiple = lambda name, by: f"--{name}={getattr(self, name)} must be a multiple of {by}"
        for wrong, why in [
            (self.lsd not in ("attention", "avgpool"),
             f"--lsd must be 'attention' or 'avgpool', got {self.lsd!r}"),
            (not (self.fsra or self.gstra), "fsra=False and gstra=False: no context to fuse"),
            (self.stab_dropout >= 1, f"--stab_dropout must be below 1, got {self.stab_dropout}"),
            (self.stab_dim < self.lste_reduction,
             "--lste_reduction above --stab_dim leaves LSTE no channel"),
            (self.rope_factor != 1 and self.rope_high_freq_factor <= self.rope_low_freq_factor,
             "--rope_high_freq_factor must be above --rope_low_freq_factor, to blend between them"),
            (self.dim_per_head % 2, "--head_dim (or --d_model // --n_heads) must be even for the "
             f"rotary embeddings' channel pairs, got {self.dim_per_head}"),
            (self.n_frames % self.chunk_frames, multiple("n_frames", "chunk_frames")),
            (self.stab_dim % self.stab_heads, multiple("stab_dim", "stab_heads")),
            (self.n_heads % self.n_kv_heads, multiple("n_heads", "n_kv_heads")),
            (self.image_size % (self.patch_size * self.lsd_window),
             multiple("image_size", "patch_size*lsd_window"))]:
            if wrong:
                raise ValueError(why)

    @property
    def dim_per_head(self):  # d
        return self.head_dim or self.d_model // self.n_heads

    @property
    def grid(self):  # g: cells per side of a full frame's LSD grid
        return self.image_size // (self.patch_size * self.lsd_window)

    @property
    def tokens_per_frame(self):  # a whole frame: the fused token, g rows of g cells (+ split)
        return 1 + self.grid * (self.grid + self.split_tokens)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)


PRESETS = {
    # unit tests: about 55 thousand parameters, milliseconds per forward on a CPU
    "nano": dict(n_frames=4, image_size=32, patch_size=8, chunk_frames=2, stab_dim=32, stab_heads=2,
                 vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                 max_seq_len=256, stab_dropout=0.0, letterbox=False),
    # the default synthetic run: 8 frames of 48x48, a 3x3 grid. No dropout: no clip is ever repeated
    "tiny": dict(n_frames=8, image_size=48, patch_size=8, chunk_frames=4, stab_dim=96, stab_heads=4,
                 vocab_size=128, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=256, stab_dropout=0.0, letterbox=False),
    "paper": dict(),  # the release: 8 frames of 448x448, STAB width 1024, a Vicuna-7B decoder
}


# ------------------------------------------------------------------ the STAB (Sec. 3.1)

def form(cfg, plain):  # the class to build: `plain`, or with cfg.fast its faster form (below)
    faster = {PatchEmbed: FastPatchEmbed, LSTE: FastLSTE, QueryAttention: FastQueryAttention}
    return faster[plain] if cfg.fast else plain


class PatchEmbed(nn.Conv2d):
    """Patch embedding (Eq. 1; the release's `patch_embedding`): each P x P patch maps linearly to C
    numbers, a Conv2d whose stride is its kernel, without bias. Channels last, as the STAB keeps its
    tokens: frames (B*T, 3, S, S) -> (B*T, p, p, C); tiny, B=1: (8, 3, 48, 48) -> (8, 6, 6, 96)."""

    def __init__(self, dim, patch):
        super().__init__(3, dim, patch, patch, bias=False)

    def forward(self, frames):
        return super().forward(frames).permute(0, 2, 3, 1)


class LSTE(nn.Module):
    """Local Spatio-Temporal Encoding (Sec. 3.1, Eq. 2-3; the release's `lmhra1` and `dpe`, after
    UniFormerV2): a bottleneck (1x1x1 conv, depthwise conv over 3 frames, 1x1x1 conv) added to its
    input (Eq. 2), then a 3x3x3 depthwise conv added in turn (Eq. 3, "DPE"); the release's BatchNorm
    is not in the paper. Chunks (B*T/k, k, p, p, C) -> the same; tiny, B=1: (2, 4, 6, 6, 96)."""

    def __init__(self, cfg):
        super().__init__()
        C, r = cfg.stab_dim, int(cfg.stab_dim // cfg.lste_reduction)
        self.norm = nn.BatchNorm3d(C)
        self.reduce = nn.Conv3d(C, r, 1)
        self.temporal = nn.Conv3d(r, r, (3, 1, 1), padding=(1, 0, 0), groups=r)
        self.expand = nn.Conv3d(r, C, 1)
        self.dpe = nn.Conv3d(C, C, 3, padding=1, groups=C)
        for param in (self.expand.weight, self.expand.bias, self.dpe.bias):
            nn.init.zeros_(param)  # the bottleneck starts as the identity; dpe's weight as inited

    def forward(self, x):
        y = x.permute(0, 4, 1, 2, 3)  # (B*T/k, C, k, p, p), Conv3d's layout; zero-padded chunk ends
        y = y + self.expand(self.temporal(self.reduce(self.norm(y))))  # Eq. 2
        y = y + self.dpe(y)  # Eq. 3
        return y.permute(0, 2, 3, 4, 1)


class QueryAttention(nn.Module):
    """One query token attends over a set of tokens (Eq. 4), plus the raw query: GSTRA's, LSD's and
    FSRA's attention (the release's LocalAttention/GlobalAttention, from EVE). q = W_q LN(query),
    [keys; values] = W_kv LN(tokens); per head softmax(q.key * scale) weights the values; heads
    concatenated, then W_o. N queries, each over L tokens of its own; tiny, B=1, (N, L): GSTRA's
    (2, 144), a chunk's patches; LSD's (72, 4), a window's; FSRA's (8, 9), a frame's cells."""

    def __init__(self, dim, heads, bias=False, full_width_scale=True):
        super().__init__()
        self.heads = heads
        self.q = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=bias))
        self.kv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim, bias=bias))  # rows: K, V
        self.proj = nn.Linear(dim, dim)
        # The release scales LSD's and FSRA's logits by C^-0.5 (from EVE), GSTRA's by d^-0.5
        self.scale = dim ** -0.5 if full_width_scale else (dim // heads) ** -0.5

    def forward(self, query, tokens, key_mask=None):  # (N, C), (N, L, C), (N, L) bool -> (N, C)
        weights, values = self.attention(query, tokens, key_mask)  # (N, heads, L), (N, heads, L, d)
        return query + self.proj((weights[..., None] * values).sum(2).flatten(1))

    def attention(self, query, tokens, key_mask=None):  # teaching/attention_pictures.py draws it
        N, L, C = tokens.shape
        q = self.q(query).view(N, self.heads, 1, -1)  # (N, heads, 1, d)
        keys, values = self.kv(tokens).view(N, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * keys).sum(-1) * self.scale  # (N, heads, L)
        if key_mask is not None:  # FSRA's letterbox (real videos only): no weight outside the box
            logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
        return logits.float().softmax(-1).to(q.dtype), values


class QuickGELU(nn.Module):  # CLIP's and UniFormerV2's GELU approximation, which GSTRA's MLP uses
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class GSTRA(nn.Module):
    """Global Spatio-Temporal Relationship Aggregator (Sec. 3.1, Eq. 11-13; the release's `dec`, a
    UniFormerV2 decoder block): a learned query attends over a chunk's k*p*p tokens, then an MLP:
    one token per chunk of k frames, shared by its frames (the paper speaks of one per video).
    (B*T/k, k*p*p, C) -> (B*T/k, C); tiny, B=1: (2, 144, 96) -> (2, 96)."""

    def __init__(self, cfg):
        super().__init__()
        C, hidden = cfg.stab_dim, cfg.gstra_mlp_ratio * cfg.stab_dim
        self.query = nn.Parameter(torch.zeros(C))  # `temporal_cls_token`
        self.attn = form(cfg, QueryAttention)(C, cfg.stab_heads, bias=True, full_width_scale=False)
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), QuickGELU(), nn.Dropout(cfg.stab_dropout),
                                 nn.Linear(hidden, C))
        bound = math.sqrt(6 / (4 * C))  # xavier_uniform over the release's packed (3C, C) q/k/v
        for linear in (self.attn.q[1], self.attn.kv[1]):
            nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(linear.bias)
        for param in [*self.attn.proj.parameters(), *self.mlp[-1].parameters()]:  # chunk token 0
            nn.init.zeros_(param)

    def forward(self, tokens):  # all of LSTE's output; letterbox padding unmasked, as released
        x = self.attn(self.query.expand(tokens.shape[0], -1), tokens)
        return x + self.mlp(self.norm(x))


class LSD(nn.Module):
    """Local Spatial Downsampling (Sec. 3.1, Eq. 4-7; the release's `local_attention`): each s x s
    window of patch tokens becomes one token by attention over the window. The paper's query is a
    learned W_ij (Eq. 5); the release queries with the window's average and adds that average back.
    (B*T, p, p, C) -> (B*T, g, g, C); tiny, B=1: (8, 6, 6, 96) -> (8, 3, 3, 96)."""

    def __init__(self, cfg):
        super().__init__()
        self.s, C = cfg.lsd_window, cfg.stab_dim
        self.attn = form(cfg, QueryAttention)(C, cfg.stab_heads) if cfg.lsd == "attention" else None

    def forward(self, x):  # frames of any multiple of s a side, not only p
        s, C = self.s, x.shape[-1]
        rows, cols = x.shape[1] // s, x.shape[2] // s  # g x g windows in the STAB
        windows = x.reshape(-1, rows, s, cols, s, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, C)
        mean = windows.mean(1)  # (B*T*g*g, C); with lsd="avgpool" (Table 4's "w/o LSD") the output
        return (mean if self.attn is None else self.attn(mean, windows)).view(-1, rows, cols, C)


class FSRA(nn.Module):
    """Frame-wise Spatial Relationship Aggregator (Sec. 3.1, Eq. 8-10; the release's
    `global_attention`): a learned query attends over a frame's grid tokens, one token a frame. The
    paper has a query per frame position (W_t, Eq. 8); the release shares one, `class_embedding`.
    (B*T, g*g, C) -> (B*T, C); tiny, B=1: (8, 9, 96) -> (8, 96)."""

    def __init__(self, cfg):
        super().__init__()
        self.query = nn.Parameter(torch.randn(cfg.stab_dim))
        self.attn = form(cfg, QueryAttention)(cfg.stab_dim, cfg.stab_heads)

    def forward(self, tokens, valid=None):  # valid (B*T, g*g) bool: the letterbox's cells, or None
        return self.attn(self.query.expand(tokens.shape[0], -1), tokens, valid)


class STAB(nn.Module):
    """Spatio-Temporal Alignment Block (Sec. 3.1, Fig. 3; the release's `VideoTokenizer`): frames
    -> visual tokens: a frame's fused token, then g rows of g grid tokens, each + a split token."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, C = cfg, cfg.stab_dim
        self.patch_embed = form(cfg, PatchEmbed)(C, cfg.patch_size)
        # Ablations (cfg.lste, gstra, fsra, split_tokens) leave their modules None: no parameters.
        self.lste = form(cfg, LSTE)(cfg) if cfg.lste else None
        self.gstra = GSTRA(cfg) if cfg.gstra else None
        self.lsd = LSD(cfg)
        self.fsra = FSRA(cfg) if cfg.fsra else None
        self.balance = nn.Parameter(torch.zeros(C)) if cfg.gstra and cfg.fsra else None  # 1/2 each
        self.fuse = nn.Sequential(nn.LayerNorm(C), nn.Dropout(cfg.stab_dropout), nn.Linear(C, C))
        self.split_token = nn.Parameter(torch.randn(C)) if cfg.split_tokens else None

    def forward(self, video):
        """video (B, T, 3, S, S) -> tokens (B, T*(1 + g*(g+1)), C), lengths (B,); tiny, B=1:
        (1, 8, 3, 48, 48) -> (1, 104, 96), [104]. A real video's 4th channel, its letterbox, takes
        the lines marked "letterbox" (real_video/letterbox_tokens.py)."""
        cfg, C, k = self.cfg, self.cfg.stab_dim, self.cfg.chunk_frames
        B, T = video.shape[:2]
        patches = self.patch_embed(video[:, :, :3].flatten(0, 1))  # (B*T, p, p, C)
        p = patches.shape[1]
        # LSTE and GSTRA see chunks of k frames. Channels last: in the fast forms reshapes are views
        chunks = patches.reshape(B * T // k, k, p, p, C)  # tiny: (8, 6, 6, 96) -> (2, 4, 6, 6, 96)
        local = self.lste(chunks) if cfg.lste else chunks
        if cfg.gstra:  # one token per chunk, (B*T/k, C); tiny: (2, 96)
            chunk_token = self.gstra(local.reshape(B * T // k, k * p * p, C))
        # The release adds the raw patch embeddings once more (LSTE's residual already holds them):
        # the identity path is doubled, which the paper's equations do not show. Without LSTE: once.
        grid = self.lsd(((local + chunks) if cfg.lste else chunks).reshape(B * T, p, p, C))
        g = grid.shape[1]  # grid (B*T, g, g, C); tiny: (8, 3, 3, 96)
        # letterbox, real videos only: the cells inside the box, (B, g, g) bool; None: every cell
        valid = letterbox_tokens.valid_cells(video, g) if video.shape[2] == 4 else None
        if cfg.fsra:  # one token per frame, (B*T, C); tiny: (8, 96)
            frame_valid = None if valid is None else valid.repeat_interleave(T, 0).flatten(1)
            frame_token = self.fsra(grid.flatten(1, 2), frame_valid)
        if cfg.gstra:  # each frame its chunk's token (B*T, C): k copies; 1 for a per-frame GSTRA
            chunk_token = chunk_token.repeat_interleave(B * T // len(chunk_token), 0)
        if cfg.gstra and cfg.fsra:  # Eq. 14: a learned per-channel mix, then the shared projection
            alpha = torch.sigmoid(self.balance)
            fused = self.fuse((1 - alpha) * chunk_token + alpha * frame_token)  # (B*T, C)
        else:  # the ablations "w/o FSRA" and "w/o GSTRA": the one context left
            fused = self.fuse(chunk_token if cfg.gstra else frame_token)
        rows = grid  # with split tokens closing the rows (Eq. 15): (B*T, g, g+1, C)
        if cfg.split_tokens:
            rows = torch.cat([grid, self.split_token.expand(B * T, g, 1, C)], 2)
        tokens = torch.cat([fused[:, None], rows.flatten(1, 2)], 1).view(B, -1, C)  # Eq. 16
        if valid is not None:  # letterbox: drop the tokens of cells outside the box, pack left
            return letterbox_tokens.pack(tokens, valid, cfg.split_tokens)
        return tokens, torch.full((B,), tokens.shape[1], device=video.device)


# ------------------------------------------------------------------ the decoder: a Llama-family LLM

class RMSNorm(nn.Module):  # x / rms(x) * weight, in fp32 as Llama does
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_inv_freq(cfg, device=None):
    """Rotary frequencies (d/2,) in fp32; rope_factor > 1 rescales the low ones as Llama 3 does.
    Computed at every forward, on the device, never stored: .to(bf16) would round a stored copy."""
    d, original = cfg.dim_per_head, cfg.rope_original_max_len
    exponents = torch.arange(0, d, 2, dtype=torch.float32, device=device) / d
    inv_freq = 1.0 / cfg.rope_theta ** exponents
    if cfg.rope_factor == 1.0:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    smooth = (original / wavelen - low) / (high - low)  # 0 at original / low, 1 at original / high
    blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq  # from scaled to kept
    scaled = torch.where(wavelen > original / low, inv_freq / cfg.rope_factor, inv_freq)
    return torch.where((wavelen >= original / high) & (wavelen <= original / low), blended, scaled)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class KVCache:
    """The keys and values so far, for generation: per layer a buffer (B, n_kv_heads, n_slots, d)
    of zeros (masked, never NaN), written in place at new slots; fixed shapes: one CUDA graph."""

    def __init__(self, cfg, batch, n_slots, dtype, device):
        shape, self.n_slots = (batch, cfg.n_kv_heads, n_slots, cfg.dim_per_head), n_slots
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    def update(self, layer, slots, keys, values):  # as gpt-fast's KVCache.update
        """Write a layer's new keys and values (B, n_kv_heads, L, d) at slots (L,); returns its
        whole buffers, (B, n_kv_heads, n_slots, d) each: what decoding attends over."""
        self.keys[layer].index_copy_(2, slots, keys)
        self.values[layer].index_copy_(2, slots, values)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    """Self-attention, rotary embeddings, grouped-query heads; two modes. Training and the prefill:
    causal over these L positions. Decoding (`visible` given): the whole cache, under a mask."""

    def __init__(self, cfg, layer):
        super().__init__()
        D, d = cfg.d_model, cfg.dim_per_head
        self.n_heads, self.n_kv_heads, self.d = cfg.n_heads, cfg.n_kv_heads, d
        self.layer = layer  # its index among the decoder's blocks: its buffers in a KVCache
        self.q_proj = nn.Linear(D, cfg.n_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * d, D, bias=False)

    def forward(self, x, cos, sin, cache=None, slots=None, visible=None):
        """x (B, L, D), cos and sin (B or 1, L, d) -> (B, L, D). cache: a KVCache, which takes the
        keys and values at slots (L,); visible (B, n_slots) bool, decoding: each row's own slots."""
        B, L, _ = x.shape
        q, keys, values = (part.view(B, L, -1, self.d).transpose(1, 2) for part in self.project(x))
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # (B or 1, 1, L, d)
        q, keys = q * cos + rotate_half(q) * sin, keys * cos + rotate_half(keys) * sin
        if cache is not None:
            cached = cache.update(self.layer, slots, keys, values)
        gqa = self.n_kv_heads != self.n_heads
        if visible is None:  # training, the prefill: causal over these L positions (not the cache)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:  # decoding: every slot of the cache, the mask hiding padding and unwritten slots
            out = F.scaled_dot_product_attention(q, *cached, attn_mask=visible[:, None, None],
                                                 enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # out: (B, heads, L, d)

    def project(self, x):  # q, keys, values (B, L, heads * d); fast_inference.py fuses the three
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, slots=None, visible=None):  # as Attention takes them
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """A Llama-family decoder (Llama 2/3, Vicuna, Mistral, Qwen2, SmolLM): the parameter names are
    Hugging Face's, so that checkpoints map one to one."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for m in self.modules():  # Llama's init: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, positions, cache=None, slots=None, visible=None, return_hidden=False):
        """x (B, L, D) at positions (B or 1, L) -> the final hidden states (B, L, D); cache, slots,
        visible as Attention takes them. return_hidden: also the n_layers + 1 hidden states as
        Hugging Face counts them: [0] the input, [i] block i's output, [-1] the final norm's."""
        angles = positions[..., None].float() * rope_inv_freq(self.cfg, x.device)  # B or 1, L, d/2
        angles = torch.cat([angles, angles], -1)  # rotate-half's layout: both halves alike
        cos, sin = angles.cos(), angles.sin()
        hidden = [x]
        for block in self.layers:
            if self.cfg.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, slots, visible)
            if return_hidden:  # otherwise each block's output is freed once the next one has run
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden[:-1] + [x]) if return_hidden else x


# ------------------------------------------------------------- VideoPanda: STAB, projector, decoder

class VideoPanda(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.stab = STAB(cfg)
        # Eq. 17, the release's mlp2x_gelu: every visual token, fused and split tokens included
        self.projector = nn.Sequential(nn.Linear(cfg.stab_dim, cfg.d_model), nn.GELU(),
                                       nn.Linear(cfg.d_model, cfg.d_model))
        self.decoder = Decoder(cfg)

    def num_params(self):  # per part; a tied lm_head is the embedding, counted once
        count = lambda module: sum(param.numel() for param in module.parameters())
        return {part: count(getattr(self, part)) for part in ("stab", "projector", "decoder")}

    def encode_videos(self, videos):  # (B, T, 3 or 4, S, S) -> (B, L_vis, D), lengths (B,)
        k, block = self.cfg.chunk_frames, self.cfg.patch_size * self.cfg.lsd_window
        shape = tuple(videos.shape)
        if len(shape) != 5 or shape[2] not in (3, 4) or shape[1] % k or shape[3] % block or \
                shape[3] != shape[4]:
            raise ValueError(f"videos must be (batch, frames, 3 or 4 channels, side, side): square "
                             f"frames, frames a multiple of chunk_frames={k}, side of "
                             f"patch_size*lsd_window={block}; got {shape}")
        tokens, lengths = self.stab(videos.to(self.projector[0].weight.dtype))
        return self.projector(tokens), lengths

    def embed_inputs(self, videos, input_ids, labels=None, lengths=None):
        """Splice each video's visual tokens in place of the VIDEO_PLACEHOLDER of its prompt:
        input_ids and labels (B, L_text), right-padded to lengths (B,) (None: all) -> embeddings
        (B, L, D), L = L_text - 1 + L_vis, zero-padded; labels (B, L) or None; lengths (B,)."""
        (B, L_text), dev = input_ids.shape, input_ids.device
        lengths = torch.full((B,), L_text, device=dev) if lengths is None else lengths.to(dev)
        is_video = input_ids == VIDEO_PLACEHOLDER
        is_video &= torch.arange(L_text, device=dev) < lengths[:, None]
        if not (is_video.sum(1) == 1).all():
            raise ValueError(f"every prompt needs exactly one <video> placeholder "
                             f"({VIDEO_PLACEHOLDER}); found {is_video.sum(1).tolist()} per row")
        vis, n_vis = self.encode_videos(videos)  # (B, L_vis, D); (B,), below L_vis if letterboxed
        L, out_len = L_text - 1 + vis.shape[1], lengths - 1 + n_vis  # L from shapes: no GPU sync
        if L > self.cfg.max_seq_len:
            raise ValueError(f"{L} positions (text and video) exceed the decoder's context, "
                             f"max_seq_len={self.cfg.max_seq_len}: shorten the prompt or the video")
        # Worked example: the prompt [a, b, <video>, c] and the visual tokens [v0, v1, v2] become
        # [a, b, v0, v1, v2, c] (L_text = 4, n_vis = 3, L = 6, the placeholder at = 2):
        #   output position j  0 1 2 3 4 5
        #   in_video           . . x x x .   at <= j < at + n_vis: take vis_pos's visual token
        #   text_pos           0 1 0 1 2 3   else text_pos's: j before the video, j-n_vis+1 after
        #   vis_pos            0 0 0 1 2 2   j - at, here -2 -1 0 1 2 3, clamped to 0..L_vis-1
        # The clamps: gather reads both indices, the one not taken too, so both must be in range
        # (text_pos leaves 0..L_text-1 in long videos and on rows with fewer visual tokens).
        at = is_video.int().argmax(1)[:, None]  # (B, 1)
        j = torch.arange(L, device=dev)[None]  # (1, L)
        in_video = (j >= at) & (j < at + n_vis[:, None])  # (B, L)
        text_pos = torch.where(j < at, j, j - n_vis[:, None] + 1).clamp(0, L_text - 1)  # (B, L)
        vis_pos = (j - at).clamp(0, vis.shape[1] - 1)  # (B, L)
        # The placeholder's id is negative, no token's: 0 stands in, its embedding is never taken
        text = self.decoder.embed_tokens(input_ids.clamp(min=0)).to(vis.dtype)  # (B, L_text, D)
        take = lambda embeds, pos: embeds.gather(1, pos[..., None].expand(-1, -1, embeds.shape[-1]))
        real = j < out_len[:, None]  # (B, L): False on a row's right padding, which becomes zeros
        x = torch.where(in_video[..., None], take(vis, vis_pos), take(text, text_pos))
        x = x * real[..., None]  # (B, L, D)
        if labels is not None:  # no loss on the video or the padding
            labels = torch.where(in_video | ~real, IGNORE_INDEX, labels.to(dev).gather(1, text_pos))
        return x, labels, out_len

    def forward(self, videos, input_ids, labels=None, lengths=None, reduction="mean",
                return_hidden=False):
        """Without labels: logits (B, L, V). With labels aligned to input_ids (IGNORE_INDEX but on
        answers): the next-token loss (Eq. 20), the mean over supervised tokens or, reduction="sum",
        their sum. return_hidden: (that, the hidden states as Decoder.forward returns them)."""
        x, labels, _ = self.embed_inputs(videos, input_ids, labels, lengths)
        # Right padding: the causal mask alone is exact for every real position.
        positions = torch.arange(x.shape[1], device=x.device)[None]
        states = self.decoder(x, positions, return_hidden=return_hidden)
        states, hidden = states if return_hidden else (states, None)
        if labels is None:
            out = self.decoder.lm_head(states)
        else:
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX  # only these need the (large) vocabulary head
            logits = self.decoder.lm_head(states[:, :-1][supervised])
            out = F.cross_entropy(logits.float(), targets[supervised], reduction=reduction)
        return (out, hidden) if return_hidden else out

    @torch.no_grad()
    def generate(self, videos, input_ids, lengths=None, max_new_tokens=32, temperature=0.0,
                 top_k=None, eos_id=None, generator=None, cache=None):
        """stream()'s tokens, (B, n); eos_id after a row has finished."""
        steps = list(self.stream(videos, input_ids, lengths, max_new_tokens, temperature, top_k,
                                 eos_id, generator, cache))
        return torch.stack(steps, 1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    @torch.no_grad()
    def stream(self, videos, input_ids, lengths=None, max_new_tokens=32, temperature=0.0,
               top_k=None, eos_id=None, generator=None, cache=None):
        """Yield the next token of every row (B,): the video and the prompt go through the decoder
        once (the prefill) into the KV cache (a new one, or `cache`); then one position a token."""
        x, _, seq_len = self.embed_inputs(videos, input_ids, lengths=lengths)  # (B, L, D), (B,)
        B, L, _ = x.shape
        n_slots = L + max_new_tokens if cache is None else cache.n_slots  # checked before made
        if L + max_new_tokens > min(self.cfg.max_seq_len, n_slots):
            raise ValueError(f"a prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"the context, max_seq_len={self.cfg.max_seq_len}, or the KV cache's "
                             f"{n_slots} slots")
        cache = KVCache(self.cfg, B, n_slots, x.dtype, x.device) if cache is None else cache
        logits = self.prefill(x, seq_len, cache)
        # Right padding: row b's prompt fills slots 0 .. seq_len[b] - 1, and every row's new tokens
        # go to slots L, L + 1, ...; `visible` hides the gap. Positions go on from seq_len[b].
        slot = torch.arange(n_slots, device=x.device)
        visible = slot[None] < seq_len[:, None]  # (B, n_slots)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        for step in range(max_new_tokens):
            token = sample_token(logits, temperature, top_k, generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            yield token
            # done.all() waits for the GPU: without an eos_id it is skipped, the next step queued
            if step == max_new_tokens - 1 or eos_id is not None and done.all():
                return
            visible[:, L + step] = True  # the new token's slot
            logits = self.decode_step(token, seq_len + step, visible, cache, slot[L + step, None])

    def prefill(self, x, seq_len, cache):  # prompts (B, L, D) -> next-token logits (B, V)
        positions = torch.arange(x.shape[1], device=x.device)  # slot i holds position i
        states = self.decoder(x, positions[None], cache, positions)  # (B, L, D)
        return self.decoder.lm_head(states[torch.arange(len(x), device=x.device), seq_len - 1])

    def decode_step(self, token, positions, visible, cache, slots):
        """New tokens (B,) at positions (B,), into the cache at slots (1,) -> next-token logits
        (B, V); the same shapes every step, for one CUDA graph (gpu_speed/fast_inference.py)."""
        x = self.decoder.embed_tokens(token[:, None]).to(cache.keys[0].dtype)  # (B, 1, D)
        states = self.decoder(x, positions[:, None], cache, slots, visible)  # (B, 1, D)
        return self.decoder.lm_head(states[:, -1])


def sample_token(logits, temperature=0.0, top_k=None, generator=None):
    """Greedy at temperature 0; else a sample of softmax(logits / temperature) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]


# ------------------------------------------------------------------ faster forms of the same maths
# form() builds each in its parent's place: the same function of the same parameters, faster.

class FastPatchEmbed(PatchEmbed):
    """Patches do not overlap: the conv is one matmul of the flattened patches with the weight."""

    def forward(self, frames):  # (B*T, 3, S, S) -> (B*T, p, p, C)
        P, p = self.kernel_size[0], frames.shape[-1] // self.kernel_size[0]
        patches = frames.reshape(-1, 3, p, P, p, P).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(-1, p * p, 3 * P * P)  # (B*T, p*p, 3*P*P): a row per patch
        return (patches @ self.weight.flatten(1).T).unflatten(1, (p, p))


class FastLSTE(LSTE):
    """The same convs on channels-last tokens, never transposed: a 1x1x1 conv is a Linear over
    channels, the temporal conv is 3 shifted products, the 3x3x3 conv three 3x3 depthwise convs."""

    def forward(self, x):  # (B*T/k, k, p, p, C) -> the same
        y = self.norm(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # BatchNorm3d: channels 1st
        y = F.linear(y, self.reduce.weight.flatten(1), self.reduce.bias)  # (B*T/k, k, p, p, r)
        padded = F.pad(y, (0, 0, 0, 0, 0, 0, 1, 1))  # (B*T/k, k + 2, p, p, r): zero frames at ends
        weight = self.temporal.weight.view(-1, 3)  # (r, 3): a weight per channel and time tap
        y = sum(weight[:, tap] * padded[:, tap:tap + x.shape[1]] for tap in range(3))
        x = x + F.linear(y + self.temporal.bias, self.expand.weight.flatten(1), self.expand.bias)
        return x + self.dpe_as_2d_convs(x)

    def dpe_as_2d_convs(self, x):  # (B*T/k, k, p, p, C) -> the same
        """The 3x3x3 depthwise conv as three 3x3 depthwise 2D convs z_0, z_1, z_2, one per time
        tap, over all frames, shifted in time and summed: y[i] = z_0[i-1] + z_1[i] + z_2[i+1]
        (zero-padded). cuDNN's 2D depthwise kernels are fast on channels-last frames, its 3D not."""
        k, C = x.shape[1], x.shape[-1]
        frames = x.flatten(0, 1).permute(0, 3, 1, 2)  # (B*T, C, p, p), channels-last strides
        z = [F.conv2d(frames, self.dpe.weight[:, :, tap], padding=1, groups=C).permute(0, 2, 3, 1)
             .reshape(x.shape) for tap in range(3)]
        earlier = F.pad(z[0], (0, 0, 0, 0, 0, 0, 1, 0))[:, :k]  # frame i gets z_0 of frame i-1
        later = F.pad(z[2], (0, 0, 0, 0, 0, 0, 0, 1))[:, 1:]   # and z_2 of frame i+1
        return earlier + z[1] + later + self.dpe.bias


class FastQueryAttention(QueryAttention):
    """The same attention without a key and a value for every token. Per head, q.(W_k x + b_k) =
    (W_k^T q).x + q.b_k, where q.b_k is the same for every token and cancels in the softmax; and
    sum_l a_l (W_v x_l + b_v) = W_v (sum_l a_l x_l) + b_v as the a_l sum to 1. So map the query back
    to token space, attend over the normalised tokens themselves, and project one pooled token per
    head: 2C^2 multiply-adds per query instead of 2LC^2 (GSTRA: L = k*p*p)."""

    def forward(self, query, tokens, key_mask=None):  # (N, C), (N, L, C), (N, L) bool -> (N, C)
        N, L, C = tokens.shape
        if L <= self.heads:  # LSD's s*s = 4-token windows: the plain form. Twice (N, heads, C) is
            # no less than the keys and values saved, (N, L, 2C): it pays at GSTRA's and FSRA's L
            return super().forward(query, tokens, key_mask)
        return query + self.proj(self.pooled_attention(query, tokens, key_mask).reshape(N, C))

    def pooled_attention(self, query, tokens, key_mask):  # -> (N, heads, d)
        N, L, C = tokens.shape
        x = self.kv[0](tokens)  # (N, L, C): the normalised tokens
        w_k, w_v = self.kv[1].weight.view(2, self.heads, C // self.heads, C)  # (heads, d, C) each
        q = self.q(query).view(N, self.heads, -1)  # (N, heads, d)
        # einsum, not q @ w_k: broadcasting the weights over N would copy them N times
        q_tokens = torch.einsum("nhd,hdc->nhc", q, w_k)  # (N, heads, C): W_k^T q, per head
        logits = q_tokens @ x.transpose(1, 2) * self.scale  # (N, heads, L)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
        pooled = logits.float().softmax(-1).to(x.dtype) @ x  # (N, heads, C): one token per head
        out = torch.einsum("nhc,hdc->nhd", pooled, w_v)
        return out if self.kv[1].bias is None else out + self.kv[1].bias.view(2, self.heads, -1)[1]
