"""Tests of the attention pictures: attention_pictures.attention_probe, the maps, the pictures and their colour keys,
the file formats, and sample.py --viz."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from checkpoints import run_files
import data
import sample
import train
from teaching import attention_pictures
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
    with attention_pictures.attention_probe(model) as maps:
        inside = model.stab(v)[0]
    assert torch.equal(inside, before)  # the fast forms ran, as without the probe
    shapes = {name: tuple(a.shape) for name, a in maps.items()}
    assert shapes == {"stab.lsd.attn": (4 * 2 * 2, 2, 4), "stab.fsra.attn": (4, 2, 4), "stab.gstra.attn": (2, 2, 32)}
    for name, weights in maps.items():
        expected = reference_weights(model.get_submodule(name), *calls[name])
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 3  # the probe removed its own three


def test_each_weight_sits_on_its_square_and_each_softmax_sums_to_one():
    model = nano()  # 32 px frames: 4 x 4 patches of 8 px, 2 x 2 windows of 2 x 2 patches, chunks of 2 frames
    v = torch.randn(1, 4, 3, 32, 32)
    heat = {h.name: h for h in attention_pictures.attention_maps(model, v)}
    with attention_pictures.attention_probe(model) as maps:
        model.encode_videos(v)
    assert {name: h.weights.shape for name, h in heat.items()} == {"LSD": (4, 4, 4), "FSRA": (4, 2, 2), "GSTRA": (4, 4, 4)}
    lsd = maps["stab.lsd.attn"].mean(1).view(4, 2, 2, 2, 2)  # (t, window row i, column j, patch row a, column b)
    for t, i, j, a, b in np.ndindex(4, 2, 2, 2, 2):
        assert np.isclose(heat["LSD"].weights[t, 2 * i + a, 2 * j + b], lsd[t, i, j, a, b].item())
    windows = heat["LSD"].weights.reshape(4, 2, 2, 2, 2).sum((2, 4))  # (t, i, j): each window's weights
    assert np.allclose(windows, 1) and np.allclose(heat["FSRA"].weights.sum((1, 2)), 1)
    assert np.allclose(heat["GSTRA"].weights.reshape(2, -1).sum(1), 1)  # one softmax over each chunk's 2 frames
    assert [(h.uniform, h.top) for h in heat.values()] == [
        (1 / 4, 1.0), (1 / 4, heat["FSRA"].weights.max()), (1 / 32, heat["GSTRA"].weights.max())]


def test_fsra_is_uniform_over_the_letterbox_cells_only():
    v = torch.randn(1, 4, 4, 32, 32)
    v[:, :, 3] = 0
    v[:, :, 3, :16] = 1  # the mask: the top row of the 2 x 2 grid holds the picture
    fsra = attention_pictures.attention_maps(nano(), v)[1]
    assert fsra.name == "FSRA" and fsra.uniform == 1 / 2
    assert np.allclose(fsra.weights[:, 1], 0) and np.allclose(fsra.weights[:, 0].sum(-1), 1)


def test_every_map_is_drawn_in_its_keys_colours():
    model = nano()
    video = data.normalize_frames(np.zeros((4, 32, 32, 3), np.uint8))[None]  # black: no veil over the colours
    heat = attention_pictures.attention_maps(model, video)
    picture = attention_pictures.picture(attention_pictures.frames_rgb(video), heat, 3, model.cfg)
    size = 32 * -(-attention_pictures.MIN_PANEL // 32)
    assert picture.shape == (attention_pictures.HEAD + size + attention_pictures.FOOT, 4 * size + 5 * attention_pictures.GAP, 3)
    for panel, h in enumerate(heat, 1):
        left, n = attention_pictures.GAP + panel * (size + attention_pictures.GAP), h.weights.shape[-1]
        for row, column in np.ndindex(n, n):  # the middle of each square: its weight's colour on the key
            y, x = attention_pictures.HEAD + (2 * row + 1) * size // (2 * n), left + (2 * column + 1) * size // (2 * n)
            assert (picture[y, x] == attention_pictures.colormap(h.weights[3, row, column] / h.top)).all()
            corner = picture[y - size // (2 * n):y, x - size // (2 * n):x]  # where the weight is written
            assert (corner.min(-1) > 240).any() == (h.name != "GSTRA")  # in white: LSD's and FSRA's, not GSTRA's
        bar = picture[attention_pictures.HEAD + size + 6 + 30, left:left + size]  # the key's bar, 0 at the left, top at the right
        x = round(h.uniform / h.top * (size - 1))
        assert (bar[x] == 255).all()  # the white "uniform" mark
        keep = np.arange(size) != x
        assert (bar[keep] == attention_pictures.colormap(np.linspace(0, 1, size))[keep]).all()
    lsd_bar = picture[attention_pictures.HEAD + size + 6 + 30, attention_pictures.GAP + size + attention_pictures.GAP:][:size]
    assert (lsd_bar[round((size - 1) / 4)] == 255).all()  # LSD's key is absolute: uniform 1/4 a quarter along


def test_switched_off_components_have_no_map_and_a_grey_panel():
    heat = attention_pictures.attention_maps(nano(fsra=False, lsd="avgpool"), torch.randn(1, 4, 3, 32, 32))
    assert [h.name for h in heat] == ["GSTRA"]
    model = nano(gstra=False)
    picture = attention_pictures.picture(attention_pictures.frames_rgb(torch.randn(1, 4, 3, 32, 32)), attention_pictures.attention_maps(model, torch.randn(1, 4, 3, 32, 32)),
                          0, model.cfg)
    size = 32 * -(-attention_pictures.MIN_PANEL // 32)
    left = attention_pictures.GAP + 3 * (size + attention_pictures.GAP)
    assert (picture[attention_pictures.HEAD:attention_pictures.HEAD + size, left:left + size] == 64).all()


def test_the_extension_decides_one_frame_or_all(tmp_path):
    model = nano()
    video = torch.randn(1, 4, 3, 32, 32)
    gif = iio.imread(attention_pictures.write_attention(model, video, tmp_path / "a.gif"), index=None, plugin="pillow")
    png = iio.imread(attention_pictures.write_attention(model, video, tmp_path / "a.png", frame=2))
    expected = attention_pictures.picture(attention_pictures.frames_rgb(video), attention_pictures.attention_maps(model, video), 2, model.cfg)
    assert gif.shape[0] == 4 and gif.shape[1:3] == png.shape[:2] and np.array_equal(png, expected)
    with pytest.raises(ValueError, match=r"\.gif \(every frame\) or \.png \(one frame\)"):
        attention_pictures.write_attention(model, video, tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="frames 0 to 3"):
        attention_pictures.write_attention(model, video, tmp_path / "b.png", frame=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.png"]


def test_colormap_runs_from_dark_to_bright():
    c = attention_pictures.colormap(np.linspace(0, 1, 5)).astype(int)
    assert c.shape == (5, 3) and c[0].sum() < 10 and c[-1].sum() > 600
    assert (np.diff(c.sum(-1)) > 0).all()


def test_sample_viz_writes_the_first_frames_picture_to_a_png(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "evaluate", lambda *args, **kwargs: {"all": 0.0})
    train.main(["--preset=nano", "--device=cpu", "--max_steps=1", "--batch_size=2", "--warmup_steps=1",
                "--eval_samples=1", "--questions_per_clip=1", f"--out_dir={tmp_path}"])
    png = tmp_path / "attention.png"
    sample.main([f"--out_dir={tmp_path}", "--video=synthetic:3", "--max_new_tokens=1", "--device=cpu", f"--viz={png}"])
    picture = iio.imread(png)
    zoom = -(-attention_pictures.MIN_PANEL // 32)
    assert picture.shape == (attention_pictures.HEAD + 32 * zoom + attention_pictures.FOOT, 4 * 32 * zoom + 5 * attention_pictures.GAP, 3)
    cfg = PandaConfig(**run_files.load_checkpoint(tmp_path / "ckpt.pt")["model_config"])
    frame = attention_pictures.frames_rgb(sample.load_video("synthetic:3", cfg)[0])[0]  # the first panel: frame 0, enlarged
    shown = picture[attention_pictures.HEAD:attention_pictures.HEAD + 32 * zoom, attention_pictures.GAP:attention_pictures.GAP + 32 * zoom][::zoom, ::zoom]
    assert np.array_equal(shown, frame)  # a PNG keeps every colour
