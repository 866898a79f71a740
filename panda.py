"""Video-Panda in one file: the Spatio-Temporal Alignment Block (STAB), a Llama-family decoder,
and the model that splices a video's visual tokens into a prompt.

Video-Panda (Yi et al., CVPR 2025, arXiv 2412.18609) is an *encoder-free* video-language model:
raw frames go through a ~24M-parameter STAB and a projector straight into the LLM, with no
pretrained image encoder. Read top to bottom:

  STAB   patch embedding -> LSTE (local spatio-temporal convs) -> GSTRA (one token per chunk of
         frames) -> skip -> LSD (2x2 window attention) -> FSRA (one token per frame) -> fusion
         -> [fused token, rows of grid tokens each followed by a split token] per frame
  Projector  Linear -> GELU -> Linear to the decoder width
  Decoder    Llama-style: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache

The maths follows the official release where it differs from the paper's equations (so that the
released weights give the released outputs); each such place says how the paper writes it.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VIDEO_PLACEHOLDER = -200  # the id standing for "<video>" in input_ids (the release's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100       # label of positions that carry no loss


@dataclass
class PandaConfig:
    # --- video input ---
    n_frames: int = 8          # frames sampled per video; a multiple of chunk_frames
    image_size: int = 448      # square canvas the frames are letterboxed onto
    patch_size: int = 14       # patch embedding kernel = stride
    lsd_window: int = 2        # LSD merges lsd_window x lsd_window patches into one token
    chunk_frames: int = 4      # LSTE and GSTRA see chunks of this many frames (release: 4)
    letterbox: bool = True     # frames keep their aspect ratio on the canvas, with a 4th mask channel
    # --- STAB ---
    stab_dim: int = 1024       # width C of every STAB token
    stab_heads: int = 8        # heads of LSD, FSRA and GSTRA attention
    lste_reduction: float = 1.5  # LSTE bottleneck = int(C // reduction) channels
    gstra_mlp_ratio: int = 4   # GSTRA's MLP hidden width = ratio * C
    stab_dropout: float = 0.5  # dropout in GSTRA's MLP and the fusion projection (release: 0.5)
    # --- decoder (Llama family; field meanings follow Hugging Face's LlamaConfig) ---
    vocab_size: int = 32000
    d_model: int = 4096        # decoder width; the projector maps stab_dim -> d_model
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32       # < n_heads: grouped-query attention
    head_dim: int = 0          # 0 means d_model // n_heads (Qwen2/Mistral may set it)
    ffn_dim: int = 11008       # SwiGLU hidden width
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_factor: float = 1.0   # llama3-style rope scaling; 1.0 means none
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 4096    # context: video tokens + text + generated tokens
    qkv_bias: bool = False     # Qwen2 has biases on q/k/v projections
    tie_embeddings: bool = False  # lm_head shares the token embedding (small models)
    grad_checkpoint: bool = False  # recompute decoder blocks in backward to save memory
    # --- ablations (paper Table 4); the defaults are the full model. Switched-off modules are not built.
    split_tokens: bool = True  # False: rows are not closed by a split token
    fsra: bool = True          # False: the fused token is fuse(chunk token) alone
    lsd: str = "attention"     # "avgpool": each window's plain average replaces LSD's attention
    lste: bool = True          # False: patch embeddings go unchanged to GSTRA and LSD (and are added once)
    gstra: bool = True         # False: the fused token is fuse(frame token) alone

    def __post_init__(self):
        if self.lsd not in ("attention", "avgpool"):
            raise ValueError(f"lsd must be 'attention' or 'avgpool', got {self.lsd!r}")
        if not (self.fsra or self.gstra):
            raise ValueError("fsra=False and gstra=False leave the fused token no context: keep one of them")
        if self.n_frames % self.chunk_frames:
            raise ValueError(f"n_frames={self.n_frames} must be a multiple of chunk_frames={self.chunk_frames}")
        if self.stab_dim % self.stab_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"stab_dim % stab_heads and n_heads % n_kv_heads must be 0, got "
                             f"{self.stab_dim}/{self.stab_heads} and {self.n_heads}/{self.n_kv_heads}")
        if self.image_size % (self.patch_size * self.lsd_window):
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size*lsd_window="
                             f"{self.patch_size * self.lsd_window}")

    @property
    def dim_per_head(self):
        return self.head_dim or self.d_model // self.n_heads

    @property
    def grid(self):  # cells per side of a full frame's LSD grid
        return self.image_size // (self.patch_size * self.lsd_window)

    @property
    def tokens_per_frame(self):  # a full (not letterboxed) frame: fused token + g rows of g cells (and a split)
        return 1 + self.grid * (self.grid + self.split_tokens)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    # unit tests: about 55 thousand parameters, milliseconds per forward on a CPU
    "nano": dict(n_frames=4, image_size=32, patch_size=8, chunk_frames=2, stab_dim=32, stab_heads=2,
                 vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                 max_seq_len=256, stab_dropout=0.0, letterbox=False),
    # the default synthetic-video run: 8 frames of 48x48, a 3x3 token grid per frame. No dropout: the
    # synthetic stream never shows a clip twice, and dropout only slowed learning (README, "The tiny run")
    "tiny": dict(n_frames=8, image_size=48, patch_size=8, chunk_frames=4, stab_dim=96, stab_heads=4,
                 vocab_size=128, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=256, stab_dropout=0.0, letterbox=False),
    # the release: 8 frames of 448x448, STAB width 1024, Vicuna-7B-shaped decoder
    "paper": dict(),
}


# ============================================================================================
# STAB: the Spatio-Temporal Alignment Block
# ============================================================================================

class QueryAttention(nn.Module):
    """One query token cross-attends over a set of tokens, with a residual to the raw query.
    EVE's LocalAttention/GlobalAttention, reused here by LSD, FSRA and GSTRA."""

    def __init__(self, dim, heads, bias=False, full_width_scale=True):
        super().__init__()
        self.heads = heads
        self.q = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=bias))
        self.kv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim, bias=bias))  # rows: [K; V]
        self.proj = nn.Linear(dim, dim)
        # The release (inherited from EVE) scales LSD/FSRA logits by C^-0.5 over the full width,
        # not by head_dim^-0.5; GSTRA uses the standard head_dim^-0.5.
        self.scale = dim ** -0.5 if full_width_scale else (dim // heads) ** -0.5

    fast = True  # class-wide switch: False forces the plain path everywhere (tests compare the two)
    keep_weights = False  # set by attention_maps(): store the softmax weights as .weights (N, h, L)

    def forward(self, query, tokens, key_mask=None):  # (N, C), (N, L, C), (N, L) bool -> (N, C)
        N, L, C = tokens.shape
        h, d = self.heads, C // self.heads
        q = self.q(query).view(N, h, 1, d)
        if self.fast and L > h and not self.keep_weights:
            o = self.pooled_attention(q, tokens, key_mask)
        else:
            # One query over a few keys (LSD's windows), written out rather than through SDPA: a fused
            # kernel has nothing to gain here and fails once N reaches 65536 windows (PyTorch issue
            # 181085; LSD at 32 videos of 448 px). Written out, it can also keep its weights.
            k, v = self.kv(tokens).view(N, L, 2, h, d).permute(2, 0, 3, 1, 4)  # (N, h, L, d) each
            logits = (q * k).sum(-1) * self.scale  # (N, h, L)
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
            a = logits.float().softmax(-1).to(q.dtype)
            if self.keep_weights:
                self.weights = a.detach()
            o = (a[..., None] * v).sum(2)  # (N, h, d)
        return query + self.proj(o.reshape(N, C))

    def pooled_attention(self, q, tokens, key_mask):  # q (N, h, 1, d), (N, L, C), (N, L) -> (N, h, d)
        """The same attention without a key and a value for every token. Per head,
        q.(W_k x + b_k) = (W_k^T q).x + q.b_k, where q.b_k is the same for all tokens and cancels in
        the softmax; and sum_l a_l (W_v x_l + b_v) = W_v (sum_l a_l x_l) + b_v since the a_l sum to 1.
        So map the query back to token space (C numbers per head), attend over the normalised tokens
        themselves (one shared "key head" for all h query heads), and project one pooled token per
        head: per query 2C^2 multiply-adds instead of 2LC^2, a win when L > heads (GSTRA's 4096
        tokens, FSRA's 256; LSD's 4-token windows stay plain).
        Two matmuls rather than SDPA: with a "head" of C numbers no fused kernel applies, and SDPA's
        fallback ran 4-7x slower than the plain path (bench.py)."""
        h, d = q.shape[1], q.shape[-1]
        x = self.kv[0](tokens)  # (N, L, C)
        w_k, w_v = self.kv[1].weight.view(2, h, d, -1)  # (h, d, C) each
        # einsum, not q @ w_k: broadcasting the weights over N would copy them N times
        logits = torch.einsum("nhd,hdc->nhc", q.squeeze(2), w_k) @ x.transpose(1, 2) * self.scale  # (N, h, L)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
        pooled = logits.float().softmax(-1).to(x.dtype) @ x  # (N, h, C)
        o = torch.einsum("nhc,hdc->nhd", pooled, w_v)  # (N, h, d)
        return o if self.kv[1].bias is None else o + self.kv[1].bias.view(2, h, d)[1]


@contextmanager
def attention_maps(model):
    """Inside `with attention_maps(model) as maps:` every QueryAttention takes the plain path and keeps
    its softmax weights; on leaving, maps = {module name: weights (N, heads, L) of its last call}, e.g.
    "stab.lsd.attn". Outside the block nothing is stored, so the default forward pays nothing."""
    modules, maps = {n: m for n, m in model.named_modules() if isinstance(m, QueryAttention)}, {}
    for m in modules.values():
        m.fast, m.keep_weights = False, True  # instance attributes shadow the class defaults
    try:
        yield maps
    finally:
        for name, m in modules.items():
            maps[name] = m.__dict__.pop("weights", None)  # None: it was not called inside the block
            del m.fast, m.keep_weights


class LSTE(nn.Module):
    """Local Spatio-Temporal Encoding (paper Sec. 3.2): a temporal depthwise-conv bottleneck
    (UniFormerV2's local MHRA, release `lmhra1`) and a 3x3x3 depthwise position conv (`dpe`)."""

    def __init__(self, cfg):
        super().__init__()
        C, r = cfg.stab_dim, int(cfg.stab_dim // cfg.lste_reduction)
        # BatchNorm is not in the paper; the release has it. Purely linear: no activation anywhere.
        self.norm = nn.BatchNorm3d(C)
        self.reduce = nn.Conv3d(C, r, 1)
        self.temporal = nn.Conv3d(r, r, (3, 1, 1), padding=(1, 0, 0), groups=r)
        self.expand = nn.Conv3d(r, C, 1)
        self.dpe = nn.Conv3d(C, C, 3, padding=1, groups=C)
        for p in (self.expand.weight, self.expand.bias, self.dpe.bias):
            nn.init.zeros_(p)  # the temporal branch starts as the identity; dpe's weight does not

    def forward(self, x):  # (N, k, h, w, C): N = videos * chunks, k frames per chunk, channels last
        # The convs keep nn.Conv3d's weights (the release's names and shapes) but run on channels-last
        # tokens, the layout of the patch matmul, GSTRA and LSD, so that no transpose is ever made: a
        # 1x1x1 conv is a Linear over channels, and BatchNorm3d takes a channels-first view.
        y = self.norm(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        y = F.linear(y, self.reduce.weight.flatten(1), self.reduce.bias)  # (N, k, h, w, r)
        x = x + F.linear(temporal_conv(self.temporal, y), self.expand.weight.flatten(1), self.expand.bias)
        return x + dpe_conv(self.dpe, x)


def temporal_conv(conv, x):  # (N, k, h, w, r) -> (N, k, h, w, r)
    """LSTE's depthwise (3, 1, 1) conv over frames, zero-padded, as one shifted product per tap: the
    library kernel wants channels first, and compiled the sum is one pass (0.18 ms at 16 videos)."""
    k = x.shape[1]
    padded = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 1))  # (N, k + 2, h, w, r)
    w = conv.weight.view(-1, 3)  # (r, 3): a weight per channel and tap
    return sum(w[:, t] * padded[:, t:t + k] for t in range(3)) + conv.bias


def dpe_conv(conv, x):  # (N, k, h, w, C) -> (N, k, h, w, C)
    """LSTE's 3x3x3 depthwise conv as three 3x3 depthwise 2D convs, one per time tap t, each over all
    frames, then summed with the tap's shift in time: y[f] = z0[f-1] + z1[f] + z2[f+1] (zero-padded).
    On channels-last frames cuDNN's 2D depthwise kernels are fast: compiled, 1.06 ms at 16 videos
    against 2.36 for the 3D library kernel (which also wants channels first) and 3.5 for the 27
    shifted products fused by torch.compile (bench_notes.md)."""
    N, k, h, w, C = x.shape
    frames = x.reshape(N * k, h, w, C).permute(0, 3, 1, 2)  # (N*k, C, h, w) with channels-last strides
    z = [F.conv2d(frames, conv.weight[:, :, t], padding=1, groups=C).permute(0, 2, 3, 1).reshape(N, k, h, w, C)
         for t in range(3)]
    earlier = F.pad(z[0], (0, 0, 0, 0, 0, 0, 1, 0))[:, :k]  # frame f gets z0 of frame f-1
    later = F.pad(z[2], (0, 0, 0, 0, 0, 0, 0, 1))[:, 1:]   # and z2 of frame f+1
    return earlier + z[1] + later + conv.bias


class GSTRA(nn.Module):
    """Global Spatio-Temporal Relationship Aggregator (paper Sec. 3.2): a learned query
    cross-attends over all k*h*w tokens of a chunk, then an MLP (UniFormerV2 decoder block)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.stab_dim
        self.query = nn.Parameter(torch.zeros(C))  # zero: GSTRA starts as mean pooling
        self.attn = QueryAttention(C, cfg.stab_heads, bias=True, full_width_scale=False)
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, cfg.gstra_mlp_ratio * C), QuickGELU(), nn.Dropout(cfg.stab_dropout),
                                 nn.Linear(cfg.gstra_mlp_ratio * C, C))
        bound = math.sqrt(6 / (4 * C))  # xavier_uniform over the release's packed (3C, C) q/k/v matrix
        for lin in (self.attn.q[1], self.attn.kv[1]):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        for lin in (self.attn.proj, self.mlp[-1]):  # residual outputs start at zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, tokens):  # (N, k*h*w, C) -> (N, C), one token per chunk
        # Keys are the full-resolution LSTE output, letterbox padding included and unmasked, as
        # released; the paper's Eq. 12 attends over the downsampled tokens.
        x = self.attn(self.query.expand(tokens.shape[0], -1), tokens)
        return x + self.mlp(self.norm(x))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LSD(nn.Module):
    """Local Spatial Downsampling (paper Sec. 3.3): each s x s window of patch tokens becomes one
    token by attention. The paper's query is a learned W_ij; the release queries with the
    window's average and adds that average back as the residual."""

    def __init__(self, cfg):
        super().__init__()
        self.s = cfg.lsd_window
        self.attn = QueryAttention(cfg.stab_dim, cfg.stab_heads) if cfg.lsd == "attention" else None

    def forward(self, x):  # (F, H, W, C) -> (F, H/s, W/s, C)
        Fr, H, W, C = x.shape
        s, h, w = self.s, H // self.s, W // self.s
        windows = x.view(Fr, h, s, w, s, C).permute(0, 1, 3, 2, 4, 5).reshape(Fr * h * w, s * s, C)
        mean = windows.mean(1)  # (F*h*w, C); with lsd="avgpool" (Table 4's "w/o LSD") the output itself
        return (mean if self.attn is None else self.attn(mean, windows)).view(Fr, h, w, C)


class FSRA(nn.Module):
    """Frame-wise Spatial Relationship Aggregator (paper Sec. 3.3): one learned query per frame
    attends over that frame's valid tokens. The paper has a query per frame (W_t); the release
    shares one `class_embedding` across frames."""

    def __init__(self, cfg):
        super().__init__()
        self.query = nn.Parameter(torch.randn(cfg.stab_dim))
        self.attn = QueryAttention(cfg.stab_dim, cfg.stab_heads)

    def forward(self, tokens, valid=None):  # (F, L, C), (F, L) bool -> (F, C)
        return self.attn(self.query.expand(tokens.shape[0], -1), tokens, valid)


def patch_embed(conv, frames):  # (N, 3, S, S) -> (N, S/P, S/P, C), channels last
    """conv(frames) for a convolution whose stride is its kernel P, computed as what it is: one matmul
    of each frame's non-overlapping patches, flattened in the weight's (channel, row, column) order,
    with the weight (C, 3*P*P). cuDNN ran the 3-input-channel conv at ~4% of the matmul rate (bench.py)."""
    N, c, S, _ = frames.shape
    P, n = conv.kernel_size[0], S // conv.kernel_size[0]
    patches = frames.reshape(N, c, n, P, n, P).permute(0, 2, 4, 1, 3, 5).reshape(N, n * n, c * P * P)
    return (patches @ conv.weight.flatten(1).T).view(N, n, n, -1)


class STAB(nn.Module):
    """Spatio-Temporal Alignment Block (paper Sec. 3, Fig. 2): frames -> visual tokens.
    Per frame: [fused context token, then h rows of w grid tokens each closed by a split token]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.stab_dim
        self.patch_embed = nn.Conv2d(3, C, cfg.patch_size, cfg.patch_size, bias=False)
        # Ablations (cfg.lste, gstra, fsra, split_tokens) leave their modules as None: no parameters.
        self.lste = LSTE(cfg) if cfg.lste else None
        self.gstra = GSTRA(cfg) if cfg.gstra else None
        self.lsd = LSD(cfg)
        self.fsra = FSRA(cfg) if cfg.fsra else None
        self.balance = nn.Parameter(torch.zeros(C)) if cfg.gstra and cfg.fsra else None  # sigmoid(0): even mix
        self.fuse = nn.Sequential(nn.LayerNorm(C), nn.Dropout(cfg.stab_dropout), nn.Linear(C, C))
        self.split_token = nn.Parameter(torch.randn(C)) if cfg.split_tokens else None

    def forward(self, video):
        """video (B, T, 3 or 4, S, S) -> tokens (B, L, C) and lengths (B,).
        Channel 3, when present, is the letterbox mask (1 = real pixels); each video's valid box
        is a rectangle shared by its frames. Videos with a smaller box get fewer tokens: they are
        packed to the left and padded to the longest video's L."""
        cfg = self.cfg
        B, T = video.shape[:2]
        k, C = cfg.chunk_frames, cfg.stab_dim
        p = patch_embed(self.patch_embed, video[:, :, :3].flatten(0, 1))  # (B*T, Hp, Wp, C)
        Hp, Wp = p.shape[1:3]

        # LSTE and GSTRA run on chunks of k frames, chunks folded into the batch. Tokens stay channels
        # last from the patch matmul to LSD: every reshape below is a view, not a copy.
        chunks = p.view(B * T // k, k, Hp, Wp, C)
        local = self.lste(chunks) if cfg.lste else chunks
        chunk_token = self.gstra(local.view(B * T // k, k * Hp * Wp, C)) if cfg.gstra else None  # (B*T/k, C)
        # The release adds the raw patch embeddings once more (LSTE's residual already holds them):
        # the identity path is doubled, which the paper's equations do not show. Without LSTE: once.
        x = ((local + chunks) if cfg.lste else chunks).view(B * T, Hp, Wp, C)

        grid = self.lsd(x)  # (B*T, h, w, C)
        h, w = grid.shape[1:3]
        valid = self.valid_cells(video, h, w)  # (B, h, w) bool, or None when every cell is valid
        frame_valid = None if valid is None else valid.repeat_interleave(T, 0).flatten(1)
        frame_token = self.fsra(grid.flatten(1, 2), frame_valid) if cfg.fsra else None  # (B*T, C)

        if cfg.gstra:
            chunk_token = chunk_token.repeat_interleave(k, 0)  # (B*T, C): frames of chunk j use token j
        if cfg.gstra and cfg.fsra:
            alpha = torch.sigmoid(self.balance)
            fused = self.fuse((1 - alpha) * chunk_token + alpha * frame_token)
        else:  # ablation "w/o FSRA" or "w/o GSTRA": the one context left
            fused = self.fuse(chunk_token if cfg.gstra else frame_token)

        n = int(cfg.split_tokens)  # split tokens per row, 1 or 0
        rows = torch.cat([grid, self.split_token.expand(B * T, h, 1, C)], 2) if n else grid  # (B*T, h, w+n, C)
        tokens = torch.cat([fused[:, None], rows.flatten(1, 2)], 1).view(B, T * (1 + h * (w + n)), C)
        if valid is None:
            return tokens, torch.full((B,), tokens.shape[1], device=video.device)
        # Keep the fused token, the valid cells, and the split token of every valid row.
        keep_rows = torch.cat([valid, valid.any(2, keepdim=True)[..., :n]], 2).flatten(1)  # (B, h*(w+n))
        keep = torch.cat([keep_rows.new_ones(B, 1), keep_rows], 1).repeat(1, T)  # (B, T*(1+h*(w+n)))
        return pack_left(tokens, keep)

    def valid_cells(self, video, h, w):
        """The letterbox mask at LSD-grid resolution, (B, h, w) bool; None without a mask channel."""
        if video.shape[2] == 3:
            return None
        mask = video[:, :, 3]  # (B, T, S, S)
        cells = F.avg_pool2d(mask.flatten(0, 1)[:, None].float(), mask.shape[-1] // h)[:, 0]
        cells = cells.view(mask.shape[0], -1, h, w)
        rect = cells[:, 0].bool()
        box = rect.any(2)[:, :, None] & rect.any(1)[:, None, :]
        if not (((cells == 0) | (cells == 1)).all() and (cells == rect[:, None]).all() and (box == rect).all()):
            raise ValueError("the mask channel must mark one rectangle per video, the same in every frame, "
                             f"aligned to whole {self.cfg.patch_size * self.cfg.lsd_window}-pixel LSD windows")
        if not rect.flatten(1).any(1).all():
            raise ValueError("a video's mask channel is all zero: it has no valid pixels")
        return None if rect.all() else rect


def pack_left(tokens, keep):
    """Move each row's kept tokens to the front, in order; pad to the longest row.
    tokens (B, L, C), keep (B, L) bool -> (B, L', C), lengths (B,). No loop over rows."""
    lengths = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :int(lengths.max())]
    packed = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    in_row = torch.arange(order.shape[1], device=tokens.device) < lengths[:, None]
    return packed * in_row[..., None], lengths


# ============================================================================================
# Decoder: a Llama-family causal language model written from scratch
# ============================================================================================

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32 as Llama does, then return to the working dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_inv_freq(cfg):
    """Rotary frequencies, with Llama 3's rescaling of the low frequencies when rope_factor > 1."""
    d = cfg.dim_per_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
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
        d, hd = cfg.d_model, cfg.dim_per_head
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache):  # x (B, L, d); cos, sin (B or 1, L, hd)
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.hd).transpose(1, 2)  # (B, nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.hd).transpose(1, 2)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v)
        # Without a mask every query sees itself and what precedes it (SDPA aligns is_causal to the
        # top left, so this is only right when the keys are exactly these L positions). With a mask
        # (decoding after a padded prefill) the mask alone says what each query may see.
        if mask is None and k.shape[2] != L:
            raise ValueError(f"{k.shape[2]} cached keys for {L} queries: decoding with a cache needs a mask")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


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

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of everything seen so far, one (k, v) pair per layer, grown by concatenation."""

    def __init__(self, n_layers):
        self.layers = [None] * n_layers
        self.layer = 0  # which layer's update comes next

    def update(self, k, v):  # (B, nkv, L_new, hd) each -> all keys and values so far
        old = self.layers[self.layer]
        if old is not None:
            k, v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)
        self.layers[self.layer] = (k, v)
        self.layer = (self.layer + 1) % len(self.layers)
        return k, v


class StaticKVCache:
    """KVCache in preallocated (B, nkv, max_len, hd) buffers, written in place at `slots`: shapes
    never change, so a compiled decode step can replay one CUDA graph per token (as gpt-fast does).
    Decoding attends over the whole buffer; the mask hides the slots not written yet."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.dim_per_head)  # zeros: masked, and never NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.layer, self.slots = 0, None  # slots (L_new,): where the next update writes

    def update(self, k, v):
        i, self.layer = self.layer, (self.layer + 1) % len(self.k)
        self.k[i].index_copy_(2, self.slots, k)
        self.v[i].index_copy_(2, self.slots, v)
        # Only the prefill writes several slots, from slot 0: its own keys are all there is so far.
        return (k, v) if k.shape[2] > 1 else (self.k[i], self.v[i])


class Decoder(nn.Module):
    """A Llama-family decoder (Llama 2/3, Vicuna, Mistral, Qwen2, SmolLM): parameter names follow
    Hugging Face's so that checkpoints map one to one."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        for m in self.modules():  # Llama's init: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # .to(torch.bfloat16) would round the rotary frequencies too (an angle error of radians at
        # position 2000): recompute them in fp32 on whatever device the module went to.
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def forward(self, x, positions, mask=None, cache=None, return_hidden=False):
        """x (B, L, d) embeddings at positions (B or 1, L) -> final hidden states (B, L, d). return_hidden:
        also the list of n_layers + 1 hidden states as Hugging Face counts them (distillation, spec D.1):
        [0] the input embeddings, [i] block i's output, [n_layers] the final normed output."""
        angles = positions[..., None].float() * self.inv_freq  # (B or 1, L, hd/2)
        angles = torch.cat([angles, angles], -1)  # rotate-half layout: both halves share a frequency
        cos, sin = angles.cos(), angles.sin()
        hidden = [x]
        for block in self.layers:
            if self.cfg.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
            if return_hidden:  # otherwise each block's output is freed as soon as the next one has run
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden[:-1] + [x]) if return_hidden else x


# ============================================================================================
# VideoPanda: STAB + projector + decoder
# ============================================================================================

class VideoPanda(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.stab = STAB(cfg)
        # mlp2x_gelu: applied to every visual token, fused and split tokens included
        self.projector = nn.Sequential(nn.Linear(cfg.stab_dim, cfg.d_model), nn.GELU(),
                                       nn.Linear(cfg.d_model, cfg.d_model))
        self.decoder = Decoder(cfg)

    def num_params(self):
        """Parameters per group; shared (tied) tensors are counted once."""
        def count(module):
            return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
        return {"stab": count(self.stab), "projector": count(self.projector), "decoder": count(self.decoder)}

    def encode_videos(self, videos):
        """videos (B, T, 3 or 4, S, S) -> visual embeddings (B, L, d_model), lengths (B,)."""
        self.check_videos(videos)
        tokens, lengths = self.stab(videos.to(self.projector[0].weight.dtype))
        return self.projector(tokens), lengths

    def check_videos(self, videos):
        cfg = self.cfg
        if videos.ndim != 5 or videos.shape[2] not in (3, 4):
            raise ValueError(f"videos must be (batch, frames, 3 or 4 channels, height, width); got shape "
                             f"{tuple(videos.shape)}")
        B, T, _, H, W = videos.shape
        if T % cfg.chunk_frames:
            raise ValueError(f"got {T} frames per video; the STAB needs a multiple of chunk_frames={cfg.chunk_frames}")
        if H != W or H % (cfg.patch_size * cfg.lsd_window):
            raise ValueError(f"frames must be square with a side that is a multiple of patch_size*lsd_window="
                             f"{cfg.patch_size * cfg.lsd_window}; got {H}x{W}")

    def embed_inputs(self, videos, input_ids, labels=None, lengths=None):
        """Splice each video's visual tokens at the VIDEO_PLACEHOLDER of its prompt.
        input_ids (B, S) right-padded, lengths (B,) real tokens per row (None: all S).
        Returns embeddings (B, L, d) right-padded with zeros, labels (B, L) or None, lengths (B,)."""
        B, S = input_ids.shape
        dev = input_ids.device
        lengths = torch.full((B,), S, device=dev) if lengths is None else lengths.to(dev)
        in_text = torch.arange(S, device=dev) < lengths[:, None]
        is_video = (input_ids == VIDEO_PLACEHOLDER) & in_text
        if not (is_video.sum(1) == 1).all():
            raise ValueError(f"every prompt needs exactly one <video> placeholder ({VIDEO_PLACEHOLDER}); "
                             f"found {is_video.sum(1).tolist()} per row")
        vis, n_vis = self.encode_videos(videos)  # (B, V, d), (B,)
        out_len = lengths - 1 + n_vis
        if int(out_len.max()) > self.cfg.max_seq_len:
            raise ValueError(f"a sequence of {int(out_len.max())} tokens (text plus visual) exceeds the "
                             f"decoder's context of max_seq_len={self.cfg.max_seq_len}; shorten the prompt "
                             f"or use fewer frames")

        # Output position j takes text position j before the placeholder, visual token j - p inside
        # the video span, and text position j - n_vis + 1 after it. One gather each, no loop.
        p = is_video.int().argmax(1)[:, None]  # (B, 1)
        j = torch.arange(int(out_len.max()), device=dev)[None]  # (1, L)
        in_video = (j >= p) & (j < p + n_vis[:, None])
        text_pos = torch.where(j < p, j, j - n_vis[:, None] + 1).clamp(0, S - 1)
        vis_pos = (j - p).clamp(0, vis.shape[1] - 1)
        text = self.decoder.embed_tokens(input_ids.clamp(min=0)).to(vis.dtype)  # placeholder is replaced below
        gather = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
        x = torch.where(in_video[..., None], gather(vis, vis_pos), gather(text, text_pos))
        real = j < out_len[:, None]
        x = x * real[..., None]
        if labels is not None:
            labels = torch.where(in_video | ~real, IGNORE_INDEX, labels.to(dev).gather(1, text_pos))
        return x, labels, out_len

    def forward(self, videos, input_ids, labels=None, lengths=None, reduction="mean", return_hidden=False):
        """Without labels: logits (B, L, vocab) over the spliced sequence. With labels (B, S) aligned
        to input_ids (IGNORE_INDEX on everything but answer tokens): the next-token loss, averaged
        over supervised tokens (reduction="mean") or summed ("sum", for exact accumulation).
        return_hidden: (that, the decoder's hidden states), as Decoder.forward returns them."""
        x, labels, _ = self.embed_inputs(videos, input_ids, labels, lengths)
        # Right padding means causal masking alone is exact for every real position.
        h = self.decoder(x, torch.arange(x.shape[1], device=x.device)[None], return_hidden=return_hidden)
        h, hidden = h if return_hidden else (h, None)
        if labels is None:
            out = self.decoder.lm_head(h)
        else:
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX  # only those positions need the (large) vocabulary head
            logits = self.decoder.lm_head(h[:, :-1][supervised])
            out = F.cross_entropy(logits.float(), targets[supervised], reduction=reduction)
        return (out, hidden) if return_hidden else out

    @torch.no_grad()
    def generate(self, videos, input_ids, lengths=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 eos_id=None, generator=None, static_cache=False):
        """Answer each prompt; returns new tokens (B, n) with eos_id after a row has finished."""
        steps = list(self.stream(videos, input_ids, lengths, max_new_tokens, temperature, top_k, eos_id, generator,
                                 static_cache))
        return torch.stack(steps, 1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    @torch.no_grad()
    def stream(self, videos, input_ids, lengths=None, max_new_tokens=32, temperature=0.0, top_k=None,
               eos_id=None, generator=None, static_cache=False):
        """Yield the next token of every row (B,), one step at a time: prefill the video and prompt
        once into the KV cache, then run one position per generated token. static_cache: True (or a
        StaticKVCache to reuse, with room for the prompt and the new tokens) preallocates the cache."""
        x, _, seq_len = self.embed_inputs(videos, input_ids, lengths=lengths)
        B, L, _ = x.shape
        if L + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds the context "
                             f"max_seq_len={self.cfg.max_seq_len}; lower max_new_tokens")
        static = StaticKVCache(self.cfg, B, L + max_new_tokens, x.dtype, x.device) if static_cache is True \
            else static_cache
        if static and static.k[0].shape[2] < L + max_new_tokens:
            raise ValueError(f"the static cache has {static.k[0].shape[2]} slots; this needs {L + max_new_tokens}")
        cache = static or KVCache(self.cfg.n_layers)
        slots = torch.arange(static.k[0].shape[2] if static else L + max_new_tokens, device=x.device)
        cache.slots = slots[:L]  # where a static cache writes (the plain one appends)
        h = self.decoder(x, slots[None, :L], cache=cache)
        logits = self.decoder.lm_head(h[torch.arange(B), seq_len - 1])
        # Rows are right-padded to L, so new tokens of shorter rows sit after a gap of padding
        # in the cache: the mask hides that gap and positions continue from each row's length.
        visible = slots[None] < seq_len[:, None]  # (B, slots)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        for step in range(max_new_tokens):
            token = sample_token(logits, temperature, top_k, generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            yield token
            # done.all() waits for the GPU; without an eos_id no row can finish, and skipping the check
            # lets the next step be queued while this one runs (bench.py: decode tokens/s)
            if step == max_new_tokens - 1 or eos_id is not None and done.all():
                return
            visible[:, L + step] = True  # the new token's slot
            cache.slots = slots[L + step:L + step + 1]
            emb = self.decoder.embed_tokens(token[:, None]).to(x.dtype)
            mask = visible if static else visible[:, :L + step + 1]  # the plain cache has no empty slots
            logits = self.decode_step(emb, (seq_len + step)[:, None], mask[:, None, None, :], cache)

    def decode_step(self, emb, positions, mask, cache):
        """One new token per row, embedded (B, 1, d) -> next-token logits (B, vocab). A method of its
        own so that it can be compiled: with a StaticKVCache its shapes are the same at every step."""
        return self.decoder.lm_head(self.decoder(emb, positions, mask=mask, cache=cache)[:, -1])


def sample_token(logits, temperature=0.0, top_k=None, generator=None):
    """Greedy when temperature is 0; otherwise sample from softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]
