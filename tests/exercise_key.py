"""Worked answers to docs/EXERCISES.md, several correct ones per exercise and the plausible wrong ones,
for tests/test_exercises.py to prove its checks: every correct answer passes, every wrong one fails.
(A teacher handing out the exercises may leave this file out.)"""

import math

import torch
import torch.nn as nn

from panda import FastQueryAttention, PandaConfig, QueryAttention


# --------------------------------------------------------------------------- 1. LSD written out

def windows_of(x, s):
    """(F, H, W, C) -> (F * H/s * W/s, s*s, C): each s x s block's patches, row by row."""
    F_, H, W, C = x.shape
    return x.reshape(F_, H // s, s, W // s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, C)


def attend(attn, query, keys_values, scale):
    """One query per row over its tokens with attn's layers: (N, C), (N, L, C) -> (N, C), no residual."""
    N, L, C = keys_values.shape
    q = attn.q(query).view(N, attn.heads, 1, -1)
    k, v = attn.kv(keys_values).split(C, -1)
    k, v = (t.view(N, L, attn.heads, -1).transpose(1, 2) for t in (k, v))  # (N, heads, L, d)
    weights = ((q * k).sum(-1) * scale).softmax(-1)  # (N, heads, L)
    return attn.proj((weights[..., None] * v).sum(2).reshape(N, C))


def lsd_right(x, attn, s):
    """Correct: the windows by reshape and permute, the attention by hand."""
    F_, H, W, C = x.shape
    windows = windows_of(x, s)
    mean = windows.mean(1)
    return (mean + attend(attn, mean, windows, attn.scale)).view(F_, H // s, W // s, C)


def lsd_right_unfold(x, attn, s):
    """Correct: the windows by unfold, the attention through scaled_dot_product_attention."""
    F_, H, W, C = x.shape
    windows = x.unfold(1, s, s).unfold(2, s, s).flatten(-2).permute(0, 1, 2, 4, 3).reshape(-1, s * s, C)
    mean = windows.mean(1)
    N, d = len(windows), C // attn.heads
    q = attn.q(mean).view(N, 1, attn.heads, d).transpose(1, 2)
    k, v = (t.view(N, s * s, attn.heads, d).transpose(1, 2) for t in attn.kv(windows).chunk(2, -1))
    o = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (N, heads, 1, d)
    return (mean + attn.proj(o.transpose(1, 2).reshape(N, C))).view(F_, H // s, W // s, C)


def lsd_calls_attn(x, attn, s):
    """Wrong: calls attn itself."""
    F_, H, W, C = x.shape
    windows = windows_of(x, s)
    return attn(windows.mean(1), windows).view(F_, H // s, W // s, C)


def lsd_calls_forward_unbound(x, attn, s):
    """Wrong: QueryAttention.forward called through the class, around a guard on the instance."""
    F_, H, W, C = x.shape
    windows = windows_of(x, s)
    return QueryAttention.forward(attn, windows.mean(1), windows).view(F_, H // s, W // s, C)


def lsd_calls_attention_method(x, attn, s):
    """Wrong: the softmax from QueryAttention.attention."""
    F_, H, W, C = x.shape
    windows = windows_of(x, s)
    mean = windows.mean(1)
    weights, v = QueryAttention.attention(attn, mean, windows)
    return (mean + attn.proj((weights[..., None] * v).sum(2).reshape(-1, C))).view(F_, H // s, W // s, C)


def lsd_head_dim_scale(x, attn, s):
    """Wrong: the usual head_dim^-0.5 scale, not attn.scale."""
    F_, H, W, C = x.shape
    windows = windows_of(x, s)
    mean = windows.mean(1)
    return (mean + attend(attn, mean, windows, (C // attn.heads) ** -0.5)).view(F_, H // s, W // s, C)


def lsd_no_permute(x, attn, s):
    """Wrong: windows by reshape alone, which groups a row's neighbours instead of a block."""
    F_, H, W, C = x.shape
    windows = x.reshape(-1, s * s, C)
    mean = windows.mean(1)
    return (mean + attend(attn, mean, windows, attn.scale)).view(F_, H // s, W // s, C)


def lsd_no_residual(x, attn, s):
    """Wrong: the window's average is not added back."""
    F_, H, W, C = x.shape
    windows = windows_of(x, s)
    return attend(attn, windows.mean(1), windows, attn.scale).view(F_, H // s, W // s, C)


# --------------------------------------------------------------------------- 2. GSTRA per frame

def gstra_per_frame_right(gstra, local):
    """Correct: one frame a row, in chunk-then-frame order."""
    return gstra(local.flatten(2, 3).flatten(0, 1))  # (N*k, h*w, C)


def gstra_per_frame_loop(gstra, local):
    """Correct: chunk by chunk, its k frames as a batch."""
    return torch.cat([gstra(frame.flatten(1, 2)) for frame in local])


def gstra_per_chunk_repeated(gstra, local):
    """Wrong: the release's one token per chunk, given to each of its frames."""
    return gstra(local.flatten(1, 3)).repeat_interleave(local.shape[1], 0)


def gstra_per_frame_frames_first(gstra, local):
    """Wrong: frame 0 of every chunk first."""
    return gstra(local.transpose(0, 1).flatten(2, 3).flatten(0, 1))


# --------------------------------------------------------------------------- 3. the number of frames

def config_for_frames_right(n_frames):
    """Correct: the largest divisor up to 4, exactly the room needed."""
    chunk = max(c for c in range(1, 5) if n_frames % c == 0)
    tiny = PandaConfig.preset("tiny", n_frames=n_frames, chunk_frames=chunk)
    return PandaConfig.preset("tiny", n_frames=n_frames, chunk_frames=chunk,
                              max_seq_len=n_frames * tiny.tokens_per_frame + 128)


def config_for_frames_rounded(n_frames):
    """Correct: the context rounded up to a multiple of 64, the chunk found by counting down."""
    chunk = next(c for c in (4, 3, 2, 1) if n_frames % c == 0)
    needed = n_frames * PandaConfig.preset("tiny").tokens_per_frame + 128
    return PandaConfig.preset("tiny", n_frames=n_frames, chunk_frames=chunk, max_seq_len=64 * math.ceil(needed / 64))


def config_for_frames_four_or_one(n_frames):
    """Wrong: chunks of 4 or of 1; 6 frames allow chunks of 3."""
    chunk = 4 if n_frames % 4 == 0 else 1
    return PandaConfig.preset("tiny", n_frames=n_frames, chunk_frames=chunk,
                              max_seq_len=n_frames * PandaConfig.preset("tiny").tokens_per_frame + 128)


def config_for_frames_fixed_context(n_frames):
    """Wrong: the tiny preset's 256 tokens whatever the length."""
    chunk = max(c for c in range(1, 5) if n_frames % c == 0)
    return PandaConfig.preset("tiny", n_frames=n_frames, chunk_frames=chunk)


def config_for_frames_huge_context(n_frames):
    """Wrong: a context far larger than needed."""
    chunk = max(c for c in range(1, 5) if n_frames % c == 0)
    return PandaConfig.preset("tiny", n_frames=n_frames, chunk_frames=chunk, max_seq_len=8192)


# --------------------------------------------------------------------------- 4. another pretrained decoder

def decoder_config_right(hf):
    """Correct: every field, the defaults of a Llama config.json where one is missing."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim", hf["hidden_size"] // heads)
    return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=heads, n_kv_heads=hf.get("num_key_value_heads", heads),
                head_dim=0 if head_dim == hf["hidden_size"] // heads else head_dim,
                ffn_dim=hf["intermediate_size"], rms_eps=hf["rms_norm_eps"], rope_theta=float(hf.get("rope_theta", 10000.0)),
                max_seq_len=hf["max_position_embeddings"], qkv_bias=hf["model_type"] == "qwen2",
                tie_embeddings=hf.get("tie_word_embeddings", False))


def decoder_config_explicit_head_dim(hf):
    """Correct: head_dim always written out, rope_theta as the file has it (an int in SmolLM2's)."""
    heads = hf["num_attention_heads"]
    return decoder_config_right(hf) | dict(head_dim=hf.get("head_dim", hf["hidden_size"] // heads),
                                           rope_theta=hf.get("rope_theta", 10000))


def decoder_config_ignores_head_dim(hf):
    """Wrong: head_dim always 0, also where the file sets another width."""
    return decoder_config_right(hf) | dict(head_dim=0)


def decoder_config_kv_heads_default_one(hf):
    """Wrong: a missing num_key_value_heads read as 1 (it means one per query head)."""
    return decoder_config_right(hf) | dict(n_kv_heads=hf.get("num_key_value_heads", 1))


def decoder_config_tied_by_default(hf):
    """Wrong: embeddings tied when the file does not say (Llama's default is untied)."""
    return decoder_config_right(hf) | dict(tie_embeddings=hf.get("tie_word_embeddings", True))


def decoder_config_bias_everywhere(hf):
    """Wrong: q/k/v biases for every model type (only Qwen2 has them)."""
    return decoder_config_right(hf) | dict(qkv_bias=True)


def decoder_config_no_context(hf):
    """Wrong: max_seq_len left out, so the preset's 4096 stays."""
    return {k: v for k, v in decoder_config_right(hf).items() if k != "max_seq_len"}


def decoder_config_with_a_stab_field(hf):
    """Wrong: a field that is not the decoder's."""
    return decoder_config_right(hf) | dict(stab_dim=hf["hidden_size"])


# --------------------------------------------------------------------------- 5. a query per frame in FSRA

class FrameQueryFSRA(nn.Module):
    """Correct: row b*T + t attends with query[t]."""

    def __init__(self, cfg):
        super().__init__()
        self.query = nn.Parameter(torch.randn(cfg.n_frames, cfg.stab_dim))
        self.attn = (FastQueryAttention if cfg.fast else QueryAttention)(cfg.stab_dim, cfg.stab_heads)

    def frame_of_row(self, rows):
        """The frame position of each of the rows (B * T of them)."""
        return torch.arange(rows) % len(self.query)

    def forward(self, tokens, valid=None):
        """(B * T, L, C), (B * T, L) or None -> (B * T, C)."""
        return self.attn(self.query[self.frame_of_row(len(tokens))], tokens, valid)


class FrameQueryFSRAByVideo(FrameQueryFSRA):
    """Wrong: the rows read as t * B + b."""

    def frame_of_row(self, rows):
        return torch.arange(rows) // (rows // len(self.query))


class FrameQueryFSRAFirstOnly(FrameQueryFSRA):
    """Wrong: query[0] for every frame, the release's sharing again."""

    def frame_of_row(self, rows):
        return torch.zeros(rows, dtype=torch.long)


RIGHT = {
    "lsd": [lsd_right, lsd_right_unfold],
    "gstra_per_frame": [gstra_per_frame_right, gstra_per_frame_loop],
    "config_for_frames": [config_for_frames_right, config_for_frames_rounded],
    "decoder_config": [decoder_config_right, decoder_config_explicit_head_dim],
    "FrameQueryFSRA": [FrameQueryFSRA],
}
WRONG = {
    "lsd": [lsd_calls_attn, lsd_calls_forward_unbound, lsd_calls_attention_method, lsd_head_dim_scale,
            lsd_no_permute, lsd_no_residual],
    "gstra_per_frame": [gstra_per_chunk_repeated, gstra_per_frame_frames_first],
    "config_for_frames": [config_for_frames_four_or_one, config_for_frames_fixed_context,
                          config_for_frames_huge_context],
    "decoder_config": [decoder_config_ignores_head_dim, decoder_config_kv_heads_default_one,
                       decoder_config_tied_by_default, decoder_config_bias_everywhere, decoder_config_no_context,
                       decoder_config_with_a_stab_field],
    "FrameQueryFSRA": [FrameQueryFSRAByVideo, FrameQueryFSRAFirstOnly],
}
