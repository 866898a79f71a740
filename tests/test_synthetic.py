"""Tests of the synthetic video-QA task (data.py, Section 1).

The answers are re-derived from the rendered PIXELS wherever possible, not from the generator's
scene description, so a bug in the renderer or in the question logic cannot hide behind itself.
"""
import collections
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

ORDER_KINDS = ("direction", "appear_or_disappear", "which_event", "color_change")
SPATIAL_KINDS = ("color", "shape", "count", "where")


# --- reading a frame without the scene description -------------------------------------------

def color_mask(frame, color):  # (H, W) bool: pixels of exactly this colour
    return (frame == np.array(data.COLORS[color], dtype=np.uint8)).all(axis=-1)


def colors_in(frame):
    return [c for c in data.COLORS if color_mask(frame, c).any()]


def centroid(mask):  # (x, y) of a mask's pixels
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def classify_shape(mask):
    """Tell the four shapes apart by how much of their bounding box they fill, and triangles
    from crosses by their narrow top row."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if box[0].sum() < box[-1].sum() else "cross"


def count_blobs(frame):
    """Connected groups of non-black pixels (4-neighbourhood)."""
    lit = frame.any(axis=-1)
    seen = np.zeros_like(lit)
    blobs = 0
    for start in zip(*np.nonzero(lit)):
        if seen[start]:
            continue
        blobs += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < lit.shape[0] and 0 <= nx < lit.shape[1] and lit[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs


def named(question, vocabulary):
    words = question.rstrip("?").split()
    found = [w for w in words if w in vocabulary]
    return found[0] if found else None


def spatial_answer(kind, question, frame, grid=3):
    """The answer read from ONE frame."""
    shape, color = named(question, data.SHAPES), named(question, data.COLORS)
    if kind == "color":
        matches = [c for c in colors_in(frame) if classify_shape(color_mask(frame, c)) == shape]
        return matches[0] if len(matches) == 1 else None
    if kind == "shape":
        return classify_shape(color_mask(frame, color)) if color_mask(frame, color).any() else None
    if kind == "count":
        blobs = count_blobs(frame)
        return data.COUNT_WORDS[blobs] if blobs == len(colors_in(frame)) else None
    if kind == "where":
        mask = color_mask(frame, color)
        if not mask.any() or classify_shape(mask) != shape:
            return None
        x, y = centroid(mask)
        size = frame.shape[0]
        return data.GRID_NAMES[grid][grid * min(int(grid * y / size), grid - 1) + min(int(grid * x / size), grid - 1)]
    raise ValueError(kind)


def temporal_answer(kind, question, video):
    """The answer read from the frames in their given order."""
    shape, color = named(question, data.SHAPES), named(question, data.COLORS)
    first, last = video[0], video[-1]
    if kind in ("direction", "moves"):
        dx, dy = centroid(color_mask(last, color)) - centroid(color_mask(first, color))
        if kind == "moves":
            return "yes" if max(abs(dx), abs(dy)) >= 1 else "no"
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if kind == "appear_or_disappear":
        shown = (color_mask(first, color).any(), color_mask(last, color).any())
        return {(False, True): "appear", (True, False): "disappear"}.get(shown)
    if kind == "which_event":
        event = "appear" if "appears" in question.rstrip("?").split() else "disappear"
        came, went = set(colors_in(last)) - set(colors_in(first)), set(colors_in(first)) - set(colors_in(last))
        candidates = came if event == "appear" else went
        if len(candidates) != 1:
            return None
        c = candidates.pop()
        return f"{c} {classify_shape(color_mask(last if event == 'appear' else first, c))}"
    if kind == "color_change":
        def shape_color(frame):
            matches = [c for c in colors_in(frame) if classify_shape(color_mask(frame, c)) == shape]
            return matches[0] if len(matches) == 1 else None
        before, after = shape_color(first), shape_color(last)
        return after if before is not None and before != after else None
    raise ValueError(kind)


def samples(n, split="train", n_frames=8, size=48, start=0, grid=3):
    return [data.make_sample(i, split, n_frames, size, grid) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def train_pool():
    return samples(3000)


@pytest.fixture(scope="module")
def tokenizer():
    return data.build_tokenizer()


# --- determinism ---------------------------------------------------------------------------

def fingerprint(sample_list):
    digest = hashlib.sha256()
    for s in sample_list:
        digest.update(s.video.tobytes())
        digest.update(f"{s.question}|{s.answer}|{s.family}".encode())
    return digest.hexdigest()


def test_same_index_gives_same_sample_and_different_indices_differ():
    for split in ("train", "heldout"):
        a, b = data.make_sample(7, split), data.make_sample(7, split)
        assert np.array_equal(a.video, b.video) and (a.question, a.answer) == (b.question, b.answer)
    videos = [s.video.tobytes() for s in samples(50)]
    assert len(set(videos)) == 50
    firsts = [data.make_sample(0, split).video.tobytes() for split in ("train", "heldout", "test")]
    assert len(set(firsts)) == 3
    with pytest.raises(ValueError, match="split"):
        data.make_sample(0, "validation")


def test_samples_do_not_depend_on_the_process_or_hash_seed():
    code = ("import sys; sys.path.insert(0, '.'); import test_synthetic as t; "
            "print(t.fingerprint(t.samples(20) + t.samples(20, 'heldout')))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == fingerprint(samples(20) + samples(20, "heldout"))


# --- answers agree with the pixels -----------------------------------------------------------

@pytest.mark.parametrize("split,n_frames,size,grid", [
    ("train", 8, 48, 3), ("heldout", 8, 48, 3), ("test", 8, 48, 3), ("train", 4, 32, 3), ("train", 8, 64, 3),
    ("heldout", 4, 48, 3), ("train", 8, 48, 2), ("heldout", 8, 48, 2)])
def test_every_answer_agrees_with_the_pixels(split, n_frames, size, grid):
    for s in samples(150, split, n_frames, size, grid=grid):
        assert s.video.shape == (n_frames, size, size, 3) and s.video.dtype == np.uint8
        if s.kind in SPATIAL_KINDS:  # every single frame must give the same, right answer
            answers = {spatial_answer(s.kind, s.question, frame, grid) for frame in s.video}
            assert answers == {s.answer}, (s.question, s.answer, answers)
        else:
            assert temporal_answer(s.kind, s.question, s.video) == s.answer, (s.question, s.answer)


def test_order_dependent_answers_change_when_the_frames_are_reversed():
    checked = 0
    for s in samples(400):
        if s.kind in ORDER_KINDS:
            reversed_answer = temporal_answer(s.kind, s.question, s.video[::-1])
            assert reversed_answer != s.answer, (s.question, s.answer)
            checked += 1
    assert checked > 100


def test_objects_never_touch():
    for s in samples(300):
        for frame in s.video:
            assert count_blobs(frame) == len(colors_in(frame))


# --- held-out combinations ----------------------------------------------------------------

def worn_pairs(sample):
    return {(o.shape, c) for o in sample.objects for c in o.colors}


def test_heldout_pairs_never_appear_in_train_or_test(train_pool):
    seen = set().union(*(worn_pairs(s) for s in train_pool))
    assert not seen & data.HELDOUT_PAIRS
    assert not set().union(*(worn_pairs(s) for s in samples(500, "test"))) & data.HELDOUT_PAIRS
    assert {shape for shape, _ in seen} == set(data.SHAPES)  # train still shows every shape ...
    assert {color for _, color in seen} == set(data.COLORS)  # ... and every colour


def test_train_pixels_never_show_a_heldout_pair():
    for s in samples(200):
        for frame in s.video:
            for c in colors_in(frame):
                assert (classify_shape(color_mask(frame, c)), c) not in data.HELDOUT_PAIRS


def test_heldout_questions_are_about_heldout_pairs():
    """The novel object is the subject unless the answer would name its colour or shape; then it
    is a distractor, and the subject wears a training pair."""
    heldout = samples(400, "heldout")
    for s in heldout:
        assert worn_pairs(s) & data.HELDOUT_PAIRS
        subject = s.objects[0]
        subject_is_novel = (subject.shape, subject.colors[-1]) in data.HELDOUT_PAIRS
        assert subject_is_novel == (s.kind not in data.NAMES_SUBJECT), (s.kind, subject.shape, subject.colors)
    assert set().union(*(worn_pairs(s) for s in heldout)) >= data.HELDOUT_PAIRS


# --- balance --------------------------------------------------------------------------------

def test_both_families_and_all_kinds_are_well_represented(train_pool):
    families = collections.Counter(s.family for s in train_pool)
    assert 0.4 < families["spatial"] / len(train_pool) < 0.6
    kinds = collections.Counter(s.kind for s in train_pool)
    for kind, (family, _, _) in data.QUESTIONS.items():  # no kind crowds out or starves the others
        assert 0.05 < kinds[kind] / families[family] < 0.4, (kind, kinds)
    temporal = [s for s in train_pool if s.family == "temporal"]
    assert sum(s.kind in ORDER_KINDS for s in temporal) / len(temporal) >= 0.8


def test_no_answer_dominates_its_question_kind(train_pool):
    by_kind = collections.defaultdict(collections.Counter)
    for s in train_pool:
        by_kind[s.kind][s.answer] += 1
    for kind, answers in by_kind.items():
        share = max(answers.values()) / sum(answers.values())
        assert share <= 1 / len(answers) + 0.1, (kind, answers)


# --- tokenizer and prompt -------------------------------------------------------------------

def test_every_word_of_the_task_is_in_the_vocabulary(tokenizer, train_pool):
    unk = tokenizer.token_to_id("<unk>")
    texts = [t for s in train_pool[:2000] + samples(300, "heldout") for t in (s.question, s.answer)]
    texts += list(data.synthetic_language())
    for text in texts:
        assert unk not in tokenizer.encode(text).ids, text
    assert unk in tokenizer.encode("what colour is the purple hexagon?").ids  # unknown words do map to <unk>


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path, train_pool):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = tokenizers.Tokenizer.from_file(str(path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for s in train_pool[:50]:
        assert encode(loaded, s.question, s.answer) == encode(tokenizer, s.question, s.answer)
    assert [tokenizer.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert data.build_tokenizer().get_vocab() == tokenizer.get_vocab()  # ids never change


def encode(tokenizer, question, answer=None):
    return data.tokenize_conversation(tokenizer, data.SYNTHETIC, [(question, answer)])


def test_the_synthetic_prompt_marks_only_the_answer_for_loss(tokenizer, train_pool):
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    for s in train_pool[:200]:
        ids, labels = encode(tokenizer, s.question, s.answer)
        prompt, prompt_labels = encode(tokenizer, s.question)
        # "<s> USER: <video>\n{question} ASSISTANT:", the video a single placeholder id
        assert prompt[:4] == [bos, tokenizer.token_to_id("user"), tokenizer.token_to_id(":"), data.VIDEO_PLACEHOLDER]
        assert ids.count(data.VIDEO_PLACEHOLDER) == 1
        assert ids[:len(prompt)] == prompt and prompt_labels == [data.IGNORE_INDEX] * len(prompt)
        assert tokenizer.decode(prompt[-2:]) == "assistant :"
        assert labels[:len(prompt)] == [data.IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):]
        answer_ids = labels[len(prompt):]
        assert answer_ids[-1] == eos and eos not in answer_ids[:-1]
        assert tokenizer.decode(answer_ids[:-1]) == s.answer


def test_a_model_grid_the_task_cannot_name_is_an_error(tokenizer):
    data.SyntheticQA(tokenizer, grid=2)  # 2x2 and 3x3 grids have cell names
    with pytest.raises(ValueError, match="2x2 or 3x3 token grid.*16x16"):  # the paper preset's grid
        data.SyntheticQA(tokenizer, n_frames=8, size=448, grid=16)


def test_collate_pads_on_the_right(tokenizer):
    qa = data.SyntheticQA(tokenizer)
    examples = [qa[i] for i in range(6)]
    batch = data.collate(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1, "pick indices with different lengths so padding is exercised"
    B, S = len(examples), max(lengths)
    assert batch["videos"].shape == (B, 8, 3, 48, 48) and batch["videos"].dtype == torch.float32
    assert batch["input_ids"].shape == (B, S) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].shape == (B, S) and batch["labels"].dtype == torch.int64
    assert batch["lengths"].tolist() == lengths and batch["lengths"].dtype == torch.int64
    for row, e in enumerate(examples):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert batch["labels"][row, :n].tolist() == e["labels"]
        assert (batch["input_ids"][row, n:] == tokenizer.token_to_id("<pad>")).all()
        assert (batch["labels"][row, n:] == data.IGNORE_INDEX).all()
        assert torch.equal(batch["videos"][row], data.normalize_frames(e["video"]))


def test_normalize_frames_uses_clip_statistics():
    frames = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    frames[1] = 255
    x = data.normalize_frames(frames)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    mean, std = torch.tensor(data.CLIP_MEAN), torch.tensor(data.CLIP_STD)
    assert torch.allclose(x[0, :, 0, 0], -mean / std) and torch.allclose(x[1, :, 2, 3], (1 - mean) / std)
    assert torch.equal(data.normalize_frames(torch.from_numpy(frames)), x)
    with pytest.raises(ValueError, match="uint8"):
        data.normalize_frames(frames.astype(np.float32))


def test_batches_resume_the_same_stream(tokenizer):
    qa = data.SyntheticQA(tokenizer)
    whole = qa.batch(0, 8)
    first, second = qa.batch(0, 5), qa.batch(5, 3)
    for part, rows in ((first, range(0, 5)), (second, range(5, 8))):
        for i, row in enumerate(rows):
            n = int(whole["lengths"][row])
            assert torch.equal(part["videos"][i], whole["videos"][row])
            assert torch.equal(part["input_ids"][i, :n], whole["input_ids"][row, :n])



def test_batches_drawn_by_workers_are_the_batches_drawn_in_process(tokenizer):
    """Two worker processes take turns drawing the steps, yet the stream is the in-process one: the same
    batches, in the same order, with the same place after each (what a checkpoint resumes from)."""
    qa = data.SyntheticQA(tokenizer, n_frames=4, size=32, questions_per_clip=2, grid=2)
    here, workers = qa.batches(6, 3, rank=1, world=2), qa.batches(6, 3, rank=1, world=2, workers=2)
    for step in range(5):
        (a, place_a), (b, place_b) = next(here), next(workers)
        assert place_a == place_b == 6 + 6 * (step + 1)
        assert [s.question for s in a["samples"]] == [s.question for s in b["samples"]]
        assert all(torch.equal(a[k], b[k]) for k in ("videos", "input_ids", "labels", "lengths"))

# --- scoring and the order ablation ---------------------------------------------------------

def test_accuracy_ignores_case_spacing_and_punctuation():
    records = [("spatial", "top left", "Top  left."), ("spatial", "red", "blue"),
               ("temporal", "up", " up</s>"), ("temporal", "appear", "appear")]
    assert data.accuracy(records) == {"spatial": 0.5, "temporal": 1.0, "all": 0.75}
    contained = [("a", "cooking", "a man is cooking."), ("a", "red", "Red"), ("a", "cat", "category")]
    assert data.accuracy(contained, contains=True) == {"a": 2 / 3, "all": 2 / 3}  # whole words only


def test_shuffle_frames_is_a_fixed_nontrivial_permutation():
    video = next(s.video for s in samples(20) if s.kind == "direction")  # every frame differs
    shuffled = data.shuffle_frames(video, seed=1)
    assert np.array_equal(shuffled, data.shuffle_frames(video, seed=1))
    order = [next(i for i in range(len(video)) if np.array_equal(f, video[i])) for f in shuffled]
    assert sorted(order) == list(range(len(video))) and order != sorted(order)
    assert torch.equal(data.shuffle_frames(torch.from_numpy(video), seed=1), torch.from_numpy(shuffled))
