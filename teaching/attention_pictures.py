"""Pictures of what the STAB looks at:

    python sample.py --video=synthetic:7 --viz=attention.gif   # every frame, looping
    python sample.py --video=synthetic:7 --viz=attention.png   # one frame: 0, or --viz_frame=N

A picture is one frame of the clip and three maps of attention weights on it, side by side, each
with its colour key. Weights are averaged over the attention heads; the frame shows through every
map as a light veil (black pixels leave the map's colours exactly as the key gives them).

  LSD    (Sec. 3.1, Eq. 4-7) each s x s window of patches becomes one token: its query (the
         window's average) weighs the window's s*s patches. The key is absolute, 0 to 1: a
         window's weights sum to 1, and 1/(s*s) on every patch (1/4 for 2x2 windows), marked
         "uniform", means no preference. Thin lines are patches, thick lines windows.
  FSRA   (Eq. 8-10) the frame token's query weighs the frame's g x g grid cells (LSD's tokens); the
         weights of a frame sum to 1. Lines are cells.
  GSTRA  (Eq. 11-13) the chunk token's query weighs all k*p*p patches of a chunk of k frames at
         once; a frame's map is its part of them, and the weights of the chunk's k frames sum to
         1. A frame that GSTRA ignores stays dark. Lines are patches.

FSRA's and GSTRA's keys run from 0 to the largest weight in the clip, one scale for every frame, so
frames compare; their "uniform" mark is 1/(valid cells) and 1/(k*p*p). LSD's and FSRA's squares
carry their weight in numbers too, where they are large enough. A component switched off
(PandaConfig's Table 4 switches) shows a grey panel, captioned "switched off". docs/pictures.md
reads a picture of a trained tiny model.
"""

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from checkpoints import run_files
import data
from panda import QueryAttention
from real_video import letterbox_tokens


@contextmanager
def attention_probe(model):
    """Inside `with attention_probe(model) as maps:` every call of a QueryAttention (LSD, FSRA,
    GSTRA) also records its softmax weights, recomputed from the call's inputs by its plain form:
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


# ------------------------------------------------------------------------------------ the weights

@dataclass
class HeatMap:
    """One panel's weights, laid on the frame as an n x n grid, and how its colour key reads
    them."""
    name: str            # LSD, FSRA or GSTRA
    caption: str         # what one weight is
    weights: np.ndarray  # (T, n, n) float: frame t's weight per grid square, averaged over heads
    uniform: float       # the weight of every square when the query has no preference
    top: float           # the top of the colour key: the brightest colour
    lines: tuple         # grid lines to draw: (squares a side, line width in pixels) pairs
    numbers: bool        # write each square's weight in it, where there is room


@torch.no_grad()
def attention_maps(model, video):
    """video (1, T, C, S, S) as the model takes it -> [HeatMap] for LSD, FSRA and GSTRA, in that
    order; a component switched off (or LSD as average pooling) has none."""
    cfg = model.cfg
    with attention_probe(model) as maps:
        model.encode_videos(video)
    T = video.shape[1]
    p, s, k, g = video.shape[-1] // cfg.patch_size, cfg.lsd_window, cfg.chunk_frames, cfg.grid
    valid = letterbox_tokens.valid_cells(video, g)  # the letterbox's cells; None: all are real
    heads_mean = {name: a.float().mean(1).cpu() for name, a in maps.items()}
    heat = []
    if "stab.lsd.attn" in heads_mean:  # (T*g*g, s*s): one window per row, its patches row by row
        a = heads_mean["stab.lsd.attn"].view(T, g, g, s, s).permute(0, 1, 3, 2, 4).reshape(T, p, p)
        heat.append(HeatMap("LSD", f"patch weights in each {s}x{s} window", a.numpy(),
                            1 / (s * s), 1.0, ((p, 1), (g, 3)), True))
    if "stab.fsra.attn" in heads_mean:  # (T, g*g): softmax over the frame's valid cells
        a = heads_mean["stab.fsra.attn"].view(T, g, g).numpy()
        n_valid = g * g if valid is None else int(valid.sum())
        heat.append(HeatMap("FSRA", "frame token's weight per cell", a, 1 / n_valid,
                            float(a.max()), ((g, 3),), True))
    if "stab.gstra.attn" in heads_mean:  # (T/k, k*p*p): one softmax over a whole chunk
        a = heads_mean["stab.gstra.attn"].view(T, p, p).numpy()
        heat.append(HeatMap("GSTRA", "chunk token's weight per patch", a, 1 / (k * p * p),
                            float(a.max()), ((p, 1),), False))
    return heat


def frames_rgb(video):
    """The model's input (1, T, C, S, S), CLIP-normalised -> uint8 RGB frames (T, S, S, 3)."""
    rgb = video[0, :, :3].float().cpu().permute(0, 2, 3, 1)  # (T, S, S, 3)
    rgb = rgb * torch.tensor(data.CLIP_STD) + torch.tensor(data.CLIP_MEAN)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------ drawing

MIN_PANEL = 288   # frames are enlarged (nearest neighbour, by a whole factor) to this size or more
GAP = 12          # pixels between panels and around the picture
HEAD = 48         # pixels above the panels: a panel's name and what it shows
FOOT = 64         # pixels below them: the colour keys
VEIL = 0.4        # how much of the frame shows through a map
BACKGROUND, TEXT, DIM, LINE = (24, 24, 24), (255, 255, 255), (170, 170, 170), (120, 120, 120)
NUMBER_ROOM = 40  # a square this many pixels wide, or wider, has its weight written in it


def colormap(x):
    """Values in [0, 1] (...) -> RGB uint8 (..., 3): black, purple, red, orange, pale yellow, like
    'inferno'."""
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                       dtype=float)
    stops = np.linspace(0, 1, len(anchors))
    x = np.clip(x, 0, 1)
    channels = [np.interp(x, stops, anchors[:, c]) for c in range(3)]
    return np.stack(channels, -1).round().astype(np.uint8)


@functools.cache
def font(size):
    """Pillow's own scalable font at `size` pixels: nothing to install."""
    return ImageFont.load_default(size=size)


def map_panel(heat, t, frame, zoom):
    """(S*zoom, S*zoom, 3) uint8: frame t's weights in the key's colours, each on its grid square,
    with the frame screened over them (brightness max(r, g, b) * VEIL: black leaves the colour
    unchanged)."""
    S, n = frame.shape[0], heat.weights.shape[-1]
    colours = colormap(heat.weights[t] / heat.top).repeat(S // n, 0).repeat(S // n, 1).astype(float)
    veil = VEIL * frame.max(-1, keepdims=True) / 255
    panel = 255 - (255 - colours) * (1 - veil)  # a screen blend
    panel = panel.round().astype(np.uint8).repeat(zoom, 0).repeat(zoom, 1)
    for squares, width in heat.lines:  # lines between squares, centred on the borders
        step = panel.shape[0] // squares
        for i in range(1, squares):
            edge = slice(i * step - width // 2, i * step - width // 2 + width)
            panel[edge], panel[:, edge] = LINE, LINE
    return panel


def write_numbers(draw, heat, t, corner, size):
    """Each square's weight, two decimals, in its top left corner, where squares are large enough.
    corner: the panel's top left (x, y) on the picture; size: its side in pixels."""
    n = heat.weights.shape[-1]
    if not heat.numbers or size // n < NUMBER_ROOM:
        return
    left, top = corner
    for row, column in np.ndindex(n, n):
        x, y = left + column * size // n + 4, top + row * size // n + 3
        draw.text((x, y), f"{heat.weights[t, row, column]:.2f}".removeprefix("0"), font=font(12),
                  fill=TEXT, stroke_width=2, stroke_fill=BACKGROUND)


def draw_key(canvas, heat, left, top, width):
    """The colour key of `heat` under its panel: a bar from 0 to heat.top, "uniform" marked above
    it."""
    bar = np.repeat(colormap(np.linspace(0, 1, width))[None], 14, 0)  # (14, width, 3)
    canvas.paste(Image.fromarray(bar), (left, top + 22))
    draw, small = ImageDraw.Draw(canvas), font(13)
    # the softmax's largest weight is at least its mean, so "uniform" is on the bar
    x = left + round(heat.uniform / heat.top * (width - 1))
    draw.polygon([(x - 5, top + 15), (x + 5, top + 15), (x, top + 21)], fill=TEXT)  # a pointer
    draw.line([(x, top + 22), (x, top + 35)], fill=TEXT)
    label = f"uniform {heat.uniform:.2g}"
    label_width = draw.textlength(label, font=small)
    label_x = min(max(x - label_width / 2, left), left + width - label_width)
    draw.text((label_x, top), label, fill=TEXT, font=small)
    draw.text((left, top + 40), "0", fill=DIM, font=small)
    top_label = f"{heat.top:.2g}" + ("" if heat.name == "LSD" else " (clip's largest)")
    top_label_x = left + width - draw.textlength(top_label, font=small)
    draw.text((top_label_x, top + 40), top_label, fill=DIM, font=small)


def picture(frames, heat, t, cfg):
    """(height, width, 3) uint8: frame t, then the LSD, FSRA and GSTRA panels, with names and
    keys."""
    T, S = frames.shape[:2]
    zoom = max(1, -(-MIN_PANEL // S))  # ceil: the enlargement factor
    size = S * zoom
    by_name = {h.name: h for h in heat}
    canvas = Image.new("RGB", (4 * size + 5 * GAP, HEAD + size + FOOT), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    chunk = t // cfg.chunk_frames
    first, last = chunk * cfg.chunk_frames, (chunk + 1) * cfg.chunk_frames - 1
    heads = [(f"frame {t}", f"of 0-{T - 1}; chunk {chunk} = frames {first}-{last}")]
    heads += [(name, by_name[name].caption if name in by_name else "switched off")
              for name in ("LSD", "FSRA", "GSTRA")]
    for i, (name, caption) in enumerate(heads):
        left = GAP + i * (size + GAP)
        draw.text((left, 4), name, fill=TEXT, font=font(20))
        draw.text((left, 28), caption, fill=DIM, font=font(14))
        if i == 0:
            panel = frames[t].repeat(zoom, 0).repeat(zoom, 1)
        elif name in by_name:
            panel = map_panel(by_name[name], t, frames[t], zoom)
            draw_key(canvas, by_name[name], left, HEAD + size + 6, size)
        else:
            panel = np.full((size, size, 3), 64, np.uint8)
        canvas.paste(Image.fromarray(panel), (left, HEAD))
        if name in by_name:
            write_numbers(draw, by_name[name], t, (left, HEAD), size)
    return np.asarray(canvas)


def write_attention(model, video, path, frame=0, seconds_per_frame=0.8):
    """Draw what LSD, FSRA and GSTRA attend to in video (1, T, C, S, S) and write it to path: a .gif
    shows every frame, looping; a .png one frame, `frame` (0: the first). Returns the path."""
    path, T = Path(path), video.shape[1]
    if path.suffix.lower() not in (".gif", ".png"):
        raise ValueError(f"{path}: attention pictures are .gif (every frame) or .png (one frame)")
    if not 0 <= frame < T:
        raise ValueError(f"frame {frame} does not exist: the video has frames 0 to {T - 1}")
    frames, heat = frames_rgb(video), attention_maps(model, video)
    if path.suffix.lower() == ".png":
        encoded = iio.imwrite("<bytes>", picture(frames, heat, frame, model.cfg), extension=".png")
    else:
        pictures = np.stack([picture(frames, heat, t, model.cfg) for t in range(T)])
        encoded = iio.imwrite("<bytes>", pictures, plugin="pillow", extension=".gif",
                              duration=int(seconds_per_frame * 1000), loop=0)
    try:
        run_files.write_atomically(path, lambda f: f.write(encoded))
    except OSError as err:  # a full disk: one line naming the picture, and no half of one left
        raise OSError(f"{path} could not be written: {err.strerror or err}") from None
    return path
