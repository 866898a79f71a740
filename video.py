"""Real videos: reading files, the release's frame sampling and letterbox, its chat templates, the
Video-ChatGPT / Valley instruction format and the zero-shot QA format, and what happens to a file
that cannot be used (--on_error: raise, or skip and count).

    frames, info = read_video("clip.mp4", 8)         # (8, H, W, 3) uint8, sampled as the release does
    video = frames_for_model(frames, cfg)            # (8, 4, 448, 448): letterboxed, with the mask channel

Pixels are decoded by PyAV (FFmpeg's own demuxers and decoders) through imageio's pyav plugin; Pillow
resizes. The synthetic task (data.py) needs none of this.
"""

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import torch
from imageio.core.request import InitializationError
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import CLIP_MEAN, ChatTemplate, collate, normalize_frames, tokenize_conversation
from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
LETTERBOX_FILL = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104): normalises to about 0


class VideoError(ValueError):
    """A video that cannot be used: missing, empty, corrupt, truncated, no video stream, no frames."""


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


def probe_video(path):
    """Frame count, frame rate and size from the container, without decoding a single frame.

    mp4, mov, avi and gif headers store the frame count. WebM/Matroska store none (PyAV says 0),
    so there we count the video packets by demuxing: 3 ms for the 720 frames of the test webm.
    """
    path = check_video_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                found = ", ".join(stream.type for stream in container.streams) or "no streams"
                raise VideoError(f"{path}: expected a video stream, found {found}")
            stream = container.streams.video[0]
            n_header = stream.frames
            if n_header > 0:
                n_total, source = n_header, "header"
            else:
                n_total, source = count_packets(container, stream), "packets"
            info = {"path": str(path), "n_total": n_total, "n_header": n_header, "count_source": source,
                    "fps": frames_per_second(container, stream, n_total), "codec": stream.codec_context.name,
                    "width": stream.codec_context.width, "height": stream.codec_context.height}
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot be read as a video (corrupt, truncated or not a video): {err}") from err
    if n_total == 0:
        raise VideoError(f"{path}: the video stream holds no frames")
    return info


def count_packets(container, stream):
    return sum(1 for packet in container.demux(stream) if packet.size > 0)  # the last one is an empty flush


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
    # the release's round(fps) is 0 below 0.5 fps (a zero range step); stride 1 keeps every frame a candidate
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
    """T = n_frames sampled RGB frames of a video file, decoded once, front to back.

    Returns (frames uint8 (T, H, W, 3), info) with info["indices"] the sampled frame numbers,
    info["n_total"] the frame count they were sampled from, info["fps"], and the header facts.
    threads: FFmpeg decoding threads, 0 = FFmpeg's choice (pass 1 or 2 under many DataLoader workers).
    """
    info = probe_video(path)
    indices = sample_frame_indices(info["n_total"], info["fps"], n_frames)
    frames, _ = decode_frames_at(path, indices, threads)
    if len(frames) < len(set(indices)):
        # Decoding ended, or FFmpeg gave up, before the last sampled frame: the count overclaims (an
        # mp4 cut short after its index, packets that hold no picture). Sample again over the frames
        # that do decode rather than return fewer than T, and say so.
        n_decoded, stopped_by = count_decoded_frames(path, threads)
        promise = f"{path}: {info['n_total']} frames by the {info['count_source']} count"
        why = f" ({stopped_by})" if stopped_by else ""
        if n_decoded == 0:
            raise VideoError(f"{promise}, but none decodes{why}")
        warnings.warn(f"{promise}, but only {n_decoded} decode{why}; sampling from those")
        info.update(n_total=n_decoded, count_source="decoded", decode_stopped_by=stopped_by)
        indices = sample_frame_indices(n_decoded, info["fps"], n_frames)
        frames, _ = decode_frames_at(path, indices, threads)
        if len(frames) < len(set(indices)):
            raise VideoError(f"{path}: {n_decoded} frames decoded on one pass, fewer on the next")
    info["indices"] = indices
    return np.stack([frames[i] for i in indices]), info  # (T, H, W, 3) uint8


# ValueError: a stream without a single decodable frame has no pixel format to build a filter with
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, InitializationError)


def decode_frames_at(path, indices, threads=0):
    """({index: uint8 (H, W, 3)} for the distinct indices, None), or fewer frames and FFmpeg's
    error (or None for a clean end) when the video stops early.

    FFmpeg's select filter drops every other frame before the RGB conversion, which would
    otherwise cost as much as the decoding (3x slower in all on cockatoo.mp4), and we stop at the
    last wanted frame, so at most one RGB frame per sampled index is ever in memory.
    """
    wanted = sorted(set(indices))
    keep = {"expr": "+".join(f"eq(n,{i})" for i in wanted)}  # n: the decoded frame's number, from 0
    frames = {}
    try:
        with iio.imopen(path, "r", plugin="pyav") as video:
            # rgb24 also turns GIFs' palette/bgra frames into RGB
            decoded = video.iter(format="rgb24", filter_sequence=[("select", keep)],
                                 thread_type="AUTO", thread_count=threads)
            for index, frame in zip(wanted, decoded):
                frames[index] = frame  # (H, W, 3) uint8
                if index == wanted[-1]:
                    break
    except DECODE_ERRORS as err:
        return frames, f"{type(err).__name__}: {err}"
    return frames, None


def count_decoded_frames(path, threads=0):
    """(number of frames that decode before the end or the first FFmpeg error, that error or None).
    The same decoder and threads as decode_frames_at, each frame shrunk to 1 grey pixel before it
    is handed over, so counting costs about one decode: the fallback when counts lie."""
    n_decoded = 0
    try:
        with iio.imopen(path, "r", plugin="pyav") as video:
            for _ in video.iter(format="gray", filter_sequence=[("scale", "1:1")],
                                thread_type="AUTO", thread_count=threads):
                n_decoded += 1
    except DECODE_ERRORS as err:
        return n_decoded, f"{type(err).__name__}: {err}"
    return n_decoded, None


# --- geometry: letterbox with mask, or square crop -----------------------------------

def check_frames(frames):
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3):
        found = f"{frames.dtype} {tuple(frames.shape)}" if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"expected uint8 numpy frames of shape (T, H, W, 3), found {found}")


def letterbox_box(height, width, canvas=448, patch=14, window=2):
    """(top, left, valid_height, valid_width) in pixels of a height x width frame on the canvas.

    The long side fills the canvas; the short side is rounded UP to whole blocks of patch * window
    pixels (28: one LSD window of 2x2 patches), and the box is centred on block boundaries with the
    odd block at the bottom/right: the release's compute_basehw_video, whose rule for the teacher's
    224 px frames (patch 14) is doubled for the student's 448; canvas=224, window=1 gives the teacher's.
    """
    block = patch * window
    if canvas % block:
        raise ValueError(f"canvas {canvas} must be a whole number of patch*window = {block} px blocks")
    n_blocks = canvas // block
    long_side, short_side = max(height, width), min(height, width)
    short_blocks = -(-canvas * short_side // (long_side * block))  # exact ceil, no float rounding
    offset = (n_blocks - short_blocks) // 2 * block
    if width > height:  # landscape: full width, padded above and below
        return offset, 0, short_blocks * block, canvas
    return 0, offset, canvas, short_blocks * block  # portrait or square


def letterbox(frames, canvas=448, patch=14, window=2):
    """uint8 frames (T, H, W, 3) -> float32 (T, 4, canvas, canvas): normalised RGB + a 0/1 mask.

    As the release's resize2require_video: each frame is resized straight to the valid box (bicubic, Pillow's default and what
    the release gets), pasted on a (122, 116, 104) canvas, and the whole canvas is normalised;
    the mask (1 on the pasted box) is appended after normalisation, as channel 3, unnormalised.
    """
    check_frames(frames)
    T, height, width, _ = frames.shape
    top, left, box_h, box_w = letterbox_box(height, width, canvas, patch, window)
    pixels = np.empty((T, canvas, canvas, 3), dtype=np.uint8)  # (T, S, S, 3)
    pixels[:] = LETTERBOX_FILL
    for t in range(T):
        resized = Image.fromarray(frames[t]).resize((box_w, box_h), Image.Resampling.BICUBIC)
        pixels[t, top:top + box_h, left:left + box_w] = np.asarray(resized)
    mask = torch.zeros(T, 1, canvas, canvas)  # (T, 1, S, S)
    mask[:, :, top:top + box_h, left:left + box_w] = 1.0
    return torch.cat([normalize_frames(pixels), mask], dim=1)  # (T, 4, S, S)


def resize_center_crop(frames, size):
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, size, size): short side to size (bicubic), centre crop.
    The long side is truncated to int(size * long / short) and the crop offset rounded, as CLIP's
    torchvision Resize + CenterCrop do."""
    check_frames(frames)
    _, height, width, _ = frames.shape
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    crops = np.stack([np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC))
                      [top:top + size, left:left + size] for frame in frames])  # (T, size, size, 3)
    return normalize_frames(crops)


def frames_for_model(frames, cfg):
    """uint8 frames (T, H, W, 3) -> the float tensor (T, C, S, S) a model with PandaConfig cfg takes:
    letterboxed with the mask channel (C = 4) when cfg.letterbox, else resized and centre-cropped (C = 3)."""
    if cfg.letterbox:
        return letterbox(frames, cfg.image_size, cfg.patch_size, cfg.lsd_window)
    return resize_center_crop(frames, cfg.image_size)


def video_tensor(path, cfg, threads=0):
    """A video file -> (T, C, S, S) for a model with PandaConfig cfg: cfg.n_frames frames sampled as
    the release does, never flipped (the release flips at evaluation too; we flip only in training)."""
    frames, _ = read_video(path, cfg.n_frames, threads)  # (T, H, W, 3) uint8
    return frames_for_model(frames, cfg)


# --- the release's chat templates ------------------------------------------------------------

VICUNA_V1 = ChatTemplate(  # training (the release's conv_vicuna_v1)
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VIDEOPANDA_V1 = ChatTemplate(  # evaluation (its conv_videopanda_v1): "human" where training says "user"
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = {"vicuna_v1": VICUNA_V1, "videopanda_v1": VIDEOPANDA_V1}


# --- annotation files -------------------------------------------------------------------

def load_json_list(path):
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read the annotation file: {err}") from err
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, found {type(entries).__name__}")
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
        raise AnnotationError(f"{where}: field {field!r} has the wrong type {type(entry[field]).__name__}")
    return entry[field]


def parse_instruction_entry(entry, where, video_tag="<video>"):
    """A Video-ChatGPT / Valley entry -> {"id", "video", "turns": [(question, answer), ...]}.
    Turns must alternate human, gpt. The video tag is removed wherever it is; the template puts
    one placeholder at the front of the first question (as the release's preprocess_multimodal)."""
    sample_id = str(require_field(entry, "id", where, (str, int)))
    video = require_field(entry, "video", where)
    conversation = require_field(entry, "conversations", where, list)
    if not conversation or len(conversation) % 2:
        raise AnnotationError(f"{where}: expected human/gpt pairs of turns, found {len(conversation)} turns")
    values = []
    for k, (turn, role) in enumerate(zip(conversation, ("human", "gpt") * len(conversation))):
        speaker = require_field(turn, "from", f"{where}, turn {k}")
        if speaker != role:
            raise AnnotationError(f"{where}, turn {k}: expected a turn from {role!r}, found {speaker!r}")
        values.append(require_field(turn, "value", f"{where}, turn {k}"))
    turns = [(question.replace(video_tag, "").strip(), answer) for question, answer in zip(values[::2], values[1::2])]
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
    extension, also with ActivityNet's "v_" prefix. A name that matches nothing is a VideoError."""
    folder = Path(folder)
    stem = name[:-len(Path(name).suffix)] if Path(name).suffix.lower() in VIDEO_EXTENSIONS else name
    candidates = [folder / name] + [folder / f"{prefix}{stem}{ext}"
                                    for prefix in ("", "v_") for ext in VIDEO_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VideoError(f"sample {sample_id!r}: video {name!r} resolves to no file in {folder} "
                     f"(tried {', '.join(VIDEO_EXTENSIONS)}, with and without the 'v_' prefix)")


# --- datasets ---------------------------------------------------------------------------

class VideoTextDataset(Dataset):
    """What the instruction and QA datasets share: a video file -> the tensor a model with PandaConfig
    cfg takes (frames_for_model), flips in training, the prompt's ids and labels, bad entries.

    A bad annotation entry is an AnnotationError when the file is read (on_error="raise") or left out
    and listed in .invalid_entries (on_error="skip"). A video that cannot be used never raises in
    __getitem__: the item is {"id", "skipped": reason}, which collate_video_batch lists in
    batch["skipped"], and the caller applies --on_error in its own process (apply_error_policy), where
    a raised error keeps its one-line message (a DataLoader worker's exception arrives wrapped in its
    traceback, and a count kept in a worker would never reach the training loop). Items hold only
    strings and a tokenizers.Tokenizer, both picklable, so DataLoader workers fork or spawn fine."""

    def __init__(self, video_folder, tokenizer, template, cfg, *, train=False, flip_prob=0.5, on_error="raise",
                 max_text_tokens=4096, decode_threads=0):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.video_folder, self.tokenizer, self.template, self.cfg = Path(video_folder), tokenizer, template, cfg
        self.train, self.flip_prob, self.on_error = train, flip_prob, on_error
        self.max_text_tokens, self.decode_threads = max_text_tokens, decode_threads
        self.samples, self.invalid_entries = [], []  # invalid_entries: reasons, under on_error="skip"

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

    def load_video(self, sample):
        path = resolve_video(self.video_folder, sample["video"], sample["id"])
        frames, _ = read_video(path, self.cfg.n_frames, self.decode_threads)  # (T, H, W, 3) uint8
        video = frames_for_model(frames, self.cfg)  # (T, C, S, S)
        # torch's RNG, not numpy's: DataLoader reseeds torch in each worker, numpy's state is forked as is.
        # The mask channel flips with the frames, so the valid box stays where the pixels are.
        if self.train and torch.rand(()) < self.flip_prob:
            video = video.flip(-1)
        return video

    def tokenize(self, sample, turns):
        ids, labels = tokenize_conversation(self.tokenizer, self.template, turns)
        if self.max_text_tokens and len(ids) > self.max_text_tokens:  # the release cuts the text before the video expands
            ids, labels = ids[:self.max_text_tokens], labels[:self.max_text_tokens]
            if VIDEO_PLACEHOLDER not in ids:
                raise AnnotationError(f"sample {sample['id']!r}: cutting the text to {self.max_text_tokens} "
                                      f"tokens removes the video placeholder")
        return ids, labels


class VideoInstructionDataset(VideoTextDataset):
    """Video-ChatGPT / Valley instruction data (the release's training format): a JSON list of {"id", "video",
    "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", "value": ...}, ...]}.
    Items: {"id", "video" float32 (T, C, S, S), "input_ids", "labels"}; labels on the answers only."""

    def __init__(self, annotation_path, video_folder, tokenizer, cfg, template=VICUNA_V1, **options):
        super().__init__(video_folder, tokenizer, template, cfg, **options)
        self.samples = self.parse_all(load_json_list(annotation_path),
                                      lambda entry, where: parse_instruction_entry(entry, where, template.video_tag),
                                      annotation_path)

    def make_item(self, sample):
        ids, labels = self.tokenize(sample, sample["turns"])
        return {"id": sample["id"], "video": self.load_video(sample), "input_ids": ids, "labels": labels}


class VideoQADataset(VideoTextDataset):
    """Zero-shot video QA (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA) in Video-ChatGPT's
    question and answer files, keyed by question_id. Items: {"id", "video", "input_ids", "labels",
    "question", "answer", "video_name", "prompt_len"}.

    By default input_ids is the generation prompt, ending in "ASSISTANT:", with no targets. With
    include_answer=True the answer and eos follow as targets (teacher-forced scoring);
    input_ids[:prompt_len] is the prompt either way."""

    def __init__(self, question_path, answer_path, video_folder, tokenizer, cfg, template=VIDEOPANDA_V1,
                 include_answer=False, **options):
        super().__init__(video_folder, tokenizer, template, cfg, **options)
        self.include_answer = include_answer
        answer_pairs = self.parse_all(load_json_list(answer_path), parse_qa_answer, answer_path)
        require_unique([qid for qid, _ in answer_pairs], answer_path)
        answers = dict(answer_pairs)
        self.samples = self.parse_all(load_json_list(question_path),
                                      lambda entry, where: parse_qa_question(entry, where, answers), question_path)
        require_unique([sample["id"] for sample in self.samples], question_path)

    def make_item(self, sample):
        answer = sample["answer"] if self.include_answer else None
        ids, labels = self.tokenize(sample, [(sample["question"], answer)])
        prompt_len = next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        return {"id": sample["id"], "video": self.load_video(sample), "input_ids": ids, "labels": labels,
                "question": sample["question"], "answer": sample["answer"], "video_name": sample["video"],
                "prompt_len": prompt_len}


def collate_video_batch(items, pad_id=0):
    """collate() of the items that loaded, plus batch["skipped"]: (id, reason) of those that did
    not, and every other field as a list (batch["id"], batch["question"], ...). If nothing loaded,
    videos/input_ids/labels/lengths are None: log batch["skipped"] and move on.
    pad_id 0 is the release's (pad = unk = 0 for Llama); use functools.partial to change it."""
    kept = [item for item in items if "skipped" not in item]
    skipped = [(item["id"], item["skipped"]) for item in items if "skipped" in item]
    if not kept:
        return {**dict.fromkeys(("videos", "input_ids", "labels", "lengths")), "skipped": skipped}
    batch = collate(kept, pad_id=pad_id)
    for key in kept[0].keys() - {"video", "input_ids", "labels"}:
        batch[key] = [item[key] for item in kept]
    batch["skipped"] = skipped
    return batch


# --- the skip policy, and batches for training ----------------------------------------------

def apply_error_policy(batch, on_error, skipped):
    """The unusable samples a DataLoader batch reports: raise on the first (on_error="raise"), or name
    each in the log and append it to `skipped` (on_error="skip"). Never dropped without a word."""
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


def batches(dataset, batch_size, seed, place, on_error, skipped, num_workers=2, rank=0, world=1):
    """Endless training batches of a dataset, as (batch, place), place = (epoch, position). Epoch e
    visits the samples in the order of a permutation seeded by (seed, e); position counts the samples
    of the epoch used so far, so the place saved in a checkpoint is where a resumed run goes on.
    Unusable samples stop the run (on_error="raise") or are logged, appended to `skipped` and left
    out of the batch.

    Under torchrun, process r takes every world-th sample of the order from the r-th on: the k-th
    batches of all processes together are samples k*B*world .. (k+1)*B*world - 1 of the order, the
    k-th batch of one process with the global batch B*world (until a sample is skipped). Each process
    keeps its own place in its share, so one that skips a sample, or ends its share of an epoch a
    batch earlier, still yields one batch per micro-step, like the others: no coordination."""
    epoch, position = place
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(dataset))[rank::world][position:].tolist()
        # The workers' flip RNG is seeded from (seed, epoch, position, rank): a run is reproducible from any
        # starting point, though a resumed epoch flips other clips than an uninterrupted one would.
        flips = torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, position, rank])
                                                  .integers(2**62)))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
                            collate_fn=collate_video_batch, generator=flips)
        n_kept, started_at = 0, position
        for batch in loader:
            kept = 0 if batch["lengths"] is None else len(batch["lengths"])
            position += kept + len(batch["skipped"])
            apply_error_policy(batch, on_error, skipped)
            if kept:
                n_kept += kept
                yield batch, (epoch, position)
        if n_kept == 0 and started_at == 0:
            whose = "its" if world == 1 else f"process {rank}'s"
            raise VideoError(f"not one of {whose} {len(range(rank, len(dataset), world))} samples loads; "
                             f"the last reason: {skipped[-1]}")
        epoch, position = epoch + 1, 0
