"""Tests of the paper's Table 4 ablation switches: each one removes exactly its component, the
default configuration is the full model unchanged, and letterbox packing stays right."""

import pytest
import torch
import torch.nn.functional as F

from panda import VIDEO_PLACEHOLDER, PandaConfig, VideoPanda

ABLATIONS = {  # Table 4's rows as PandaConfig overrides
    "full": {},
    "w/o split tokens": dict(split_tokens=False),
    "w/o FSRA": dict(fsra=False),
    "w/o LSD (avg pool)": dict(lsd="avgpool"),
    "w/o LSTE": dict(lste=False),
    "w/o GSTRA": dict(gstra=False),
    "w/o GSTRA & LSTE": dict(gstra=False, lste=False),
}
# What each component owns in STAB's state dict (buffers included: BatchNorm's running statistics).
OWNED = {"split_tokens": ("split_token",), "fsra": ("fsra.", "balance"), "lsd": ("lsd.attn.",),
         "lste": ("lste.",), "gstra": ("gstra.", "balance")}


def nano(**overrides):
    """A nano model whose STAB weights are all random: fresh, GSTRA outputs zero and LSTE's temporal
    branch is zero (zero-initialised outputs), so a wrong ablation could go unnoticed."""
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", **overrides)).eval()
    with torch.no_grad():
        for p in model.stab.parameters():
            p.normal_(0, 0.5)
    return model


def clip(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.n_frames, 3, cfg.image_size, cfg.image_size, generator=g)


def reference_tokens(stab, video):
    """Square frames -> (B, T * tokens_per_frame, C), written out chunk by chunk and frame by frame
    from the release's vision_tokenizer.py with Table 4's ablations, independent of STAB.forward."""
    cfg, C, s, k = stab.cfg, stab.cfg.stab_dim, stab.cfg.lsd_window, stab.cfg.chunk_frames
    out = []
    for frames in video:  # (T, 3, S, S)
        tokens = []
        for start in range(0, len(frames), k):
            P = stab.patch_embed(frames[start:start + k])[None]  # (1, k, p, p, C)
            local = stab.lste(P) if cfg.lste else P
            g = stab.gstra(local.flatten(1, 3))[0] if cfg.gstra else None  # (C,)
            dense = (local + P if cfg.lste else P)[0].permute(0, 3, 1, 2)  # (k, C, Hp, Wp)
            for D in dense:
                mean = F.avg_pool2d(D[None], s)[0]  # (C, h, w)
                h, w = mean.shape[1:]
                Z = mean.flatten(1).T  # (h*w, C)
                if cfg.lsd == "attention":
                    windows = D.unfold(1, s, s).unfold(2, s, s).permute(1, 2, 3, 4, 0).reshape(h * w, s * s, C)
                    Z = stab.lsd.attn(Z, windows)
                f = stab.fsra(Z[None])[0] if cfg.fsra else None  # (C,)
                if cfg.fsra and cfg.gstra:
                    alpha = torch.sigmoid(stab.balance)
                    fused = stab.fuse((1 - alpha) * g + alpha * f)
                else:
                    fused = stab.fuse(g if cfg.gstra else f)
                rows = Z.view(h, w, C)
                if cfg.split_tokens:
                    rows = torch.cat([rows, stab.split_token.expand(h, 1, C)], 1)  # (h, w+1, C)
                tokens += [fused[None], rows.reshape(-1, C)]
        out.append(torch.cat(tokens))
    return torch.stack(out)


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_variant_equals_the_written_out_reference(name):
    model = nano(**ABLATIONS[name])
    v = clip(model.cfg)
    tokens, lengths = model.stab(v)
    expected = reference_tokens(model.stab, v)
    assert tokens.shape == expected.shape == (2, model.cfg.n_frames * model.cfg.tokens_per_frame, 32)
    assert lengths.tolist() == [tokens.shape[1]] * 2
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)  # float32 sums in other orders


@pytest.mark.parametrize("name", ABLATIONS)
def test_switched_off_modules_are_absent_and_the_rest_all_get_gradients(name):
    overrides = ABLATIONS[name]
    model, full = nano(**overrides).train(), nano()
    off = [field for field, value in overrides.items() if value in (False, "avgpool")]
    if "fsra" in off or "gstra" in off:
        assert model.stab.balance is None  # nothing left to balance
    gone = {n for n in full.stab.state_dict() if n.startswith(sum((OWNED[f] for f in off), ()))}
    assert set(model.stab.state_dict()) == set(full.stab.state_dict()) - gone
    assert all(getattr(model.stab, f.replace("split_tokens", "split_token")) is None for f in off if f != "lsd")
    v = clip(model.cfg)
    ids = torch.tensor([[1, VIDEO_PLACEHOLDER, 3, 4]] * 2)
    model(v, ids, labels=ids.clamp(min=0)).backward()
    assert all(p.grad is not None for p in model.parameters())  # no parameter sits unused


def test_the_default_config_is_the_full_model():
    cfg = PandaConfig()
    assert (cfg.split_tokens, cfg.fsra, cfg.lsd, cfg.lste, cfg.gstra) == (True, True, "attention", True, True)
    names = {n.split(".")[0] for n in nano().stab.state_dict()}
    assert names == {"patch_embed", "lste", "gstra", "lsd", "fsra", "balance", "fuse", "split_token"}
    assert PandaConfig.preset("paper").tokens_per_frame == 273
    assert PandaConfig.preset("paper", split_tokens=False).tokens_per_frame == 257


def test_without_split_tokens_the_tokens_are_the_full_models_minus_the_split_column():
    full, ablated = nano(), nano(split_tokens=False)
    ablated.stab.load_state_dict({n: t for n, t in full.stab.state_dict().items() if n != "split_token"})
    v = clip(full.cfg)
    with_split, without = full.stab(v)[0], ablated.stab(v)[0]
    T, g, C = full.cfg.n_frames, 2, 32
    per_frame = with_split.view(2, T, 1 + g * (g + 1), C)
    grid = per_frame[:, :, 1:].view(2, T, g, g + 1, C)[:, :, :, :g]  # drop the last column: the splits
    expected = torch.cat([per_frame[:, :, :1], grid.flatten(2, 3)], 2).flatten(1, 2)
    assert without.shape == (2, T * (1 + g * g), C) and torch.equal(without, expected)


def test_letterbox_packing_without_split_tokens():
    torch.manual_seed(0)
    small = dict(stab_dim=16, stab_heads=2, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                 vocab_size=50, n_frames=4, chunk_frames=2, image_size=224)  # 8 x 8 LSD grid
    full = VideoPanda(PandaConfig.preset("paper", **small)).stab.eval()
    torch.manual_seed(0)
    ablated = VideoPanda(PandaConfig.preset("paper", split_tokens=False, **small)).stab.eval()
    v = torch.randn(2, 4, 4, 224, 224)
    v[:, :, 3] = 0
    v[0, :, 3, 56:168, :] = 1  # video 0: 4 rows of 8 valid cells (a 28-px window each)
    v[1, :, 3, :, 28:196] = 1  # video 1: 8 rows of 6 valid cells
    (a, n_a), (b, n_b) = full(v), ablated(v)
    assert n_a.tolist() == [4 * (1 + 4 * 9), 4 * (1 + 8 * 7)]
    assert n_b.tolist() == [4 * (1 + 4 * 8), 4 * (1 + 8 * 6)]
    for i, w in enumerate((8, 6)):  # the ablated tokens are the full model's without every (w+1)-th grid token
        frames = a[i, :n_a[i]].view(4, -1, 16)
        grid = frames[:, 1:].view(4, -1, w + 1, 16)[:, :, :w]
        expected = torch.cat([frames[:, :1], grid.flatten(1, 2)], 1).flatten(0, 1)
        assert torch.equal(b[i, :n_b[i]], expected)
        assert (b[i, n_b[i]:] == 0).all()  # padding after the shorter video


def test_avgpool_lsd_is_the_window_mean():
    lsd = nano(lsd="avgpool").stab.lsd
    assert lsd.attn is None and not list(lsd.parameters())
    x = torch.randn(3, 4, 6, 8)  # (F, H, W, C)
    expected = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(lsd(x), expected)


def test_without_fsra_the_fused_token_is_the_chunk_context_alone():
    model = nano(fsra=False)
    stab, cfg = model.stab, model.cfg
    v = clip(cfg, B=1)
    p = stab.patch_embed(v[0])  # (T, p, p, C)
    chunks = p.reshape(2, 2, *p.shape[1:])  # (T/k, k, Hp, Wp, C)
    g = stab.gstra(stab.lste(chunks).flatten(1, 3))  # (T/k, C)
    fused = stab(v)[0].view(cfg.n_frames, cfg.tokens_per_frame, -1)[:, 0]
    torch.testing.assert_close(fused, stab.fuse(g).repeat_interleave(2, 0))
    assert stab.fsra is None and not any("fsra" in n for n, _ in model.named_parameters())


def test_without_lste_and_gstra_the_patch_embeddings_go_straight_to_lsd():
    model = nano(lste=False, gstra=False)
    stab, cfg = model.stab, model.cfg
    assert stab.lste is None and stab.gstra is None
    v = clip(cfg, B=1)
    x = stab.patch_embed(v[0])  # (T, p, p, C): added once, not twice
    grid = stab.lsd(x)
    tokens = stab(v)[0].view(cfg.n_frames, cfg.tokens_per_frame, -1)
    torch.testing.assert_close(tokens[:, 0], stab.fuse(stab.fsra(grid.flatten(1, 2))))
    torch.testing.assert_close(tokens[:, 1:].view(cfg.n_frames, 2, 3, -1)[:, :, :2], grid)


def test_bad_switch_values_are_clear_errors():
    with pytest.raises(ValueError, match="lsd must be 'attention' or 'avgpool'"):
        PandaConfig(lsd="maxpool")
    with pytest.raises(ValueError, match="fsra=False and gstra=False"):
        PandaConfig(fsra=False, gstra=False)
