"""The synthetic video-QA task, the default data: made on the fly, nothing downloaded (torch,
numpy and tokenizers only). Clips of coloured shapes on black that move, stay, appear, disappear or
change colour; spatial questions can be answered from any one frame, temporal ones need the frames
in order. Split "heldout" asks about (shape, colour) pairs "train" never shows; "test" is fresh
clips drawn like "train". Sample i of a split is the same on every machine, so a training run
resumes by remembering an index.

A batch, from every data source (real videos too, real_video/video_files.py): videos
(B, T, C, S, S) float32, C = 3, or 4 with the letterbox mask as channel 3; input_ids (B, L) int64,
right-padded, one VIDEO_PLACEHOLDER per row where the video goes; labels (B, L), IGNORE_INDEX but
on answers; lengths (B,) real tokens per row. The pixels are normalised alike (normalize_frames),
and the prompt format (ChatTemplate, tokenize_conversation) is shared too: the release's templates
are in real_video/video_files.py.
"""

import itertools
import json
import re
import signal
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from panda import IGNORE_INDEX, VIDEO_PLACEHOLDER

# the pixel statistics CLIP's encoder was trained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames, out=None):
    """uint8 RGB frames (T, H, W, 3), numpy or torch -> the STAB's float32 input (T, 3, H, W):
    (v / 255 - mean) / std per channel, with CLIP's statistics. Every pixel a model sees, synthetic
    or real, is normalised here. out: a float32 (T, 3, H, W) tensor or view to write into and return
    (the real-video letterbox passes its canvas's valid box), so that no temporary the size of the
    clip is made."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), "
                         f"got {frames.dtype} frames of shape {tuple(frames.shape)}")
    if out is None:
        T, height, width, _ = frames.shape
        out = torch.empty(T, 3, height, width, device=frames.device)
    channels = frames.permute(3, 0, 1, 2)  # (3, T, H, W), a view
    for c in range(3):  # in place, in float32: each step rounds as (frames / 255 - mean) / std does
        out[:, c].copy_(channels[c]).div_(255).sub_(CLIP_MEAN[c]).div_(CLIP_STD[c])
    return out  # (T, 3, H, W)


# --- the world: shapes, colours, motions ----------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
          "yellow": (255, 255, 0), "white": (255, 255, 255)}
# (dx, dy) per direction; y grows down
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CELL_NAMES = ("top left", "top", "top right",  # a 3x3 grid of cells, row by row
              "left", "center", "right",
              "bottom left", "bottom", "bottom right")
QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")  # a 2x2 grid
# 'where' answers name the cells of the model's token grid
GRID_NAMES = {3: CELL_NAMES, 2: QUADRANT_NAMES}
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

# kind: (family, weight within its family, template); the subject is always objects[0]
QUESTIONS = {
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
# what the subject may do; spatial subjects sit still, so any one frame answers
SUBJECT_BEHAVIORS = {
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
        return [c for c in COLORS
                if c not in used_colors and ((shape, c) in HELDOUT_PAIRS) == heldout]
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
        x, y = (round((i + 0.5) * size / grid) + int(rng.integers(-jitter, jitter + 1))
                for i in (col, row))
        return np.tile([x, y], (n_frames, 1)), None
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = min(rng.uniform(3.0, 4.0) * size / 48,  # pixels per frame
                0.85 * (high - low) / (n_frames - 1))
    travel = np.round(np.arange(n_frames) * speed).astype(int)  # (T,)
    # increasing, with the whole path in the frame
    along = int(rng.integers(low, high - travel[-1] + 1)) + travel
    if sum(DIRECTIONS[direction]) < 0:
        along = along[::-1]
    across = np.full(n_frames, int(rng.integers(low, high + 1)))
    xy = (along, across) if DIRECTIONS[direction][0] else (across, along)
    return np.stack(xy, axis=1), direction


def event_frame(rng, n_frames):
    """The first frame after an event; 'before' and 'after' each last at least a quarter of the
    clip."""
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
    """Up to n further (question, answer) pairs about the sample's scene, other than its own
    question: more supervision per rendered clip, as real instruction data has several turns per
    video."""
    pairs = {ask(kind, [o] + [p for p in sample.objects if p is not o], size, grid)
             for o in sample.objects for kind in valid_kinds(o, sample.objects)}
    pairs.discard((sample.question, sample.answer))
    pairs = sorted(pairs)
    return [pairs[i] for i in rng.permutation(len(pairs))[:n]]


def check_grid(grid):
    if grid not in GRID_NAMES:
        raise ValueError(f"the synthetic task's 'where' answers name the cells of a 2x2 or 3x3 "
                         f"token grid, and this model's grid is {grid}x{grid}: use a small preset "
                         f"(tiny, nano) or real data")


def make_sample(index, split="train", n_frames=8, size=48, grid=3):
    """Sample number `index` of a split: the same clip, question and answer on every machine.
    grid: 'where' answers name the cells of a grid x grid split of the frame (the model's
    token grid)."""
    check_grid(grid)
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    if n_frames < 2 or size < 24:
        raise ValueError(f"need n_frames >= 2 and size >= 24 to show motion, "
                         f"got {n_frames} and {size}")
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
    # the novel look first: its pair is the rarest
    for i in sorted(range(len(behaviors)), key=lambda i: i != novel):
        n_colors = 2 if behaviors[i] == "change" else 1
        looks[i] = pick_look(rng, n_colors, i == novel, used_shapes, used_colors)
    looks = [looks[i] for i in range(len(behaviors))]
    # resample positions until no object hides or touches another (about 3 tries)
    for _ in range(10_000):
        objects = [make_object(behavior, shape, colors, rng, n_frames, size, grid)
                   for behavior, (shape, colors) in zip(behaviors, looks)]
        if not any(overlaps(a, b, size) for a, b in itertools.combinations(objects, 2)):
            break
    else:
        raise RuntimeError(f"could not place {len(objects)} objects apart in a {size}x{size} frame")
    question, answer = ask(kind, objects, size, grid)
    family = QUESTIONS[kind][0]
    return Sample(render(objects, n_frames, size), question, answer, family, kind, objects)


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


# --- text: the prompt format, the task's tokenizer -------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """The release's two-separator chat layout (its conversation.py, SeparatorStyle.TWO):
    "{system} USER: <video>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..."."""
    system: str
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "            # after the system prompt and after each question
    eos: str = "</s>"         # after each answer; a target, so the model learns to stop
    bos: str | None = "<s>"   # None for tokenizers without one (Qwen2)
    video_tag: str = "<video>"


# the synthetic task's prompt: "<s> USER: <video>\\n{q} ASSISTANT: {a}</s>..."
SYNTHETIC = ChatTemplate(system="")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID = SPECIAL_TOKENS.index("<pad>")  # build_tokenizer() gives the special tokens these ids


def synthetic_language():
    """Every string the task can say: all questions, all answers and the chat template's words."""
    for _, _, template in QUESTIONS.values():
        for shape, color, event in itertools.product(SHAPES, COLORS, EVENTS):
            yield template.format(shape=shape, color=color, event=event)
    yield from (*SHAPES, *COLORS, *DIRECTIONS, *CELL_NAMES, *COUNT_WORDS, *EVENTS, "yes", "no")
    yield f"{SYNTHETIC.user}: {SYNTHETIC.assistant}:"


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


def unknown_words(tokenizer, text):
    """The words of text that the tokenizer reads as <unk>, which a model would answer as some other
    question; none where the tokenizer has no <unk> (byte-level ones spell every word)."""
    unk, encoding = tokenizer.token_to_id("<unk>"), tokenizer.encode(text, add_special_tokens=False)
    return [text[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets)
            if unk is not None and i == unk]


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
                in_answer = answer_start is not None and end > answer_start
                labels.append(token_id if in_answer else IGNORE_INDEX)
    return ids, labels


def collate(examples, pad_id=PAD_ID):
    """Batch dicts with "video" (uint8 (T, H, W, 3), or an already float (T, C, H, W) tensor),
    "input_ids" and "labels" into VideoPanda.forward()'s tensors, text padded on the right."""
    videos = [v if torch.is_tensor(v) and v.is_floating_point() else normalize_frames(v)
              for v in (e["video"] for e in examples)]
    shapes = sorted({tuple(v.shape) for v in videos})
    if len(shapes) != 1:
        raise ValueError(f"clips of one batch must share one (T, C, H, W), got {shapes}")
    lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)  # (B,)
    input_ids = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, L)
    for row, e in enumerate(examples):
        if len(e["labels"]) != len(e["input_ids"]):
            raise ValueError(f"row {row}: {len(e['input_ids'])} input_ids but "
                             f"{len(e['labels'])} labels")
        input_ids[row, :lengths[row]] = torch.tensor(e["input_ids"])
        labels[row, :lengths[row]] = torch.tensor(e["labels"])
    return {"videos": torch.stack(videos), "input_ids": input_ids, "labels": labels,
            "lengths": lengths}


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
        turns = [(sample.question, sample.answer), *more]
        input_ids, labels = tokenize_conversation(self.tokenizer, SYNTHETIC, turns)
        return {"video": sample.video, "input_ids": input_ids, "labels": labels, "sample": sample}

    def batch(self, start_index, batch_size):
        """collate()'s tensors, and "samples": the Samples (ground truth, e.g. for the oracle
        teacher)."""
        examples = [self[i] for i in range(start_index, start_index + batch_size)]
        batch = collate(examples, pad_id=self.tokenizer.token_to_id("<pad>"))
        return batch | {"samples": [e["sample"] for e in examples]}

    def batches(self, next_sample, batch_size, rank=0, world=1, workers=0):
        """Endless (batch, place) for training. Sample i is the same on every machine, so the next
        index is the whole place: a step takes the next batch_size * world samples, process r the
        r-th batch_size of them, and any number of processes can go on from a checkpoint's index.
        workers > 0: the batches are drawn by that many processes while the model trains, the same
        batches in the same order."""
        steps = TrainingSteps(self, next_sample, batch_size, rank, world)
        if not workers:
            return iter(steps)
        # batch_size=None: each item is already a batch. With several workers, worker w draws
        # steps w, w + workers, ...; the DataLoader asks them in turn and returns the batches in
        # step order.
        return iter(torch.utils.data.DataLoader(steps, batch_size=None, num_workers=workers,
                                                worker_init_fn=ignore_ctrl_c))


def ignore_ctrl_c(worker_id):
    """Ctrl-C is the training process's to handle: it finishes its step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingSteps(torch.utils.data.IterableDataset):
    """SyntheticQA.batches' stream as a dataset a DataLoader's workers can share: step j's batch
    and the place after it, from step `first` on in steps of `every` (worker w of n: first w,
    every n)."""

    def __init__(self, task, next_sample, batch_size, rank, world):
        self.task, self.next_sample, self.batch_size, self.rank, self.world = \
            task, next_sample, batch_size, rank, world

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        first, every = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in itertools.count(first, every):
            start = self.next_sample + step * self.batch_size * self.world  # its first sample
            batch = self.task.batch(start + self.rank * self.batch_size, self.batch_size)
            yield batch, start + self.batch_size * self.world


# --- scoring --------------------------------------------------------------------------------

def normalize_answer(text):
    """The words of a text as the tokenizer splits them, lowercase, one space apart, without
    punctuation or special tokens: "Top  left.</s>" -> "top left"."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return " ".join(re.findall(r"\w+", text.lower()))


def answer_text(tokenizer, ids, eos_id):
    """Generated ids -> the answer: cut at the first eos, decoded and stripped, as the release
    does."""
    return tokenizer.decode(ids[:ids.index(eos_id)] if eos_id in ids else ids).strip()


def accuracy(records, contains=False):
    """records: (group, answer, prediction) triples -> {group: share right, ..., "all": share
    right}. Right: the prediction's words are the answer's (contains=True: include them as whole
    words, "a man is cooking" for "cooking"). The release judges real QA sets with a GPT model (its
    eval_video_qa.py), which accepts paraphrases: these two are a lower and an upper quick check."""
    hits = {}
    for group, answer, prediction in records:
        answer, prediction = normalize_answer(answer), normalize_answer(prediction)
        right = f" {answer} " in f" {prediction} " if contains else answer == prediction
        for key in (group, "all"):
            hits.setdefault(key, []).append(right)
    return {key: sum(values) / len(values) for key, values in hits.items()}


# --- the task as train.py's data ------------------------------------------------------------
# What a training run does with the task. The run's own helpers (multi_gpu.distributed,
# checkpoints.run_files) are imported where they are used: data.py needs torch, numpy, tokenizers.

@torch.no_grad()
def evaluate(run, model, split="heldout", shuffle=False):
    """Exact-match accuracy per question family on the first eval_samples of a synthetic split,
    answered greedily by `model`, the whole model; shuffle: frames in a fixed scrambled order.
    Under torchrun the processes share the questions."""
    from multi_gpu import distributed
    was_training, cfg, eos = model.training, model.cfg, run.tokenizer.token_to_id("</s>")
    model.eval()
    records, mine, device = [], range(run.rank, run.config.eval_samples, run.world), run.device
    for start_at in range(0, len(mine), 100):  # 100 questions at a time
        indices = mine[start_at:start_at + 100]
        samples = [make_sample(i, split, cfg.n_frames, cfg.image_size, cfg.grid) for i in indices]
        prompts = [tokenize_conversation(run.tokenizer, SYNTHETIC, [(s.question, None)])
                   for s in samples]
        videos = [shuffle_frames(s.video, seed=i) if shuffle else s.video
                  for i, s in zip(indices, samples)]
        batch = collate([dict(video=v, input_ids=ids, labels=labels)
                         for v, (ids, labels) in zip(videos, prompts)])
        answers = model.generate(batch["videos"].to(device), batch["input_ids"].to(device),
                                 batch["lengths"].to(device), eos_id=eos,
                                 max_new_tokens=run.config.max_new_tokens)
        records += [(s.family, s.answer, answer_text(run.tokenizer, ids, eos))
                    for s, ids in zip(samples, answers.tolist())]
    model.train(was_training)
    return accuracy([record for part in distributed.gather(records) for record in part])


def accuracy_line(by_family):
    """{family: share right} -> "all 50.0%, color 75.0%, ...", the families sorted by name."""
    return ", ".join(f"{family} {value:.1%}" for family, value in sorted(by_family.items()))


class SyntheticTask:
    """The synthetic video-QA task as a training run's data source (train.py's Run.data; the other
    is real_video.training_data.RealVideos, which provides the same attributes and methods). The
    batches come from SyntheticQA's endless stream. Sample i is the same on every process, so where
    the run is, next_sample, is one number for them all, and a run goes on from it on any number of
    processes. Held-out exact match scores the model during the run and at its end."""
    template = "synthetic"  # the prompt format, saved for sample.py
    decodes_files = False   # waits for its batches are not ones more --num_workers would shorten
    data_size = None        # the checkpoint's data_size: a stream has none

    def __init__(self):
        self.next_sample = 0  # the stream's index of the first sample no step has taken
        self.skipped = []     # none: every clip is made whole

    data_place = property(lambda self: self.next_sample)  # the checkpoint's data_place

    def start_stream(self, run, ckpt):
        """The batches from the first sample, or from where ckpt left the run."""
        if ckpt is not None:  # every process that saved it saved the same index
            places = ckpt["data_place"]
            self.next_sample = places[run.rank] if len(places) == run.world else places[0]
        cfg, config = run.model.cfg, run.config
        task = SyntheticQA(run.tokenizer, "train", cfg.n_frames, cfg.image_size,
                           config.questions_per_clip, cfg.grid)
        self.stream = task.batches(self.next_sample, config.batch_size, run.rank, run.world,
                                   config.num_workers)

    def next_batch(self):
        batch, self.next_sample = next(self.stream)
        return batch

    def evaluate_mid_run(self, run, write):
        """One line through write: the step, its loss and the held-out accuracies."""
        from multi_gpu import distributed
        accuracies = evaluate(run, distributed.whole_model(run.model, run.config.fsdp))
        if run.master:
            write(f"step {run.step}: loss {run.loss:.4f}, held-out exact match: "
                  f"{accuracy_line(accuracies)}")

    def finish(self, run, check_stop):
        """The final accuracies, printed and in out_dir/results.json; check_stop() before each
        (Ctrl-C: the run exits there)."""
        from checkpoints import run_files
        from multi_gpu import distributed
        final, results = distributed.whole_model(run.model, run.config.fsdp), {}
        for name, split, shuffle in (("heldout", "heldout", False), ("test", "test", False),
                                     ("heldout_shuffled", "heldout", True)):
            check_stop()
            results[name] = evaluate(run, final, split, shuffle)
            if run.master:
                print(f"{name}: {accuracy_line(results[name])}")
        if run.master:
            text = json.dumps(results, indent=1).encode()
            run_files.write_atomically(run.out / "results.json", lambda f: f.write(text))
            print("held-out: (shape, colour) pairs training never showed; test: fresh clips of "
                  "training's pairs; shuffled: held-out with frames out of order, where spatial "
                  "holds and temporal falls to ~50%")
