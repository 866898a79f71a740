"""Your answers to EXERCISES.md. Replace each `raise NotImplementedError` with a solution; then

    python -m pytest tests/test_exercises.py -rs

checks it against panda's own behaviour. An exercise you have not attempted yet is skipped, not failed.
"""

import torch  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F  # noqa: F401  (you will likely want it)

from panda import PandaConfig, QueryAttention  # noqa: F401


# --------------------------------------------------------------------------- exercise 1

def lsd(x, attn, window):
    """Local Spatial Downsampling, written out (spec B.3 step 6b; paper Sec. 3.3).

    x: (F, H, W, C) patch tokens of F frames. Every window x window block of patches becomes one token:
    the block's average, plus the output of one attention whose query is that average and whose keys
    and values are the block's window*window patches. Returns (F, H // window, W // window, C).

    Use attn's layers, a panda.QueryAttention: attn.q (LayerNorm, then Linear: the query), attn.kv
    (LayerNorm, then Linear to 2C: the first C outputs are the keys, the last C the values), attn.proj
    (the output Linear), attn.heads and attn.scale (multiply the logits by it). Do not call attn(...)."""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 2

def gstra_per_frame(gstra, local):
    """GSTRA with one token per frame instead of one per chunk.

    local: (N, k, h, w, C), LSTE's output for N chunks of k frames. gstra: a panda.GSTRA. Return (N * k, C):
    for every frame, in order (chunk 0's k frames, then chunk 1's, ...), GSTRA's token when its query
    attends over that frame's h * w tokens only. (panda's STAB gives gstra all k * h * w tokens of a chunk.)"""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 3

def config_for_frames(n_frames):
    """The tiny preset for clips of n_frames frames (any n_frames >= 2).

    Return a PandaConfig equal to PandaConfig.preset("tiny") except for n_frames, chunk_frames and
    max_seq_len: chunks as long as the release's (4 frames) where n_frames allows, and a context with
    room for the video's tokens and 128 text tokens (prompt, answers and generated tokens)."""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 4

def decoder_config(hf):
    """A Hugging Face Llama, Mistral or Qwen2 config.json, read into a dict -> the decoder fields of PandaConfig:

    vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, rms_eps, rope_theta, max_seq_len,
    qkv_bias and tie_embeddings (see PandaConfig's comments). Leave out rope scaling and sliding windows."""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 5

class FrameQueryFSRA(nn.Module):
    """FSRA as the paper's equation writes it: a learned query W_t for every frame position t, instead of
    the release's one query shared by all frames (panda.FSRA).

    Attributes: query, a Parameter (cfg.n_frames, cfg.stab_dim); attn, a panda.QueryAttention(cfg.stab_dim,
    cfg.stab_heads). forward(tokens, valid=None) as panda.FSRA's: tokens (B * T, L, C) with the frames of each
    video one after another (row b * T + t is frame t of video b), valid (B * T, L) bool or None -> (B * T, C),
    frame t attending with query[t]. It then drops into a STAB: model.stab.fsra = FrameQueryFSRA(cfg)."""

    def __init__(self, cfg):
        super().__init__()
        raise NotImplementedError

    def forward(self, tokens, valid=None):
        raise NotImplementedError
