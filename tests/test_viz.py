"""Tests of the attention pictures: viz.attention_probe, the heat maps, and sample.py --viz."""

import imageio.v3 as iio
import numpy as np
import torch

import common
import sample
import train
import viz
from panda import PandaConfig, QueryAttention, VideoPanda


def nano(**overrides):
    torch.manual_seed(0)
    model = VideoPanda(PandaConfig.preset("nano", **overrides)).eval()
    with torch.no_grad():  # random everywhere: fresh, GSTRA's query is zero and its attention uniform
        for p in model.stab.parameters():
            p.normal_(0, 0.5)
    return model


def reference_weights(attn, query, tokens, key_mask=None):
    """softmax(q . k * scale) per head, from the module's layers, written out: (N, heads, L)."""
    N, L, C = tokens.shape
    q = attn.q(query).view(N, attn.heads, 1, -1)
    k = attn.kv(tokens)[..., :C].view(N, L, attn.heads, -1).transpose(1, 2)
    logits = (q * k).sum(-1) * attn.scale
    return logits.masked_fill(~key_mask[:, None], float("-inf")).softmax(-1) if key_mask is not None \
        else logits.softmax(-1)


def test_the_probe_records_each_attention_and_changes_nothing():
    model = nano()
    v = torch.randn(1, 4, 3, 32, 32)
    before = model.stab(v)[0]
    calls = {}
    for name, m in model.named_modules():  # what each attention was called with, to check against
        if isinstance(m, QueryAttention):
            m.register_forward_hook(lambda m, args, out, name=name: calls.__setitem__(name, args))
    with viz.attention_probe(model) as maps:
        inside = model.stab(v)[0]
    assert torch.equal(inside, before)  # the fast forms ran, as without the probe
    shapes = {name: tuple(a.shape) for name, a in maps.items()}
    assert shapes == {"stab.lsd.attn": (4 * 2 * 2, 2, 4), "stab.fsra.attn": (4, 2, 4), "stab.gstra.attn": (2, 2, 32)}
    for name, weights in maps.items():
        expected = reference_weights(model.get_submodule(name), *calls[name])
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 3  # the probe removed its own three


def test_heat_maps_put_each_weight_on_its_pixels():
    model = nano()
    v = torch.randn(1, 4, 3, 32, 32)
    heat = viz.attention_heat_maps(model, v)
    with viz.attention_probe(model) as maps:
        model.encode_videos(v)
    assert {k: m.shape for k, m in heat.items()} == {name: (4, 32, 32) for name in ("LSD", "FSRA", "GSTRA")}
    # LSD: window (i, j) covers pixels [16i:16i+16, 16j:16j+16]; its patch (a, b) the 8 x 8 at 8a, 8b inside
    lsd = maps["stab.lsd.attn"].mean(1).view(4, 2, 2, 2, 2)  # (T, i, j, a, b)
    for t, i, j, a, b in np.ndindex(4, 2, 2, 2, 2):
        y, x = 16 * i + 8 * a, 16 * j + 8 * b
        assert np.allclose(heat["LSD"][t, y:y + 8, x:x + 8], lsd[t, i, j, a, b].item())
    fsra = maps["stab.fsra.attn"].mean(1).view(4, 2, 2)
    assert np.allclose(heat["FSRA"][2, 16:, :16], (fsra[2, 1, 0] / fsra[2].max()).item())
    assert np.isclose(heat["GSTRA"][:2].max(), 1) and np.isclose(heat["GSTRA"][2:].max(), 1)  # one scale per chunk


def test_switched_off_components_have_no_map():
    heat = viz.attention_heat_maps(nano(fsra=False, lsd="avgpool"), torch.randn(1, 4, 3, 32, 32))
    assert set(heat) == {"GSTRA"}
    assert viz.attention_gif_frames(nano(gstra=False), torch.randn(1, 4, 3, 32, 32)).shape[0] == 4


def test_colormap_runs_from_dark_to_bright():
    c = viz.colormap(np.linspace(0, 1, 5)).astype(int)
    assert c.shape == (5, 3) and c[0].sum() < 10 and c[-1].sum() > 600
    assert (np.diff(c.sum(-1)) > 0).all()


def test_sample_viz_writes_a_gif_with_a_picture_per_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: {"all": 0.0})
    train.main(["--preset=nano", "--device=cpu", "--max_steps=1", "--batch_size=2", "--warmup_steps=1",
                "--eval_samples=1", "--questions_per_clip=1", f"--out_dir={tmp_path}"])
    gif = tmp_path / "attention.gif"
    sample.main([f"--out_dir={tmp_path}", "--video=synthetic:3", "--max_new_tokens=1", "--device=cpu",
                 f"--viz={gif}"])
    pictures = iio.imread(gif, index=None, plugin="pillow")
    zoom = -(-viz.MIN_PANEL // 32)
    assert pictures.shape[:3] == (4, viz.CAPTION + 32 * zoom, 4 * 32 * zoom + 3 * viz.GAP)
    cfg = PandaConfig(**common.load_checkpoint(tmp_path / "ckpt.pt")["model_config"])
    frame = viz.frames_rgb(sample.load_video("synthetic:3", cfg)[0])[2]  # the first panel: the frame, enlarged
    shown = pictures[2, viz.CAPTION:, :32 * zoom, :3][::zoom, ::zoom]
    assert np.abs(shown.astype(int) - frame).max() <= 8  # GIF palettes round the colours a little
