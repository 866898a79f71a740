"""Real videos: reading files, the release's frame sampling and letterbox, its chat templates, the
Video-ChatGPT / Valley instruction format and the zero-shot QA format, and what happens to a file
that cannot be used (--on_error: raise, or skip and count).

    frames, info = read_video("clip.mp4", 8)  # (8, H, W, 3) uint8, sampled as the release does
    video = model_input(frames, cfg)          # (8, 4, 448, 448): letterboxed, with the mask channel

Pixels are decoded by PyAV (FFmpeg's own demuxers and decoders), seeking to the keyframe before
each sampled frame; Pillow resizes. docs/video.md tells how frames are found, which files are
refused and why, and what a loader worker delivers per second. The synthetic task (data.py) needs
none of this.
"""

import bisect
import hashlib
import json
import math
import tempfile
import warnings
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from checkpoints import run_files
from data import (CLIP_MEAN, ChatTemplate, collate, normalize_frames, tokenize_conversation,
                  unknown_words)
from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
LETTERBOX_FILL = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104): normalises to about 0
# the padding's normalised value, (3,): the canvas is filled with it, not normalised pixel by pixel
FILL_NORMALIZED = normalize_frames(np.array(LETTERBOX_FILL, np.uint8)[None, None, None])[0, :, 0, 0]
TEACHER_PATCH = 14  # the release's teacher is a ViT with 14 px patches
# Codecs whose frames paint over the previous picture although every packet is marked a keyframe:
# decoding from the middle gives wrong pixels, so these are always read front to back.
DRAWS_OVER_PREVIOUS = {"gif", "apng", "webp"}
# The largest picture a file may declare, read from its header before a frame is decoded: 8K UHD
# (7680x4320, 33 Mpx) with room to spare. The model sees at most 448 px; what a file claims beyond
# this only costs memory: eight RGB frames of 67 Mpx are 1.6 GB, in every loader worker.
MAX_PICTURE_PIXELS = 8192 * 8192


class VideoError(ValueError):
    """A video that cannot be used: missing, empty, corrupt, truncated, no video stream, too few
    frames."""


class AnnotationError(ValueError):
    """An annotation entry that cannot be used: a missing field, turns out of order, no answer."""


# --- reading video files ----------------------------------------------------------------

def check_video_file(path):
    """The path as a Path, after the checks that need no decoder (exists, is a file, not empty)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: expected a video file, found a directory or a special file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: expected a video, found an empty (0-byte) file")
    return path


@contextmanager
def open_video(path, threads=0):
    """(container, its first video stream), opened by PyAV, decoding with `threads` threads (0:
    FFmpeg's choice). Whatever is raised inside the with-block becomes a VideoError naming the file
    and the exception: broken files make PyAV raise AttributeError, UnicodeDecodeError and more
    besides FFmpeg's own errors, and under --on_error=skip only a VideoError is a skip rather than
    the end of the run."""
    path = check_video_file(path)
    try:
        # metadata that is not UTF-8 (a title in Latin-1) is no reason to refuse the pixels
        with av.open(str(path), metadata_errors="replace") as container:
            if not container.streams.video:
                found = ", ".join(stream.type for stream in container.streams) or "no streams"
                raise VideoError(f"{path}: expected a video stream, found {found}")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoError(f"{path}: the video stream has no codec description (a file cut "
                                 f"inside its header?)")
            check_picture_size(path, stream.codec_context)
            stream.codec_context.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            yield container, stream
    except VideoError:
        raise
    except MemoryError:  # numpy's and PyAV's: this file's problem, which --on_error=skip can skip
        raise VideoError(f"{path}: out of memory while decoding it") from None
    except Exception as err:  # a broken file can make PyAV raise almost anything: see the docstring
        raise VideoError(f"{path}: cannot be read as a video (corrupt, truncated or not a video): "
                         f"{type(err).__name__}: {err}") from err


def check_picture_size(path, codec):
    """A VideoError unless the stream's declared picture is within MAX_PICTURE_PIXELS. The decoder
    allocates what the header declares (for a GIF, its logical screen: the canvas every frame is
    painted on, however small the frames), so a 300-byte file can ask for gigabytes."""
    pixels = codec.width * codec.height
    if pixels > MAX_PICTURE_PIXELS:
        raise VideoError(f"{path}: its header declares a {codec.width}x{codec.height} picture "
                         f"({pixels / 1e6:.0f} Mpx), more than the "
                         f"{MAX_PICTURE_PIXELS / 1e6:.0f} Mpx read here (8K UHD is 33 Mpx); "
                         f"decoding it would take gigabytes")


@dataclass
class FrameIndex:
    """What one pass over a video's packets tells, without decoding a frame.

    pts: every frame's presentation timestamp, in presentation order: frame n of a front-to-back
    decode (the n-th frame, as the release's decord reader numbers them) is the one with timestamp
    pts[n], so B-frames, open GOPs and variable frame rates need no special case. keyframes: the
    keyframes' timestamps, in order. hidden: packets the container marks as not to be shown (cut
    by an edit list). no_seek: why frames cannot be found by seeking in this file, None where they
    can."""
    pts: list
    keyframes: list
    hidden: int
    no_seek: str | None


def index_frames(container, stream):
    """The FrameIndex of a freshly opened container: one demux pass, which reads the file but
    decodes nothing."""
    pts, keyframes, hidden, starts_on_keyframe = [], [], 0, None
    for packet in container.demux(stream):
        if packet.size == 0:  # the empty packet at the end, which tells the decoder to empty itself
            continue
        if packet.is_discard:
            hidden += 1
            continue
        if starts_on_keyframe is None:
            starts_on_keyframe = packet.is_keyframe
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    if stream.codec_context.name in DRAWS_OVER_PREVIOUS:
        no_seek = f"{stream.codec_context.name} frames paint over the previous ones"
    elif None in pts:
        no_seek = "packets without timestamps"
    elif len(set(pts)) < len(pts):
        no_seek = "packets that share a timestamp"
    elif not starts_on_keyframe:
        no_seek = "the stream does not start on a keyframe"
    else:
        no_seek = None
        pts.sort()
        keyframes.sort()
    return FrameIndex(pts, keyframes, hidden, no_seek)


def describe_video(path, container, stream):
    """(info, FrameIndex) of a freshly opened container; info is what probe_video returns."""
    index = index_frames(container, stream)
    n_header, n_total = stream.frames, len(index.pts)
    codec = stream.codec_context
    decoding = "seeking" if index.no_seek is None else f"front to back: {index.no_seek}"
    info = {"path": str(path), "n_total": n_total, "n_header": n_header, "count_source": "packets",
            # what the container promises: its header's count (MKV and WebM have none) less the
            # hidden packets
            "n_expected": max(n_total, n_header - index.hidden if n_header > 0 else 0),
            "fps": frames_per_second(container, stream, n_total), "codec": codec.name,
            "width": codec.width, "height": codec.height, "decoding": decoding}
    info["shortfall"] = require_enough_frames(info, n_total, "in the file")
    return info, index


def probe_video(path):
    """What a video holds, without decoding a frame: info with "n_total" (frames, counted from the
    packets), "n_header" (the header's count, 0 where the container stores none), "n_expected"
    (what the container promises), "shortfall" (None, or the account of missing frames), "fps",
    "codec", "width", "height" (as stored, before any turn) and "decoding" (how read_video finds
    frames in it)."""
    with open_video(path) as (container, stream):
        info, _ = describe_video(path, container, stream)
    return info


def require_enough_frames(info, n_usable, how):
    """The rule for a file that holds or decodes fewer frames than its container promises
    (docs/video.md): none, a single one, or fewer than half is a VideoError. Otherwise returns the
    account for a warning, e.g. "clip.mp4: 20 frames by the container, 15 in the file" (None when
    no frame is missing), and the caller samples from the frames there are. how: "in the file", or
    "decoded" and why decoding stopped."""
    n_expected, path = info["n_expected"], info["path"]
    if n_expected == 0:
        raise VideoError(f"{path}: the video stream holds no frames")
    if n_usable >= n_expected:
        return None
    account = f"{path}: {n_expected} frames by the container, {n_usable} {how}"
    if n_usable <= 1 or 2 * n_usable < n_expected:
        raise VideoError(f"{account}: fewer than half, too few to sample from")
    return account


def frames_per_second(container, stream, n_frames):
    """The mean frame rate, 0.0 if unknown. It only sets the 1-fps candidate stride of
    sample_frame_indices: frames are always picked by index.

    GIF frames carry their own delays (newtonscradle.gif: 20 to 50 ms) and FFmpeg's average_rate
    for a GIF (50 there) is not their mean rate, so GIFs use frames / duration (36 / 0.82 s = 43.9).
    """
    if stream.codec_context.name == "gif":
        seconds = duration_seconds(container, stream)
        if seconds > 0:
            return n_frames / seconds
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else 0.0


def duration_seconds(container, stream):
    """The video stream's duration in seconds, else the container's, else 0.0."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def sample_frame_indices(n_frames_in_video, fps, T=8):
    """The release's choice of T frames (its dataloader.py, _get_rawvideo_dec), as sorted indices.

    One candidate per second, range(0, n, round(fps)); more than T candidates: T of them at
    linspace(0, len - 1, T) rounded down; exactly T: all; fewer (a clip shorter than T seconds):
    the stride max(1, (n - 1) // (T - 1)) from frame 0. All branches start at frame 0.
    """
    n = n_frames_in_video
    if n < 1 or T < 1:
        raise ValueError(f"need a video with frames and T >= 1, got n_frames_in_video={n}, T={T}")
    if n < T:  # the release pads with blank frames here; we repeat frames instead
        return indices_with_repetition(n, T)
    # The release's round(fps) is 0 below 0.5 fps (a zero range step); stride 1 keeps every frame
    # a candidate.
    stride = max(1, round(fps)) if fps and math.isfinite(fps) else 1
    candidates = list(range(0, n, stride))
    if len(candidates) > T:
        return [candidates[k] for k in np.linspace(0, len(candidates) - 1, T).astype(int)]
    if len(candidates) == T:
        return candidates
    step = max(1, (n - 1) // (T - 1))
    return [k * step for k in range(T)]


def indices_with_repetition(n, T):
    """T sorted indices over n < T frames, every frame used: slot k takes the frame under its centre
    ((k + 0.5) * n / T), so the repeats spread evenly, e.g. n=3, T=8 -> [0, 0, 0, 1, 1, 2, 2, 2]."""
    return [(2 * k + 1) * n // (2 * T) for k in range(T)]


def read_video(path, n_frames=8, threads=0):
    """T = n_frames sampled frames of a video file, RGB and upright as a player shows them.

    Returns (frames uint8 (T, H, W, 3), info): info as probe_video's, with "indices" the sampled
    frame numbers (frame n is the n-th frame of a front-to-back decode) and "n_total" the frame
    count they were sampled from. Each sampled frame is found by seeking to the keyframe at or
    before it and decoding forward; files that cannot seek (GIFs, packets without timestamps), or
    where seeking does not find every frame, are decoded front to back, which gives the same
    frames. A file with fewer frames than its container promises is sampled from those there are,
    with a warning, or refused (require_enough_frames). threads: FFmpeg decoding threads, 0 =
    FFmpeg's choice (1 in DataLoader workers).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    with open_video(path, threads) as (container, stream):
        info, index = describe_video(path, container, stream)
        indices = sample_frame_indices(info["n_total"], info["fps"], n_frames)
        seekable = index.no_seek is None
        found = decode_by_seeking(container, stream, index, indices) if seekable else {}
    if seekable and len(found) < len(set(indices)):
        info["decoding"] = "front to back: seeking did not find every sampled frame"
    if len(found) < len(set(indices)):
        found, n_decoded, stopped_by = decode_in_order(path, indices, threads)
        if len(found) < len(set(indices)):  # decoding stopped before the last sampled frame
            how = "decoded" + (f" ({stopped_by})" if stopped_by else "")
            info.update(n_total=n_decoded, count_source="decoded",
                        shortfall=require_enough_frames(info, n_decoded, how))
            indices = sample_frame_indices(n_decoded, info["fps"], n_frames)
            found, _, _ = decode_in_order(path, indices, threads)
            if len(found) < len(set(indices)):
                raise VideoError(f"{path}: {n_decoded} frames decoded on one pass, fewer on the "
                                 f"next")
    if info["shortfall"]:
        warnings.warn(f"{info['shortfall']}; sampling from those")
    info["indices"] = indices
    return stack_frames(path, found, indices), info  # (T, H, W, 3) uint8


def decode_by_seeking(container, stream, index, indices):
    """{frame number: upright RGB frame} for the distinct sampled numbers: for each, seek to the
    last keyframe at or before it (unless decoding already stands between the two) and decode
    forward to it, converting only the sampled frames to RGB. Returns fewer frames where the file
    does not behave as its packets promise (a seek that lands elsewhere, a frame the decoder drops,
    a decoding error)."""
    found, decoded, last = {}, iter(()), None
    try:
        for n in sorted(set(indices)):
            k = bisect.bisect_right(index.keyframes, index.pts[n])
            if k == 0:  # frame n shows before the first keyframe (frames that open the stream)
                return found
            keyframe = index.keyframes[k - 1]
            if last is None or keyframe > last:  # decoding stands before the keyframe: jump there
                decoded = frames_from_keyframe(container, stream, index, keyframe)
            for m, frame in decoded:
                last = index.pts[m]
                if m == n:
                    found[n] = upright(frame)
                    break
            else:  # the stream ended, or stopped agreeing with its packets, before frame n
                return found
    except av.FFmpegError:
        pass  # a packet that does not decode: the front-to-back pass will find where, and say so
    return found


def frames_from_keyframe(container, stream, index, keyframe):
    """(frame number, decoded frame) in presentation order, from the keyframe with timestamp
    `keyframe` on. Ends early, without an error, where the file stops agreeing with its index: the
    seek lands off a keyframe or after this one, or a decoded frame is not the next one its packets
    promised."""
    # the seek also empties the decoder
    container.seek(keyframe, stream=stream, backward=True, any_frame=False)
    start = number = None
    for packet in container.demux(stream):
        if start is None and packet.size:  # where the seek landed: this keyframe, or an earlier one
            if not packet.is_keyframe or packet.pts is None or packet.pts > keyframe:
                return
            start, number = packet.pts, bisect.bisect_left(index.pts, packet.pts)
        # the last, empty packet drains the decoder
        for frame in stream.codec_context.decode(packet):
            if frame.pts is not None and frame.pts < start:
                continue  # an open GOP's leading frames refer to frames before the keyframe
            if number == len(index.pts) or frame.pts != index.pts[number]:
                return
            yield number, frame
            number += 1


def decode_in_order(path, indices, threads=0):
    """Front to back, as a player decodes: ({frame number: upright RGB frame} for the distinct
    sampled numbers, frames decoded, the error that stopped decoding or None). Decoding stops after
    the last sampled frame, or where the file ends or fails: then the count is every frame that
    decodes."""
    wanted, last = set(indices), max(indices)
    found, n_decoded, stopped_by = {}, 0, None
    with open_video(path, threads) as (container, stream):
        try:
            for frame in container.decode(stream):
                if n_decoded in wanted:
                    found[n_decoded] = upright(frame)
                n_decoded += 1
                if n_decoded > last:
                    break
        except av.FFmpegError as err:
            stopped_by = f"{type(err).__name__}: {err}"
    return found, n_decoded, stopped_by


def upright(frame):
    """A decoded frame as players show it: RGB uint8 (H, W, 3), turned and mirrored as its display
    matrix says (phones store portrait video as landscape pictures plus a quarter turn in the
    mp4/mov track header; FFmpeg hands that matrix to every frame).

    Fork safety: PyAV ties a frame whose side_data was read into a reference cycle, freed only by
    the garbage collector, possibly in a DataLoader worker forked later. A thread pool freed there
    waits forever for threads the fork did not copy, so the conversion runs on one thread (no
    pool), and side_data is read only where frame.rotation (which makes no cycle) says the matrix
    turns."""
    # (H, W, 3); GIFs' palette/bgra frames become RGB too
    rgb = frame.to_ndarray(format="rgb24", threads=1)
    # no matrix, or one that does not turn (one that only mirrors top to bottom is left as is)
    if frame.rotation == 0:
        return rgb
    matrix = np.frombuffer(bytes(frame.side_data.get("DISPLAYMATRIX")), dtype=np.int32)
    a, b, _, c, d = matrix[:5].tolist()
    # ISO/IEC 14496-12's matrix shows the coded pixel (x, y) at (a x + c y, b x + d y), plus a
    # shift. With a = d = 0 it is a quarter turn (the shown x comes from the coded y); any angle
    # that is not a multiple of 90 degrees is taken to the nearest one.
    if abs(b) + abs(c) > abs(a) + abs(d):
        rgb, x_sign, y_sign = rgb.transpose(1, 0, 2), c, b
    else:
        x_sign, y_sign = a, d
    return np.ascontiguousarray(rgb[::-1 if y_sign < 0 else 1, ::-1 if x_sign < 0 else 1])


def stack_frames(path, found, indices):
    """The sampled frames found, {number: (H, W, 3)}, as one uint8 array (T, H, W, 3) in the order
    of indices; a VideoError if their sizes differ (a stream whose picture size changes midway)."""
    sizes = sorted({frame.shape[:2] for frame in found.values()})
    if len(sizes) > 1:
        found = ", ".join(f"{width}x{height}" for height, width in sizes)
        raise VideoError(f"{path}: the picture size changes within the video ({found}); re-encode "
                         f"it at one size")
    try:
        return np.stack([found[n] for n in indices])  # (T, H, W, 3) uint8
    except MemoryError:
        raise VideoError(f"{path}: out of memory while decoding it") from None


# --- from frames to the model's input: letterbox with mask, or square crop ------------------
# Two steps, because a FrameCache keeps what lies between them: resize_for_model makes the uint8
# pixels of the one resize (and the letterbox's box), pixels_to_tensor normalises them onto the
# model's canvas. "frames" are decoded frames at the file's size, "pixels" the resized ones.

def check_frames(frames):
    """A ValueError unless frames is what read_video returns: a uint8 numpy array (T, H, W, 3)."""
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
            and frames.shape[-1] == 3):
        found = (f"{frames.dtype} {tuple(frames.shape)}" if hasattr(frames, "shape")
                 else type(frames).__name__)
        raise ValueError(f"expected uint8 numpy frames of shape (T, H, W, 3), found {found}")


def letterbox_box(height, width, canvas=448, patch=14, window=2):
    """(top, left, valid_height, valid_width) in pixels of a height x width frame on the canvas.

    The long side fills the canvas; the short side is rounded UP to whole blocks of patch * window
    pixels (28: one LSD window of 2x2 patches), and the box is centred on block boundaries with the
    odd block at the bottom/right: the release's compute_basehw_video, whose rule for the teacher's
    224 px frames (patch 14) is doubled for the student's 448; canvas=224, window=1 gives the
    teacher's.
    """
    block = patch * window
    if canvas % block:
        raise ValueError(f"canvas {canvas} must be a whole number of patch*window = {block} px "
                         f"blocks")
    n_blocks = canvas // block
    long_side, short_side = max(height, width), min(height, width)
    short_blocks = -(-canvas * short_side // (long_side * block))  # exact ceil, no float rounding
    offset = (n_blocks - short_blocks) // 2 * block
    if width > height:  # landscape: full width, padded above and below
        return offset, 0, short_blocks * block, canvas
    return 0, offset, canvas, short_blocks * block  # portrait or square


def letterbox(frames, canvas=448, patch=14, window=2):
    """uint8 frames (T, H, W, 3) -> float32 (T, 4, canvas, canvas): normalised RGB + a 0/1 mask.

    As the release's resize2require_video: each frame is resized straight to the valid box
    (bicubic, Pillow's default and what the release gets) and pasted on a (122, 116, 104) canvas,
    the canvas is normalised, and the mask (1 on the box) follows as channel 3, unnormalised.
    """
    return pixels_to_tensor(*letterbox_pixels(frames, canvas, patch, window), canvas)


def letterbox_pixels(frames, canvas=448, patch=14, window=2):
    """The one resize of letterbox: uint8 frames (T, H, W, 3) -> (uint8 (T, h, w, 3), the frames
    resized to their valid box, and that box, (top, left, h, w) on the canvas)."""
    check_frames(frames)
    T, height, width, _ = frames.shape
    box = letterbox_box(height, width, canvas, patch, window)
    _, _, box_h, box_w = box
    resized = np.empty((T, box_h, box_w, 3), dtype=np.uint8)  # (T, h, w, 3)
    for t in range(T):
        picture = Image.fromarray(frames[t]).resize((box_w, box_h), Image.Resampling.BICUBIC)
        resized[t] = np.asarray(picture)
    return resized, box


def resize_center_crop(frames, size):
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, size, size): short side to size (bicubic),
    centre crop."""
    return normalize_frames(center_crop_pixels(frames, size))


def center_crop_pixels(frames, size):
    """The uint8 pixels of resize_center_crop, (T, size, size, 3). The long side is truncated to
    int(size * long / short) and the crop offset rounded, as CLIP's torchvision Resize +
    CenterCrop do."""
    check_frames(frames)
    _, height, width, _ = frames.shape
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    crops = [np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC))
             [top:top + size, left:left + size] for frame in frames]
    return np.stack(crops)  # (T, size, size, 3)


def model_input(frames, cfg):
    """uint8 frames (T, H, W, 3) -> the float tensor (T, C, S, S) a model with PandaConfig cfg
    takes: letterboxed with the mask channel (C = 4) when cfg.letterbox, else resized and
    centre-cropped (C = 3). Never flipped: the release flips at evaluation too, we only in
    training (VideoTextDataset)."""
    return pixels_to_tensor(*resize_for_model(frames, cfg), cfg.image_size)


def resize_for_model(frames, cfg):
    """The first step of model_input, all of its work but the cheap rest: (uint8 pixels, letterbox
    box) when cfg.letterbox, else (the centre crop, None). What a FrameCache stores."""
    if cfg.letterbox:
        return letterbox_pixels(frames, cfg.image_size, cfg.patch_size, cfg.lsd_window)
    return center_crop_pixels(frames, cfg.image_size), None


def mirrored(pixels, box, size):
    """resize_for_model's (pixels, box) flipped left to right on a size-px canvas: its tensor is
    the flipped tensor, mask channel included, so the valid box stays where the pixels are.
    Flipping the uint8 pixels rather than the float tensor copies a quarter of the bytes."""
    pixels = np.ascontiguousarray(pixels[:, :, ::-1])  # (T, h, w, 3)
    if box is None:
        return pixels, None
    top, left, box_h, box_w = box
    return pixels, (top, size - left - box_w, box_h, box_w)


def pixels_to_tensor(pixels, box, canvas):
    """The second step of model_input: resize_for_model's (pixels, box) -> the float tensor.
    Without a box, the pixels normalised as they are, (T, 3, h, w). With one, float32
    (T, 4, canvas, canvas): only the box's pixels are normalised one by one; the padding is one
    known colour, written as its normalised value, and the mask channel is 1 on the box."""
    if box is None:
        return normalize_frames(pixels)
    top, left, box_h, box_w = box
    out = torch.empty(len(pixels), 4, canvas, canvas)  # (T, 4, S, S)
    out[:, :3] = FILL_NORMALIZED[:, None, None]
    out[:, 3] = 0.0
    normalize_frames(pixels, out=out[:, :3, top:top + box_h, left:left + box_w])
    out[:, 3, top:top + box_h, left:left + box_w] = 1.0
    return out


# --- a cache of resized frames -------------------------------------------------------------

class FrameCache:
    """Each video's sampled frames after their one resize (resize_for_model, uint8), written once
    into folder and read back instead of decoding again: a later epoch or run costs a file read,
    not a decode.

    An entry is keyed by the video file (its absolute path, size and modification time) and by
    every setting that changes the pixels (`settings`: frames, sizes, patch, window, letterbox,
    teacher size), so an edited video or a run with other settings never reads a stale entry. It is
    written atomically (a temporary file renamed into place): a crash, or two workers writing one
    entry, leave a whole entry. A read_video warning is given when the entry is written, not again
    at each read. The flip happens after the cache, so both orientations train from one entry.

    The folder is trusted like the videos themselves: whoever can write in it can plant pixels of
    the right shape, and those are what the model sees. So an entry is checked when read, not
    authenticated: exactly the arrays these settings write, pixels of the shape and dtype they
    imply, a box of 4 ints inside the canvas. One that fails is named, decoded again and
    rewritten. A folder that cannot be written is a ValueError here, in the process that builds
    the dataset; an entry that cannot be written later (a full disk) is named once, and this
    process then decodes without caching."""

    VERSION = 1  # of the entry layout; a new layout gets new keys

    def __init__(self, folder, settings):
        self.folder, self.settings = Path(folder), dict(settings)
        # what VideoTextDataset.load_videos stores:
        # {name: (canvas side, whether a box goes with it)}
        self.layout = {"video": (settings["image_size"], settings["letterbox"])}
        if settings["teacher_size"]:
            self.layout["teacher_video"] = (settings["teacher_size"], True)
        self.writing = True  # until an entry cannot be written
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.folder).close()  # a file that vanishes when closed
        except OSError as err:
            raise ValueError(f"--frame_cache={self.folder}: cannot write there ({err}); name a "
                             f"writable folder, or leave --frame_cache out") from None

    def entry(self, path):
        """(the entry's file, its key: the text that names everything the pixels depend on)."""
        path = Path(path).resolve()
        stat = path.stat()
        key = json.dumps({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                          "version": self.VERSION, **self.settings}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npz", key

    def load(self, path):
        """{name: (pixels, box or None)} as saved for this video and these settings, or None."""
        file, key = self.entry(path)
        if not file.is_file():
            return None
        try:
            # TypeError: an .npy array, not an archive
            with np.load(file, allow_pickle=False) as saved:
                if str(saved["key"]) != key:  # another video with this digest: never in practice
                    return None
                return self.checked(saved)
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as err:
            warnings.warn(f"{file}: unreadable frame cache entry for {path} ({err}); it is written "
                          f"again")
            return None

    def checked(self, saved):
        """{name: (pixels, box or None)} of an open entry that holds exactly what these settings
        write, else a ValueError saying what differs."""
        boxes = [f"{name}_box" for name, (_, boxed) in self.layout.items() if boxed]
        expected = sorted(["key", "names", *self.layout, *boxes])
        if (sorted(saved.files) != expected
                or sorted(str(saved["names"]).split()) != sorted(self.layout)):
            raise ValueError(f"it holds the arrays {sorted(saved.files)}, expected {expected}")
        prepared = {}
        for name, (canvas, boxed) in self.layout.items():
            box = checked_box(saved[f"{name}_box"], canvas) if boxed else None
            shape = (self.settings["n_frames"], *(box[2:] if box else (canvas, canvas)), 3)
            pixels = saved[name]
            if pixels.dtype != np.uint8 or pixels.shape != shape:
                raise ValueError(f"{name!r} holds {pixels.dtype} pixels of shape {pixels.shape}, "
                                 f"expected uint8 {shape}")
            prepared[name] = (pixels, box)
        return prepared

    def save(self, path, prepared):
        """Store {name: (pixels uint8, box or None)} for this video. An entry that cannot be written
        is named once; the frames just decoded are used all the same, so no video is lost to the
        cache."""
        if not self.writing:
            return
        file, key = self.entry(path)
        arrays = {"key": np.array(key), "names": np.array(" ".join(prepared))}
        for name, (pixels, box) in prepared.items():
            arrays[name] = pixels
            if box is not None:
                arrays[f"{name}_box"] = np.array(box)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            run_files.write_atomically(file, lambda f: np.savez(f, **arrays))
        except OSError as err:  # a full disk, a quota: the cache only saves time, the run goes on
            self.writing = False
            warnings.warn(f"{file}: cannot write this frame cache entry ({err}); this process "
                          f"writes no more entries to --frame_cache={self.folder} and decodes "
                          f"videos instead")


def checked_box(array, canvas):
    """A saved letterbox box as (top, left, height, width): 4 integers, at least one pixel, inside
    a canvas x canvas picture; else a ValueError."""
    if array.shape != (4,) or array.dtype.kind not in "iu":
        raise ValueError(f"a box must be 4 integers, found {array.dtype} of shape {array.shape}")
    top, left, height, width = array.tolist()
    if min(top, left) < 0 or min(height, width) < 1 or max(top + height, left + width) > canvas:
        raise ValueError(f"the box {(top, left, height, width)} does not lie inside the "
                         f"{canvas}-px canvas")
    return top, left, height, width


# --- the release's chat templates ------------------------------------------------------------

# training (the release's conv_vicuna_v1)
VICUNA_V1 = ChatTemplate(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# evaluation (its conv_videopanda_v1): "human" where training says "user"
VIDEOPANDA_V1 = ChatTemplate(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = {"vicuna_v1": VICUNA_V1, "videopanda_v1": VIDEOPANDA_V1}


# --- annotation files -------------------------------------------------------------------

def load_json_list(path):
    """The entries of a JSON list file (instructions, questions or answers). Whatever makes the file
    unreadable is an AnnotationError naming it: bytes that are not UTF-8 (with their offset), JSON
    syntax (with its line and column), nesting too deep for the parser, a number too long to
    convert."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text: the byte at offset {err.start} "
                              f"({err.object[err.start]:#04x}) is not valid UTF-8 ({err.reason}); "
                              f"save the file as UTF-8") from None
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise AnnotationError(f"{path}: cannot read the annotation file: {err}") from None
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, found "
                              f"{type(entries).__name__}")
    return entries


def entry_name(path, index, entry):
    """How errors name an entry: "file: entry 3 (id 'abc')"."""
    known_id = entry.get("id", entry.get("question_id")) if isinstance(entry, dict) else None
    return f"{path}: entry {index}" + (f" (id {known_id!r})" if known_id is not None else "")


def require_field(entry, field, where, types=str):
    """entry[field], or an AnnotationError naming the entry (where) and the field."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, found {type(entry).__name__}")
    if field not in entry:
        raise AnnotationError(f"{where}: missing field {field!r}")
    if not isinstance(entry[field], types):
        raise AnnotationError(f"{where}: field {field!r} has the wrong type "
                              f"{type(entry[field]).__name__}")
    return entry[field]


def parse_instruction_entry(entry, where, video_tag="<video>"):
    """A Video-ChatGPT / Valley entry -> {"id", "video", "turns": [(question, answer), ...]}.
    Turns must alternate human, gpt. The video tag is removed wherever it is; the template puts
    one placeholder at the front of the first question (as the release's preprocess_multimodal)."""
    sample_id = str(require_field(entry, "id", where, (str, int)))
    video = require_field(entry, "video", where)
    conversation = require_field(entry, "conversations", where, list)
    if not conversation or len(conversation) % 2:
        raise AnnotationError(f"{where}: expected human/gpt pairs of turns, found "
                              f"{len(conversation)} turns")
    values = []
    for k, (turn, role) in enumerate(zip(conversation, ("human", "gpt") * len(conversation))):
        speaker = require_field(turn, "from", f"{where}, turn {k}")
        if speaker != role:
            raise AnnotationError(f"{where}, turn {k}: expected a turn from {role!r}, found "
                                  f"{speaker!r}")
        values.append(require_field(turn, "value", f"{where}, turn {k}"))
    turns = [(question.replace(video_tag, "").strip(), answer)
             for question, answer in zip(values[::2], values[1::2])]
    return {"id": sample_id, "video": video, "turns": turns}


def parse_qa_answer(entry, where):
    """An entry of a QA answer file -> (question_id, answer), ids as strings."""
    question_id = require_field(entry, "question_id", where, (str, int))
    return str(question_id), str(require_field(entry, "answer", where, (str, int, float)))


def require_unique(question_ids, path):
    """Results are merged by question_id, so a repeated one is an error of the whole file."""
    repeated = [qid for qid, count in Counter(question_ids).items() if count > 1]
    if repeated:
        raise AnnotationError(f"{path}: question_id must be unique, repeated: {repeated[:5]}")


def parse_qa_question(entry, where, answers):
    """An entry of a QA question file -> {"id", "video", "question", "answer"}."""
    qid = str(require_field(entry, "question_id", where, (str, int)))
    video = str(require_field(entry, "video_name", where, (str, int)))
    question = require_field(entry, "question", where)
    if qid not in answers:
        raise AnnotationError(f"{where}: question_id {qid!r} has no entry in the answer file")
    return {"id": qid, "video": video, "question": question, "answer": answers[qid]}


def resolve_video(folder, name, sample_id=None):
    """The file of a video name in folder: the name as given, else its stem with each usual
    extension, also with ActivityNet's "v_" prefix. A name that matches nothing is a VideoError.

    Names stay inside the folder: an absolute name or one with a ".." part is a VideoError, since
    an annotation file someone hands you could otherwise read any file the run can. Symlinks inside
    the folder are followed: whoever put them there chose what they point to (docs/video.md)."""
    folder = Path(folder)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise VideoError(f"sample {sample_id!r}: video {name!r} leaves the video folder {folder}: "
                         f"names must be relative to it, without '..'")
    has_extension = Path(name).suffix.lower() in VIDEO_EXTENSIONS
    stem = name[:-len(Path(name).suffix)] if has_extension else name
    candidates = [folder / name] + [folder / f"{prefix}{stem}{ext}"
                                    for prefix in ("", "v_") for ext in VIDEO_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VideoError(f"sample {sample_id!r}: video {name!r} resolves to no file in {folder} "
                     f"(tried {', '.join(VIDEO_EXTENSIONS)}, with and without the 'v_' prefix)")


# --- datasets ---------------------------------------------------------------------------

class VideoTextDataset(Dataset):
    """What the instruction and QA datasets share: a video file -> the tensor a model with
    PandaConfig cfg takes (model_input), flips in training, the prompt's ids and labels, bad
    entries.

    teacher_size > 0 adds "teacher_video" to each item: the same decoded frames letterboxed on a
    teacher_size canvas with 14 px patches and one patch per block (the release's teacher layout,
    224 for its 448 px student), for a distillation teacher. Its valid box is the student's scaled
    down, and in training it flips with the student's clip (the release flips the two
    independently).

    frame_cache: a folder for a FrameCache of the resized frames ("" = none), which later epochs
    and runs with the same settings read instead of decoding.

    A bad annotation entry is an AnnotationError when the file is read (on_error="raise") or left
    out and listed in .invalid_entries (on_error="skip"). A video that cannot be used never raises
    in __getitem__: the item is {"id", "skipped": reason}, which collate_video_batch lists in
    batch["skipped"], and the caller applies --on_error in its own process (apply_error_policy),
    where a raised error keeps its one-line message (a DataLoader worker's exception arrives
    wrapped in its traceback, and a count kept in a worker would never reach the training loop).
    Items hold only strings and a tokenizers.Tokenizer, both picklable, so DataLoader workers fork
    or spawn fine."""

    def __init__(self, video_folder, tokenizer, template, cfg, *, train=False, flip_prob=0.5,
                 on_error="raise", max_text_tokens=4096, decode_threads=0, teacher_size=0,
                 frame_cache=""):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if teacher_size < 0 or teacher_size % TEACHER_PATCH:
            raise ValueError(f"teacher_size must be 0 (no teacher) or a multiple of "
                             f"{TEACHER_PATCH}, got {teacher_size}")
        self.video_folder, self.tokenizer = Path(video_folder), tokenizer
        self.template, self.cfg = template, cfg
        self.train, self.flip_prob, self.on_error = train, flip_prob, on_error
        self.max_text_tokens, self.decode_threads = max_text_tokens, decode_threads
        self.teacher_size = teacher_size
        settings = dict(n_frames=cfg.n_frames, image_size=cfg.image_size, patch_size=cfg.patch_size,
                        lsd_window=cfg.lsd_window, letterbox=cfg.letterbox,
                        teacher_size=teacher_size)
        self.cache = FrameCache(frame_cache, settings) if frame_cache else None
        self.samples = []
        self.invalid_entries = []  # the reasons, under on_error="skip"

    def parse_all(self, entries, parse, path):
        """[parse(entry, its name) for each entry], all up front, so that a broken annotation file
        fails before training starts; under on_error="skip" bad entries go to .invalid_entries."""
        parsed = []
        for index, entry in enumerate(entries):
            try:
                parsed.append(parse(entry, entry_name(path, index, entry)))
            except AnnotationError as err:
                if self.on_error == "raise":
                    raise
                self.invalid_entries.append(str(err))
        if self.invalid_entries:
            warnings.warn(f"skipped {len(self.invalid_entries)} invalid annotation entries "
                          f"(listed in .invalid_entries), the first: {self.invalid_entries[0]}")
        return parsed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        try:
            return self.make_item(self.samples[index])
        except (VideoError, AnnotationError) as err:
            return {"id": self.samples[index]["id"], "skipped": str(err)}

    def load_videos(self, sample):
        """{"video": (T, C, S, S)} of a sample, and "teacher_video" (T, 4, t, t) with teacher_size
        t: from the frame cache where it holds them, else decoded and resized (and then stored in
        the cache)."""
        path = resolve_video(self.video_folder, sample["video"], sample["id"])
        prepared = self.cache.load(path) if self.cache else None  # {name: (uint8 pixels, box)}
        if prepared is None:
            # (T, H, W, 3) uint8
            frames, _ = read_video(path, self.cfg.n_frames, self.decode_threads)
            prepared = {"video": resize_for_model(frames, self.cfg)}
            if self.teacher_size:
                prepared["teacher_video"] = letterbox_pixels(frames, self.teacher_size,
                                                             TEACHER_PATCH, 1)
            if self.cache:
                self.cache.save(path, prepared)
        sizes = {"video": self.cfg.image_size, "teacher_video": self.teacher_size}
        # torch's RNG, not numpy's: DataLoader reseeds torch in each worker, numpy's state is forked
        # as is. One draw flips the student's and the teacher's copies together.
        if self.train and torch.rand(()) < self.flip_prob:
            prepared = {name: mirrored(pixels, box, sizes[name])
                        for name, (pixels, box) in prepared.items()}
        return {name: pixels_to_tensor(pixels, box, sizes[name])
                for name, (pixels, box) in prepared.items()}

    def tokenize(self, sample, turns):
        ids, labels = tokenize_conversation(self.tokenizer, self.template, turns)
        # the release cuts the text before the video expands
        if self.max_text_tokens and len(ids) > self.max_text_tokens:
            ids, labels = ids[:self.max_text_tokens], labels[:self.max_text_tokens]
            if VIDEO_PLACEHOLDER not in ids:
                raise AnnotationError(f"sample {sample['id']!r}: cutting the text to "
                                      f"{self.max_text_tokens} tokens removes the video "
                                      f"placeholder")
        return ids, labels


class VideoInstructionDataset(VideoTextDataset):
    """Video-ChatGPT / Valley instruction data (the release's training format): a JSON list of
    {"id", "video", "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt",
    "value": ...}, ...]}. Items: {"id", "video" float32 (T, C, S, S), "input_ids", "labels"} (and
    "teacher_video" with teacher_size); labels on the answers only."""

    def __init__(self, annotation_path, video_folder, tokenizer, cfg, template=VICUNA_V1,
                 **options):
        super().__init__(video_folder, tokenizer, template, cfg, **options)

        def parse(entry, where):
            return parse_instruction_entry(entry, where, template.video_tag)
        self.samples = self.parse_all(load_json_list(annotation_path), parse, annotation_path)

    def make_item(self, sample):
        ids, labels = self.tokenize(sample, sample["turns"])
        return {"id": sample["id"], **self.load_videos(sample), "input_ids": ids, "labels": labels}


class VideoQADataset(VideoTextDataset):
    """Zero-shot video QA (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA) in Video-ChatGPT's
    question and answer files, keyed by question_id. Items: {"id", "video", "input_ids", "labels",
    "question", "answer", "video_name", "prompt_len"}.

    By default input_ids is the generation prompt, ending in "ASSISTANT:", with no targets. With
    include_answer=True the answer and eos follow as targets (teacher-forced scoring);
    input_ids[:prompt_len] is the prompt either way.

    A question that cannot be answered as asked is that item's own error (check_question), which
    the caller raises or skips under --on_error: words the tokenizer reads as <unk>, or a prompt
    that leaves no room for max_new_tokens generated tokens in the model's context."""

    def __init__(self, question_path, answer_path, video_folder, tokenizer, cfg,
                 template=VIDEOPANDA_V1, include_answer=False, max_new_tokens=0, **options):
        super().__init__(video_folder, tokenizer, template, cfg, **options)
        self.include_answer, self.max_new_tokens = include_answer, max_new_tokens
        answer_pairs = self.parse_all(load_json_list(answer_path), parse_qa_answer, answer_path)
        require_unique([qid for qid, _ in answer_pairs], answer_path)
        answers = dict(answer_pairs)

        def parse(entry, where):
            return parse_qa_question(entry, where, answers)
        self.samples = self.parse_all(load_json_list(question_path), parse, question_path)
        require_unique([sample["id"] for sample in self.samples], question_path)

    def make_item(self, sample):
        answer = sample["answer"] if self.include_answer else None
        ids, labels = self.tokenize(sample, [(sample["question"], answer)])
        self.check_question(sample, ids)  # before the video is decoded
        prompt_len = next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        return {"id": sample["id"], **self.load_videos(sample), "input_ids": ids, "labels": labels,
                "question": sample["question"], "answer": sample["answer"],
                "video_name": sample["video"], "prompt_len": prompt_len}

    def check_question(self, sample, ids):
        """An AnnotationError naming the sample if the tokenizer reads words of its question as
        <unk> (the model would answer another question), or if its text, its video's visual tokens
        and max_new_tokens exceed cfg.max_seq_len. The visual tokens are counted for full frames,
        cfg.n_frames * cfg.tokens_per_frame, as the STAB gives them: a letterboxed video gives
        fewer (fewer rows, shorter ones), so the bound is safe, if a little strict for such
        videos."""
        unknown = unknown_words(self.tokenizer, sample["question"])
        if unknown:
            raise AnnotationError(f"sample {sample['id']!r}: the model's tokenizer does not know "
                                  f"the word(s) {unknown} of the question (it would read them as "
                                  f"<unk>)")
        n_text = len(ids) - 1  # less the placeholder
        n_visual = self.cfg.n_frames * self.cfg.tokens_per_frame
        if n_text + n_visual + self.max_new_tokens > self.cfg.max_seq_len:
            raise AnnotationError(f"sample {sample['id']!r}: {n_text} text tokens + {n_visual} "
                                  f"visual tokens + --max_new_tokens={self.max_new_tokens} exceed "
                                  f"the model's context, max_seq_len={self.cfg.max_seq_len}: the "
                                  f"question is too long")


def collate_video_batch(items, pad_id=0):
    """collate() of the items that loaded, plus batch["skipped"]: (id, reason) of those that did
    not, batch["teacher_videos"] (B, T, 4, t, t) where items carry "teacher_video", and every other
    field as a list (batch["id"], batch["question"], ...). If nothing loaded,
    videos/input_ids/labels/lengths are None: log batch["skipped"] and move on.
    pad_id 0 is the release's (pad = unk = 0 for Llama); use functools.partial to change it."""
    kept = [item for item in items if "skipped" not in item]
    skipped = [(item["id"], item["skipped"]) for item in items if "skipped" in item]
    if not kept:
        return {**dict.fromkeys(("videos", "input_ids", "labels", "lengths")), "skipped": skipped}
    batch = collate(kept, pad_id=pad_id)
    if "teacher_video" in kept[0]:
        # (B, T, 4, t, t)
        batch["teacher_videos"] = torch.stack([item["teacher_video"] for item in kept])
    for key in kept[0].keys() - {"video", "teacher_video", "input_ids", "labels"}:
        batch[key] = [item[key] for item in kept]
    batch["skipped"] = skipped
    return batch


# --- the skip policy, and batches for training ----------------------------------------------

def apply_error_policy(batch, on_error, skipped):
    """The unusable samples a DataLoader batch reports: raise on the first (on_error="raise"), or
    name each in the log and append it to `skipped` (on_error="skip"). Never dropped without a
    word."""
    for sample_id, reason in batch["skipped"]:
        message = reason if reason.startswith("sample ") else f"sample {sample_id!r}: {reason}"
        if on_error == "raise":
            raise VideoError(f"{message} (--on_error=skip would skip it and go on)")
        skipped.append(message)
        tqdm.write(f"skipped {message}")


def report_skipped(skipped, dataset):
    """The end-of-run account of on_error=skip: every distinct sample left out, and how often."""
    counts = Counter(skipped)
    print(f"skipped {len(skipped)} time(s), {len(counts)} distinct sample(s) with unusable videos, "
          f"and {len(dataset.invalid_entries)} invalid annotation entries")
    for message, count in counts.items():
        print(f"  {message}" + (f" ({count} times)" if count > 1 else ""))
    for message in dataset.invalid_entries:
        print(f"  {message}")


@dataclass(frozen=True)
class BatchPlan:
    """How batches() deals a dataset out: which samples make each batch (batch_size, seed, and
    this process's share, rank of world), and the DataLoader that decodes them (num_workers
    processes; pinned memory when pin_memory, None: when CUDA is available), which changes no
    batch."""
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    num_workers: int = 2
    pin_memory: bool | None = None


def batches(dataset, plan, place, on_error, skipped):
    """Endless training batches of a dataset, as (batch, place), place = (epoch, position). Epoch e
    visits the samples in the order of a permutation seeded by (plan.seed, e); position counts the
    samples of the epoch used so far, so the place saved in a checkpoint is where a resumed run
    goes on. Unusable samples stop the run (on_error="raise") or are logged, appended to `skipped`
    and left out of the batch.

    Under torchrun, process r takes every world-th sample of the order from the r-th on: the k-th
    batches of all processes together are samples k*B*world .. (k+1)*B*world - 1 of the order, the
    k-th batch of one process with the global batch B*world (until a sample is skipped). Each
    process keeps its own place in its share, so one that skips a sample, or ends its share of an
    epoch a batch earlier, still yields one batch per micro-step, like the others: no
    coordination.

    One DataLoader serves the whole run: its plan.num_workers processes start once, and the next
    epoch's first batches are decoded while this epoch's last ones train. Each worker keeps two
    batches ready (PyTorch's prefetch). The dataset's decode_threads should be 1 here: the workers
    are the parallelism."""
    rank, world = plan.rank, plan.world
    share = len(range(rank, len(dataset), world))
    if share == 0:
        raise ValueError(f"process {rank} of {world} has no samples: the dataset holds "
                         f"{len(dataset)}")
    # The workers' flip RNG is seeded from (seed, epoch, position, rank) of the starting place: a
    # run is reproducible from any starting point, though a resumed run flips other clips than an
    # uninterrupted one.
    epoch, position = place
    flip_seed = np.random.default_rng([plan.seed, epoch, position, rank]).integers(2**62)
    flips = torch.Generator().manual_seed(int(flip_seed))
    pin_memory = torch.cuda.is_available() if plan.pin_memory is None else plan.pin_memory
    sampler = (indices for _, _, indices in epoch_batches(len(dataset), plan, place))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=plan.num_workers,
                        collate_fn=collate_video_batch, generator=flips, pin_memory=pin_memory)
    n_kept, counting = 0, position == 0  # whether the current epoch is seen from its start
    # The loader yields its batches in the plan's order, so a second walk of the plan names their
    # places.
    for batch, (batch_epoch, position, _) in zip(loader, epoch_batches(len(dataset), plan, place)):
        if batch_epoch != epoch:
            if counting and n_kept == 0:
                whose = "its" if world == 1 else f"process {rank}'s"
                raise VideoError(f"not one of {whose} {share} samples loads; the last reason: "
                                 f"{skipped[-1]}")
            epoch, n_kept, counting = batch_epoch, 0, True
        apply_error_policy(batch, on_error, skipped)
        if batch["lengths"] is not None:
            n_kept += len(batch["lengths"])
            yield batch, (epoch, position)


def epoch_batches(n_samples, plan, place):
    """The order of batches(): endless (epoch, position after the batch, the batch's sample
    indices) of this process's share, from place = (epoch, position) on. A batch never spans two
    epochs: an epoch's last may be smaller."""
    epoch, position = place
    while True:
        permutation = np.random.default_rng([plan.seed, epoch]).permutation(n_samples)
        order = permutation[plan.rank::plan.world].tolist()  # this process's share
        for start in range(position, len(order), plan.batch_size):
            indices = order[start:start + plan.batch_size]
            yield epoch, start + len(indices), indices
        epoch, position = epoch + 1, 0
