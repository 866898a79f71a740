"""The fast forms in panda.py compute the plain forms' function (PandaConfig.fast): the patch embedding
as a matmul, the LSTE on channels-last tokens, the pooled attention of GSTRA and FSRA; forward and
gradients, each module and the whole model. And the KV cache: generation through it equals generation
that recomputes the whole sequence, with a fresh cache or a larger one reused."""

import pytest
import torch
import torch.nn.functional as F

import panda
from panda import VIDEO_PLACEHOLDER, FastQueryAttention, KVCache, PandaConfig, QueryAttention, VideoPanda

TOLERANCE = 1e-5  # fp32: the two forms add the same products in another order


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomised(module, seed, std=0.3):
    """Every parameter random (the zero inits would hide biases and residual branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def both(make, seed):
    """(fast, plain): the same module, fast=True and fast=False, with the same random weights."""
    fast, plain = randomised(make(True), seed), make(False)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def assert_same_function(fast, plain, inputs):
    """Equal outputs, and equal gradients for the inputs and every parameter."""
    inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out_fast, out_plain = fast(*inputs), plain(*inputs)
    out_fast, out_plain = (o[0] if isinstance(o, tuple) else o for o in (out_fast, out_plain))
    assert rel_err(out_fast, out_plain) < TOLERANCE
    g = torch.randn_like(out_plain)
    wrt = lambda m: [x for x in inputs if x.requires_grad] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out_fast, wrt(fast), g, allow_unused=True),
                    torch.autograd.grad(out_plain, wrt(plain), g, allow_unused=True)):
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) < TOLERANCE)


# --------------------------------------------------------------------------- attention

def sdpa_reference(attn, query, tokens, key_mask=None):
    """The release's formula through F.scaled_dot_product_attention: a key and a value for every token."""
    N, L, C = tokens.shape
    h = attn.heads
    q = attn.q(query).view(N, h, 1, C // h)
    k, v = attn.kv(tokens).view(N, L, 2, h, C // h).permute(2, 0, 3, 1, 4)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return query + attn.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale).reshape(N, C))


@pytest.mark.parametrize("bias,full_width_scale", [(True, False), (False, True)])  # GSTRA; LSD and FSRA
@pytest.mark.parametrize("masked", [False, True])
def test_pooled_attention_is_the_plain_attention(bias, full_width_scale, masked):
    for seed in range(3):
        form = lambda f: FastQueryAttention if f else QueryAttention
        fast, plain = both(lambda f: form(f)(64, 4, bias, full_width_scale), seed)
        g = torch.Generator().manual_seed(seed)
        query, tokens = torch.randn(6, 64, generator=g), torch.randn(6, 50, 64, generator=g)
        mask = None
        if masked:
            mask = torch.rand(6, 50, generator=g) > 0.4
            mask[:, seed] = True  # at least one valid key per query
        assert_same_function(fast, plain, [query, tokens] + ([mask] if masked else []))
        assert rel_err(plain(query, tokens, mask), sdpa_reference(plain, query, tokens, mask)) < TOLERANCE


def test_few_tokens_keep_the_plain_form():
    """Up to as many tokens as heads (LSD's 2x2 windows) the plain form runs: there the rewrite would
    hold more numbers than it saves. Above that, the pooled form."""
    attn = FastQueryAttention(32, 8)
    calls = []
    attn.pooled_attention = lambda query, tokens, mask: calls.append(tokens.shape[1]) or torch.zeros(2, 8, 4)
    attn(torch.randn(2, 32), torch.randn(2, 8, 32))
    attn(torch.randn(2, 32), torch.randn(2, 9, 32))
    assert calls == [9]


def test_the_switch_builds_the_fast_forms_with_the_same_parameters():
    fast, plain = (VideoPanda(PandaConfig.preset("nano", fast=f)).stab for f in (True, False))
    kinds = lambda stab: [type(m).__name__ for m in (stab.patch_embed, stab.lste, stab.gstra.attn, stab.lsd.attn,
                                                      stab.fsra.attn)]
    assert kinds(plain) == ["PatchEmbed", "LSTE"] + ["QueryAttention"] * 3
    assert kinds(fast) == ["FastPatchEmbed", "FastLSTE"] + ["FastQueryAttention"] * 3
    assert {n: t.shape for n, t in fast.state_dict().items()} == {n: t.shape for n, t in plain.state_dict().items()}


# --------------------------------------------------------------------------- the STAB's modules

def test_patch_embedding_matmul_is_the_conv():
    fast, plain = both(lambda f: (panda.FastPatchEmbed if f else panda.PatchEmbed)(24, 14), 0)
    assert_same_function(fast, plain, [torch.randn(5, 3, 56, 56)])
    assert rel_err(plain(torch.ones(1, 3, 56, 56)), F.conv2d(torch.ones(1, 3, 56, 56), plain.weight, stride=14)
                   .permute(0, 2, 3, 1)) < TOLERANCE  # plain is the release's Conv2d, channels last


@pytest.mark.parametrize("training", [False, True])  # BatchNorm with running or batch statistics
def test_lste_on_channels_last_tokens_is_the_conv3d_modules(training):
    cfg = PandaConfig.preset("nano", stab_dim=24)
    fast, plain = both(lambda f: (panda.FastLSTE if f else panda.LSTE)(cfg), 0)
    for m in (fast, plain):
        m.norm.running_var.fill_(1.7)  # randomised() touched parameters only
        m.train(training)
    x = torch.randn(3, 4, 5, 7, 24)  # (N, k, h, w, C): odd sizes, so rows and columns cannot be confused
    assert_same_function(fast, plain, [x])


# --------------------------------------------------------------------------- the whole model

def paper_geometry(fast, seed=0):
    """The paper's frames (8 x 448 px, patch 14, LSD 2, chunks of 4) with narrow widths."""
    torch.manual_seed(seed)
    cfg = PandaConfig.preset("paper", stab_dim=16, stab_heads=2, d_model=16, n_layers=1, n_heads=2,
                             n_kv_heads=2, ffn_dim=32, vocab_size=50, stab_dropout=0.0, fast=fast)
    return VideoPanda(cfg)


@pytest.mark.parametrize("letterbox", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_the_fast_stab_is_the_plain_stab(letterbox, training):
    fast, plain = both(lambda f: paper_geometry(f).stab.train(training), 0)
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 8, 3, 448, 448, generator=g)
    if letterbox:  # a 16:9-like box: FSRA's key mask is in play, and the tokens are packed
        mask = torch.zeros(448, 448)
        mask[56:392, :] = 1
        video = torch.cat([video, mask.expand(2, 8, 1, 448, 448)], 2)
    assert torch.equal(fast(video)[1], plain(video)[1])
    assert_same_function(fast, plain, [video])


# --------------------------------------------------------------------------- the KV cache

def nano_model_and_prompts():
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano")).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(3, cfg.n_frames, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=g)
    ids[:, 2] = VIDEO_PLACEHOLDER
    return model, videos, ids, torch.tensor([9, 5, 7])  # right-padded rows of different lengths


def test_each_decode_step_gives_the_logits_of_the_whole_sequence():
    """Every step's logits through the cache equal a forward pass over the prompt and the tokens so
    far (which has no cache), for rows of different lengths in one batch."""
    model, videos, ids, lengths = nano_model_and_prompts()
    steps, original = [], model.decode_step
    model.decode_step = lambda *a: steps.append(original(*a)) or steps[-1]
    new = model.generate(videos, ids, lengths, max_new_tokens=5)
    for row, n in enumerate(lengths.tolist()):
        for step in range(1, 5):
            seq = torch.cat([ids[row:row + 1, :n], new[row:row + 1, :step]], 1)
            whole = model(videos[row:row + 1], seq)[0, -1]
            assert rel_err(steps[step - 1][row], whole) < TOLERANCE, (row, step)


def test_the_prefill_gives_each_row_the_logits_of_its_prompt_alone():
    """Right-padded rows of different lengths in one prefill: each row's next-token logits, taken at
    its own last position, equal a forward pass over that row alone."""
    model, videos, ids, lengths = nano_model_and_prompts()
    x, _, seq_len = model.embed_inputs(videos, ids, lengths=lengths)
    with torch.no_grad():
        logits = model.prefill(x, seq_len, KVCache(model.cfg, 3, x.shape[1], torch.float32, "cpu"))
        for row, n in enumerate(lengths.tolist()):
            assert rel_err(logits[row], model(videos[row:row + 1], ids[row:row + 1, :n])[0, -1]) < TOLERANCE


def test_a_larger_cache_reused_gives_the_same_tokens_and_a_small_one_is_an_error():
    model, videos, ids, lengths = nano_model_and_prompts()
    fresh = model.generate(videos, ids, lengths, max_new_tokens=12)
    cache = KVCache(model.cfg, 3, 150, torch.float32, "cpu")  # as a compiled decoder keeps one
    for _ in range(2):  # the second call finds the first call's keys in the buffers: they must not matter
        assert torch.equal(model.generate(videos, ids, lengths, max_new_tokens=12, cache=cache), fresh)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=5)
    a = model.generate(videos, ids, lengths, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(videos, ids, lengths, generator=torch.Generator().manual_seed(3), cache=cache, **kw)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="the KV cache's 20 slots"):
        model.generate(videos, ids, lengths, max_new_tokens=12, cache=KVCache(model.cfg, 3, 20, torch.float32, "cpu"))
