"""Video-Panda (Yi et al., CVPR 2025, arXiv 2412.18609) in one file, an *encoder-free* video-language model:
raw frames go through a ~24M-parameter Spatio-Temporal Alignment Block (STAB) and a ~21M-parameter projector
straight into a Llama-family LLM, with no pretrained image encoder. Read top to bottom, the order in which
a video flows (the paper's Sec. 3.1, Fig. 3):

  PatchEmbed      frames -> patch tokens                                         Eq. 1
  LSTE            local spatio-temporal convolutions on chunks of k frames      Eq. 2-3
  GSTRA           one query attends over a whole chunk: one token per chunk     Eq. 11-13
  LSD             each s x s window of patches becomes one token by attention   Eq. 4-7
  FSRA            one query attends over a frame's grid: one token per frame    Eq. 8-10
  STAB            fuses the chunk and frame tokens, lays out rows + split tokens Eq. 14-16
  projector       every visual token to the decoder's width                     Eq. 17
  Decoder         Llama: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache
  VideoPanda      splice, next-token loss (Eq. 20), generate

Where the official release differs from the paper's equations, the code follows the release (so that
its weights give its outputs) and a comment says how the paper writes it. Each module's plain form, the
maths as written, comes first; a faster form of the same function sits beside it behind one switch,
PandaConfig.fast, with a line on why the two are equal (tests/test_fast_path.py proves it).

Shapes: B videos, T frames a video, k frames a chunk, S canvas side, P patch side, p = S/P patches a side,
s LSD window side, g = p/s grid cells a side, C STAB width, D decoder width, L tokens, V vocabulary.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VIDEO_PLACEHOLDER = -200  # the id that stands for "<video>" in input_ids (the release's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100       # the label of positions that carry no loss


@dataclass
class PandaConfig:
    # --- video input ---
    n_frames: int = 8          # T: frames sampled per video, a multiple of chunk_frames
    image_size: int = 448      # S: the square canvas frames are letterboxed onto
    patch_size: int = 14       # P: patch embedding kernel = stride
    lsd_window: int = 2        # s: LSD merges s x s patches into one token
    chunk_frames: int = 4      # k: LSTE and GSTRA see chunks of this many frames (the release's 4)
    letterbox: bool = True     # frames keep their aspect ratio on the canvas, with a 4th mask channel
    # --- STAB ---
    stab_dim: int = 1024       # C: the width of every STAB token
    stab_heads: int = 8        # heads of LSD, FSRA and GSTRA attention
    lste_reduction: float = 1.5  # LSTE bottleneck = int(C // reduction) channels
    gstra_mlp_ratio: int = 4   # GSTRA's MLP hidden width = ratio * C
    stab_dropout: float = 0.5  # dropout in GSTRA's MLP and the fusion projection (the release's 0.5)
    fast: bool = True          # the fast forms of the same maths; False runs every module's plain form
    # --- decoder (Llama family; the fields of Hugging Face's LlamaConfig) ---
    vocab_size: int = 32000    # V
    d_model: int = 4096        # D: decoder width; the projector maps C -> D
    n_layers: int = 32         # decoder blocks
    n_heads: int = 32          # query heads
    n_kv_heads: int = 32       # key/value heads; fewer than n_heads: grouped-query attention
    head_dim: int = 0          # 0 means D // n_heads (Qwen2 and Mistral may set it)
    ffn_dim: int = 11008       # SwiGLU hidden width
    rms_eps: float = 1e-5      # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    rope_factor: float = 1.0   # llama3-style rope scaling; 1.0 means none
    rope_low_freq_factor: float = 1.0  # llama3 rope scaling: wavelengths above original / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3 rope scaling: wavelengths below original / this are kept
    rope_original_max_len: int = 8192  # llama3 rope scaling: the context the model was trained with
    max_seq_len: int = 4096    # context: visual tokens + text + generated tokens
    qkv_bias: bool = False     # Qwen2 has biases on the q/k/v projections
    tie_embeddings: bool = False  # lm_head shares the token embedding (small models)
    grad_checkpoint: bool = False  # recompute decoder blocks in backward to save memory
    # --- the paper's Table 4 ablations; the defaults are the full model; a module switched off is not built
    split_tokens: bool = True  # False: rows are not closed by a split token
    fsra: bool = True          # False: the fused token is fuse(chunk token) alone
    lsd: str = "attention"     # "avgpool": each window's plain average replaces LSD's attention
    lste: bool = True          # False: patch embeddings go unchanged to GSTRA and LSD (and are added once)
    gstra: bool = True         # False: the fused token is fuse(frame token) alone

    def __post_init__(self):
        zero_ok = ("n_layers", "head_dim", "stab_dropout")  # a STAB alone; d_model // n_heads; no dropout
        for name, value in vars(self).items():  # sizes and rates first: the rules below divide by them
            if type(value) in (int, float) and not (0 < value < math.inf or value == 0 and name in zero_ok):
                raise ValueError(f"--{name} must be {'zero or more' if name in zero_ok else 'positive'}, got {value}")
        for wrong, why in [
                (self.lsd not in ("attention", "avgpool"), f"--lsd must be 'attention' or 'avgpool', got {self.lsd!r}"),
                (not (self.fsra or self.gstra), "fsra=False and gstra=False leave the fused token no context"),
                (self.stab_dropout >= 1, f"--stab_dropout must be below 1, got {self.stab_dropout}"),
                (self.stab_dim < self.lste_reduction, "--lste_reduction above --stab_dim leaves LSTE no channel"),
                (self.rope_factor != 1 and self.rope_high_freq_factor <= self.rope_low_freq_factor,
                 "--rope_high_freq_factor must be above --rope_low_freq_factor: rope scaling blends between them"),
                (self.dim_per_head % 2, f"--head_dim (or --d_model // --n_heads) of {self.dim_per_head}: rotary "
                                        f"embeddings turn pairs of channels, so it must be even"),
                (self.n_frames % self.chunk_frames, f"--n_frames={self.n_frames} must be a multiple of chunk_frames"),
                (self.stab_dim % self.stab_heads, f"--stab_dim={self.stab_dim} must be a multiple of stab_heads"),
                (self.n_heads % self.n_kv_heads, f"--n_heads={self.n_heads} must be a multiple of n_kv_heads"),
                (self.image_size % (self.patch_size * self.lsd_window),
                 f"--image_size={self.image_size} must be a multiple of patch_size*lsd_window")]:
            if wrong:
                raise ValueError(why)

    @property
    def dim_per_head(self):
        return self.head_dim or self.d_model // self.n_heads

    @property
    def grid(self):  # g: cells per side of a full frame's LSD grid
        return self.image_size // (self.patch_size * self.lsd_window)

    @property
    def tokens_per_frame(self):  # a full (not letterboxed) frame: fused token + g rows of g cells (and a split)
        return 1 + self.grid * (self.grid + self.split_tokens)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)


PRESETS = {
    # unit tests: about 55 thousand parameters, milliseconds per forward on a CPU
    "nano": dict(n_frames=4, image_size=32, patch_size=8, chunk_frames=2, stab_dim=32, stab_heads=2, vocab_size=64,
                 d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256, stab_dropout=0.0,
                 letterbox=False),
    # the default synthetic run: 8 frames of 48x48, a 3x3 grid. No dropout: the stream never repeats a clip
    "tiny": dict(n_frames=8, image_size=48, patch_size=8, chunk_frames=4, stab_dim=96, stab_heads=4,
                 vocab_size=128, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=256, stab_dropout=0.0, letterbox=False),
    "paper": dict(),  # the release: 8 frames of 448x448, STAB width 1024, a Vicuna-7B-shaped decoder
}


# ------------------------------------------------------------------ the STAB (Sec. 3.1)

class PatchEmbed(nn.Conv2d):
    """Patch embedding (Eq. 1; the release's `patch_embedding`): every P x P patch of a frame is mapped
    linearly to C numbers, a Conv2d whose stride is its kernel, without bias."""

    def __init__(self, dim, patch, fast=True):
        super().__init__(3, dim, patch, patch, bias=False)
        self.fast = fast

    def forward(self, frames):  # (N, 3, S, S) -> (N, p, p, C), channels last as the STAB keeps its tokens
        if not self.fast:
            return super().forward(frames).permute(0, 2, 3, 1)
        # Fast: patches do not overlap, so it is one matmul of the flattened patches with the (C, 3*P*P) weight
        N, c, S, _ = frames.shape
        P, p = self.kernel_size[0], S // self.kernel_size[0]
        patches = frames.reshape(N, c, p, P, p, P).permute(0, 2, 4, 1, 3, 5).reshape(N, p * p, c * P * P)
        return (patches @ self.weight.flatten(1).T).view(N, p, p, -1)


class LSTE(nn.Module):
    """Local Spatio-Temporal Encoding (Sec. 3.1, Eq. 2-3; the release's `lmhra1` and `dpe`, after UniFormerV2):
    a bottleneck (1x1x1 conv, depthwise conv over 3 frames, 1x1x1 conv) added to its input (Eq. 2), then a
    3x3x3 depthwise conv added in turn (Eq. 3, "DPE"). Linear; the release's BatchNorm is not in the paper."""

    def __init__(self, cfg):
        super().__init__()
        C, r = cfg.stab_dim, int(cfg.stab_dim // cfg.lste_reduction)
        self.fast = cfg.fast
        self.norm = nn.BatchNorm3d(C)
        self.reduce = nn.Conv3d(C, r, 1)
        self.temporal = nn.Conv3d(r, r, (3, 1, 1), padding=(1, 0, 0), groups=r)
        self.expand = nn.Conv3d(r, C, 1)
        self.dpe = nn.Conv3d(C, C, 3, padding=1, groups=C)
        for p in (self.expand.weight, self.expand.bias, self.dpe.bias):
            nn.init.zeros_(p)  # the bottleneck starts as the identity; dpe's weight keeps its default init

    def forward(self, x):  # (N, k, p, p, C) -> the same: N chunks of k frames, channels last
        if self.fast:
            return self.forward_fast(x)
        y = x.permute(0, 4, 1, 2, 3)  # (N, C, k, p, p): the Conv3d layout. Convs zero-pad at chunk ends
        y = y + self.expand(self.temporal(self.reduce(self.norm(y))))  # Eq. 2
        y = y + self.dpe(y)  # Eq. 3
        return y.permute(0, 2, 3, 4, 1)

    def forward_fast(self, x):
        """The same convs on channels-last tokens, never transposed: a 1x1x1 conv is a Linear over
        channels, the temporal conv is 3 shifted products, the 3x3x3 conv three 3x3 depthwise convs."""
        y = self.norm(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # BatchNorm3d on a channels-first view
        y = F.linear(y, self.reduce.weight.flatten(1), self.reduce.bias)  # (N, k, p, p, r)
        padded = F.pad(y, (0, 0, 0, 0, 0, 0, 1, 1))  # (N, k + 2, p, p, r): zero frames at both ends
        w = self.temporal.weight.view(-1, 3)  # (r, 3): a weight per channel and time tap
        y = sum(w[:, t] * padded[:, t:t + x.shape[1]] for t in range(3)) + self.temporal.bias
        x = x + F.linear(y, self.expand.weight.flatten(1), self.expand.bias)
        return x + self.dpe_fast(x)

    def dpe_fast(self, x):  # (N, k, p, p, C) -> the same
        """The 3x3x3 depthwise conv as three 3x3 depthwise 2D convs z_t, one per time tap t, each over all
        frames, summed with their shifts in time: y[f] = z_0[f-1] + z_1[f] + z_2[f+1] (zero-padded);
        cuDNN's 2D depthwise kernels are fast on channels-last frames, its 3D one is not."""
        k, C = x.shape[1], x.shape[-1]
        frames = x.flatten(0, 1).permute(0, 3, 1, 2)  # (N*k, C, p, p), channels-last strides
        z = [F.conv2d(frames, self.dpe.weight[:, :, t], padding=1, groups=C).permute(0, 2, 3, 1).reshape(x.shape)
             for t in range(3)]
        earlier = F.pad(z[0], (0, 0, 0, 0, 0, 0, 1, 0))[:, :k]  # frame f gets z_0 of frame f-1
        later = F.pad(z[2], (0, 0, 0, 0, 0, 0, 0, 1))[:, 1:]   # and z_2 of frame f+1
        return earlier + z[1] + later + self.dpe.bias


class QueryAttention(nn.Module):
    """One query token attends over a set of tokens (Eq. 4), plus the raw query: the cross-attention of GSTRA,
    LSD and FSRA (the release's LocalAttention/GlobalAttention, from EVE). q = W_q LN(query), [k; v] =
    W_kv LN(tokens); per head softmax(q.k * scale) weights the v's; heads concatenated, then W_o."""

    def __init__(self, dim, heads, bias=False, full_width_scale=True, fast=True):
        super().__init__()
        self.heads, self.fast = heads, fast
        self.q = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=bias))
        self.kv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim, bias=bias))  # rows: [K; V]
        self.proj = nn.Linear(dim, dim)
        # The release scales LSD's and FSRA's logits by C^-0.5 (from EVE), not the usual head_dim^-0.5; GSTRA's is usual
        self.scale = dim ** -0.5 if full_width_scale else (dim // heads) ** -0.5

    def forward(self, query, tokens, key_mask=None):  # (N, C), (N, L, C), (N, L) bool -> (N, C)
        N, L, C = tokens.shape
        if self.fast and L > self.heads:
            return query + self.proj(self.pooled(query, tokens, key_mask).reshape(N, C))
        weights, v = self.attention(query, tokens, key_mask)  # (N, heads, L), (N, heads, L, d)
        return query + self.proj((weights[..., None] * v).sum(2).reshape(N, C))

    def attention(self, query, tokens, key_mask=None):
        """The softmax weights (N, heads, L) and the values (N, heads, L, d): the plain form, which
        viz.py also calls to draw what each query looks at."""
        N, L, C = tokens.shape
        q = self.q(query).view(N, self.heads, 1, -1)  # (N, heads, 1, d)
        k, v = self.kv(tokens).view(N, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (N, heads, L, d) each
        logits = (q * k).sum(-1) * self.scale  # (N, heads, L)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
        return logits.float().softmax(-1).to(q.dtype), v

    def pooled(self, query, tokens, key_mask):  # -> (N, heads, d)
        """Fast: the same attention without a key and a value for every token. Per head,
        q.(W_k x + b_k) = (W_k^T q).x + q.b_k, where q.b_k is the same for every token and cancels in
        the softmax; and sum_l a_l (W_v x_l + b_v) = W_v (sum_l a_l x_l) + b_v as the a_l sum to 1. So
        map the query back to token space, attend over the normalised tokens themselves, and project
        one pooled token per head: 2C^2 multiply-adds per query instead of 2LC^2 (GSTRA: L = k*p*p)."""
        N, L, C = tokens.shape
        x = self.kv[0](tokens)  # (N, L, C)
        w_k, w_v = self.kv[1].weight.view(2, self.heads, C // self.heads, C)  # (heads, d, C) each
        q = self.q(query).view(N, self.heads, -1)  # (N, heads, d)
        # einsum, not q @ w_k: broadcasting the weights over N would copy them N times
        logits = torch.einsum("nhd,hdc->nhc", q, w_k) @ x.transpose(1, 2) * self.scale  # (N, heads, L)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
        pooled = logits.float().softmax(-1).to(x.dtype) @ x  # (N, heads, C)
        o = torch.einsum("nhc,hdc->nhd", pooled, w_v)
        return o if self.kv[1].bias is None else o + self.kv[1].bias.view(2, self.heads, -1)[1]


class QuickGELU(nn.Module):  # CLIP's and UniFormerV2's GELU approximation, which GSTRA's MLP uses
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class GSTRA(nn.Module):
    """Global Spatio-Temporal Relationship Aggregator (Sec. 3.1, Eq. 11-13; the release's `dec`, a
    UniFormerV2 decoder block): a learned query attends over all k*p*p tokens of a chunk, then an MLP.
    One token per chunk of k frames, shared by its frames: the paper speaks of one per video."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.stab_dim
        self.query = nn.Parameter(torch.zeros(C))  # `temporal_cls_token`
        self.attn = QueryAttention(C, cfg.stab_heads, bias=True, full_width_scale=False, fast=cfg.fast)
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, cfg.gstra_mlp_ratio * C), QuickGELU(), nn.Dropout(cfg.stab_dropout),
                                 nn.Linear(cfg.gstra_mlp_ratio * C, C))
        bound = math.sqrt(6 / (4 * C))  # xavier_uniform over the release's packed (3C, C) q/k/v matrix
        for lin in (self.attn.q[1], self.attn.kv[1]):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        for p in [*self.attn.proj.parameters(), *self.mlp[-1].parameters()]:  # the zero query: a chunk token of 0
            nn.init.zeros_(p)

    def forward(self, tokens):  # (N, k*p*p, C): the full-resolution LSTE output, padding unmasked, as released
        x = self.attn(self.query.expand(tokens.shape[0], -1), tokens)
        return x + self.mlp(self.norm(x))


class LSD(nn.Module):
    """Local Spatial Downsampling (Sec. 3.1, Eq. 4-7; the release's `local_attention`): each s x s
    window of patch tokens becomes one token by attention over the window. The paper's query is a
    learned W_ij (Eq. 5); the release queries with the window's average and adds that average back."""

    def __init__(self, cfg):
        super().__init__()
        self.s = cfg.lsd_window
        self.attn = QueryAttention(cfg.stab_dim, cfg.stab_heads, fast=cfg.fast) if cfg.lsd == "attention" else None

    def forward(self, x):  # (N, h, w, C) patches -> (N, h/s, w/s, C); the STAB's frames have h = w = p
        (N, h, w, C), s = x.shape, self.s
        windows = x.reshape(N, h // s, s, w // s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, C)
        mean = windows.mean(1)  # (N*h*w/s^2, C); with lsd="avgpool" (Table 4's "w/o LSD") the output itself
        return (mean if self.attn is None else self.attn(mean, windows)).view(N, h // s, w // s, C)


class FSRA(nn.Module):
    """Frame-wise Spatial Relationship Aggregator (Sec. 3.1, Eq. 8-10; the release's `global_attention`):
    a learned query attends over one frame's valid grid tokens: one token per frame. The paper has a
    query per frame position (W_t, Eq. 8); the release shares one, `class_embedding`, across frames."""

    def __init__(self, cfg):
        super().__init__()
        self.query = nn.Parameter(torch.randn(cfg.stab_dim))
        self.attn = QueryAttention(cfg.stab_dim, cfg.stab_heads, fast=cfg.fast)

    def forward(self, tokens, valid=None):  # (N, g*g, C), (N, g*g) bool -> (N, C)
        return self.attn(self.query.expand(tokens.shape[0], -1), tokens, valid)


class STAB(nn.Module):
    """Spatio-Temporal Alignment Block (Sec. 3.1, Fig. 3; the release's `VideoTokenizer`): frames ->
    visual tokens. Per frame: [fused context token, then g rows of g grid tokens each closed by a split token]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, C = cfg, cfg.stab_dim
        self.patch_embed = PatchEmbed(C, cfg.patch_size, cfg.fast)
        # Ablations (cfg.lste, gstra, fsra, split_tokens) leave their modules as None: no parameters.
        self.lste = LSTE(cfg) if cfg.lste else None
        self.gstra = GSTRA(cfg) if cfg.gstra else None
        self.lsd = LSD(cfg)
        self.fsra = FSRA(cfg) if cfg.fsra else None
        self.balance = nn.Parameter(torch.zeros(C)) if cfg.gstra and cfg.fsra else None  # sigmoid(0): an even mix
        self.fuse = nn.Sequential(nn.LayerNorm(C), nn.Dropout(cfg.stab_dropout), nn.Linear(C, C))  # `proj`
        self.split_token = nn.Parameter(torch.randn(C)) if cfg.split_tokens else None  # `split_embedding`

    def forward(self, video):
        """video (B, T, 3 or 4, S, S) -> tokens (B, L, C), lengths (B,). Channel 3, if there, is the letterbox
        mask (1 = real pixels), one rectangle per video; a smaller box gives fewer tokens, packed to the left."""
        cfg = self.cfg
        (B, T), k, C = video.shape[:2], cfg.chunk_frames, cfg.stab_dim
        x = self.patch_embed(video[:, :, :3].flatten(0, 1))  # (B*T, p, p, C)
        p = x.shape[1]
        # LSTE and GSTRA see chunks of k frames, the chunks folded into the batch. Tokens stay channels
        # last from the patch embedding to LSD: in the fast forms every reshape here is a view, not a copy.
        chunks = x.reshape(B * T // k, k, p, p, C)
        local = self.lste(chunks) if cfg.lste else chunks
        chunk_token = self.gstra(local.reshape(B * T // k, k * p * p, C)) if cfg.gstra else None  # (B*T/k, C)
        # The release adds the raw patch embeddings once more (LSTE's residual already holds them): the
        # identity path is doubled, which the paper's equations do not show. Without LSTE: once.
        grid = self.lsd(((local + chunks) if cfg.lste else chunks).reshape(B * T, p, p, C))  # (B*T, g, g, C)
        g = grid.shape[1]
        valid = self.valid_cells(video, g)  # (B, g, g) bool, or None when every cell is valid
        frame_valid = None if valid is None else valid.repeat_interleave(T, 0).flatten(1)
        frame_token = self.fsra(grid.flatten(1, 2), frame_valid) if cfg.fsra else None  # (B*T, C)
        if cfg.gstra:  # (B*T, C): each frame gets its chunk's token, k copies (1 if a GSTRA gives one per frame)
            chunk_token = chunk_token.repeat_interleave(B * T // len(chunk_token), 0)
        if cfg.gstra and cfg.fsra:  # Eq. 14: a learned per-channel mix, then the shared projection
            alpha = torch.sigmoid(self.balance)
            fused = self.fuse((1 - alpha) * chunk_token + alpha * frame_token)
        else:  # the ablations "w/o FSRA" and "w/o GSTRA": the one context left
            fused = self.fuse(chunk_token if cfg.gstra else frame_token)
        n = int(cfg.split_tokens)  # split tokens per row, 1 or 0 (Eq. 15); the fused token goes first (Eq. 16)
        rows = torch.cat([grid, self.split_token.expand(B * T, g, 1, C)], 2) if n else grid  # (B*T, g, g+n, C)
        tokens = torch.cat([fused[:, None], rows.flatten(1, 2)], 1).view(B, T * (1 + g * (g + n)), C)
        if valid is None:
            return tokens, torch.full((B,), tokens.shape[1], device=video.device)
        # Keep the fused token, the valid cells, and the split token of every valid row.
        keep_rows = torch.cat([valid, valid.any(2, keepdim=True)[..., :n]], 2).flatten(1)  # (B, g*(g+n))
        keep = torch.cat([keep_rows.new_ones(B, 1), keep_rows], 1).repeat(1, T)  # (B, T*(1+g*(g+n)))
        return pack_left(tokens, keep)

    def valid_cells(self, video, g):
        """The letterbox mask on the LSD grid, (B, g, g) bool; None without a mask channel or when the box is whole."""
        if video.shape[2] == 3:
            return None
        mask = video[:, :, 3]  # (B, T, S, S)
        cells = F.avg_pool2d(mask.flatten(0, 1)[:, None].float(), mask.shape[-1] // g).view(*mask.shape[:2], g, g)
        rect = cells[:, 0].bool()
        box = rect.any(2)[:, :, None] & rect.any(1)[:, None, :]
        if not (((cells == 0) | (cells == 1)).all() and (cells == rect[:, None]).all() and (box == rect).all()):
            raise ValueError("the mask channel must mark one rectangle per video, the same in every frame, "
                             f"aligned to whole {self.cfg.patch_size * self.cfg.lsd_window}-pixel LSD windows")
        if not rect.flatten(1).any(1).all():
            raise ValueError("a video's mask channel is all zero: it has no valid pixels")
        return None if rect.all() else rect


def pack_left(tokens, keep):
    """Each row's kept tokens to the front, in order, padded: (B, L, C), keep (B, L) -> (B, L', C), lengths (B,)."""
    lengths = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :int(lengths.max())]
    packed = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    in_row = torch.arange(order.shape[1], device=tokens.device) < lengths[:, None]
    return packed * in_row[..., None], lengths


# ------------------------------------------------------------------ the decoder: a Llama-family LLM

class RMSNorm(nn.Module):  # x / rms(x) * weight, in fp32 as Llama does
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_inv_freq(cfg, device=None):
    """Rotary frequencies (d/2,) in fp32, with Llama 3's rescaling of the low ones when rope_factor > 1.
    Computed at every forward, on the device, never stored: a stored copy would be rounded by .to(bf16)."""
    d = cfg.dim_per_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    if cfg.rope_factor == 1.0:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor   # longer than this: scale fully
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor  # shorter than this: keep
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, d = cfg.d_model, cfg.dim_per_head
        self.n_heads, self.n_kv_heads, self.d = cfg.n_heads, cfg.n_kv_heads, d
        self.q_proj = nn.Linear(D, cfg.n_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * d, D, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, slots=None, last=None):
        """x (B, L, D); cos, sin (B or 1, L, d). No mask: causal over these L positions (training, a prefill).
        cache: this layer's (keys, values) buffers of a KVCache, written at `slots`; with a mask (B, 1, 1,
        slots) the queries attend over the whole buffers, the mask alone saying what each row sees (decoding).
        last (B,), in a prefill: keys and values at all L positions, but a query and output (B, 1, D) at last only."""
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, -1, self.d).transpose(1, 2) for t in self.project(x))  # (B, heads, L, d) each
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            cache[0].index_copy_(2, slots, k)
            cache[1].index_copy_(2, slots, v)
            if mask is not None:
                k, v = cache
        if last is not None:  # one query per row, which sees its own position and those before it
            q, L = q[torch.arange(B, device=x.device), :, last, None], 1  # (B, heads, 1, d)
            mask = (torch.arange(k.shape[2], device=x.device) <= last[:, None])[:, None, None]  # (B, 1, 1, L)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))

    def project(self, x):  # q, k, v (B, L, heads * d); inference.py fuses the three matmuls into one
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
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, slots=None, last=None):  # last: as Attention takes it
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, last)
        x = x + h if last is None else x[torch.arange(len(x), device=x.device), last, None] + h
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """The keys and values so far: per layer a preallocated buffer (B, n_kv_heads, slots, head_dim), written in
    place at the new tokens' slots. Its shapes never change: a compiled decode step replays one CUDA graph."""

    def __init__(self, cfg, batch, slots, dtype, device):  # one tensor per layer: each is updated in place
        shape, self.slots = (batch, cfg.n_kv_heads, slots, cfg.dim_per_head), slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]  # zeros: masked,
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]  # never NaN


class Decoder(nn.Module):
    """A Llama-family decoder (Llama 2/3, Vicuna, Mistral, Qwen2, SmolLM): the parameter names are
    Hugging Face's, so that checkpoints map one to one."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for m in self.modules():  # Llama's init: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, positions, mask=None, cache=None, slots=None, return_hidden=False, last=None):
        """x (B, L, D) at positions (B or 1, L) -> final hidden states (B, L, D), (B, 1, D) with last; mask, cache,
        slots, last as Attention takes them. return_hidden: also the n_layers + 1 hidden states as Hugging Face
        counts them (for distillation): [0] the input embeddings, [i] block i's output, [-1] the final norm's."""
        angles = positions[..., None].float() * rope_inv_freq(self.cfg, x.device)  # (B or 1, L, d/2)
        angles = torch.cat([angles, angles], -1)  # the rotate-half layout: both halves share a frequency
        cos, sin = angles.cos(), angles.sin()
        hidden = [x]
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.cfg.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, mask, kv, slots, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv, slots, last if i == len(self.layers) - 1 else None)
            if return_hidden:  # otherwise each block's output is freed as soon as the next one has run
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden[:-1] + [x]) if return_hidden else x


# ------------------------------------------------------------------ VideoPanda: STAB + projector + decoder

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
        return {n: sum(p.numel() for p in getattr(self, n).parameters()) for n in ("stab", "projector", "decoder")}

    def encode_videos(self, videos):
        """videos (B, T, 3 or 4, S, S) -> visual embeddings (B, L, D), lengths (B,)."""
        k, block, shape = self.cfg.chunk_frames, self.cfg.patch_size * self.cfg.lsd_window, tuple(videos.shape)
        if len(shape) != 5 or shape[2] not in (3, 4) or shape[1] % k or shape[3] != shape[4] or shape[3] % block:
            raise ValueError(f"videos must be (batch, frames, 3 or 4 channels, side, side): square frames, frames a "
                             f"multiple of chunk_frames={k}, side of patch_size*lsd_window={block}; got {shape}")
        tokens, lengths = self.stab(videos.to(self.projector[0].weight.dtype))
        return self.projector(tokens), lengths

    def embed_inputs(self, videos, input_ids, labels=None, lengths=None):
        """Splice each video's visual tokens at the VIDEO_PLACEHOLDER of its prompt. input_ids (B, L_text)
        right-padded, lengths (B,) real tokens per row (None: all). Returns the embeddings (B, L, D), L =
        L_text - 1 + L_vis, right-padded with zeros, the labels (B, L) or None, and the lengths (B,)."""
        (B, L_text), dev = input_ids.shape, input_ids.device
        lengths = torch.full((B,), L_text, device=dev) if lengths is None else lengths.to(dev)
        is_video = (input_ids == VIDEO_PLACEHOLDER) & (torch.arange(L_text, device=dev) < lengths[:, None])
        if not (is_video.sum(1) == 1).all():
            raise ValueError(f"every prompt needs exactly one <video> placeholder ({VIDEO_PLACEHOLDER}); "
                             f"found {is_video.sum(1).tolist()} per row")
        vis, n_vis = self.encode_videos(videos)  # (B, L_vis, D), (B,)
        L, out_len = L_text - 1 + vis.shape[1], lengths - 1 + n_vis  # L from the shapes: no wait for the GPU
        if L > self.cfg.max_seq_len:
            raise ValueError(f"{L} positions (text and video) exceed the decoder's context, max_seq_len="
                             f"{self.cfg.max_seq_len}: shorten the prompt or use fewer frames")
        # Output position j: text j before the placeholder, video j - at in its span, text j - n_vis + 1 after.
        at = is_video.int().argmax(1)[:, None]  # (B, 1)
        j = torch.arange(L, device=dev)[None]  # (1, L)
        in_video = (j >= at) & (j < at + n_vis[:, None])
        text_pos = torch.where(j < at, j, j - n_vis[:, None] + 1).clamp(0, L_text - 1)
        vis_pos = (j - at).clamp(0, vis.shape[1] - 1)
        text = self.decoder.embed_tokens(input_ids.clamp(min=0)).to(vis.dtype)  # the placeholder is replaced below
        gather = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
        real = j < out_len[:, None]
        x = torch.where(in_video[..., None], gather(vis, vis_pos), gather(text, text_pos)) * real[..., None]
        if labels is not None:
            labels = torch.where(in_video | ~real, IGNORE_INDEX, labels.to(dev).gather(1, text_pos))
        return x, labels, out_len

    def forward(self, videos, input_ids, labels=None, lengths=None, reduction="mean", return_hidden=False):
        """Without labels: logits (B, L, V). With labels aligned to input_ids (IGNORE_INDEX but on answers): the
        next-token loss (Eq. 20), the mean over supervised tokens or, reduction="sum", their sum (for exact
        accumulation). return_hidden: (that, the decoder's hidden states, as Decoder.forward returns them)."""
        x, labels, _ = self.embed_inputs(videos, input_ids, labels, lengths)
        # Right padding: the causal mask alone is exact for every real position.
        h = self.decoder(x, torch.arange(x.shape[1], device=x.device)[None], return_hidden=return_hidden)
        h, hidden = h if return_hidden else (h, None)
        if labels is None:
            out = self.decoder.lm_head(h)
        else:
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX  # only these positions need the (large) vocabulary head
            logits = self.decoder.lm_head(h[:, :-1][supervised])
            out = F.cross_entropy(logits.float(), targets[supervised], reduction=reduction)
        return (out, hidden) if return_hidden else out

    @torch.no_grad()
    def generate(self, videos, input_ids, lengths=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 eos_id=None, generator=None, cache=None):
        """Answer each prompt; returns the new tokens (B, n), eos_id after a row has finished."""
        steps = list(self.stream(videos, input_ids, lengths, max_new_tokens, temperature, top_k, eos_id, generator,
                                 cache))
        return torch.stack(steps, 1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    @torch.no_grad()
    def stream(self, videos, input_ids, lengths=None, max_new_tokens=32, temperature=0.0, top_k=None,
               eos_id=None, generator=None, cache=None):
        """Yield the next token of every row (B,): the video and the prompt go through the decoder once (the
        prefill), filling the KV cache; then one position per new token. cache: a KVCache to reuse (None: new)."""
        x, _, seq_len = self.embed_inputs(videos, input_ids, lengths=lengths)
        B, L, _ = x.shape
        n_slots = L + max_new_tokens if cache is None else cache.slots  # checked before a new cache is made
        if L + max_new_tokens > min(self.cfg.max_seq_len, n_slots):
            raise ValueError(f"a prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds the context, "
                             f"max_seq_len={self.cfg.max_seq_len}, or the KV cache's {n_slots} slots")
        cache = KVCache(self.cfg, B, n_slots, x.dtype, x.device) if cache is None else cache
        logits = self.prefill(x, seq_len, cache)
        slots = torch.arange(cache.slots, device=x.device)
        # Right padding: a shorter row's new tokens sit after a gap that the mask hides; positions go on from its length
        visible = slots[None] < seq_len[:, None]  # (B, slots)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        for step in range(max_new_tokens):
            token = sample_token(logits, temperature, top_k, generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            yield token
            # done.all() waits for the GPU: without an eos_id it is skipped, and the next step is queued at once
            if step == max_new_tokens - 1 or eos_id is not None and done.all():
                return
            visible[:, L + step] = True  # the new token's slot
            logits = self.decode_step(token, seq_len + step, visible, cache, slots[L + step, None])

    def prefill(self, x, seq_len, cache):  # prompts x (B, L, D) into the cache -> next-token logits (B, V)
        pos = torch.arange(x.shape[1], device=x.device)
        return self.decoder.lm_head(self.decoder(x, pos[None], cache=cache, slots=pos, last=seq_len - 1)[:, 0])

    def decode_step(self, token, positions, visible, cache, slots):
        """New tokens (B,) at positions (B,) -> next-token logits (B, V); the same shapes at every step."""
        emb = self.decoder.embed_tokens(token[:, None]).to(cache.k[0].dtype)
        return self.decoder.lm_head(self.decoder(emb, positions[:, None], visible[:, None, None], cache, slots)[:, -1])


def sample_token(logits, temperature=0.0, top_k=None, generator=None):
    """Greedy when temperature is 0; otherwise sample from softmax(logits / temperature) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]
