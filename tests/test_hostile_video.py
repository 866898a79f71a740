"""Video and annotation files someone hands you (real_video/video_files.py): a header that declares a huge picture,
video names that leave --video_folder, frame cache entries and folders that are not what the run
wrote, annotation files that are not UTF-8 JSON, and questions that cannot be answered as asked.
Each is a VideoError or AnnotationError of one line naming the file, the sample or the option, and
a bad video or question is skippable under --on_error=skip. Every clip is a few frames written here
by PyAV at the nano preset's size; the huge GIF is 269 bytes written by hand and never decoded."""

import errno
import json
import os
import re
import struct
from dataclasses import replace

import av
import numpy as np
import pytest
import torch

from checkpoints import run_files
import data
from real_video import video_files
from panda import PandaConfig, VideoPanda
from real_video.video_files import AnnotationError, VideoError

NANO = PandaConfig.preset("nano")  # 4 frames of 32 px, centre-cropped, a context of 256 tokens


def write_clip(path, n_frames=6, height=16, width=64):
    """A small H.264 clip whose frames are uniformly grey, a step lighter each."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for k in range(n_frames):
            picture = np.full((height, width, 3), 20 + 20 * k, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def qa_files(folder, questions):
    """A question file and an answer file in folder for [(question_id, video_name, question)]."""
    (folder / "q.json").write_text(json.dumps([{"question_id": qid, "video_name": name, "question": question}
                                               for qid, name, question in questions]))
    answers = [{"question_id": qid, "answer": "red"} for qid, _, _ in questions]
    (folder / "a.json").write_text(json.dumps(answers))
    return folder / "q.json", folder / "a.json"


def qa_dataset(folder, questions, cfg=NANO, **options):
    return video_files.VideoQADataset(*qa_files(folder, questions), folder, data.build_tokenizer(), cfg, **options)


def policy(items, on_error):
    """What sample.py --eval does with a batch of these items: (the batch, the skip messages)."""
    batch, skipped = video_files.collate_video_batch(items), []
    video_files.apply_error_policy(batch, on_error, skipped)
    return batch, skipped


# --------------------------------------------------------------------------- a memory bomb

def huge_canvas_gif(path, side=16000, n_frames=10):
    """A GIF89a whose logical screen is side x side, holding n_frames frames of one pixel (269 bytes).
    A decoder paints every frame on a canvas of the screen's size: 768 MB of RGB a frame at 16000."""
    screen = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"  # 2 colours
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # shown for 0.1 s
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # a 1x1 image in the corner
             + b"\x02\x02\x44\x01\x00")  # LZW with 3-bit codes: clear, colour 0, end
    path.write_bytes(screen + loop + frame * n_frames + b"\x3b")
    return path


def test_a_huge_declared_picture_is_refused_before_decoding_and_skippable(tmp_path, monkeypatch):
    bomb = huge_canvas_gif(tmp_path / "bomb.gif")
    assert bomb.stat().st_size == 269
    for decoder in ("decode_by_seeking", "decode_in_order"):  # never let a test allocate the canvas
        monkeypatch.setattr(video_files, decoder, lambda *args: pytest.fail("the huge picture was decoded"))
    with pytest.raises(VideoError, match=rf"{re.escape(str(bomb))}: .*16000x16000 picture .*67 Mpx"):
        video_files.read_video(bomb, 4)
    dataset = qa_dataset(tmp_path, [("q0", "bomb.gif", "what color is the circle ?")], on_error="skip")
    batch, skipped = policy([dataset[0]], "skip")
    assert batch["videos"] is None and len(skipped) == 1
    assert "'q0'" in skipped[0] and "16000x16000" in skipped[0]
    # running out of memory while decoding a file is that file's error too, so skip can skip it
    monkeypatch.undo()
    clip = write_clip(tmp_path / "clip.mp4")
    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 5.72 GiB for an array")  # as numpy says it
    monkeypatch.setattr(np, "stack", out_of_memory)
    with pytest.raises(VideoError, match=rf"{re.escape(str(clip))}: out of memory while decoding it"):
        video_files.read_video(clip, 4)


# --------------------------------------------------------------------------- names that leave the folder

@pytest.mark.parametrize("name", ["../outside.mp4", "../outside", "sub/../../outside.mp4", "ABSOLUTE"])
def test_a_video_name_that_leaves_the_video_folder_is_refused(tmp_path, name):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    outside = write_clip(tmp_path / "outside.mp4")
    name = str(outside) if name == "ABSOLUTE" else name
    dataset = qa_dataset(folder, [("q0", name, "what color is the circle ?")])
    with pytest.raises(VideoError) as error:
        policy([dataset[0]], "raise")
    line = str(error.value)
    assert "\n" not in line and f"'q0': video {name!r} leaves the video folder {folder}" in line
    # a symlink the user put inside the folder is theirs to make: it is followed
    (folder / "linked.mp4").symlink_to(outside)
    assert "skipped" not in qa_dataset(folder, [("q0", "linked", "what color is the circle ?")])[0]


# --------------------------------------------------------------------------- the frame cache

def planted(arrays, fault):
    """A frame cache entry's arrays with one thing changed that these settings never write."""
    arrays = dict(arrays)
    if fault == "a box of 3 numbers":
        arrays["video_box"] = arrays["video_box"][:3]
    elif fault == "a box off the canvas":
        arrays["video_box"] = np.array([20, 0, 16, 32])
    elif fault == "a box of floats":
        arrays["video_box"] = arrays["video_box"].astype(np.float64)
    elif fault == "pixels of another shape":
        arrays["video"] = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    elif fault == "float pixels":
        arrays["video"] = arrays["video"].astype(np.float32)
    elif fault == "an extra array":
        arrays["note"] = np.zeros(3)
    return arrays


@pytest.mark.parametrize("fault", ["a box of 3 numbers", "a box off the canvas", "a box of floats",
                                   "pixels of another shape", "float pixels", "an extra array",
                                   "a folder that cannot be written", "a full disk"])
def test_a_frame_cache_entry_or_folder_that_is_not_as_written_is_named(tmp_path, monkeypatch, fault):
    cfg, cache = replace(NANO, letterbox=True), tmp_path / "cache"  # a 16x64 clip: a 16x32 box at the top
    questions = [("q0", "clip.mp4", "what color is the circle ?")]
    write_clip(tmp_path / "clip.mp4")
    decoded = qa_dataset(tmp_path, questions, cfg)[0]["video"]
    if fault == "a folder that cannot be written":
        cache.write_text("a file where the folder should be")
        with pytest.raises(ValueError, match=rf"^--frame_cache={re.escape(str(cache))}: cannot write there"):
            qa_dataset(tmp_path, questions, cfg, frame_cache=str(cache))
        return
    dataset = qa_dataset(tmp_path, questions, cfg, frame_cache=str(cache))
    entry, _ = dataset.cache.entry(tmp_path / "clip.mp4")
    if fault == "a full disk":
        def disk_full(path, write):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        monkeypatch.setattr(run_files, "write_atomically", disk_full)
        message = (rf"{re.escape(str(entry))}: cannot write .*No space left"
                   rf".*--frame_cache={re.escape(str(cache))} ")
    else:
        dataset[0]  # writes the entry
        with np.load(entry) as saved:
            arrays = dict(saved)
        np.savez(entry, **planted(arrays, fault))
        message = rf"{re.escape(str(entry))}: unreadable frame cache entry .* written again"
    with pytest.warns(UserWarning, match=message):
        item = dataset[0]
    assert torch.equal(item["video"], decoded)  # the decoded frames, never the planted ones


# --------------------------------------------------------------------------- annotation files

GOOD_QUESTIONS = b'[{"question_id": "q0", "video_name": "clip", "question": "what color is the circle ?"}]'
GOOD_ANSWERS = b'[{"question_id": "q0", "answer": "red"}]'


@pytest.mark.parametrize("which", ["q.json", "a.json", "instructions.json"])
@pytest.mark.parametrize("content, problem", [
    (b'[{"question_id": "q0", "answer": "caf\xe9"}]', r"not UTF-8 text: the byte at offset 37 \(0xe9\)"),
    (b'[{"question_id": "q0",}]', r"cannot read the annotation file: .* line 1 column 23"),
    (b"[" * 100_000, r"cannot read the annotation file: maximum recursion depth"),
])
def test_an_annotation_file_that_is_not_utf8_json_is_one_line_naming_it(tmp_path, which, content, problem):
    (tmp_path / "q.json").write_bytes(GOOD_QUESTIONS)
    (tmp_path / "a.json").write_bytes(GOOD_ANSWERS)
    (tmp_path / which).write_bytes(content)
    tokenizer = data.build_tokenizer()
    with pytest.raises(AnnotationError) as error:
        if which == "instructions.json":
            video_files.VideoInstructionDataset(tmp_path / which, tmp_path, tokenizer, NANO)
        else:
            video_files.VideoQADataset(tmp_path / "q.json", tmp_path / "a.json", tmp_path, tokenizer, NANO)
    line = str(error.value)
    assert "\n" not in line and re.match(rf"{re.escape(str(tmp_path / which))}: {problem}", line), line


# --------------------------------------------------------------------------- questions under --eval

def test_a_question_that_cannot_be_answered_as_asked_is_its_own_error(tmp_path):
    write_clip(tmp_path / "clip.mp4")
    questions = [("q0", "clip", "what color is the circle ?"), ("q1", "clip", "what colour is the circle ?"),
                 ("q2", "clip", "what color is the " + "red " * 300 + "circle ?"),
                 ("q3", "clip", "how many objects are there ?")]
    model = VideoPanda(NANO).eval()
    n_text = len(qa_dataset(tmp_path, questions[:1])[0]["input_ids"]) - 1  # less the video placeholder
    room = NANO.max_seq_len - n_text - NANO.n_frames * NANO.tokens_per_frame  # what q0 leaves for the answer
    dataset = qa_dataset(tmp_path, questions, on_error="skip", max_new_tokens=room)
    batch, skipped = policy([dataset[k] for k in range(4)], "skip")
    assert batch["id"] == ["q0", "q3"] and [qid for qid, _ in batch["skipped"]] == ["q1", "q2"]
    assert re.search(r"'q1'.*\['colour'\].*<unk>", skipped[0])
    assert re.search(r"'q2'.* visual tokens \+ --max_new_tokens=\d+ exceed .*max_seq_len=256", skipped[1])
    with pytest.raises(VideoError, match=r"'q1'.*colour"):
        policy([dataset[1]], "raise")
    # the visual count is the STAB's own for a full frame, so the bound is exact: q0 fills the context
    item = dataset[0]
    answer = model.generate(item["video"][None], torch.tensor([item["input_ids"]]), max_new_tokens=room)
    assert answer.shape == (1, room)
    over = qa_dataset(tmp_path, questions[:1], max_new_tokens=room + 1)[0]
    assert "'q0'" in over["skipped"] and "exceed" in over["skipped"]
