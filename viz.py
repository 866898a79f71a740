"""Pictures of what the STAB looks at: `python sample.py --video=synthetic:7 --viz=attention.gif`.

The GIF has one picture per video frame, four panels side by side, each a heat map laid over the frame:

  frame | LSD: each patch's weight inside its s x s window (the window's 4 weights sum to 1; uniform = 1/4)
        | FSRA: the frame token's attention over the frame's grid cells
        | GSTRA: the chunk token's attention over all k*h*w patches of its chunk; each frame shows its share,
          on one colour scale per chunk, so a frame GSTRA ignores stays dark

Weights are averaged over heads. FSRA and GSTRA maps are scaled so that their largest weight is
bright; the LSD map is not rescaled. A component switched off (PandaConfig's ablations) shows a dark panel.
"""

from contextlib import contextmanager

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw

import data
from panda import QueryAttention


@contextmanager
def attention_probe(model):
    """Inside `with attention_probe(model) as maps:` every call of a QueryAttention (LSD, FSRA, GSTRA)
    also records its softmax weights, recomputed from the call's inputs by its plain form:
    maps[module name] = (N, heads, L) of its last call, e.g. maps["stab.lsd.attn"]. Forward hooks,
    removed on leaving: the model itself is not changed and pays nothing outside the block."""
    maps, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QueryAttention):
            def record(module, args, output, name=name):
                maps[name] = module.attention(*args)[0].detach()
            handles.append(module.register_forward_hook(record))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()

PANELS = ("frame", "LSD", "FSRA", "GSTRA")
GAP, CAPTION = 4, 14  # pixels between panels, and above them for the labels
MIN_PANEL = 192       # small frames are enlarged (nearest neighbour) to at least this many pixels


def colormap(x):
    """Values in [0, 1] (...) -> RGB uint8 (..., 3): black, purple, red, orange, pale yellow, like 'inferno'."""
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)
    stops = np.linspace(0, 1, len(anchors))
    x = np.clip(x, 0, 1)
    return np.stack([np.interp(x, stops, anchors[:, c]) for c in range(3)], -1).round().astype(np.uint8)


@torch.no_grad()
def attention_heat_maps(model, video):
    """video (1, T, C, S, S) as the model takes it -> {panel: (T, S, S) float in [0, 1]} for LSD, FSRA
    and GSTRA (missing when switched off), each map enlarged to the frame's pixels."""
    cfg = model.cfg
    with attention_probe(model) as maps:
        model.encode_videos(video)
    T, S = video.shape[1], video.shape[-1]
    p, s, k, g = S // cfg.patch_size, cfg.lsd_window, cfg.chunk_frames, cfg.grid  # p x p patches, s x s windows
    heat = {}
    if maps.get("stab.lsd.attn") is not None:  # (T*g*g, heads, s*s): one window per row
        a = maps["stab.lsd.attn"].float().mean(1).view(T, g, g, s, s)
        heat["LSD"] = a.permute(0, 1, 3, 2, 4).reshape(T, p, p)  # each patch back in its place
    if maps.get("stab.fsra.attn") is not None:  # (T, heads, g*g)
        a = maps["stab.fsra.attn"].float().mean(1).view(T, g, g)
        heat["FSRA"] = a / a.amax((1, 2), keepdim=True)
    if maps.get("stab.gstra.attn") is not None:  # (T/k, heads, k*p*p): one softmax over a whole chunk
        a = maps["stab.gstra.attn"].float().mean(1).view(T // k, k, p, p)
        heat["GSTRA"] = (a / a.amax((1, 2, 3), keepdim=True)).view(T, p, p)
    return {name: np.kron(m.cpu().numpy(), np.ones((S // m.shape[-1],) * 2)) for name, m in heat.items()}


def frames_rgb(video):
    """The model's input (1, T, C, S, S), CLIP-normalised -> uint8 RGB frames (T, S, S, 3)."""
    rgb = video[0, :, :3].float().cpu().permute(0, 2, 3, 1)  # (T, S, S, 3)
    rgb = rgb * torch.tensor(data.CLIP_STD) + torch.tensor(data.CLIP_MEAN)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def attention_gif_frames(model, video, alpha=0.6):
    """(T, height, width, 3) uint8: per frame the row [frame | LSD | FSRA | GSTRA] with captions."""
    frames, heat = frames_rgb(video), attention_heat_maps(model, video)
    T, S = frames.shape[:2]
    zoom = max(1, -(-MIN_PANEL // S))  # ceil: the enlargement factor
    pictures = []
    for t in range(T):
        panels = [frames[t]]
        for name in PANELS[1:]:
            if name in heat:
                panels.append(((1 - alpha) * frames[t] + alpha * colormap(heat[name][t])).astype(np.uint8))
            else:
                panels.append(frames[t] // 4)  # switched off: nothing to show
        panels = [p.repeat(zoom, 0).repeat(zoom, 1) for p in panels]
        size = S * zoom
        row = np.zeros((CAPTION + size, len(PANELS) * size + (len(PANELS) - 1) * GAP, 3), dtype=np.uint8)
        for i, panel in enumerate(panels):
            row[CAPTION:, i * (size + GAP):i * (size + GAP) + size] = panel
        picture = Image.fromarray(row)
        draw = ImageDraw.Draw(picture)
        for i, name in enumerate(PANELS):
            label = f"{name} t={t}" if i == 0 else name if name in heat else f"{name} (off)"
            draw.text((i * (size + GAP) + 2, 1), label, fill=(255, 255, 255))
        pictures.append(np.asarray(picture))
    return np.stack(pictures)


def write_attention(model, video, path, seconds_per_frame=0.6):
    """Write the pictures of attention_gif_frames() as a looping GIF; returns the path."""
    pictures = attention_gif_frames(model, video)
    iio.imwrite(path, pictures, plugin="pillow", extension=".gif", duration=int(seconds_per_frame * 1000), loop=0)
    return path
