"""Your answers to docs/EXERCISES.md. Replace each `raise NotImplementedError` with a solution; then

    python -m pytest tests/test_exercises.py -rs

checks it against panda's own behaviour. An exercise you have not attempted yet is skipped, not failed.
The end of this file puts answers 2 and 5 into a training run (train.py --model_hook): nothing to write there.
"""

import math

import torch  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F  # noqa: F401  (you will likely want it)

from panda import PandaConfig, QueryAttention  # noqa: F401


# --------------------------------------------------------------------------- exercise 1

def lsd(x, attn, window):
    """Local Spatial Downsampling written out (the paper's Sec. 3.1, Eq. 4-7; panda's LSD).

    x: (F, H, W, C) patch tokens of F frames. Every window x window block of patches becomes one token:
    the block's average, plus the output of one attention whose query is that average and whose keys
    and values are the block's window*window patches. Returns (F, H // window, W // window, C).

    attn is a panda.QueryAttention; use its layers: attn.q (LayerNorm, then Linear: the query), attn.kv
    (LayerNorm, then Linear to 2C: the first C outputs are the keys, the last C the values), attn.proj
    (the output Linear), attn.heads and attn.scale (multiply the logits by it). Calling attn, or any
    method of QueryAttention, is not an answer: the test makes them raise."""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 2

def gstra_per_frame(gstra, local):
    """GSTRA (Eq. 11-13) with one token per frame instead of one per chunk.

    local: (N, k, h, w, C), LSTE's output for N chunks of k frames. gstra: a panda.GSTRA. Return (N * k, C):
    for every frame, in order (chunk 0's k frames, then chunk 1's, ...), GSTRA's token when its query
    attends over that frame's h * w tokens only. (panda's STAB gives gstra all k * h * w tokens of a chunk.)"""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 3

def config_for_frames(n_frames):
    """The tiny preset for clips of n_frames frames (any n_frames >= 2).

    Return a PandaConfig equal to PandaConfig.preset("tiny") but for three fields:
      chunk_frames  the largest divisor of n_frames that is at most 4 (the release's chunk length);
      max_seq_len   at least n_frames * tokens_per_frame + 128 (the video's tokens and 128 text tokens:
                    prompt, answers, generated words) and at most twice that;
      n_frames      n_frames."""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 4

def decoder_config(hf):
    """A Hugging Face Llama, Mistral or Qwen2 config.json, read into a dict -> a dict of PandaConfig's
    decoder fields, which PandaConfig.preset("paper", **yours) turns into that checkpoint's decoder:

    vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, rms_eps, rope_theta, max_seq_len,
    qkv_bias and tie_embeddings (see PandaConfig's comments). Leave out rope scaling and sliding windows."""
    raise NotImplementedError


# --------------------------------------------------------------------------- exercise 5

class FrameQueryFSRA(nn.Module):
    """FSRA as the paper's Eq. 8 writes it: a learned query W_t for every frame position t, instead of
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


# --------------------------------------------------------------------------- your answers in a training run
# python train.py --model_hook=teaching.exercises.with_gstra_per_frame --save_every=0   (exercise 2's "Then try")
# python train.py --model_hook=teaching.exercises.with_frame_query_fsra --save_every=0  (exercise 5's "Then try")

class PerFrameGSTRA(nn.Module):
    """Where the STAB calls GSTRA with a chunk's tokens (N, k*p*p, C), your gstra_per_frame gives one
    token per frame, (N*k, C), from the same GSTRA weights."""

    def __init__(self, gstra, chunk_frames):
        super().__init__()
        self.gstra, self.k = gstra, chunk_frames

    def forward(self, tokens):
        """(N, k*p*p, C) -> (N*k, C): chunk n's frame i is row n*k + i."""
        N, L, C = tokens.shape
        p = math.isqrt(L // self.k)  # the STAB's frames are square: p x p patches
        return gstra_per_frame(self.gstra, tokens.view(N, self.k, p, p, C))


def with_gstra_per_frame(model):
    """The model with exercise 2's answer in its STAB; train.py --model_hook calls it on a fresh model."""
    if model.stab.gstra is None:
        raise ValueError("exercise 2 changes GSTRA, which this model does not have (--gstra=false)")
    model.stab.gstra = PerFrameGSTRA(model.stab.gstra, model.cfg.chunk_frames)
    return model


def with_frame_query_fsra(model):
    """The model with exercise 5's answer as its FSRA; train.py --model_hook calls it on a fresh model."""
    if model.stab.fsra is None:
        raise ValueError("exercise 5 changes FSRA, which this model does not have (--fsra=false)")
    model.stab.fsra = FrameQueryFSRA(model.cfg)
    return model
