"""Letterboxed frames in the STAB, real videos only (PandaConfig.letterbox, the release's
"anypixel"). A real clip keeps its aspect ratio on the square canvas (video_files.letterbox), and a
4th channel marks its real pixels: one rectangle per video, the same in every frame, aligned to
whole LSD windows. The STAB (panda.py) runs as for any video up to the LSD grid; then valid_cells
gives the grid cells inside the box, FSRA masks the cells outside (no attention weight), and pack
drops their tokens, packing each video's kept tokens left. The synthetic task's 3-channel frames
never come here. Only torch: panda.py imports this file, and must not need PyAV or Pillow.
"""

import torch
import torch.nn.functional as F


def valid_cells(video, g):
    """video (B, T, 3 or 4, S, S), g grid cells a side -> (B, g, g) bool, the cells inside the box;
    None for 3-channel frames or a box that covers the whole canvas. tiny, B=1, a 16:9 clip:
    (1, 8, 4, 48, 48) -> (1, 3, 3), its box two rows of three cells, the third row False."""
    if video.shape[2] == 3:
        return None
    mask = video[:, :, 3]  # (B, T, S, S)
    cells = F.avg_pool2d(mask.flatten(0, 1)[:, None].float(), mask.shape[-1] // g)
    cells = cells.view(*mask.shape[:2], g, g)  # (B, T, g, g): each cell's share of real pixels
    rect = cells[:, 0].bool()
    box = rect.any(2)[:, :, None] & rect.any(1)[:, None, :]
    if not (((cells == 0) | (cells == 1)).all() and (cells == rect[:, None]).all() and
            (box == rect).all()):
        raise ValueError("the mask channel must mark one rectangle per video, the same in every "
                         f"frame, aligned to whole {mask.shape[-1] // g}-pixel LSD windows")
    if not rect.flatten(1).any(1).all():
        raise ValueError("a video's mask channel is all zero: it has no valid pixels")
    return None if rect.all() else rect


def pack(tokens, valid, split_tokens):
    """The STAB's tokens (B, T*(1 + g*(g+1)), C) -> each frame's fused token, its valid cells and
    the split tokens of its valid rows, packed left (pack_left): (B, L, C), lengths (B,)."""
    keep = valid  # (B, g, g)
    if split_tokens:  # a row's split token stays if any of its cells does
        keep = torch.cat([valid, valid.any(2, keepdim=True)], 2)  # (B, g, g+1)
    keep = torch.cat([keep.new_ones(len(keep), 1), keep.flatten(1)], 1)  # (B, tokens a frame)
    return pack_left(tokens, keep.repeat(1, tokens.shape[1] // keep.shape[1]))  # frames alike


def pack_left(tokens, keep):
    """Each row's kept tokens to the front, in order, zero-padded: tokens (B, L, C), keep (B, L)
    bool -> (B, the most any row keeps, C), lengths (B,)."""
    lengths = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :int(lengths.max())]
    packed = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    in_row = torch.arange(order.shape[1], device=tokens.device) < lengths[:, None]
    return packed * in_row[..., None], lengths
