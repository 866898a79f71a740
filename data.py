"""Data for panda: synthetic video QA, real video files, QA datasets, tokenizers and prompts.

Everything that turns files or random seeds into the tensors VideoPanda.forward() takes:
videos (B, T, C, H, W) float32 (C = 3, or 4 with the letterbox mask as channel 3),
input_ids (B, S) int64 right-padded, with VIDEO_PLACEHOLDER (-200) once per row where the
video goes, labels (B, S) int64 with IGNORE_INDEX (-100) on every non-answer token, and
lengths (B,) the number of real (non-padding) tokens of each row.
"""

import itertools
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import torch
from imageio.core.request import InitializationError
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch.utils.data import Dataset

VIDEO_PLACEHOLDER = -200  # same sentinel as the release's IMAGE_TOKEN_INDEX; panda.py defines it too
IGNORE_INDEX = -100       # label of tokens that carry no loss (F.cross_entropy's default ignore_index)

# ---------------------------------------------------------------------------------------------
# Section 1: synthetic video QA (owned by the synthetic-data work)
# ---------------------------------------------------------------------------------------------
#
# The default task: short clips of coloured shapes on black, with one question each. Spatial
# questions can be answered from any single frame; temporal ones need the frames in order
# (which way, appear or disappear, what colour at the end). Split "heldout" asks about
# (shape, colour) pairs that "train" never shows; "test" is fresh clips drawn like "train".
# Nothing is downloaded, and sample i of a split is the same on every machine, so a training
# run resumes by remembering the next index.

# --- shared by both sections --------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the statistics CLIP's encoder was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames):
    """uint8 RGB frames (T, H, W, 3), numpy or torch -> the encoder's float32 input (T, 3, H, W)."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), "
                         f"got {frames.dtype} frames of shape {tuple(frames.shape)}")
    pixels = frames.float() / 255  # (T, H, W, 3) in [0, 1]
    # normalise before the permute, on contiguous memory: much faster on CPU than after it
    normalized = (pixels - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return normalized.permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)


# --- the world: shapes, colours, motions ----------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
          "yellow": (255, 255, 0), "white": (255, 255, 255)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); y grows down
CELL_NAMES = ("top left", "top", "top right",  # a 3x3 grid of cells, row by row
              "left", "center", "right",
              "bottom left", "bottom", "bottom right")
QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")  # a 2x2 grid
GRID_NAMES = {3: CELL_NAMES, 2: QUADRANT_NAMES}  # 'where' answers name the cells of the model's token grid
COUNT_WORDS = ("zero", "one", "two", "three")  # indexed by the count
EVENTS = ("appear", "disappear")

# One pair per shape that train never shows, though it shows every shape and every colour, so
# heldout measures whether shape and colour were learnt apart. The held-out colours are mixtures
# (yellow = red + green, white = all three) of primaries each shape IS seen in: a pixel-linear
# encoder can compose them. (A held-out blue circle would light a channel never seen as a circle.)
HELDOUT_PAIRS = frozenset({("circle", "white"), ("square", "yellow"),
                           ("triangle", "yellow"), ("cross", "white")})
SPLIT_SEEDS = {"train": 0, "heldout": 1, "test": 2}  # test: unseen clips, no held-out pairs
# Kinds whose answer names the subject's colour or shape. In "heldout" a novel subject would make
# the answer a word that never followed this question in training: that tests the language prior,
# not vision. So there the novel object is a distractor the model must see past.
NAMES_SUBJECT = ("color", "shape", "which_event", "color_change")

QUESTIONS = {  # kind: (family, weight within its family, template); the subject is always objects[0]
    "color": ("spatial", 1, "what color is the {shape}?"),
    "shape": ("spatial", 1, "what shape is the {color} object?"),
    "count": ("spatial", 1, "how many objects are there?"),
    "where": ("spatial", 1, "where is the {color} {shape}?"),
    # Order-dependent kinds dominate, so shuffling frames pulls temporal accuracy towards chance;
    # "moves" (yes/no) can be read off the set of frames and is kept rare.
    "direction": ("temporal", 3, "which way does the {color} {shape} move?"),
    "appear_or_disappear": ("temporal", 2, "does the {color} {shape} appear or disappear?"),
    "which_event": ("temporal", 2, "which object {event}s?"),
    "color_change": ("temporal", 2, "what color does the {shape} turn?"),
    "moves": ("temporal", 1, "does the {color} {shape} move?"),
}
SUBJECT_BEHAVIORS = {  # what the subject may do; spatial subjects sit still, so any one frame answers
    "color": ("still",), "shape": ("still",), "where": ("still",), "count": ("still", "move"),
    "direction": ("move",), "appear_or_disappear": EVENTS, "which_event": EVENTS,
    "color_change": ("change",), "moves": ("move", "still"),
}


def kind_probabilities():
    """Half the questions are spatial, half temporal; the weights share out each half."""
    totals = {}
    for family, weight, _ in QUESTIONS.values():
        totals[family] = totals.get(family, 0) + weight
    return [0.5 * weight / totals[family] for family, weight, _ in QUESTIONS.values()]


@dataclass
class SceneObject:
    """Ground truth of one object, for tests and teachers that should not have to read pixels."""
    shape: str
    behavior: str               # still | move | appear | disappear | change
    colors: list                # (T,) colour name per frame (also in frames where it is hidden)
    centers: np.ndarray         # (T, 2) integer pixel centre (x, y) per frame
    visible: np.ndarray         # (T,) bool
    direction: str | None = None  # set when behavior == "move"


@dataclass
class Sample:
    video: np.ndarray           # (T, H, W, 3) uint8
    question: str
    answer: str
    family: str                 # spatial | temporal
    kind: str                   # a key of QUESTIONS
    objects: list               # SceneObjects; objects[0] is the subject of the question


# --- making a scene -------------------------------------------------------------------------

def object_radius(size):
    return size // 8  # 2r+1 = 13 px at 48 px: a shape fills most of one cell of the 3x3 grid


def plan_behaviors(kind, rng):
    """One behaviour per object; objects[0] is the subject, the rest are distractors."""
    subject = str(rng.choice(SUBJECT_BEHAVIORS[kind]))
    if kind == "which_event":  # the answer must be told apart from an object doing the opposite
        opposite = "disappear" if subject == "appear" else "appear"
        calm = [str(rng.choice(["still", "move"])) for _ in range(rng.integers(0, 2))]
        return [subject, opposite] + calm
    # count needs every object in every frame; otherwise distractors may come and go
    others = ["still", "move"] if kind == "count" else ["still", "move", "appear", "disappear"]
    return [subject] + [str(rng.choice(others)) for _ in range(rng.integers(0, 3))]


def pick_look(rng, n_colors, novel, used_shapes, used_colors):
    """A shape and n_colors colours unused in the scene, so 'the circle' and 'the red object'
    always name one object. A novel look ends with a held-out colour for its shape."""
    def free_colors(shape, heldout):
        return [c for c in COLORS if c not in used_colors and ((shape, c) in HELDOUT_PAIRS) == heldout]
    n_seen = n_colors - 1 if novel else n_colors  # colours from train pairs
    shapes = [s for s in SHAPES if s not in used_shapes
              and len(free_colors(s, False)) >= n_seen and (not novel or free_colors(s, True))]
    shape = str(rng.choice(shapes))
    colors = [str(c) for c in rng.choice(free_colors(shape, False), n_seen, replace=False)]
    if novel:
        colors.append(free_colors(shape, True)[0])
    used_shapes.add(shape)
    used_colors.update(colors)
    return shape, colors


def plan_path(behavior, rng, n_frames, size, grid=3):
    """Per-frame centres (T, 2) as (x, y), and the direction of motion (None unless moving)."""
    low, high = object_radius(size), size - 1 - object_radius(size)  # centres that keep it whole
    if behavior != "move":  # resting objects sit near a cell centre, so 'where' is never borderline
        row, col = divmod(int(rng.integers(grid * grid)), grid)
        jitter = size // 48
        x, y = (round((i + 0.5) * size / grid) + int(rng.integers(-jitter, jitter + 1)) for i in (col, row))
        return np.tile([x, y], (n_frames, 1)), None
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = min(rng.uniform(3.0, 4.0) * size / 48, 0.85 * (high - low) / (n_frames - 1))  # px per frame
    travel = np.round(np.arange(n_frames) * speed).astype(int)  # (T,)
    along = int(rng.integers(low, high - travel[-1] + 1)) + travel  # increasing, whole path in frame
    if sum(DIRECTIONS[direction]) < 0:
        along = along[::-1]
    across = np.full(n_frames, int(rng.integers(low, high + 1)))
    xy = (along, across) if DIRECTIONS[direction][0] else (across, along)
    return np.stack(xy, axis=1), direction


def event_frame(rng, n_frames):
    """The first frame after an event; 'before' and 'after' each last at least a quarter of the clip."""
    margin = max(1, n_frames // 4)
    return int(rng.integers(margin, n_frames - margin + 1))


def make_object(behavior, shape, colors, rng, n_frames, size, grid=3):
    centers, direction = plan_path(behavior, rng, n_frames, size, grid)
    frames = np.arange(n_frames)
    visible, frame_colors = np.ones(n_frames, dtype=bool), [colors[0]] * n_frames
    if behavior in ("appear", "disappear", "change"):
        k = event_frame(rng, n_frames)
        if behavior == "appear":
            visible = frames >= k
        elif behavior == "disappear":
            visible = frames < k
        else:
            frame_colors = [colors[0] if t < k else colors[1] for t in frames]
    return SceneObject(shape, behavior, frame_colors, centers, visible, direction)


def overlaps(a, b, size):
    """True if, in some frame showing both, the two objects come closer than a 1-px black gap."""
    reach = 2 * object_radius(size) + 2
    distance = np.abs(a.centers - b.centers).max(axis=1)  # (T,) the larger of |dx| and |dy|
    return bool(np.any(a.visible & b.visible & (distance < reach)))


def shape_mask(shape, center, radius, size):
    """(H, W) bool: the pixels of a shape centred at center = (x, y)."""
    ys, xs = np.ogrid[:size, :size]
    dx, dy = xs - center[0], ys - center[1]
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= (radius + 0.5) ** 2
    if shape == "square":
        return (ax < radius) & (ay < radius)
    if shape == "triangle":  # apex up, base down
        return (ay <= radius) & (2 * ax <= dy + radius)
    if shape == "cross":
        return (np.minimum(ax, ay) <= radius // 3) & (np.maximum(ax, ay) <= radius)
    raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")


def render(objects, n_frames, size):
    video = np.zeros((n_frames, size, size, 3), dtype=np.uint8)  # (T, H, W, 3) black background
    for obj in objects:
        for t in np.flatnonzero(obj.visible):
            mask = shape_mask(obj.shape, obj.centers[t], object_radius(size), size)  # (H, W)
            video[t][mask] = COLORS[obj.colors[t]]
    return video


def cell_name(center, size, grid=3):
    col, row = (min(int(grid * c / size), grid - 1) for c in center)
    return GRID_NAMES[grid][grid * row + col]


def ask(kind, objects, size, grid=3):
    """The question about objects[0] (the subject) and its short answer."""
    subject = objects[0]
    color, shape = subject.colors[0], subject.shape
    question = QUESTIONS[kind][2].format(shape=shape, color=color, event=subject.behavior)
    answers = {"color": color, "shape": shape, "count": COUNT_WORDS[len(objects)],
               "where": cell_name(subject.centers[0], size, grid), "direction": subject.direction,
               "appear_or_disappear": subject.behavior, "which_event": f"{color} {shape}",
               "color_change": subject.colors[-1],
               "moves": "yes" if subject.behavior == "move" else "no"}
    return question, answers[kind]


def valid_kinds(subject, objects):
    """The question kinds that have one clear answer about `subject` in this scene."""
    kinds = [kind for kind, behaviors in SUBJECT_BEHAVIORS.items()
             if subject.behavior in behaviors and kind not in ("count", "which_event")]
    if all(o.behavior in ("still", "move") for o in objects):
        kinds.append("count")  # every object is there in every frame
    if subject.behavior in EVENTS and sum(o.behavior == subject.behavior for o in objects) == 1:
        kinds.append("which_event")  # it alone does this
    return kinds


def more_questions(sample, n, size, rng, grid=3):
    """Up to n further (question, answer) pairs about the sample's scene, other than its own question:
    more supervision per rendered clip, as real instruction data has several turns per video."""
    pairs = {ask(kind, [o] + [p for p in sample.objects if p is not o], size, grid)
             for o in sample.objects for kind in valid_kinds(o, sample.objects)}
    pairs.discard((sample.question, sample.answer))
    pairs = sorted(pairs)
    return [pairs[i] for i in rng.permutation(len(pairs))[:n]]


def check_grid(grid):
    if grid not in GRID_NAMES:
        raise ValueError(f"the synthetic task's 'where' answers name the cells of a 2x2 or 3x3 token grid, "
                         f"and this model's grid is {grid}x{grid}: use a small preset (tiny, nano) or real data")


def make_sample(index, split="train", n_frames=8, size=48, grid=3):
    """Sample number `index` of a split: the same clip, question and answer on every machine.
    grid: 'where' answers name the cells of a grid x grid split of the frame (the model's token grid)."""
    check_grid(grid)
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    if n_frames < 2 or size < 24:
        raise ValueError(f"need n_frames >= 2 and size >= 24 to show motion, got {n_frames} and {size}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])  # no global RNG: reproducible anywhere
    kind = str(rng.choice(list(QUESTIONS), p=kind_probabilities()))
    behaviors = plan_behaviors(kind, rng)
    novel = None  # which object wears a held-out (shape, colour) pair
    if split == "heldout":
        if kind in NAMES_SUBJECT and len(behaviors) == 1:
            behaviors.append(str(rng.choice(["still", "move"])))
        novel = len(behaviors) - 1 if kind in NAMES_SUBJECT else 0
    used_shapes, used_colors = set(), set()
    looks = {}
    for i in sorted(range(len(behaviors)), key=lambda i: i != novel):  # the novel look first: its pair is rarest
        looks[i] = pick_look(rng, 2 if behaviors[i] == "change" else 1, i == novel, used_shapes, used_colors)
    looks = [looks[i] for i in range(len(behaviors))]
    for _ in range(10_000):  # resample positions until no object hides or touches another (~3 tries)
        objects = [make_object(behavior, shape, colors, rng, n_frames, size, grid)
                   for behavior, (shape, colors) in zip(behaviors, looks)]
        if not any(overlaps(a, b, size) for a, b in itertools.combinations(objects, 2)):
            break
    else:
        raise RuntimeError(f"could not place {len(objects)} objects apart in a {size}x{size} frame")
    question, answer = ask(kind, objects, size, grid)
    return Sample(render(objects, n_frames, size), question, answer, QUESTIONS[kind][0], kind, objects)


def shuffle_frames(video, seed=0):
    """The clip with its frames in a fixed random order other than the original: the order
    ablation, under which temporal answers should fall to chance while spatial ones stay right."""
    n_frames = len(video)
    if n_frames < 2:
        raise ValueError(f"need at least 2 frames to shuffle, got {n_frames}")
    rng, order = np.random.default_rng(seed), np.arange(n_frames)
    while (order == np.arange(n_frames)).all():
        order = rng.permutation(n_frames)
    return video[order.tolist()]


# --- text: tokenizer, chat prompt, labels ---------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID = SPECIAL_TOKENS.index("<pad>")  # build_tokenizer() gives the special tokens these ids
VIDEO_TOKEN = "<video>"
PROMPT = "USER: " + VIDEO_TOKEN + "\n{question} ASSISTANT:"


def synthetic_language():
    """Every string the task can say: all questions, all answers and the chat template."""
    for _, _, template in QUESTIONS.values():
        for shape, color, event in itertools.product(SHAPES, COLORS, EVENTS):
            yield template.format(shape=shape, color=color, event=event)
    yield from (*SHAPES, *COLORS, *DIRECTIONS, *CELL_NAMES, *COUNT_WORDS, *EVENTS, "yes", "no")
    yield PROMPT.format(question="").replace(VIDEO_TOKEN, " ")


def build_tokenizer():
    """A word-level tokenizer over exactly the task's words (sorted, so ids never change)."""
    lowercase, splitter = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = {word for text in synthetic_language()
             for word, _ in splitter.pre_tokenize_str(lowercase.normalize_str(text))}
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = lowercase, splitter
    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # "</s>" in text stays one token
    return tokenizer


def encode_example(tokenizer, question, answer=None, more_turns=()):
    """(input_ids, labels) of a chat: "<s>USER: <video>\n{question} ASSISTANT: {answer}</s>", then
    " USER: {question} ASSISTANT: {answer}</s>" for each (question, answer) of more_turns.
    The video is one VIDEO_PLACEHOLDER id; only the answers and their "</s>" carry loss, so the model
    learns to answer and then stop. With answer=None: the first prompt alone, for generation."""
    pieces = PROMPT.format(question=question).split(VIDEO_TOKEN)
    if len(pieces) != 2:
        raise ValueError(f"expected exactly one {VIDEO_TOKEN} in the prompt, found {len(pieces) - 1}")
    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids
    input_ids = [tokenizer.token_to_id("<s>"), *encode(pieces[0]), VIDEO_PLACEHOLDER, *encode(pieces[1])]
    labels = [IGNORE_INDEX] * len(input_ids)
    if answer is None:
        return input_ids, labels
    for turn, (q, a) in enumerate([(question, answer), *more_turns]):
        if turn:
            prompt_ids = encode(" " + PROMPT.replace(VIDEO_TOKEN + "\n", "").format(question=q))
            input_ids, labels = input_ids + prompt_ids, labels + [IGNORE_INDEX] * len(prompt_ids)
        answer_ids = encode(a) + [tokenizer.token_to_id("</s>")]
        input_ids, labels = input_ids + answer_ids, labels + answer_ids
    return input_ids, labels


def collate(examples, pad_id=PAD_ID):
    """Batch dicts with "video" (uint8 (T, H, W, 3), or an already float (T, C, H, W) tensor),
    "input_ids" and "labels" into VideoPanda.forward()'s tensors, text padded on the right."""
    videos = [v if torch.is_tensor(v) and v.is_floating_point() else normalize_frames(v)
              for v in (e["video"] for e in examples)]
    shapes = sorted({tuple(v.shape) for v in videos})
    if len(shapes) != 1:
        raise ValueError(f"clips of one batch must share one (T, C, H, W), got {shapes}")
    lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)  # (B,)
    input_ids = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)  # (B, S)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, S)
    for row, e in enumerate(examples):
        if len(e["labels"]) != len(e["input_ids"]):
            raise ValueError(f"row {row}: {len(e['input_ids'])} input_ids but {len(e['labels'])} labels")
        input_ids[row, :lengths[row]] = torch.tensor(e["input_ids"])
        labels[row, :lengths[row]] = torch.tensor(e["labels"])
    return {"videos": torch.stack(videos), "input_ids": input_ids, "labels": labels, "lengths": lengths}


class SyntheticQA:
    """The synthetic task as an endless, deterministic stream: batch(i, B) holds samples i..i+B-1,
    so a checkpoint that stores the next index resumes exactly the same data."""

    def __init__(self, tokenizer, split="train", n_frames=8, size=48, questions_per_clip=1, grid=3):
        check_grid(grid)  # now, not at the first batch
        self.tokenizer, self.split, self.n_frames, self.size = tokenizer, split, n_frames, size
        self.questions_per_clip, self.grid = questions_per_clip, grid

    def __getitem__(self, index):
        sample = make_sample(index, self.split, self.n_frames, self.size, self.grid)
        rng = np.random.default_rng([SPLIT_SEEDS[self.split], index, 1])
        more = more_questions(sample, self.questions_per_clip - 1, self.size, rng, self.grid)
        input_ids, labels = encode_example(self.tokenizer, sample.question, sample.answer, more)
        return {"video": sample.video, "input_ids": input_ids, "labels": labels, "sample": sample}

    def batch(self, start_index, batch_size):
        """collate()'s tensors, and "samples": the Samples (ground truth, e.g. for oracle_features)."""
        examples = [self[i] for i in range(start_index, start_index + batch_size)]
        batch = collate(examples, pad_id=self.tokenizer.token_to_id("<pad>"))
        return batch | {"samples": [e["sample"] for e in examples]}


# --- scoring --------------------------------------------------------------------------------

def normalize_answer(text):
    """The words of a text as the tokenizer splits them, lowercase, one space apart, without
    punctuation or special tokens: "Top  left.</s>" -> "top left"."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return " ".join(re.findall(r"\w+", text.lower()))


def exact_match(records):
    """records: (family, answer, prediction) triples -> {family: accuracy, ..., "all": accuracy}."""
    hits = {}
    for family, answer, prediction in records:
        correct = normalize_answer(answer) == normalize_answer(prediction)
        for key in (family, "all"):
            hits.setdefault(key, []).append(correct)
    return {key: sum(values) / len(values) for key, values in hits.items()}


# --- an oracle teacher for distillation (spec D) --------------------------------------------

# The oracle's feature channels, in order: D = 24 (a multiple of the distillation head's 8 heads).
# A real teacher (the release's LanguageBind ViT) adds learned position embeddings to its patches, so
# its per-patch features say where each patch is; the row and column one-hots are the oracle's version.
MAX_ORACLE_GRID = 4
ORACLE_FEATURES = (*SHAPES, *COLORS, *DIRECTIONS, "still", "visible", "coverage",
                   *(f"row {i}" for i in range(MAX_ORACLE_GRID)), *(f"column {i}" for i in range(MAX_ORACLE_GRID)))


def oracle_features(sample, grid):
    """A perfect frozen 'teacher' read off the generator's ground truth instead of the pixels: float32
    (T, grid, grid, 24) for a grid x grid cell layout (the model's LSD grid, PandaConfig.grid). Per cell,
    the object covering most of it gives one-hots of its shape, its colour in that frame and its motion
    (left, right, up, down or still), then 1 ("visible": an object is seen here) and the fraction of the
    cell it covers; every cell, empty or not, also gets one-hots of its row and column (channels
    ORACLE_FEATURES). Empty cells carry only their position."""
    T, size = sample.video.shape[:2]
    if size % grid or grid > MAX_ORACLE_GRID:
        raise ValueError(f"a {size}-pixel frame must split into grid x grid whole cells with grid <= "
                         f"{MAX_ORACLE_GRID}; got grid {grid}")
    cell, channel = size // grid, {name: i for i, name in enumerate(ORACLE_FEATURES)}
    coverage = np.zeros((len(sample.objects), T, grid, grid))  # (O, T, g, g)
    features = np.zeros((len(sample.objects), T, len(ORACLE_FEATURES)), dtype=np.float32)  # (O, T, D)
    for i, obj in enumerate(sample.objects):
        for t in np.flatnonzero(obj.visible):  # the very masks render() paints
            mask = shape_mask(obj.shape, obj.centers[t], object_radius(size), size)  # (H, W)
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


# ---------------------------------------------------------------------------------------------
# Section 2: real video files, geometry, QA datasets (owned by the real-video work)
# ---------------------------------------------------------------------------------------------

# The real-data path: video files -> T sampled RGB frames -> the paper's 448 px letterbox with a
# mask channel (or a plain square crop) -> dataset items with one VIDEO_PLACEHOLDER each.
# Pixels are decoded by imageio's PyAV plugin (FFmpeg inside the PyAV wheel); PyAV itself is used
# directly only to read headers and count packets, which imageio does not expose.
# Cost to know of: imageio 2.38 runs gc.collect() when it closes a pyav reader (twice per file:
# __exit__ and __del__), 2 x ~70 ms in a process that imported torch. gc.freeze() in the main
# process before the DataLoader starts its workers makes those collections nearly free.

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
LETTERBOX_FILL = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104): normalises to about 0


class VideoError(ValueError):
    """A video that cannot be used: missing, empty, corrupt, truncated, no video stream, no frames."""


class AnnotationError(ValueError):
    """An annotation entry that cannot be used: a missing field, turns out of order, no answer."""


# --- 2.1 reading video files ----------------------------------------------------------------

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
    """The release's choice of T frames (spec B.1), as sorted indices into the decoded frames.

    One candidate per second, range(0, n, round(fps)); more than T candidates: T of them at
    linspace(0, len - 1, T) rounded down; exactly T: all; fewer (a clip shorter than T seconds):
    the stride max(1, (n - 1) // (T - 1)) from frame 0. All branches start at frame 0.
    """
    n = n_frames_in_video
    if n < 1 or T < 1:
        raise ValueError(f"need a video with frames and T >= 1, got n_frames_in_video={n}, T={T}")
    if n < T:  # the release pads with blank frames here; we repeat frames instead (spec 0, item 7)
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


# --- 2.2 geometry: letterbox with mask, square crop, flip -----------------------------------

def check_frames(frames):
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3):
        found = f"{frames.dtype} {tuple(frames.shape)}" if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"expected uint8 numpy frames of shape (T, H, W, 3), found {found}")


def letterbox_box(height, width, canvas=448, patch=14, window=2):
    """(top, left, valid_height, valid_width) in pixels of a height x width frame on the canvas.

    The long side fills the canvas; the short side is rounded UP to whole blocks of patch * window
    pixels (28: one LSD window of 2x2 patches), and the box is centred on block boundaries with the
    odd block at the bottom/right. At canvas 448 this is spec B.1's teacher rule (224 px, patch 14)
    doubled; canvas=224, window=1 gives the teacher's own layout.
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

    Spec B.1: each frame is resized straight to the valid box (bicubic, Pillow's default and what
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


def hflip(video):
    """Mirror a clip (T, C, H, W) left-right: every frame, and the mask channel with them (spec H.14)."""
    return video.flip(-1)


def geometry_options(cfg):
    """The frame options of VideoTextDataset that match a model's PandaConfig (read duck-typed:
    data.py does not import panda.py): the frames a model is given must be the frames it was built for."""
    return dict(n_frames=cfg.n_frames, geometry="letterbox" if cfg.letterbox else "center_crop",
                size=cfg.image_size, patch=cfg.patch_size, window=cfg.lsd_window)


def frames_for_model(frames, cfg):
    """uint8 frames (T, H, W, 3) -> the float tensor (T, C, S, S) a model with PandaConfig cfg takes:
    letterboxed with the mask channel (C = 4) when cfg.letterbox, else resized and centre-cropped (C = 3)."""
    if cfg.letterbox:
        return letterbox(frames, cfg.image_size, cfg.patch_size, cfg.lsd_window)
    return resize_center_crop(frames, cfg.image_size)


def video_tensor(path, cfg, threads=0):
    """A video file -> (T, C, S, S) for a model with PandaConfig cfg: cfg.n_frames frames sampled as
    the release does, never flipped (inference is deterministic, spec 0 item 5). Bad files: VideoError."""
    frames, _ = read_video(path, cfg.n_frames, threads)  # (T, H, W, 3) uint8
    return frames_for_model(frames, cfg)


def visual_token_count(mask_or_valid_hw, patch=14, window=2):
    """LLM tokens per frame, 1 + h * (w + 1): a fused frame token, then h rows of w LSD tokens each
    followed by a split token (spec B.3e). The argument is a frame's mask (H, W) or (1, H, W), or the
    valid box's (height, width) in pixels; (h, w) is that box in windows of patch * window pixels."""
    if isinstance(mask_or_valid_hw, (torch.Tensor, np.ndarray)):
        mask = torch.as_tensor(mask_or_valid_hw).squeeze(0)  # (H, W)
        rows, cols = torch.nonzero(mask > 0, as_tuple=True)
        if len(rows) == 0:
            raise ValueError("the mask is all zero: no valid region")
        box_h, box_w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    else:
        box_h, box_w = mask_or_valid_hw
    block = patch * window
    if box_h % block or box_w % block:
        raise ValueError(f"valid box {box_h}x{box_w} px is not a whole number of {block} px windows")
    h, w = box_h // block, box_w // block
    return 1 + h * (w + 1)


# --- 2.3 chat templates and tokenisation ----------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """The release's two-separator chat layout (SeparatorStyle.TWO), spec C.3:
    "{system} USER: <video>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..."."""
    system: str
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "            # after the system prompt and after each question
    eos: str = "</s>"         # after each answer; a target, so the model learns to stop
    bos: str | None = "<s>"   # None for tokenizers without one (Qwen2)
    video_tag: str = "<video>"


VICUNA_V1 = ChatTemplate(  # training (spec C.3)
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VIDEOPANDA_V1 = ChatTemplate(  # evaluation (spec C.4); "human" where training says "user" (spec H.20)
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def conversation_pieces(template, turns):
    """The prompt of turns [(question, answer), ...] as pieces: ("bos",), ("video",), ("eos",) or
    ("text", text, answer_start) where answer_start is the offset of the answer in text (or None).
    The last answer may be None: the prompt then ends with "ASSISTANT:" for generation.
    Text is cut at the video and at each eos: the release tokenises the pieces between <image>
    tags apart, and SentencePiece restarts after "</s>" too, so this is the tokenisation it saw."""
    pieces = [("bos",)] if template.bos else []
    text = template.system + template.sep
    for k, (question, answer) in enumerate(turns):
        text += f"{template.user}: "
        if k == 0:  # one placeholder for all frames, at the front of the first question
            pieces += [("text", text, None), ("video",)]
            text = "\n"
        text += question + template.sep + f"{template.assistant}:"
        if answer is None:
            break
        text += " "
        pieces += [("text", text + answer, len(text)), ("eos",)]
        text = ""
    if text:
        pieces.append(("text", text, None))
    return pieces


def render_conversation(template, turns):
    """The prompt as one string, with the video tag: for reading and for debugging."""
    names = {"bos": template.bos or "", "video": template.video_tag, "eos": template.eos}
    return "".join(piece[1] if piece[0] == "text" else names[piece[0]]
                   for piece in conversation_pieces(template, turns))


def special_token_id(tokenizer, token):
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no token {token!r}, which the chat template needs")
    return token_id


def tokenize_conversation(tokenizer, template, turns):
    """(input_ids, labels), lists of ints of equal length, for a tokenizers.Tokenizer.

    BOS is added here and each text piece is encoded with add_special_tokens=False, so a
    tokenizer.json whose post-processor adds BOS itself (Llama's) still gives exactly one.
    Labels are the ids of the answer tokens and of each closing eos, IGNORE_INDEX elsewhere
    (BOS, system prompt, questions, "ASSISTANT:", the placeholder). A token is an answer token
    when it ends inside the answer: SentencePiece's "▁word" carries the space before the answer,
    which the release's len(...) - 2 arithmetic also puts in the answer.
    """
    ids, labels = [], []
    for piece in conversation_pieces(template, turns):
        if piece[0] == "bos":
            ids.append(special_token_id(tokenizer, template.bos))
            labels.append(IGNORE_INDEX)
        elif piece[0] == "video":
            ids.append(VIDEO_PLACEHOLDER)
            labels.append(IGNORE_INDEX)
        elif piece[0] == "eos":
            eos_id = special_token_id(tokenizer, template.eos)
            ids.append(eos_id)
            labels.append(eos_id)
        else:
            _, text, answer_start = piece
            encoding = tokenizer.encode(text, add_special_tokens=False)
            for token_id, (_, end) in zip(encoding.ids, encoding.offsets):
                ids.append(token_id)
                labels.append(token_id if answer_start is not None and end > answer_start else IGNORE_INDEX)
    return ids, labels


# --- 2.4 annotation files -------------------------------------------------------------------

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


# --- 2.5 datasets ---------------------------------------------------------------------------

class VideoTextDataset(Dataset):
    """What the instruction and QA datasets share: frames -> tensor, flips, text, bad-sample policy.

    geometry "letterbox" (the paper preset): (T, 4, size, size) with the mask channel; "center_crop":
    (T, 3, size, size). train=True mirrors a clip with probability flip_prob; evaluation never
    flips (spec 0 item 5). on_error "raise" stops at the first bad video or entry; "skip" turns a bad
    sample into {"id", "skipped": reason}, which collate_video_batch drops and lists in batch["skipped"]
    (a count kept in a worker process would never reach the training loop). Items hold only
    strings and a tokenizers.Tokenizer, both picklable, so DataLoader workers fork or spawn fine.
    """

    def __init__(self, video_folder, tokenizer, template, *, n_frames=8, geometry="letterbox", size=448,
                 patch=14, window=2, train=False, flip_prob=0.5, on_error="raise", max_text_tokens=4096,
                 decode_threads=0):
        if geometry not in ("letterbox", "center_crop"):
            raise ValueError(f"geometry must be 'letterbox' or 'center_crop', got {geometry!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.video_folder, self.tokenizer, self.template = Path(video_folder), tokenizer, template
        self.n_frames, self.geometry, self.size, self.patch, self.window = n_frames, geometry, size, patch, window
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
        return parsed

    def warn_invalid(self):
        if self.invalid_entries:
            warnings.warn(f"skipped {len(self.invalid_entries)} invalid annotation entries "
                          f"(listed in .invalid_entries), the first: {self.invalid_entries[0]}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        try:
            return self.make_item(self.samples[index])
        except (VideoError, AnnotationError) as err:
            if self.on_error == "raise":
                raise
            return {"id": self.samples[index]["id"], "skipped": str(err)}

    def load_video(self, sample):
        path = resolve_video(self.video_folder, sample["video"], sample["id"])
        frames, _ = read_video(path, self.n_frames, self.decode_threads)  # (T, H, W, 3) uint8
        if self.geometry == "letterbox":
            video = letterbox(frames, self.size, self.patch, self.window)  # (T, 4, S, S)
        else:
            video = resize_center_crop(frames, self.size)  # (T, 3, S, S)
        # torch's RNG, not numpy's: DataLoader reseeds torch in each worker, numpy's state is forked as is
        if self.train and torch.rand(()) < self.flip_prob:
            video = hflip(video)
        return video

    def tokenize(self, sample, turns):
        ids, labels = tokenize_conversation(self.tokenizer, self.template, turns)
        if self.max_text_tokens and len(ids) > self.max_text_tokens:  # spec C.5: cut text before the video expands
            ids, labels = ids[:self.max_text_tokens], labels[:self.max_text_tokens]
            if VIDEO_PLACEHOLDER not in ids:
                raise AnnotationError(f"sample {sample['id']!r}: cutting the text to {self.max_text_tokens} "
                                      f"tokens removes the video placeholder")
        return ids, labels


class VideoInstructionDataset(VideoTextDataset):
    """Video-ChatGPT / Valley instruction data (spec C.3): a JSON list of {"id", "video",
    "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", "value": ...}, ...]}.
    Items: {"id", "video" float32 (T, C, S, S), "input_ids", "labels"}; labels on the answers only."""

    def __init__(self, annotation_path, video_folder, tokenizer, template=VICUNA_V1, **options):
        super().__init__(video_folder, tokenizer, template, **options)
        self.samples = self.parse_all(load_json_list(annotation_path),
                                      lambda entry, where: parse_instruction_entry(entry, where, template.video_tag),
                                      annotation_path)
        self.warn_invalid()

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

    def __init__(self, question_path, answer_path, video_folder, tokenizer, template=VIDEOPANDA_V1,
                 include_answer=False, **options):
        super().__init__(video_folder, tokenizer, template, **options)
        self.include_answer = include_answer
        answer_pairs = self.parse_all(load_json_list(answer_path), parse_qa_answer, answer_path)
        require_unique([qid for qid, _ in answer_pairs], answer_path)
        answers = dict(answer_pairs)
        self.samples = self.parse_all(load_json_list(question_path),
                                      lambda entry, where: parse_qa_question(entry, where, answers), question_path)
        require_unique([sample["id"] for sample in self.samples], question_path)
        self.warn_invalid()

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
    kept = [item for item in items if item is not None and "skipped" not in item]
    skipped = [(item["id"], item["skipped"]) if item is not None else (None, "the dataset returned None")
               for item in items if item is None or "skipped" in item]
    if not kept:
        return {**dict.fromkeys(("videos", "input_ids", "labels", "lengths")), "skipped": skipped}
    batch = collate(kept, pad_id=pad_id)
    for key in kept[0].keys() - {"video", "input_ids", "labels"}:
        batch[key] = [item[key] for item in kept]
    batch["skipped"] = skipped
    return batch
