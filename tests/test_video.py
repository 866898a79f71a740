"""Real video files, frame sampling, letterbox geometry and the QA / instruction datasets (video.py).

The four real clips live in ../shared/data/videos (facts in its SOURCES.md); every other file is
written by the tests into tmp_path with imageio's pyav plugin.
"""

import functools
import json
import math
import pickle
import re
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import video
from data import CLIP_MEAN, CLIP_STD, conversation_pieces
from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER, PandaConfig
from video import AnnotationError, VideoError

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"

# file: (frames, header frames, fps used, sampled indices worked out by hand from spec B.1)
REAL_CLIPS = {
    # 25 fps -> candidates 0, 25, ..., 125 (6 < 8): stride (132 - 1) // 7 = 18 from frame 0
    "bigbuckbunny.mp4": (132, 132, 25.0, [0, 18, 36, 54, 72, 90, 108, 126]),
    # 20 fps -> 14 candidates 0, 20, ..., 260; linspace(0, 13, 8) floored = 0 1 3 5 7 9 11 13
    "cockatoo.mp4": (280, 280, 20.0, [0, 20, 60, 100, 140, 180, 220, 260]),
    # a GIF's rate is frames / duration = 36 / 0.82 s = 43.9 -> stride 44 -> 1 candidate: stride 35 // 7 = 5
    "newtonscradle.gif": (36, 36, 36 / 0.82, [0, 5, 10, 15, 20, 25, 30, 35]),
    # header says 0 frames: 720 counted packets; 24 fps -> 30 candidates; linspace(0, 29, 8) = 0 4 8 12 16 20 24 29
    "big_buck_bunny_0_30.webm": (720, 0, 24.0, [0, 96, 192, 288, 384, 480, 576, 696]),
}


def real_clip(name):
    path = VIDEOS / name
    if not path.is_file():
        pytest.skip(f"real test clips not found in {VIDEOS}")
    return path


@functools.lru_cache(maxsize=None)
def decoded_real_clip(name):
    """Each real clip is decoded once per test session (about 1.5 s for all four)."""
    return video.read_video(real_clip(name), 8)


# --- writing test clips ---------------------------------------------------------------------

def write_clip(path, frames, fps=10):
    """frames uint8 (T, H, W, 3) -> an mp4 (H.264) or gif file, through imageio's pyav plugin."""
    if path.suffix == ".gif":
        options = {"codec": "gif", "out_pixel_format": "rgb8"}
    else:  # yuv420p needs even sizes; 4:4:4 takes odd ones like 97x61
        odd = frames.shape[1] % 2 or frames.shape[2] % 2
        options = {"codec": "libx264", "out_pixel_format": "yuv444p" if odd else "yuv420p"}
    iio.imwrite(path, frames, plugin="pyav", fps=fps, **options)
    return path


def grey_clip(n_frames, height, width):
    """Frame i is uniformly grey at 20 + 20 i, so a decoded frame tells which one it was."""
    levels = 20 + 20 * np.arange(n_frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n_frames, height, width, 3)).copy()


def which_grey_frame(frames):
    return [round((float(frame.mean()) - 20) / 20) for frame in frames]


COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)  # exact in GIF's rgb8 palette


# --- helpers: what a few checks need, written out -------------------------------------------

def hflip(clip):
    return clip.flip(-1)


def visual_token_count(mask_or_valid_hw, patch=14, window=2):
    """LLM tokens per frame, 1 + h * (w + 1): a fused frame token, then h rows of w LSD tokens each
    followed by a split token. The argument is a frame's mask (H, W) or (1, H, W), or the valid box's
    (height, width) in pixels; (h, w) is that box in windows of patch * window pixels."""
    if isinstance(mask_or_valid_hw, (torch.Tensor, np.ndarray)):
        rows, cols = torch.nonzero(torch.as_tensor(mask_or_valid_hw).squeeze(0) > 0, as_tuple=True)
        box_h, box_w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
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
    info = video.probe_video(real_clip(name))
    assert (info["n_total"], info["n_header"]) == (n_total, n_header)
    assert info["count_source"] == ("packets" if name.endswith(".webm") else "header")
    assert info["fps"] == pytest.approx(fps)


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clip_sampled_indices_and_shapes(name):
    n_total, _, fps, indices = REAL_CLIPS[name]
    assert video.sample_frame_indices(n_total, fps, 8) == indices
    frames, info = decoded_real_clip(name)
    assert info["indices"] == indices and info["n_total"] == n_total
    height, width = (150, 200) if name.endswith(".gif") else (720, 1280)
    assert frames.shape == (8, height, width, 3) and frames.dtype == np.uint8


def test_real_clip_pixels():
    frames, _ = decoded_real_clip("bigbuckbunny.mp4")
    assert np.allclose(frames[0].reshape(-1, 3).mean(0), (111, 124, 80), atol=1.5)  # SOURCES.md
    gif, _ = decoded_real_clip("newtonscradle.gif")  # decoded as bgra: we must hand back RGB
    assert gif.shape[-1] == 3 and 150 < gif.mean() < 230


def test_webm_black_first_frame_is_sampled_as_the_rule_says():
    """Spec B.1 starts every branch at frame 0, and decoding is by frame number: the webm's first
    pts (3 ms) and its keyframes do not move frame 0. So the pure-black opening frame IS sampled;
    the other seven are picture frames. (Frames 0-4 are black; the fade-in starts at frame 5.)"""
    frames, info = decoded_real_clip("big_buck_bunny_0_30.webm")
    assert info["indices"][0] == 0
    assert frames[0].max() == 0
    assert all(frame.mean() > 50 for frame in frames[1:])


def test_real_clip_letterbox_tokens():
    for name, tokens in (("cockatoo.mp4", 154), ("newtonscradle.gif", 205)):  # 16:9 and 4:3
        frames, _ = decoded_real_clip(name)
        clip = video.letterbox(frames)
        assert clip.shape == (8, 4, 448, 448) and clip.dtype == torch.float32
        assert visual_token_count(clip[0, 3]) == tokens


def test_header_that_overclaims_is_resampled(monkeypatch, tmp_path):
    path = write_clip(tmp_path / "ten.mp4", grey_clip(10, 32, 32))
    real_probe = video.probe_video
    monkeypatch.setattr(video, "probe_video", lambda p: {**real_probe(p), "n_total": 40})  # a lying header
    with pytest.warns(UserWarning, match="40 frames by the header count, but only 10 decode"):
        frames, info = video.read_video(path, 8)
    assert len(frames) == 8 and info["n_total"] == 10 and info["count_source"] == "decoded"
    assert which_grey_frame(frames) == info["indices"] == list(range(8))  # 10 frames at 10 fps: stride 1


# --- frame sampling -------------------------------------------------------------------------

def test_sampling_rule_branches():
    assert video.sample_frame_indices(300, 30, 8) == [0, 30, 60, 90, 150, 180, 210, 270]  # linspace(0, 9, 8) = 0 1 2 3 5 6 7 9
    assert video.sample_frame_indices(200, 25, 8) == list(range(0, 200, 25))  # exactly 8 candidates
    assert video.sample_frame_indices(10, 30, 8) == list(range(8))  # stride max(1, 9 // 7) = 1
    assert video.sample_frame_indices(57, 30, 8) == [0, 8, 16, 24, 32, 40, 48, 56]


def test_sampling_short_clips_repeat_frames_in_order():
    assert video.sample_frame_indices(3, 30, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert video.sample_frame_indices(1, 30, 8) == [0] * 8  # the release divides by zero here
    for n in range(1, 8):
        indices = video.sample_frame_indices(n, 10, 8)
        assert indices == sorted(indices) and set(indices) == set(range(n))


def test_sampling_guards_odd_frame_rates():
    # fps < 0.5 gave the release a range() step of 0; stride 1 makes every frame a candidate
    assert video.sample_frame_indices(15, 0.3, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert video.sample_frame_indices(15, 0.0, 8) == video.sample_frame_indices(15, float("nan"), 8)
    for n in (8, 9, 50, 333, 1000):
        for fps in (0.1, 1, 7.5, 24, 29.97, 60, 1000):
            indices = video.sample_frame_indices(n, fps, 8)
            assert len(indices) == 8 and indices == sorted(indices) and 0 <= indices[0] and indices[-1] < n


# --- written clips: counts, short clips, GIF colours ----------------------------------------

@pytest.mark.parametrize("n_frames, height, width", [(10, 112, 64), (12, 72, 128), (5, 61, 97), (1, 32, 32)])
def test_written_mp4_counts_and_shapes(tmp_path, n_frames, height, width):
    path = write_clip(tmp_path / "clip.mp4", grey_clip(n_frames, height, width))
    assert video.probe_video(path)["n_total"] == n_frames
    frames, info = video.read_video(path, 8)
    assert frames.shape == (8, height, width, 3)
    assert which_grey_frame(frames) == info["indices"] == video.sample_frame_indices(n_frames, 10, 8)


def test_three_frame_clips_repeat_frames(tmp_path):
    mp4 = write_clip(tmp_path / "three.mp4", grey_clip(3, 48, 64))
    frames, info = video.read_video(mp4, 8)
    assert info["indices"] == which_grey_frame(frames) == [0, 0, 0, 1, 1, 2, 2, 2]
    colors = np.broadcast_to(COLORS[:, None, None, :], (3, 61, 97, 3)).copy()  # red, green, blue frames
    gif = write_clip(tmp_path / "three.gif", colors)
    frames, info = video.read_video(gif, 8)
    assert frames.shape == (8, 61, 97, 3) and info["n_total"] == 3
    expected = COLORS[[0, 0, 0, 1, 1, 2, 2, 2]].astype(int)  # RGB order, not BGR (rgb8 stores 255 as 252)
    assert np.abs(frames[:, 30, 48].astype(int) - expected).max() <= 8


# --- geometry -------------------------------------------------------------------------------

def spec_b1_box(height, width):
    """Spec B.1 literally: the teacher's 224 px layout (patch 14), doubled for the student."""
    if width > height:
        n = math.ceil(224 * height / width / 14)
        teacher = ((16 - n) // 2 * 14, 0, 14 * n, 224)
    else:
        n = math.ceil(224 * width / height / 14)
        teacher = (0, (16 - n) // 2 * 14, 224, 14 * n)
    return tuple(2 * value for value in teacher)


def test_letterbox_box_is_the_spec_teacher_rule():
    for height in range(1, 400, 7):
        for width in (1, 3, 61, 97, 100, 224, 360, 448, 640, 720, 1280, 1920):
            assert video.letterbox_box(height, width) == spec_b1_box(height, width)
            teacher = tuple(value // 2 for value in spec_b1_box(height, width))
            assert video.letterbox_box(height, width, canvas=224, patch=14, window=1) == teacher


@pytest.mark.parametrize("height, width, tokens", [
    (64, 64, 273),                 # square: 16x16 windows
    (72, 128, 154),                # 16:9: 9x16
    (96, 128, 205),                # 4:3: 12x16
    (112, 64, 1 + 16 * (10 + 1)),  # portrait: n = ceil(16 * 64 / 112) = 10 windows wide
    (61, 97, 1 + 11 * 17),         # odd: ceil(16 * 61 / 97) = 11 windows tall
])
def test_letterbox_mask_and_tokens(height, width, tokens):
    frames = np.full((2, height, width, 3), 200, dtype=np.uint8)
    clip = video.letterbox(frames)
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
    fill = (torch.tensor(video.LETTERBOX_FILL) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    outside = clip[0, :3][:, mask[0] == 0]  # (3, n) padding pixels
    if outside.numel():
        assert torch.allclose(outside, fill[:, None].expand_as(outside)) and fill.abs().max() < 0.02
    inside = (torch.tensor([200.0] * 3) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(clip[0, :3, top + 10, left + 10], inside, atol=1e-5)


def test_letterbox_smaller_canvas():
    clip = video.letterbox(np.zeros((3, 90, 160, 3), dtype=np.uint8), canvas=112)
    assert clip.shape == (3, 4, 112, 112)
    # ceil(112 * 90 / 160 / 28) = ceil(2.25) = 3 of 4 windows tall; the odd padding window goes below
    assert video.letterbox_box(90, 160, canvas=112) == (0, 0, 84, 112)
    with pytest.raises(ValueError, match="28"):
        video.letterbox_box(90, 160, canvas=100)


def test_resize_center_crop():
    frames = np.zeros((2, 60, 100, 3), dtype=np.uint8)
    frames[:, :, 40:60] = 255  # a white band in the middle
    clip = video.resize_center_crop(frames, 48)
    assert clip.shape == (2, 3, 48, 48)  # 60x100 -> 48x80, crop columns 16..64
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(clip[0, :, 24, 24], white, atol=1e-5)
    assert torch.allclose(clip[0, :, 24, 2], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD), atol=1e-5)


def test_hflip_moves_frames_and_mask_together():
    frames = np.zeros((2, 112, 64, 3), dtype=np.uint8)
    frames[:, :, :8] = 255  # white left edge
    clip = video.letterbox(frames)
    flipped = hflip(clip)
    assert torch.equal(hflip(flipped), clip)
    cols = torch.nonzero(flipped[0, 3].any(0)).flatten()
    assert int(cols.min()) % 28 == 0 and (int(cols.max()) + 1) % 28 == 0  # still whole windows
    white_cols = torch.nonzero(flipped[0, 0, 50] > 1).flatten()
    assert int(white_cols.min()) > int(cols.min()) + 200  # the white edge moved to the right of the box


# --- bad files ------------------------------------------------------------------------------

def audio_only_file(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def faststart_mp4(path):
    """An mp4 with its index (moov) before the data, so a cut file still has a header."""
    with iio.imopen(path, "w", plugin="pyav", options={"movflags": "faststart"}) as video:
        video.write(np.random.default_rng(0).integers(0, 256, (20, 48, 64, 3), dtype=np.uint8),
                    codec="libx264", fps=10)
    return path.read_bytes()


def bad_files(tmp_path):
    """name -> (path, words the error must contain)."""
    files = {}
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    files["corrupt"] = (corrupt, "cannot be read")
    source = VIDEOS / "bigbuckbunny.mp4"
    whole = source.read_bytes() if source.is_file() else write_clip(tmp_path / "w.mp4", grey_clip(30, 64, 64)).read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole[:int(0.3 * len(whole))])  # the index (moov) is at the end: gone
    files["truncated"] = (truncated, "cannot be read")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    files["empty"] = (empty, "empty")
    files["missing"] = (tmp_path / "missing.mp4", "no such file")
    files["audio only"] = (audio_only_file(tmp_path / "audio.mp4"), "expected a video stream, found audio")
    fast = faststart_mp4(tmp_path / "fast.mp4")
    no_data = tmp_path / "no_data.mp4"
    no_data.write_bytes(fast[:fast.find(b"mdat") + 4])  # the header says 20 frames, no packet follows
    files["zero decodable frames"] = (no_data, "none decodes")
    data_start = fast.find(b"mdat") + 4
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(fast[:data_start] + bytes(len(fast) - data_start))  # 20 packets of zeros
    files["undecodable packets"] = (garbage, "none decodes")
    return files


def test_bad_files_raise_video_error_naming_the_file(tmp_path):
    for name, (path, reason) in bad_files(tmp_path).items():
        with pytest.raises(VideoError) as caught:
            video.read_video(path, 8)
        assert str(path) in str(caught.value) and reason in str(caught.value), name


def test_mp4_cut_in_its_data_is_sampled_from_what_decodes(tmp_path):
    """The index (moov) comes first, so the header still says 20 frames; about 7 decode. We
    sample 8 from those, with a warning, rather than fail or return fewer than 8."""
    fast = faststart_mp4(tmp_path / "fast.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fast[:len(fast) // 2])
    with pytest.warns(UserWarning, match=f"{cut}: 20 frames by the header count, but only"):
        frames, info = video.read_video(cut, 8)
    assert len(frames) == 8 and info["n_header"] == 20 and 0 < info["n_total"] < 20
    assert info["indices"] == video.sample_frame_indices(info["n_total"], 10, 8)


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
    assert render_conversation(video.VICUNA_V1, turns) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <video>\nwhat is the cat doing ? "
        "ASSISTANT: it sleeps</s>USER: why ? ASSISTANT: because</s>")
    assert render_conversation(video.VIDEOPANDA_V1, [("how many dogs ?", None)]).endswith(
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
    dataset = video.VideoInstructionDataset(path, folder, tokenizer, geometry(112))
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
    batch = video.collate_video_batch([dataset[0], dataset[1]], pad_id=1)
    assert batch["videos"].shape == (2, 8, 4, 112, 112) and batch["id"] == ["one", "two"]
    assert batch["lengths"].tolist() == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    short = int(batch["lengths"][1])
    assert (batch["input_ids"][1, short:] == 1).all() and (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert batch["skipped"] == []


def test_instruction_entry_missing_a_field(tokenizer, instruction_files):
    path, folder, entries = instruction_files
    no_video = [entries[0], {k: v for k, v in entries[1].items() if k != "video"}]
    with pytest.raises(AnnotationError, match=r"entry 1 \(id 'two'\): missing field 'video'"):
        video.VideoInstructionDataset(write_json(folder / "bad.json", no_video), folder, tokenizer, geometry(56))
    no_value = json.loads(json.dumps(entries))
    del no_value[0]["conversations"][3]["value"]
    with pytest.raises(AnnotationError, match=r"entry 0 \(id 'one'\), turn 3: missing field 'value'"):
        video.VideoInstructionDataset(write_json(folder / "bad2.json", no_value), folder, tokenizer, geometry(56))
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        lenient = video.VideoInstructionDataset(folder / "bad.json", folder, tokenizer, geometry(56), on_error="skip")
    assert len(lenient) == 1 and "'video'" in lenient.invalid_entries[0]


def test_skip_policy_reports_the_skipped_ids(tokenizer, instruction_files):
    path, folder, entries = instruction_files
    entries = entries + [{**entries[1], "id": "three", "video": "nowhere.mp4"}]
    path = write_json(folder / "with_missing.json", entries)
    dataset = video.VideoInstructionDataset(path, folder, tokenizer, geometry(56))
    batch = video.collate_video_batch([dataset[i] for i in range(3)])
    assert batch["id"] == ["one", "two"] and batch["videos"].shape[0] == 2
    assert [sample_id for sample_id, _ in batch["skipped"]] == ["three"]
    assert "resolves to no file" in batch["skipped"][0][1]
    nothing = video.collate_video_batch([dataset[2]])
    assert nothing["videos"] is None and len(nothing["skipped"]) == 1
    with pytest.raises(VideoError, match=f"'three'.*'nowhere.mp4'.*{folder}.*--on_error=skip would skip it"):
        video.apply_error_policy(batch, "raise", [])
    skipped = []
    video.apply_error_policy(batch, "skip", skipped)
    assert len(skipped) == 1 and skipped[0].startswith("sample 'three': video 'nowhere.mp4'")


def test_train_flip_only_when_asked(tokenizer, instruction_files):
    path, folder, _ = instruction_files
    still = video.VideoInstructionDataset(path, folder, tokenizer, geometry(56))
    flipped = video.VideoInstructionDataset(path, folder, tokenizer, geometry(56), train=True, flip_prob=1.0)
    assert torch.equal(still[0]["video"], still[0]["video"])  # evaluation is deterministic
    assert torch.equal(flipped[0]["video"], hflip(still[0]["video"]))


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
    prompts = video.VideoQADataset(questions, answers, folder, tokenizer, geometry(56, letterbox=False))
    scored = video.VideoQADataset(questions, answers, folder, tokenizer, geometry(56), include_answer=True)
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
    dataset = video.VideoQADataset(write_json(folder / "q.json", entries), write_json(folder / "a.json", answer_entries),
                                  folder, tokenizer, geometry(56))
    assert dataset[3]["id"] == "q9" and re.search(f"'q9'.*'gone'.*{folder}", dataset[3]["skipped"])
    del answer_entries[1]["answer"]
    with pytest.raises(AnnotationError, match=r"a2.json: entry 1 \(id 1\): missing field 'answer'"):
        video.VideoQADataset(questions, write_json(folder / "a2.json", answer_entries), folder, tokenizer, geometry(56))


def test_dataloader_workers(tokenizer, qa_files):
    questions, answers, folder = qa_files
    dataset = video.VideoQADataset(questions, answers, folder, tokenizer, geometry(56), include_answer=True)
    pickle.loads(pickle.dumps(dataset))  # what a spawned worker gets
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=functools.partial(video.collate_video_batch, pad_id=1))
    batches = list(loader)
    assert [batch["id"] for batch in batches] == [["q0", "1"], ["q2"]]
    expected = video.collate_video_batch([dataset[0], dataset[1]], pad_id=1)
    for key in ("videos", "input_ids", "labels", "lengths"):
        assert torch.equal(batches[0][key], expected[key]), key
    assert batches[0]["videos"].shape == (2, 8, 4, 56, 56) and batches[1]["answer"] == ["red"]
