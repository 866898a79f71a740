"""The speed-ups in panda.py compute the same function as the plain code: pooled attention vs keys and
values for every token, the patch embedding as a matmul vs the conv, the LSTE on channels-last tokens
vs its conv modules, its depthwise convs rewritten vs the library kernel, a static KV cache vs
the growing one."""

from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F

import panda
from panda import VIDEO_PLACEHOLDER, PandaConfig, QueryAttention, StaticKVCache, VideoPanda


@contextmanager
def plain_attention():
    """QueryAttention.fast = False inside the block: keys and values for every token."""
    QueryAttention.fast = False
    try:
        yield
    finally:
        QueryAttention.fast = True


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomised(module, seed, std=0.3):
    """Every parameter random (the zero inits would hide biases and residual branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize("bias,full_width_scale", [(True, False), (False, True)])  # GSTRA; LSD and FSRA
@pytest.mark.parametrize("masked", [False, True])
def test_pooled_attention_equals_keys_and_values_for_every_token(bias, full_width_scale, masked):
    for seed in range(3):
        torch.manual_seed(seed)
        attn = randomised(QueryAttention(64, 4, bias=bias, full_width_scale=full_width_scale), seed)
        query, tokens = torch.randn(6, 64), torch.randn(6, 50, 64)
        mask = None
        if masked:
            mask = torch.rand(6, 50) > 0.4
            mask[:, seed] = True  # at least one valid key per query
        fast = attn(query, tokens, mask)
        with plain_attention():
            plain = attn(query, tokens, mask)
        assert rel_err(fast, plain) < 1e-5


def sdpa_reference(attn, query, tokens, key_mask=None):
    """The released formula, through F.scaled_dot_product_attention: a key and a value per token."""
    N, L, C = tokens.shape
    h = attn.heads
    q = attn.q(query).view(N, h, 1, C // h)
    k, v = attn.kv(tokens).view(N, L, 2, h, C // h).permute(2, 0, 3, 1, 4)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return query + attn.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale).reshape(N, C))


@pytest.mark.parametrize("L", [4, 50])  # LSD's window (plain path), more tokens than heads (pooled path)
@pytest.mark.parametrize("fast", [True, False])
def test_both_paths_equal_scaled_dot_product_attention(L, fast):
    torch.manual_seed(L)
    attn = randomised(QueryAttention(64, 8, bias=True, full_width_scale=L == 4), L)
    query, tokens = torch.randn(5, 64), torch.randn(5, L, 64)
    mask = torch.rand(5, L) > 0.3
    mask[:, 0] = True
    with nullcontext() if fast else plain_attention():
        for key_mask in (None, mask):
            assert rel_err(attn(query, tokens, key_mask), sdpa_reference(attn, query, tokens, key_mask)) < 1e-5


def test_pooled_attention_gradients_equal_the_plain_ones():
    torch.manual_seed(0)
    attn = randomised(QueryAttention(32, 2, bias=True, full_width_scale=False), 0)
    query, tokens = torch.randn(3, 32, requires_grad=True), torch.randn(3, 40, 32, requires_grad=True)
    grads = []
    for plain in (False, True):
        attn.zero_grad()
        query.grad = tokens.grad = None
        with plain_attention() if plain else nullcontext():
            attn(query, tokens).pow(2).sum().backward()
        grads.append([query.grad.clone(), tokens.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    for fast_g, plain_g in zip(*grads):
        assert rel_err(fast_g, plain_g) < 1e-5


def test_few_tokens_keep_the_plain_path():
    """LSD's 2x2 windows have fewer tokens than heads: the rewrite would do more work there."""
    attn = QueryAttention(32, 8)
    calls = []
    attn.pooled_attention = lambda *a: calls.append(a)
    attn(torch.randn(2, 32), torch.randn(2, 4, 32))
    assert calls == []


def paper_geometry_model(seed=0):
    """The paper's frames (8 x 448 px, patch 14, LSD 2, chunks of 4) with narrow widths."""
    torch.manual_seed(seed)
    cfg = PandaConfig.preset("paper", stab_dim=16, stab_heads=2, d_model=16, n_layers=1, n_heads=2,
                             n_kv_heads=2, ffn_dim=32, vocab_size=50)
    model = VideoPanda(cfg).eval()
    randomised(model.stab, seed, std=0.2)
    return model


@pytest.mark.parametrize("letterbox", [False, True])
def test_stab_fast_paths_equal_the_plain_stab(letterbox):
    model = paper_geometry_model()
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 8, 3, 448, 448, generator=g)
    if letterbox:  # a 16:9-like box: FSRA's key mask is in play
        mask = torch.zeros(448, 448)
        mask[56:392, :] = 1
        video = torch.cat([video, mask.expand(2, 8, 1, 448, 448)], 2)
    with torch.no_grad():
        fast, n_fast = model.stab(video)
        with plain_attention():
            plain, n_plain = model.stab(video)
    assert torch.equal(n_fast, n_plain) and fast.shape == plain.shape
    assert rel_err(fast, plain) < 1e-5


def test_patch_embedding_matmul_equals_the_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, 14, 14, bias=False)
    frames = torch.randn(5, 3, 56, 56)
    assert rel_err(panda.patch_embed(conv, frames), conv(frames).permute(0, 2, 3, 1)) < 1e-6


def lste_reference(lste, x):  # (N, C, k, h, w) -> same: the release's LSTE, its conv modules channels first
    x = x + lste.expand(lste.temporal(lste.reduce(lste.norm(x))))
    return x + lste.dpe(x)


@pytest.mark.parametrize("training", [False, True])  # BatchNorm with running or batch statistics
def test_lste_on_channels_last_tokens_equals_the_conv_modules(training):
    torch.manual_seed(0)
    lste = randomised(panda.LSTE(PandaConfig.preset("nano", stab_dim=24)), 0).train(training)
    lste.norm.running_var.uniform_(0.5, 2)  # randomised() touched parameters only
    x = torch.randn(3, 24, 4, 5, 7, requires_grad=True)  # (N, C, k, h, w); LSTE takes it channels last
    fast = lste(x.permute(0, 2, 3, 4, 1))
    plain = lste_reference(lste, x).permute(0, 2, 3, 4, 1)
    assert rel_err(fast, plain) < 1e-5
    g = torch.randn_like(plain)
    params = list(lste.parameters())
    for a, b in zip(torch.autograd.grad(fast, [x] + params, g), torch.autograd.grad(plain, [x] + params, g)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("which", ["temporal", "dpe"])
def test_depthwise_convs_on_channels_last_tokens_equal_the_library_kernel(which):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0), groups=6) if which == "temporal" else \
        torch.nn.Conv3d(6, 6, 3, padding=1, groups=6)
    randomised(conv, 0)
    x = torch.randn(2, 4, 5, 7, 6, requires_grad=True)  # (N, k, h, w, c): channels last
    fast = (panda.temporal_conv if which == "temporal" else panda.dpe_conv)(conv, x)
    library = conv(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    assert rel_err(fast, library) < 1e-6
    g = torch.randn_like(library)
    for a, b in zip(torch.autograd.grad(fast, [x, conv.weight, conv.bias], g),
                    torch.autograd.grad(library, [x, conv.weight, conv.bias], g)):
        assert rel_err(a, b) < 1e-5


def nano_model_and_prompts():
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano")).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(3, cfg.n_frames, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=g)
    ids[:, 2] = VIDEO_PLACEHOLDER
    return model, videos, ids, torch.tensor([9, 5, 7])  # right-padded rows of different lengths


def test_static_cache_generation_equals_the_plain_cache():
    model, videos, ids, lengths = nano_model_and_prompts()
    plain = model.generate(videos, ids, lengths, max_new_tokens=12)
    static = model.generate(videos, ids, lengths, max_new_tokens=12, static_cache=True)
    assert torch.equal(plain, static)
    # A preallocated cache, larger than needed, reused across calls (how a compiled decoder uses it).
    cache = StaticKVCache(model.cfg, 3, 150, torch.float32, "cpu")
    for _ in range(2):
        assert torch.equal(model.generate(videos, ids, lengths, max_new_tokens=12, static_cache=cache), plain)


def test_static_cache_logits_match_and_sampling_and_eos_work():
    model, videos, ids, lengths = nano_model_and_prompts()
    steps = {}
    for static in (False, True):
        model_steps = []
        original = model.decode_step
        model.decode_step = lambda *a: model_steps.append(original(*a)) or model_steps[-1]
        list(model.stream(videos, ids, lengths, max_new_tokens=6, static_cache=static))
        del model.decode_step
        steps[static] = torch.stack(model_steps)
    assert rel_err(steps[True], steps[False]) < 1e-5
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=5)
    a = model.generate(videos, ids, lengths, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(videos, ids, lengths, generator=torch.Generator().manual_seed(3), static_cache=True, **kw)
    assert torch.equal(a, b)
    eos = int(a[0, 2])
    assert torch.equal(model.generate(videos, ids, lengths, max_new_tokens=10, eos_id=eos),
                       model.generate(videos, ids, lengths, max_new_tokens=10, eos_id=eos, static_cache=True))


def test_a_static_cache_too_small_is_an_error():
    model, videos, ids, lengths = nano_model_and_prompts()
    with pytest.raises(ValueError, match="static cache"):
        model.generate(videos, ids, lengths, max_new_tokens=12, static_cache=StaticKVCache(model.cfg, 3, 20, torch.float32, "cpu"))
