"""Distillation (paper Sec. 3.2, Eq. 18-19; the release's `VideoCompressor`): while training, a small
head reads the decoder's hidden states at every visual grid token and is pulled towards a frozen
teacher's feature for the same cell of the same frame, loss 1 - cosine. The release distils in all
three stages, weight 1, from a frozen ViT-L/14 (LanguageBind). Nothing here runs at inference.

    teacher(batch) -> (B, T, g, g, D) features   a frozen callable: the oracle below, or a ViT
    DistillHead(hidden states at the grid tokens) -> (..., D) predictions
    loss = 1 - cosine(prediction, teacher feature), per frame the mean over its valid cells
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data
from panda import VIDEO_PLACEHOLDER


class DistillHead(nn.Module):
    """The release's VideoCompressor: predicts a frozen teacher's feature for every visual grid token
    from the decoder's hidden states there. It taps the hidden states L, L-4, ..., 0 of an L-layer
    decoder (0 = the input embeddings, L = the final normed output); the last tap queries the others
    by attention over the layer axis, and a linear map of it is the base the result adds to."""

    def __init__(self, cfg, teacher_dim, every=4, heads=8):
        super().__init__()
        if teacher_dim % heads:
            raise ValueError(f"the teacher's width {teacher_dim} must be a multiple of the head's {heads} heads")
        self.taps, self.heads = [*range(cfg.n_layers, 0, -every), 0], heads  # 32 layers: [32, 28, ..., 4, 0]
        self.norm_layer = nn.ModuleList(nn.Sequential(nn.LayerNorm(cfg.d_model),
                                                      nn.Linear(cfg.d_model, teacher_dim, bias=False))
                                        for _ in self.taps)
        self.input_layer = nn.Linear(cfg.d_model, teacher_dim)
        self.output_layer = nn.Linear(teacher_dim, teacher_dim)

    def forward(self, hidden):  # hidden[i] (N, d_model) for every i in self.taps -> (N, teacher_dim)
        s = torch.stack([norm(hidden[i]) for norm, i in zip(self.norm_layer, self.taps)], 1)  # (N, taps, D)
        N, n, D = s.shape
        s = s.view(N, n, self.heads, D // self.heads).transpose(1, 2)  # (N, heads, taps, D/heads)
        # Parameter-free: the final layer's projection is the query, the other taps are keys and values.
        # The release scales the logits by D^-0.5 over the full width, not over the head's D/heads.
        o = F.scaled_dot_product_attention(s[:, :, :1], s[:, :, 1:], s[:, :, 1:], scale=D ** -0.5)
        return self.input_layer(hidden[self.taps[0]]) + self.output_layer(o.reshape(N, D))


def grid_positions(cfg, start, valid=None):
    """Where every frame's grid tokens sit in the spliced sequence, skipping the fused token and the
    split tokens. start (B,): the index of each prompt's video placeholder; valid (B, g, g): the
    letterbox cells (None: all). -> (B, T, g, g) positions, -1 outside the valid box. A frame is
    1 + h * (w + split) tokens, [fused, row 0 and its split, row 1, ...], frames one after another."""
    if valid is None:
        valid = torch.ones(len(start), cfg.grid, cfg.grid, dtype=torch.bool, device=start.device)
    rows, cols = valid.any(2), valid.any(1)  # (B, g) each: which rows and columns the box spans
    width = cols.sum(1) + cfg.split_tokens  # (B,) tokens per row
    per_frame = 1 + rows.sum(1) * width  # (B,)
    row, col = rows.cumsum(1) - 1, cols.cumsum(1) - 1  # (B, g) each: index inside the box
    in_frame = 1 + row[:, :, None] * width[:, None, None] + col[:, None, :]  # (B, g, g), after the fused token
    frame_start = start[:, None] + torch.arange(cfg.n_frames, device=start.device) * per_frame[:, None]  # (B, T)
    return (frame_start[:, :, None, None] + in_frame[:, None]).masked_fill(~valid[:, None], -1)


def cosine_loss(pred, target, valid=None):
    """Per frame, 1 - the mean cosine similarity over its grid cells; then the mean over frames (the
    release's; Eq. 19 writes the negative cosine, the same up to a constant). pred, target
    (B, T, g, g, D); valid (B, g, g) bool letterbox cells or None (all)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, T, g, g)
    if valid is None:
        return 1 - cos.mean()
    weight = valid[:, None].float()
    return 1 - ((cos * weight).sum((2, 3)) / weight.sum((2, 3))).mean()


def distill_loss(head, teacher, batch, hidden, model):
    """The distillation term of one batch: the head's predictions at every frame's grid tokens
    against the frozen teacher's features (B, T, g, g, D) of the same frames."""
    videos, dev, g = batch["videos"], hidden[0].device, model.cfg.grid
    valid = model.stab.valid_cells(videos, g)  # None without letterboxing
    valid = None if valid is None else valid.to(dev)
    start = (batch["input_ids"] == VIDEO_PLACEHOLDER).int().argmax(1).to(dev)
    pos = grid_positions(model.cfg, start, valid)  # (B, T, g, g)
    index = pos.clamp(min=0).flatten(1)[..., None]  # (B, T*g*g, 1); cells outside the box are masked below
    taps = getattr(head, "module", head).taps  # the head's, under torchrun's DDP the wrapped head's
    picked = {i: hidden[i].gather(1, index.expand(-1, -1, hidden[i].shape[-1])).flatten(0, 1) for i in taps}
    pred = head(picked).view(*pos.shape, -1)  # (B, T, g, g, D)
    with torch.no_grad():
        target = teacher(batch).to(dev)
    return cosine_loss(pred, target, valid)


def make_teacher(name, cfg):
    """(teacher, its feature width). teacher(batch) -> frozen per-cell features (B, T, g, g, D) of the
    batch's clips on the LSD grid."""
    if name != "oracle":
        raise ValueError(f"--distill must be auto, empty (off) or oracle, got {name!r}")

    def oracle(batch):
        if "samples" not in batch:
            raise ValueError("--distill=oracle reads the synthetic task's ground truth; real data has none")
        return torch.from_numpy(np.stack([oracle_features(s, cfg.grid) for s in batch["samples"]]))
    return oracle, len(ORACLE_FEATURES)


# ------------------------------------------------------------------------------------ the oracle

# The oracle's feature channels, in order: D = 24 (a multiple of the distillation head's 8 heads).
# A real teacher (the release's LanguageBind ViT) adds learned position embeddings to its patches, so
# its per-patch features say where each patch is; the row and column one-hots are the oracle's version.
MAX_ORACLE_GRID = 4
ORACLE_FEATURES = (*data.SHAPES, *data.COLORS, *data.DIRECTIONS, "still", "visible", "coverage",
                   *(f"row {i}" for i in range(MAX_ORACLE_GRID)), *(f"column {i}" for i in range(MAX_ORACLE_GRID)))


def oracle_features(sample, grid):
    """A perfect frozen 'teacher' read off the synthetic task's ground truth instead of the pixels:
    float32 (T, grid, grid, 24) for a grid x grid cell layout (the model's LSD grid, PandaConfig.grid).
    Per cell, the object covering most of it gives one-hots of its shape, its colour in that frame and
    its motion (left, right, up, down or still), then 1 ("visible": an object is seen here) and the
    fraction of the cell it covers; every cell, empty or not, also gets one-hots of its row and column
    (channels ORACLE_FEATURES). Empty cells carry only their position."""
    T, size = sample.video.shape[:2]
    if size % grid or grid > MAX_ORACLE_GRID:
        raise ValueError(f"a {size}-pixel frame must split into grid x grid whole cells with grid <= "
                         f"{MAX_ORACLE_GRID}; got grid {grid}")
    cell, channel = size // grid, {name: i for i, name in enumerate(ORACLE_FEATURES)}
    coverage = np.zeros((len(sample.objects), T, grid, grid))  # (O, T, g, g)
    features = np.zeros((len(sample.objects), T, len(ORACLE_FEATURES)), dtype=np.float32)  # (O, T, D)
    for i, obj in enumerate(sample.objects):
        for t in np.flatnonzero(obj.visible):  # the very masks data.render() paints
            mask = data.shape_mask(obj.shape, obj.centers[t], data.object_radius(size), size)  # (H, W)
            coverage[i, t] = mask.reshape(grid, cell, grid, cell).mean((1, 3))
            hot = [obj.shape, obj.colors[t], obj.direction or "still", "visible"]
            features[i, t, [channel[name] for name in hot]] = 1
    best = coverage.argmax(0)  # (T, g, g): the object covering most of each cell (objects never overlap)
    out = features[best, np.arange(T)[:, None, None]]  # (T, g, g, D)
    out[..., channel["coverage"]] = coverage.max(0)
    out[coverage.max(0) == 0] = 0
    rows, cols = np.arange(grid)[:, None], np.arange(grid)[None, :]  # (g, 1), (1, g)
    out[:, rows, cols, channel["row 0"] + rows] = 1
    out[:, rows, cols, channel["column 0"] + cols] = 1
    return out
