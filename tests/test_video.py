"""Real video files, frame sampling, letterbox geometry and the QA / instruction datasets (real_video/video_files.py).

The four real clips live in ../shared/data/videos (facts in its SOURCES.md); every other file is
written by the tests into tmp_path with PyAV. The reference for every decoded frame is a plain
front-to-back decode (front_to_back below), which shares no code with real_video/video_files.py.
"""

import functools
import gc
import json
import math
import multiprocessing
import pickle
import re
import struct
import warnings
from fractions import Fraction
from io import BytesIO
from itertools import islice
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from real_video import video_files
from data import CLIP_MEAN, CLIP_STD, conversation_pieces, normalize_frames
from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER, PandaConfig
from real_video.video_files import AnnotationError, VideoError

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"

# file: (frames, header frames, fps used, sampled indices worked out by hand from the release's
# _get_rawvideo_dec: one candidate per second, 8 of them at linspace, or a stride for short clips)
REAL_CLIPS = {
    # 25 fps -> candidates 0, 25, ..., 125 (6 < 8): stride (132 - 1) // 7 = 18 from frame 0
    "bigbuckbunny.mp4": (132, 132, 25.0, [0, 18, 36, 54, 72, 90, 108, 126]),
    # 20 fps -> 14 candidates 0, 20, ..., 260; linspace(0, 13, 8) floored = 0 1 3 5 7 9 11 13
    "cockatoo.mp4": (280, 280, 20.0, [0, 20, 60, 100, 140, 180, 220, 260]),
    # a GIF's rate is frames / duration = 36 / 0.82 s = 43.9 -> stride 44 -> 1 candidate: stride 35 // 7 = 5
    "newtonscradle.gif": (36, 36, 36 / 0.82, [0, 5, 10, 15, 20, 25, 30, 35]),
    # header says 0 frames: 720 packets; 24 fps -> 30 candidates; linspace(0, 29, 8) = 0 4 8 12 16 20 24 29
    "big_buck_bunny_0_30.webm": (720, 0, 24.0, [0, 96, 192, 288, 384, 480, 576, 696]),
}


def real_clip(name):
    path = VIDEOS / name
    if not path.is_file():
        pytest.skip(f"real test clips not found in {VIDEOS}")
    return path


@functools.lru_cache(maxsize=None)
def decoded_real_clip(name):
    """Each real clip is decoded once per test run."""
    return video_files.read_video(real_clip(name), 8)


# --- writing test clips, and the reference decoder ------------------------------------------

def write_clip(path, frames, fps=10, options=None, durations_ms=None, container_format=None):
    """frames uint8 (T, H, W, 3) -> a video file written by PyAV: a GIF, or H.264 (yuv420p; yuv444p
    for odd sizes) in the container the suffix (or container_format) names. options: libx264's, e.g.
    g (keyframe interval), bf (B-frames), x264-params. durations_ms: each frame's display time, for a
    variable frame rate, instead of 1 / fps. path may be a BytesIO when container_format is given."""
    gif = container_format is None and path.suffix == ".gif"
    with av.open(path if isinstance(path, BytesIO) else str(path), "w", format=container_format) as container:
        stream = container.add_stream("gif" if gif else "libx264", rate=fps, options=options or {})
        stream.height, stream.width = frames.shape[1:3]
        odd = frames.shape[1] % 2 or frames.shape[2] % 2
        stream.pix_fmt = "rgb8" if gif else "yuv444p" if odd else "yuv420p"
        if durations_ms:
            stream.codec_context.time_base = Fraction(1, 1000)
        start = 0
        for k, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if durations_ms:
                picture.pts, picture.time_base = start, Fraction(1, 1000)
                start += durations_ms[k % len(durations_ms)]
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path


def front_to_back(path, indices):
    """The reference: PyAV decodes the file from its first frame on, no seeking, and the frames with
    the given numbers are kept as RGB, (len(indices), H, W, 3) uint8."""
    with av.open(str(path)) as container:
        kept = {}
        for number, frame in enumerate(container.decode(video=0)):
            if number in indices:
                kept[number] = frame.to_ndarray(format="rgb24")
            if number == max(indices):
                break
    return np.stack([kept[n] for n in indices])


def grey_clip(n_frames, height, width):
    """Frame i is uniformly grey at 20 + 20 i, so a decoded frame tells which one it was."""
    levels = 20 + 20 * np.arange(n_frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n_frames, height, width, 3)).copy()


def which_grey_frame(frames):
    return [round((float(frame.mean()) - 20) / 20) for frame in frames]


def moving_clip(n_frames, height=48, width=64):
    """Frame i: a grey level that steps every frame and a white block that moves one place every ten
    frames, so no two frames of a few hundred look alike, and motion gives P- and B-frames work."""
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i in range(n_frames):
        frames[i] = 40 + (i % 10) * 18
        row, col = divmod(i // 10 % ((height // 8) * (width // 8)), width // 8)
        frames[i, 8 * row:8 * row + 8, 8 * col:8 * col + 8] = 255
    return frames


COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)  # exact in GIF's rgb8 palette


# --- helpers: what a few checks need, written out -------------------------------------------

def hflip(clip):
    return clip.flip(-1)


def valid_box(mask):
    """(top, left, height, width) of the 1s of a (H, W) mask, which must be one solid box."""
    rows, cols = torch.nonzero(mask > 0, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) + 1 - top, int(cols.max()) + 1 - left
    assert int(mask.sum()) == height * width
    return top, left, height, width


def visual_token_count(mask_or_valid_hw, patch=14, window=2):
    """LLM tokens per frame, 1 + h * (w + 1): a fused frame token, then h rows of w LSD tokens each
    followed by a split token. The argument is a frame's mask (H, W) or (1, H, W), or the valid box's
    (height, width) in pixels; (h, w) is that box in windows of patch * window pixels."""
    if isinstance(mask_or_valid_hw, (torch.Tensor, np.ndarray)):
        box_h, box_w = valid_box(torch.as_tensor(mask_or_valid_hw).squeeze(0))[2:]
    else:
        box_h, box_w = mask_or_valid_hw
    block = patch * window
    assert box_h % block == 0 and box_w % block == 0, (box_h, box_w)
    return 1 + box_h // block * (box_w // block + 1)


def render_conversation(template, turns):
    """The prompt as one string, with the video tag."""
    names = {"bos": template.bos or "", "video": template.video_tag, "eos": template.eos}
    return "".join(piece[1] if piece[0] == "text" else names[piece[0]] for piece in conversation_pieces(template, turns))


def geometry(size, letterbox=True):
    """A model config whose frames are size x size, letterboxed (the paper's) or centre-cropped."""
    return PandaConfig.preset("paper", image_size=size, letterbox=letterbox)


# --- real clips -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clip_frame_count_and_rate(name):
    n_total, n_header, fps, _ = REAL_CLIPS[name]
    info = video_files.probe_video(real_clip(name))
    assert (info["n_total"], info["n_header"], info["n_expected"]) == (n_total, n_header, n_total)
    assert info["fps"] == pytest.approx(fps)
    assert info["decoding"] == ("front to back: gif frames paint over the previous ones" if name.endswith(".gif")
                                else "seeking")


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clip_sampled_frames_are_those_of_a_front_to_back_decode(name):
    n_total, _, fps, indices = REAL_CLIPS[name]
    assert video_files.sample_frame_indices(n_total, fps, 8) == indices
    frames, info = decoded_real_clip(name)
    assert info["indices"] == indices and info["n_total"] == n_total
    height, width = (150, 200) if name.endswith(".gif") else (720, 1280)
    assert frames.shape == (8, height, width, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, front_to_back(real_clip(name), indices))


def test_real_clip_pixels():
    frames, _ = decoded_real_clip("bigbuckbunny.mp4")
    assert np.allclose(frames[0].reshape(-1, 3).mean(0), (111, 124, 80), atol=1.5)  # SOURCES.md
    gif, _ = decoded_real_clip("newtonscradle.gif")  # decoded as bgra: we must hand back RGB
    assert gif.shape[-1] == 3 and 150 < gif.mean() < 230


def test_webm_black_first_frame_is_sampled_as_the_rule_says():
    """The release's rule starts every branch at frame 0, and frames are numbered in decoding order:
    the webm's first pts (3 ms) and its keyframes do not move frame 0. So the pure-black opening frame
    IS sampled; the other seven are picture frames. (Frames 0-4 are black; the fade-in starts at 5.)"""
    frames, info = decoded_real_clip("big_buck_bunny_0_30.webm")
    assert info["indices"][0] == 0
    assert frames[0].max() == 0
    assert all(frame.mean() > 50 for frame in frames[1:])


def test_real_clip_letterbox_tokens():
    for name, tokens in (("cockatoo.mp4", 154), ("newtonscradle.gif", 205)):  # 16:9 and 4:3
        frames, _ = decoded_real_clip(name)
        clip = video_files.letterbox(frames)
        assert clip.shape == (8, 4, 448, 448) and clip.dtype == torch.float32
        assert visual_token_count(clip[0, 3]) == tokens


# --- frame sampling -------------------------------------------------------------------------

def test_sampling_rule_branches():
    assert video_files.sample_frame_indices(300, 30, 8) == [0, 30, 60, 90, 150, 180, 210, 270]  # linspace(0, 9, 8) = 0 1 2 3 5 6 7 9
    assert video_files.sample_frame_indices(200, 25, 8) == list(range(0, 200, 25))  # exactly 8 candidates
    assert video_files.sample_frame_indices(10, 30, 8) == list(range(8))  # stride max(1, 9 // 7) = 1
    assert video_files.sample_frame_indices(57, 30, 8) == [0, 8, 16, 24, 32, 40, 48, 56]


def test_sampling_short_clips_repeat_frames_in_order():
    assert video_files.sample_frame_indices(3, 30, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert video_files.sample_frame_indices(1, 30, 8) == [0] * 8  # the release divides by zero here
    for n in range(1, 8):
        indices = video_files.sample_frame_indices(n, 10, 8)
        assert indices == sorted(indices) and set(indices) == set(range(n))


def test_sampling_guards_odd_frame_rates():
    # fps < 0.5 gave the release a range() step of 0; stride 1 makes every frame a candidate
    assert video_files.sample_frame_indices(15, 0.3, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert video_files.sample_frame_indices(15, 0.0, 8) == video_files.sample_frame_indices(15, float("nan"), 8)
    for n in (8, 9, 50, 333, 1000):
        for fps in (0.1, 1, 7.5, 24, 29.97, 60, 1000):
            indices = video_files.sample_frame_indices(n, fps, 8)
            assert len(indices) == 8 and indices == sorted(indices) and 0 <= indices[0] and indices[-1] < n


# --- seeking gives the frames of a front-to-back decode -------------------------------------

SEEKABLE_CLIPS = {  # name: (file name, frames, fps, libx264 options, frame durations in ms)
    # 24 s at 10 fps, a keyframe every 5 s, B-frames: each sampled frame is up to 49 frames past its keyframe
    "long GOP, B-frames": ("long.mp4", 240, 10, {"g": "50", "bf": "3", "sc_threshold": "0"}, None),
    # an I-frame every 12 frames whose leading B-frames refer back to the GOP before it
    "open GOP": ("open.mp4", 120, 10, {"bf": "3", "x264-params": "open-gop=1:keyint=12:min-keyint=12:scenecut=0"}, None),
    # frames shown for 33, 100, 7 and 250 ms in turn
    "variable frame rate": ("vfr.mp4", 96, 10, {"g": "8", "bf": "2"}, [33, 100, 7, 250]),
    # Matroska stores no frame count: the packets are counted
    "no frame count, variable frame rate": ("vfr.mkv", 96, 10, {"g": "8", "bf": "2"}, [33, 100, 7, 250]),
}


@pytest.fixture(scope="module")
def seekable_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seekable")
    return {name: write_clip(folder / file, moving_clip(n), fps, options, durations)
            for name, (file, n, fps, options, durations) in SEEKABLE_CLIPS.items()}


@pytest.mark.parametrize("name", SEEKABLE_CLIPS)
@pytest.mark.parametrize("threads", [1, 2])
def test_seeking_gives_the_frames_of_a_front_to_back_decode(seekable_clips, name, threads):
    path = seekable_clips[name]
    frames, info = video_files.read_video(path, 8, threads)
    assert info["decoding"] == "seeking" and info["n_total"] == SEEKABLE_CLIPS[name][1]
    assert info["indices"] == video_files.sample_frame_indices(info["n_total"], info["fps"], 8)
    assert len(set(info["indices"])) == 8
    assert np.array_equal(frames, front_to_back(path, info["indices"]))


def test_seeking_decodes_only_from_each_keyframe(seekable_clips, monkeypatch):
    """Frames 0, 30, 60, 90, 130, 160, 190, 230 of 240, keyframes at 0, 50, 100, 150, 200. Decoding
    runs on from 0 to 30 (no keyframe between), seeks to 50 and runs on through 60 to 90, seeks to 100
    for 130, to 150 for 160 and 190, to 200 for 230: 1 + 30 + 11 + 30 + 31 + 11 + 30 + 31 = 175 frames,
    each once, where a front-to-back decode needs 231. Equality with the reference is the test above."""
    decoded = []
    real = video_files.frames_from_keyframe

    def counting(*args):
        for number, frame in real(*args):
            decoded.append(number)
            yield number, frame

    monkeypatch.setattr(video_files, "frames_from_keyframe", counting)
    _, info = video_files.read_video(seekable_clips["long GOP, B-frames"], 8)
    assert info["indices"] == [0, 30, 60, 90, 130, 160, 190, 230]
    assert len(decoded) == 175 and len(set(decoded)) == 175


def test_a_seek_that_goes_wrong_falls_back_to_front_to_back(seekable_clips, monkeypatch):
    monkeypatch.setattr(video_files, "frames_from_keyframe", lambda *args: iter(()))  # seeking finds nothing
    path = seekable_clips["open GOP"]
    frames, info = video_files.read_video(path, 8)
    assert info["decoding"] == "front to back: seeking did not find every sampled frame"
    assert np.array_equal(frames, front_to_back(path, info["indices"]))


def test_packets_without_timestamps_are_decoded_front_to_back(tmp_path):
    """A raw H.264 stream has no container timestamps: its frames are numbered as they decode."""
    path = write_clip(tmp_path / "raw.h264", moving_clip(30), options={"g": "10", "bf": "2"}, container_format="h264")
    frames, info = video_files.read_video(path, 8)
    assert info["decoding"] == "front to back: packets without timestamps" and info["n_total"] == 30
    assert np.array_equal(frames, front_to_back(path, info["indices"]))


# --- written clips: counts, short clips, GIF colours ----------------------------------------

@pytest.mark.parametrize("n_frames, height, width", [(10, 112, 64), (12, 72, 128), (5, 61, 97), (1, 32, 32)])
def test_written_mp4_counts_and_shapes(tmp_path, n_frames, height, width):
    path = write_clip(tmp_path / "clip.mp4", grey_clip(n_frames, height, width))
    assert video_files.probe_video(path)["n_total"] == n_frames
    frames, info = video_files.read_video(path, 8)
    assert frames.shape == (8, height, width, 3)
    assert which_grey_frame(frames) == info["indices"] == video_files.sample_frame_indices(n_frames, 10, 8)


def test_three_frame_clips_repeat_frames(tmp_path):
    mp4 = write_clip(tmp_path / "three.mp4", grey_clip(3, 48, 64))
    frames, info = video_files.read_video(mp4, 8)
    assert info["indices"] == which_grey_frame(frames) == [0, 0, 0, 1, 1, 2, 2, 2]
    colors = np.broadcast_to(COLORS[:, None, None, :], (3, 61, 97, 3)).copy()  # red, green, blue frames
    gif = write_clip(tmp_path / "three.gif", colors)
    frames, info = video_files.read_video(gif, 8)
    assert frames.shape == (8, 61, 97, 3) and info["n_total"] == 3
    expected = COLORS[[0, 0, 0, 1, 1, 2, 2, 2]].astype(int)  # RGB order, not BGR (rgb8 stores 255 as 252)
    assert np.abs(frames[:, 30, 48].astype(int) - expected).max() <= 8


# --- frames upright, as players show them ----------------------------------------------------

def with_track_matrix(path, a, b, c, d):
    """Write the display matrix [[a, b, 0], [c, d, 0], [0, 0, 1]] (a..d in -1, 0, 1) into the track
    header (tkhd) of an mp4 that PyAV wrote with none: ISO/IEC 14496-12 shows the coded pixel (x, y) at
    (a x + c y, b x + d y). A phone filming upright stores a landscape picture and a = d = 0, b = 1,
    c = -1: turn it a quarter clockwise."""
    data = bytearray(path.read_bytes())
    identity = struct.pack(">9i", 1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)  # 16.16 and 2.30 fixed point
    at = data.index(identity, data.index(b"tkhd"))
    data[at:at + 36] = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("matrix, turn", [
    ((0, 1, -1, 0), lambda f: np.rot90(f, -1, axes=(1, 2))),   # a quarter clockwise: a phone held upright
    ((0, -1, 1, 0), lambda f: np.rot90(f, 1, axes=(1, 2))),    # a quarter counterclockwise
    ((-1, 0, 0, -1), lambda f: f[:, ::-1, ::-1]),               # upside down
    ((-1, 0, 0, 1), lambda f: f[:, :, ::-1]),                   # mirrored (a front camera)
])
def test_frames_come_back_upright(tmp_path, matrix, turn):
    frames = moving_clip(20, 32, 64)  # landscape as stored
    frames[:, :8, :8] = (255, 0, 0)  # a red corner at the stored top left
    path = with_track_matrix(write_clip(tmp_path / "phone.mp4", frames, options={"g": "5"}), *matrix)
    upright, info = video_files.read_video(path, 8)
    assert info["decoding"] == "seeking"
    assert np.array_equal(upright, turn(front_to_back(path, info["indices"])))
    if matrix == (0, 1, -1, 0):  # the phone: a portrait picture, the red corner now at the top right
        assert upright.shape == (8, 64, 32, 3)
        assert upright[0, 2, -3, 0] > 200 and upright[0, 2, 2, 0] < 150
        assert video_files.letterbox_box(*upright.shape[1:3]) == (0, 112, 448, 224)  # letterboxed as portrait


def test_reading_leaves_nothing_a_forked_worker_can_hang_on(tmp_path):
    """A DataLoader worker forked after its parent read videos inherits the parent's uncollected
    garbage (frames PyAV leaves in reference cycles: a turned clip's) and may free it. Freeing a thread
    pool there waits forever for threads the fork did not copy. So: read a turned clip with decoding
    threads, fork, and collect the garbage in the child, which must end."""
    path = with_track_matrix(write_clip(tmp_path / "phone.mp4", moving_clip(20, 32, 64)), 0, 1, -1, 0)
    gc.collect()
    gc.disable()  # keep the read's garbage for the child
    try:
        video_files.read_video(path, 8, threads=2)
        child = multiprocessing.get_context("fork").Process(target=gc.collect)
        child.start()
        child.join(timeout=60)
        hung = child.is_alive()
        if hung:
            child.kill()
    finally:
        gc.enable()
    assert not hung and child.exitcode == 0


# --- faults: every failure is a VideoError naming the file ------------------------------------

def audio_only_file(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def faststart_mp4(path):
    """An mp4 of 20 frames with its index (moov) before the data, so a cut file still has a header."""
    frames = np.random.default_rng(0).integers(0, 256, (20, 48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


def picture_size_change(path):
    """Two H.264 streams of different sizes, one after the other in one MPEG-TS file (each starts with
    its own parameter sets, so the decoder switches sizes midway, as in a concatenated broadcast)."""
    first, second = BytesIO(), BytesIO()
    write_clip(first, grey_clip(10, 48, 64), container_format="mpegts")
    write_clip(second, grey_clip(10, 64, 48), container_format="mpegts")
    path.write_bytes(first.getvalue() + second.getvalue())
    return path


def bad_files(tmp_path):
    """name -> (path, words the error must contain)."""
    files = {}
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    files["corrupt"] = (corrupt, "cannot be read")
    whole = write_clip(tmp_path / "w.mp4", grey_clip(30, 64, 64)).read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole[:int(0.7 * len(whole))])  # the index (moov) is at the end: gone
    files["truncated"] = (truncated, "cannot be read")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    files["empty"] = (empty, "empty")
    files["missing"] = (tmp_path / "missing.mp4", "no such file")
    files["audio only"] = (audio_only_file(tmp_path / "audio.mp4"), "expected a video stream, found audio")
    fast = faststart_mp4(tmp_path / "fast.mp4")
    no_codec = tmp_path / "no_codec.mp4"
    no_codec.write_bytes(fast[:fast.find(b"stsd") - 8])  # cut inside the index, before the codec description
    files["cut before the codec description"] = (no_codec, "no codec description")
    no_data = tmp_path / "no_data.mp4"
    no_data.write_bytes(fast[:fast.find(b"mdat") + 4])  # the header says 20 frames, no packet follows
    files["no packets"] = (no_data, "20 frames by the container, 0 in the file")
    data_start = fast.find(b"mdat") + 4
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(fast[:data_start] + bytes(len(fast) - data_start))  # 20 packets of zeros
    files["undecodable packets"] = (garbage, "20 frames by the container, 0 decoded")
    files["picture size changes"] = (picture_size_change(tmp_path / "sizes.ts"), "picture size changes within the video (64x48, 48x64)")
    return files


def test_bad_files_raise_video_error_naming_the_file(tmp_path):
    for name, (path, reason) in bad_files(tmp_path).items():
        with pytest.raises(VideoError) as caught:
            video_files.read_video(path, 8)
        assert str(path) in str(caught.value) and reason in str(caught.value), name


def test_metadata_that_is_not_utf8_does_not_matter(tmp_path):
    path = write_clip(tmp_path / "title.mp4", grey_clip(5, 32, 32))
    with av.open(str(path)) as container:
        assert "title" not in container.metadata
    data = path.read_bytes()
    with av.open(str(tmp_path / "titled.mp4"), "w") as container:  # the same clip, with a title
        container.metadata["title"] = "TITLE-XY"
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in grey_clip(5, 32, 32):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    titled = tmp_path / "titled.mp4"
    data = titled.read_bytes()
    assert data.count(b"TITLE-XY") == 1
    titled.write_bytes(data.replace(b"TITLE-XY", b"TITLE\xe9\xff\xfe"))  # Latin-1 and stray bytes
    with pytest.raises(UnicodeDecodeError):
        av.open(str(titled)).close()  # what PyAV does by default
    frames, _ = video_files.read_video(titled, 8)
    assert which_grey_frame(frames) == [0, 0, 1, 2, 2, 3, 4, 4]


# --- the rule for files of which only part can be used --------------------------------------

def cut_mp4(tmp_path, fraction):
    fast = faststart_mp4(tmp_path / "fast.mp4")
    cut = tmp_path / f"cut{fraction}.mp4"
    cut.write_bytes(fast[:int(len(fast) * fraction)])
    return cut


def test_file_missing_a_few_frames_is_sampled_from_those_there_are(tmp_path):
    """The index (moov) comes first, so the header still says 20 frames; 19 are in the file. At least
    half are: we sample 8 from those 19, with a warning, rather than fail or return fewer than 8."""
    cut = cut_mp4(tmp_path, 0.95)
    with pytest.warns(UserWarning, match=f"{re.escape(str(cut))}: 20 frames by the container, 19 in the file; sampling"):
        frames, info = video_files.read_video(cut, 8)
    assert len(frames) == 8 and info["n_header"] == 20 and info["n_total"] == 19
    assert info["indices"] == video_files.sample_frame_indices(19, 10, 8)
    assert np.array_equal(frames, front_to_back(cut, info["indices"]))


def test_file_whose_last_packets_do_not_decode_is_sampled_from_those_that_do(tmp_path):
    """15 packets are in the file, but the last is cut short and the frames that refer to it never come
    out: 12 decode, still more than half of 20, so the 8 are sampled from those 12."""
    cut = cut_mp4(tmp_path, 0.75)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames, info = video_files.read_video(cut, 8)
    # how decoding ends (an error, or a clean end) depends on FFmpeg's thread count; the count does not
    assert len(caught) == 1 and re.fullmatch(f"{re.escape(str(cut))}: 20 frames by the container, 12 decoded( \\(.*\\))?; "
                                             f"sampling from those", str(caught[0].message))
    assert (info["n_total"], info["count_source"]) == (12, "decoded")
    assert info["indices"] == video_files.sample_frame_indices(12, 10, 8)
    assert np.array_equal(frames, front_to_back(cut, info["indices"]))


@pytest.mark.parametrize("fraction, account", [(0.5, "20 frames by the container, 7 decoded( \\(.*\\))?"),
                                               (0.3, "20 frames by the container, 6 in the file")])
def test_file_with_fewer_than_half_its_frames_is_refused(tmp_path, fraction, account):
    cut = cut_mp4(tmp_path, fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not warned about
        with pytest.raises(VideoError, match=f"{re.escape(str(cut))}: {account}: fewer than half"):
            video_files.read_video(cut, 8)


def test_multi_frame_file_of_which_one_frame_decodes_is_refused(tmp_path):
    """One usable frame of two is half, but 8 copies of one picture are not a video."""
    fast = faststart_mp4(tmp_path / "fast.mp4")
    with av.open(str(tmp_path / "fast.mp4")) as container:
        second = [packet for packet in container.demux(video=0) if packet.size][1]
    two = tmp_path / "two.mp4"
    two.write_bytes(fast[:second.pos + second.size])  # the first two packets of 20
    with pytest.raises(VideoError, match="20 frames by the container, 2 in the file: fewer than half"):
        video_files.read_video(two, 8)
    info = {"path": "x.mp4", "n_expected": 2}
    with pytest.raises(VideoError, match="x.mp4: 2 frames by the container, 1 decoded: fewer than half"):
        video_files.require_enough_frames(info, 1, "decoded")


# --- geometry -------------------------------------------------------------------------------

def release_box(height, width):
    """The release's compute_basehw_video written out: the teacher's 224 px layout (patch 14), doubled
    for the student."""
    if width > height:
        n = math.ceil(224 * height / width / 14)
        teacher = ((16 - n) // 2 * 14, 0, 14 * n, 224)
    else:
        n = math.ceil(224 * width / height / 14)
        teacher = (0, (16 - n) // 2 * 14, 224, 14 * n)
    return tuple(2 * value for value in teacher)


def test_letterbox_box_is_the_release_rule():
    for height in range(1, 400, 7):
        for width in (1, 3, 61, 97, 100, 224, 360, 448, 640, 720, 1280, 1920):
            assert video_files.letterbox_box(height, width) == release_box(height, width)
            teacher = tuple(value // 2 for value in release_box(height, width))
            assert video_files.letterbox_box(height, width, canvas=224, patch=14, window=1) == teacher


@pytest.mark.parametrize("height, width, tokens", [
    (64, 64, 273),                 # square: 16x16 windows
    (72, 128, 154),                # 16:9: 9x16
    (96, 128, 205),                # 4:3: 12x16
    (112, 64, 1 + 16 * (10 + 1)),  # portrait: n = ceil(16 * 64 / 112) = 10 windows wide
    (61, 97, 1 + 11 * 17),         # odd: ceil(16 * 61 / 97) = 11 windows tall
])
def test_letterbox_mask_and_tokens(height, width, tokens):
    frames = np.full((2, height, width, 3), 200, dtype=np.uint8)
    clip = video_files.letterbox(frames)
    assert clip.shape == (2, 4, 448, 448) and clip.dtype == torch.float32
    mask = clip[:, 3]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and (mask[0] == mask[1]).all()
    rows, cols = torch.nonzero(mask[0], as_tuple=True)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    assert mask[0, top:bottom, left:right].all()  # one solid box
    for start, end in ((top, bottom), (left, right)):  # whole 28 px windows, centred, odd one after
        assert start % 28 == 0 and end % 28 == 0
        assert start // 28 == (16 - (end - start) // 28) // 2
    assert visual_token_count(mask[0]) == visual_token_count((bottom - top, right - left)) == tokens
    fill = (torch.tensor(video_files.LETTERBOX_FILL) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    outside = clip[0, :3][:, mask[0] == 0]  # (3, n) padding pixels
    if outside.numel():
        assert torch.allclose(outside, fill[:, None].expand_as(outside)) and fill.abs().max() < 0.02
    inside = (torch.tensor([200.0] * 3) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(clip[0, :3, top + 10, left + 10], inside, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 72, 128, 3), (2, 112, 64, 3), (2, 61, 97, 3), (1, 64, 64, 3)])
@pytest.mark.parametrize("canvas, window", [(448, 2), (224, 1), (112, 2)])
def test_letterbox_is_the_release_arithmetic_bit_for_bit(shape, canvas, window):
    """The release pastes the resized frames on a filled uint8 canvas, normalises the whole canvas
    (/ 255, - mean, / std in float32) and appends the mask: letterbox gives exactly those values."""
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    top, left, height, width = video_files.letterbox_box(*shape[1:3], canvas, 14, window)
    pasted = np.empty((shape[0], canvas, canvas, 3), dtype=np.uint8)
    pasted[:] = video_files.LETTERBOX_FILL
    for t in range(shape[0]):
        pasted[t, top:top + height, left:left + width] = np.asarray(
            Image.fromarray(frames[t]).resize((width, height), Image.Resampling.BICUBIC))
    mask = torch.zeros(shape[0], 1, canvas, canvas)
    mask[:, :, top:top + height, left:left + width] = 1.0
    expected = torch.cat([normalize_frames(pasted), mask], dim=1)
    assert torch.equal(video_files.letterbox(frames, canvas, 14, window), expected)


def test_letterbox_smaller_canvas():
    clip = video_files.letterbox(np.zeros((3, 90, 160, 3), dtype=np.uint8), canvas=112)
    assert clip.shape == (3, 4, 112, 112)
    # ceil(112 * 90 / 160 / 28) = ceil(2.25) = 3 of 4 windows tall; the odd padding window goes below
    assert video_files.letterbox_box(90, 160, canvas=112) == (0, 0, 84, 112)
    with pytest.raises(ValueError, match="28"):
        video_files.letterbox_box(90, 160, canvas=100)


def test_resize_center_crop():
    frames = np.zeros((2, 60, 100, 3), dtype=np.uint8)
    frames[:, :, 40:60] = 255  # a white band in the middle
    clip = video_files.resize_center_crop(frames, 48)
    assert clip.shape == (2, 3, 48, 48)  # 60x100 -> 48x80, crop columns 16..64
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(clip[0, :, 24, 24], white, atol=1e-5)
    assert torch.allclose(clip[0, :, 24, 2], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD), atol=1e-5)


def test_hflip_moves_frames_and_mask_together():
    frames = np.zeros((2, 112, 64, 3), dtype=np.uint8)
    frames[:, :, :8] = 255  # white left edge
    clip = video_files.letterbox(frames)
    flipped = hflip(clip)
    assert torch.equal(hflip(flipped), clip)
    cols = torch.nonzero(flipped[0, 3].any(0)).flatten()
    assert int(cols.min()) % 28 == 0 and (int(cols.max()) + 1) % 28 == 0  # still whole windows
    white_cols = torch.nonzero(flipped[0, 0, 50] > 1).flatten()
    assert int(white_cols.min()) > int(cols.min()) + 200  # the white edge moved to the right of the box


# --- tokenisation and datasets --------------------------------------------------------------

WORDS = ["USER", "ASSISTANT", ":", "what", "is", "the", "cat", "doing", "?", "it", "sleeps", "on", "a", "mat",
         "and", "then", "jumps", "color", "red", "why", "because", "tired", "how", "many", "two", "dogs"]


@pytest.fixture(scope="module")
def tokenizer():
    """Word level, like Llama's tokenizer.json in one respect: its post-processor adds <s> itself."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return tok


def answer_targets(tokenizer, answers):
    return [i for answer in answers for i in tokenizer.encode(answer, add_special_tokens=False).ids + [3]]


def test_vicuna_prompt_text():
    turns = [("what is the cat doing ?", "it sleeps"), ("why ?", "because")]
    assert render_conversation(video_files.VICUNA_V1, turns) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <video>\nwhat is the cat doing ? "
        "ASSISTANT: it sleeps</s>USER: why ? ASSISTANT: because</s>")
    assert render_conversation(video_files.VIDEOPANDA_V1, [("how many dogs ?", None)]).endswith(
        "answers to the human's questions. USER: <video>\nhow many dogs ? ASSISTANT:")


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


@pytest.fixture
def instruction_files(tmp_path):
    write_clip(tmp_path / "a.mp4", grey_clip(12, 48, 80))
    write_clip(tmp_path / "b.gif", np.broadcast_to(COLORS[:, None, None, :], (3, 40, 40, 3)).copy())
    entries = [
        {"id": "one", "video": "a.mp4", "conversations": [
            {"from": "human", "value": "what is the cat doing ?\n<video>"},  # tag at the end: moved to the front
            {"from": "gpt", "value": "it sleeps on a mat"},
            {"from": "human", "value": "why ?"},
            {"from": "gpt", "value": "because it is tired"},
            {"from": "human", "value": "and then ?"},
            {"from": "gpt", "value": "it jumps"}]},
        {"id": "two", "video": "b", "conversations": [  # no extension: resolved to b.gif
            {"from": "human", "value": "<video>\nwhat color is the cat ?"},
            {"from": "gpt", "value": "red"}]},
    ]
    return write_json(tmp_path / "train.json", entries), tmp_path, entries


def test_instruction_dataset_round_trip(tokenizer, instruction_files):
    path, folder, entries = instruction_files
    dataset = video_files.VideoInstructionDataset(path, folder, tokenizer, geometry(112))
    assert len(dataset) == 2
    for item, entry in zip(dataset, entries):
        ids, labels = item["input_ids"], item["labels"]
        assert item["id"] == entry["id"] and item["video"].shape == (8, 4, 112, 112)
        assert len(ids) == len(labels) and ids.count(VIDEO_PLACEHOLDER) == 1
        assert ids[0] == 2 and ids.count(2) == 1  # one BOS, though the post-processor would add one too
        answers = [turn["value"] for turn in entry["conversations"][1::2]]
        assert [label for label in labels if label != IGNORE_INDEX] == answer_targets(tokenizer, answers)
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))
        assert labels[ids.index(VIDEO_PLACEHOLDER)] == IGNORE_INDEX
    # the video sits at the front of the first question, after "USER:"
    ids = dataset[0]["input_ids"]
    at = ids.index(VIDEO_PLACEHOLDER)
    assert ids[at - 2:at] == [tokenizer.token_to_id("USER"), tokenizer.token_to_id(":")]
    assert ids[at + 1:at + 3] == [tokenizer.token_to_id("what"), tokenizer.token_to_id("is")]
    batch = video_files.collate_video_batch([dataset[0], dataset[1]], pad_id=1)
    assert batch["videos"].shape == (2, 8, 4, 112, 112) and batch["id"] == ["one", "two"]
    assert batch["lengths"].tolist() == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    short = int(batch["lengths"][1])
    assert (batch["input_ids"][1, short:] == 1).all() and (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert batch["skipped"] == []


def test_instruction_entry_missing_a_field(tokenizer, instruction_files):
    path, folder, entries = instruction_files
    no_video = [entries[0], {k: v for k, v in entries[1].items() if k != "video"}]
    with pytest.raises(AnnotationError, match=r"entry 1 \(id 'two'\): missing field 'video'"):
        video_files.VideoInstructionDataset(write_json(folder / "bad.json", no_video), folder, tokenizer, geometry(56))
    no_value = json.loads(json.dumps(entries))
    del no_value[0]["conversations"][3]["value"]
    with pytest.raises(AnnotationError, match=r"entry 0 \(id 'one'\), turn 3: missing field 'value'"):
        video_files.VideoInstructionDataset(write_json(folder / "bad2.json", no_value), folder, tokenizer, geometry(56))
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        lenient = video_files.VideoInstructionDataset(folder / "bad.json", folder, tokenizer, geometry(56), on_error="skip")
    assert len(lenient) == 1 and "'video'" in lenient.invalid_entries[0]


def test_skip_policy_reports_the_skipped_ids(tokenizer, instruction_files):
    path, folder, entries = instruction_files
    entries = entries + [{**entries[1], "id": "three", "video": "nowhere.mp4"}]
    path = write_json(folder / "with_missing.json", entries)
    dataset = video_files.VideoInstructionDataset(path, folder, tokenizer, geometry(56))
    batch = video_files.collate_video_batch([dataset[i] for i in range(3)])
    assert batch["id"] == ["one", "two"] and batch["videos"].shape[0] == 2
    assert [sample_id for sample_id, _ in batch["skipped"]] == ["three"]
    assert "resolves to no file" in batch["skipped"][0][1]
    nothing = video_files.collate_video_batch([dataset[2]])
    assert nothing["videos"] is None and len(nothing["skipped"]) == 1
    with pytest.raises(VideoError, match=f"'three'.*'nowhere.mp4'.*{folder}.*--on_error=skip would skip it"):
        video_files.apply_error_policy(batch, "raise", [])
    skipped = []
    video_files.apply_error_policy(batch, "skip", skipped)
    assert len(skipped) == 1 and skipped[0].startswith("sample 'three': video 'nowhere.mp4'")


def test_train_flip_only_when_asked(tokenizer, instruction_files):
    path, folder, _ = instruction_files
    still = video_files.VideoInstructionDataset(path, folder, tokenizer, geometry(56))
    flipped = video_files.VideoInstructionDataset(path, folder, tokenizer, geometry(56), train=True, flip_prob=1.0)
    assert torch.equal(still[0]["video"], still[0]["video"])  # evaluation is deterministic
    for k in range(2):  # a landscape mp4 and a square gif
        assert torch.equal(flipped[k]["video"], hflip(still[k]["video"]))
    cropped = video_files.VideoInstructionDataset(path, folder, tokenizer, geometry(56, letterbox=False))
    flipped = video_files.VideoInstructionDataset(path, folder, tokenizer, geometry(56, letterbox=False), train=True,
                                            flip_prob=1.0)
    assert torch.equal(flipped[0]["video"], hflip(cropped[0]["video"]))


@pytest.fixture
def qa_files(tmp_path):
    write_clip(tmp_path / "v_act1.mp4", grey_clip(9, 40, 64))    # ActivityNet style: "v_" + name
    write_clip(tmp_path / "msvd2.mp4", grey_clip(3, 64, 40))
    questions = [{"video_name": "act1", "question": "what is the cat doing ?", "question_id": "q0"},
                 {"video_name": "msvd2", "question": "how many dogs ?", "question_id": 1},
                 {"video_name": "act1", "question": "what color is the cat ?", "question_id": "q2"}]
    answers = [{"answer": "sleeps", "question_id": "q0", "type": 0}, {"answer": "two", "question_id": 1},
               {"answer": "red", "question_id": "q2"}]
    return write_json(tmp_path / "test_q.json", questions), write_json(tmp_path / "test_a.json", answers), tmp_path


def test_qa_dataset_round_trip(tokenizer, qa_files):
    questions, answers, folder = qa_files
    prompts = video_files.VideoQADataset(questions, answers, folder, tokenizer, geometry(56, letterbox=False))
    scored = video_files.VideoQADataset(questions, answers, folder, tokenizer, geometry(56), include_answer=True)
    assert len(prompts) == 3
    for k, (question, answer) in enumerate([("what is the cat doing ?", "sleeps"), ("how many dogs ?", "two"),
                                            ("what color is the cat ?", "red")]):
        prompt, full = prompts[k], scored[k]
        assert prompt["video"].shape == (8, 3, 56, 56) and full["video"].shape == (8, 4, 56, 56)
        assert (prompt["question"], prompt["answer"], prompt["id"]) == (question, answer, ["q0", "1", "q2"][k])
        assert prompt["input_ids"].count(VIDEO_PLACEHOLDER) == 1 and set(prompt["labels"]) == {IGNORE_INDEX}
        assert prompt["input_ids"][-2:] == [tokenizer.token_to_id("ASSISTANT"), tokenizer.token_to_id(":")]
        assert prompt["prompt_len"] == len(prompt["input_ids"]) == full["prompt_len"]
        assert full["input_ids"][:full["prompt_len"]] == prompt["input_ids"]
        assert [label for label in full["labels"] if label != IGNORE_INDEX] == answer_targets(tokenizer, [answer])


def test_qa_missing_video_and_missing_field(tokenizer, qa_files):
    questions, answers, folder = qa_files
    entries = json.loads(questions.read_text()) + [{"video_name": "gone", "question": "why ?", "question_id": "q9"}]
    answer_entries = json.loads(answers.read_text()) + [{"answer": "because", "question_id": "q9"}]
    dataset = video_files.VideoQADataset(write_json(folder / "q.json", entries), write_json(folder / "a.json", answer_entries),
                                  folder, tokenizer, geometry(56))
    assert dataset[3]["id"] == "q9" and re.search(f"'q9'.*'gone'.*{folder}", dataset[3]["skipped"])
    del answer_entries[1]["answer"]
    with pytest.raises(AnnotationError, match=r"a2.json: entry 1 \(id 1\): missing field 'answer'"):
        video_files.VideoQADataset(questions, write_json(folder / "a2.json", answer_entries), folder, tokenizer, geometry(56))


def test_dataloader_workers(tokenizer, qa_files):
    questions, answers, folder = qa_files
    dataset = video_files.VideoQADataset(questions, answers, folder, tokenizer, geometry(56), include_answer=True)
    pickle.loads(pickle.dumps(dataset))  # what a spawned worker gets
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=functools.partial(video_files.collate_video_batch, pad_id=1))
    batches = list(loader)
    assert [batch["id"] for batch in batches] == [["q0", "1"], ["q2"]]
    expected = video_files.collate_video_batch([dataset[0], dataset[1]], pad_id=1)
    for key in ("videos", "input_ids", "labels", "lengths"):
        assert torch.equal(batches[0][key], expected[key]), key
    assert batches[0]["videos"].shape == (2, 8, 4, 56, 56) and batches[1]["answer"] == ["red"]


# --- the distillation teacher's copy of the frames --------------------------------------------

def one_clip_dataset(tokenizer, folder, frames, size=448, teacher_size=224, **options):
    write_clip(folder / "clip.mp4", frames)
    entries = [{"id": "clip", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat is the cat doing ?"}, {"from": "gpt", "value": "it sleeps"}]}]
    return video_files.VideoInstructionDataset(write_json(folder / "one.json", entries), folder, tokenizer, geometry(size),
                                         teacher_size=teacher_size, **options)


@pytest.mark.parametrize("height, width", [(72, 128), (112, 64), (64, 64)])  # landscape, portrait, square
def test_teacher_video_is_the_student_layout_at_half_size(tokenizer, tmp_path, height, width):
    item = one_clip_dataset(tokenizer, tmp_path, moving_clip(12, height, width))[0]
    student, teacher = item["video"], item["teacher_video"]
    assert student.shape == (8, 4, 448, 448) and teacher.shape == (8, 4, 224, 224)
    for t in range(8):
        assert tuple(2 * value for value in valid_box(teacher[t, 3])) == valid_box(student[t, 3])
    frames, _ = video_files.read_video(tmp_path / "clip.mp4", 8)
    assert torch.equal(teacher, video_files.letterbox(frames, 224, 14, 1))  # the same decoded frames
    batch = video_files.collate_video_batch([item, item])
    assert batch["teacher_videos"].shape == (2, 8, 4, 224, 224) and "teacher_video" not in batch
    assert torch.equal(batch["teacher_videos"][1], teacher)


def test_teacher_video_flips_with_the_student_video(tokenizer, tmp_path):
    """The release flips the two independently; here one draw flips both or neither."""
    still = one_clip_dataset(tokenizer, tmp_path, moving_clip(12, 112, 64), 112, 56)[0]
    training = one_clip_dataset(tokenizer, tmp_path, moving_clip(12, 112, 64), 112, 56, train=True, flip_prob=0.5)
    torch.manual_seed(0)
    outcomes = []
    for _ in range(8):
        item = training[0]
        student_flipped = torch.equal(item["video"], hflip(still["video"]))
        teacher_flipped = torch.equal(item["teacher_video"], hflip(still["teacher_video"]))
        assert student_flipped == teacher_flipped
        assert student_flipped or torch.equal(item["video"], still["video"])
        outcomes.append(student_flipped)
    assert set(outcomes) == {True, False}


def test_teacher_size_must_fit_the_patch(tokenizer, tmp_path):
    one_clip_dataset(tokenizer, tmp_path, moving_clip(2, 32, 32))  # writes clip.mp4 and one.json
    with pytest.raises(ValueError, match=r"teacher_size must be 0 \(no teacher\) or a multiple of 14, got 200"):
        video_files.VideoInstructionDataset(tmp_path / "one.json", tmp_path, tokenizer, geometry(448), teacher_size=200)


# --- training batches through worker processes ----------------------------------------------

def test_batches_with_workers_cross_epochs_in_the_plan_order(tokenizer, tmp_path):
    """One DataLoader for the whole run: batches keep the order and places of the plan across epochs,
    with worker processes as without, and a bad sample is a counted skip."""
    clips = [write_clip(tmp_path / f"c{k}.mp4", grey_clip(4 + k, 32, 48)) for k in range(4)]
    entries = [{"id": f"s{k}", "video": clip.name if k < 4 else "gone.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhy ?"}, {"from": "gpt", "value": "because"}]}
        for k, clip in enumerate(clips + clips[:1])]
    dataset = video_files.VideoInstructionDataset(write_json(tmp_path / "five.json", entries), tmp_path, tokenizer,
                                            geometry(56), train=True, on_error="skip", decode_threads=1)
    runs = {}
    for workers in (0, 2):
        skipped = []
        plan = video_files.BatchPlan(batch_size=2, seed=7, num_workers=workers)
        stream = video_files.batches(dataset, plan, (0, 1), "skip", skipped)
        runs[workers] = [(batch["id"], place) for batch, place in islice(stream, 7)], skipped
    assert runs[0] == runs[2]
    taken, skipped = runs[2]
    assert [place for _, place in taken][:4] == [(0, 3), (0, 5), (1, 2), (1, 4)]  # epoch 0 resumed at 1
    ids = [i for batch, _ in taken for i in batch]
    assert "s4" not in ids and len(skipped) >= 2 and all("'s4'" in message for message in skipped)
    order = np.random.default_rng([7, 0]).permutation(5).tolist()
    assert [i for batch, _ in taken[:2] for i in batch] == [f"s{k}" for k in order[1:] if k != 4]


def test_batches_stop_when_no_sample_of_an_epoch_loads(tokenizer, tmp_path):
    entries = [{"id": f"s{k}", "video": "gone.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhy ?"}, {"from": "gpt", "value": "because"}]} for k in range(3)]
    dataset = video_files.VideoInstructionDataset(write_json(tmp_path / "none.json", entries), tmp_path, tokenizer,
                                            geometry(56), on_error="skip")
    with pytest.raises(VideoError, match="not one of its 3 samples loads; the last reason: sample 's.'"):
        next(video_files.batches(dataset, video_files.BatchPlan(2, 0, num_workers=0), (0, 0), "skip", []))


# --- real_video/loader_bench.py ------------------------------------------------------------------

def test_loader_bench_answers_help_and_measures_a_folder(tmp_path, capsys):
    from real_video import loader_bench
    with pytest.raises(SystemExit) as done:
        loader_bench.main(["--help"])
    assert done.value.code == 0 and "--workers=" in capsys.readouterr().out
    write_clip(tmp_path / "a.mp4", moving_clip(60), options={"g": "10", "bf": "2"})
    write_clip(tmp_path / "b.gif", grey_clip(5, 24, 32))
    loader_bench.main([f"--folder={tmp_path}", "--workers=0", "--videos=4", "--batch_size=2", "--repeats=1",
                       "--against_front_to_back=true", "--image_size=112", "--teacher_size=56"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("a.mp4") and "seeking" in lines[1] and lines[1].endswith("yes")
    assert lines[2].startswith("b.gif") and "front to back" in lines[2] and lines[2].endswith("yes")
    assert re.match(r"0 worker\(s\), batches of 2, 8 frames of 112 px \+ teacher 56 px: 4 videos in", lines[3])
    with pytest.raises(ValueError, match="expected a folder with video files"):
        loader_bench.main([f"--folder={tmp_path / 'nowhere'}"])


# --- the frame cache --------------------------------------------------------------------------

def test_frame_cache_gives_the_items_of_a_decode_without_decoding(tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain = one_clip_dataset(tokenizer, tmp_path, moving_clip(30, 72, 128), 112, 56)[0]
    first = one_clip_dataset(tokenizer, tmp_path, moving_clip(30, 72, 128), 112, 56, frame_cache=str(cache))
    written = first[0]
    entries = list(cache.glob("*/*.npz"))
    assert len(entries) == 1
    monkeypatch.setattr(video_files, "read_video", lambda *args: pytest.fail("decoded although the cache holds the frames"))
    again = video_files.VideoInstructionDataset(tmp_path / "one.json", tmp_path, tokenizer, geometry(112), teacher_size=56,
                                          frame_cache=str(cache))[0]
    for item in (written, again):
        assert torch.equal(item["video"], plain["video"]) and torch.equal(item["teacher_video"], plain["teacher_video"])
    # other settings are another entry: the centre crop at 56 px, without a teacher, decodes
    monkeypatch.undo()
    cropped = video_files.VideoInstructionDataset(tmp_path / "one.json", tmp_path, tokenizer, geometry(56, letterbox=False),
                                            frame_cache=str(cache))[0]
    assert cropped["video"].shape == (8, 3, 56, 56) and len(list(cache.glob("*/*.npz"))) == 2


def test_frame_cache_misses_when_the_video_changes_and_rewrites_a_damaged_entry(tokenizer, tmp_path):
    cache = tmp_path / "cache"
    dataset = one_clip_dataset(tokenizer, tmp_path, grey_clip(8, 32, 32), 56, 0, frame_cache=str(cache))
    dark = dataset[0]["video"]
    write_clip(tmp_path / "clip.mp4", 255 - grey_clip(9, 32, 32))  # the same name, other frames
    bright = dataset[0]["video"]
    assert bright[:, :3].mean() > dark[:, :3].mean() + 1 and len(list(cache.glob("*/*.npz"))) == 2
    entry, _ = dataset.cache.entry(tmp_path / "clip.mp4")
    entry.write_bytes(b"not an npz file")
    with pytest.warns(UserWarning, match="unreadable frame cache entry .* written again"):
        assert torch.equal(dataset[0]["video"], bright)
    assert torch.equal(dataset[0]["video"], bright)  # the rewritten entry reads
