"""sample.py with files and options someone hands it: every mistake is one line naming the file or
the option, nothing it did not make is touched, and what was answered is kept. A nano model trained
for one step answers a QA file of three questions about a tiny clip written here."""

import errno
import json
import os
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from tools import cli

from checkpoints import run_files
import data
import panda
import sample
import train
from checkpoints import checkpoint_dirs

GOOD = [{"question_id": "q1", "video_name": "clip.mp4", "question": "what color is the circle?"},
        {"question_id": "q2", "video_name": "clip.mp4", "question": "how many objects are there?"},
        {"question_id": "q3", "video_name": "clip.mp4", "question": "where is the red square?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An out_dir with a nano checkpoint after one step and its tokenizer, and videos/clip.mp4."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "evaluate", lambda *args, **kwargs: {"all": 0.0})  # tested here instead
        train.main(["--preset=nano", "--device=cpu", "--max_steps=1", "--batch_size=2",
                    "--warmup_steps=1", "--eval_samples=1", "--questions_per_clip=1", f"--out_dir={out}"])
    frames = np.full((8, 32, 32, 3), 60, dtype=np.uint8)
    frames[:, 8:16, 8:16] = (255, 0, 0)
    (out / "videos").mkdir()
    iio.imwrite(out / "videos" / "clip.mp4", frames, plugin="pyav", fps=4, codec="libx264",
                out_pixel_format="yuv420p")
    return out


def qa_args(run, folder, questions=GOOD):
    """The --eval options for these questions (every answer "red"), their files put in folder."""
    (folder / "q.json").write_text(json.dumps(questions))
    (folder / "a.json").write_text(json.dumps([{"question_id": q["question_id"], "answer": "red"}
                                               for q in questions]))
    return [f"--out_dir={run}", f"--eval={folder / 'q.json'}", f"--answers={folder / 'a.json'}",
            f"--video_folder={run / 'videos'}", "--num_workers=0", "--max_new_tokens=2",
            "--device=cpu"]


def exit_of(args):
    """sample.py's main as its command line runs it (cli.run): its exit status, or its line."""
    with pytest.raises(SystemExit) as stop:
        cli.run(sample.main, args)
    return stop.value.code


def one_line_error(args):
    line = exit_of(args)
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line  # status 1
    return line


def snapshot(*folders):
    return {p: p.read_bytes() for folder in folders for p in Path(folder).rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- files lost or touched

@pytest.mark.parametrize("case", ["a file named like a check", "tokenizer.json", "ckpt.pt", "a video",
                                  "an existing file", "--viz over the video"])
def test_no_file_the_run_did_not_make_is_touched(case, run, tmp_path):
    """--pred_out (and --viz) never replace the model's files, an input, a video or, without
    --overwrite=true, an earlier file; checking that --pred_out can be written writes nothing."""
    args, user_file = qa_args(run, tmp_path), tmp_path / "preds.json.check"
    user_file.write_text("a file of the user's")
    before = snapshot(run, tmp_path)
    if case == "a file named like a check":
        sample.main(args + [f"--pred_out={tmp_path / 'preds.json'}"])
        assert len(json.loads((tmp_path / "preds.json").read_text())) == 3
        written = {tmp_path / "preds.json": (tmp_path / "preds.json").read_bytes()}
        assert snapshot(run, tmp_path) == before | written
        return
    if case == "--viz over the video":
        shutil.copy(run / "videos" / "clip.mp4", tmp_path / "clip.mp4")  # the user's video
        before = snapshot(run, tmp_path)
        args = [f"--out_dir={run}", f"--video={tmp_path / 'clip.mp4'}", f"--viz={tmp_path / 'clip.mp4'}",
                "--question=what color is the circle?", "--device=cpu"]
        target, expected = tmp_path / "clip.mp4", "is one of the input files"
    else:
        target, expected = {"tokenizer.json": (run / "tokenizer.json", "is one of the input files"),
                            "ckpt.pt": (run / "ckpt.pt", "is one of the input files"),
                            "a video": (run / "videos" / "clip.mp4", "inside --video_folder"),
                            "an existing file": (user_file, "exists; --overwrite=true replaces it")}[case]
        args += [f"--pred_out={target}"] + (["--overwrite=true"] if case != "an existing file" else [])
    line = one_line_error(args)
    assert f"={target} " in line and expected in line
    assert snapshot(run, tmp_path) == before


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("option, expected", [
    ("--temperature=nan", "--temperature must be zero or more, got nan"),
    ("--temperature=-1", "--temperature must be zero or more, got -1"),
    ("--top_k=-5", "--top_k must be zero or more"),
    ("--max_new_tokens=-3", "--max_new_tokens must be positive"),
    ("--max_new_tokens=0", "--max_new_tokens must be positive"),
    ("--batch_size=0", "--batch_size must be positive"),
    ("--num_workers=-1", "--num_workers must be zero or more"),
    ("--viz_frame=-1", "--viz_frame must be zero or more"),
    ("--on_error=ignore", "--on_error must be one of raise, skip"),
    ("--template=chatml", "--template must be one of auto, synthetic"),
    ("--max_new_tokens=1000000000", "max_new_tokens=1000000000 exceeds the context"),
])
def test_an_impossible_option_is_one_line_naming_it_and_takes_no_memory(option, expected, run,
                                                                        monkeypatch):
    cache = panda.KVCache

    def bounded_cache(cfg, batch, slots, dtype, device):  # never asked for more than the context
        assert slots <= cfg.max_seq_len, f"a KV cache of {slots} slots"
        return cache(cfg, batch, slots, dtype, device)
    monkeypatch.setattr(panda, "KVCache", bounded_cache)
    line = one_line_error([f"--out_dir={run}", "--video=synthetic:1", "--device=cpu", option])
    assert expected in line


# --------------------------------------------------------------------------- checkpoint contents

@pytest.mark.parametrize("case", ["template", "tokenizer", "tokenizer of a directory"])
def test_checkpoint_contents_that_would_change_the_answer_are_refused(case, run, tmp_path):
    """A template the script does not know would be swapped for another prompt; a tokenizer with ids
    past the embedding belongs to another model."""
    state = run_files.load_checkpoint(run / "ckpt.pt")
    tokenizer = run_files.read_tokenizer(run / "tokenizer.json")
    if case != "template":
        tokenizer.add_tokens([f"word{i}" for i in range(state["model_config"]["vocab_size"])])
    if case == "tokenizer of a directory":
        model = run_files.build_model(state, run / "ckpt.pt", "cpu")
        checkpoint_dirs.save_pretrained(model, run_files.read_tokenizer(run / "tokenizer.json"), tmp_path / "export")
        tokenizer.save(str(tmp_path / "export" / "tokenizer.json"))  # then another model's beside it
        args = [f"--init_from={tmp_path / 'export'}"]
        file, expected = tmp_path / "export" / "tokenizer.json", "token ids go up to"
    else:
        changed = {"template": "chatml"} if case == "template" else {}
        run_files.save_checkpoint(tmp_path / "ckpt.pt", state | changed)
        tokenizer.save(str(tmp_path / "tokenizer.json"))
        args = [f"--out_dir={tmp_path}"]
        file, expected = {"template": (tmp_path / "ckpt.pt", "its template 'chatml' is none of"),
                          "tokenizer": (tmp_path / "tokenizer.json", "token ids go up to")}[case]
    line = one_line_error(args + ["--video=synthetic:1", "--device=cpu"])
    assert str(file) in line and expected in line


# --------------------------------------------------------------------------- Ctrl-C and a full disk

def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("trouble", ["Ctrl-C", "a full disk", "a full disk, --viz"])
def test_ctrl_c_keeps_the_answers_so_far_and_a_full_disk_leaves_no_half_file(trouble, run, tmp_path,
                                                                           monkeypatch, capsys):
    """Ctrl-C in the second batch: the first batch's answer is written, said to be partial, exit 130.
    The disk fills while answering: one line naming --pred_out and why, and no half of the file; or
    while drawing --viz: one line naming the picture, and no half of one."""
    if trouble == "a full disk, --viz":
        monkeypatch.setattr(os, "fsync", no_space)
        line = one_line_error([f"--out_dir={run}", "--video=synthetic:1", "--device=cpu",
                               f"--viz={tmp_path / 'a.png'}"])
        assert line == f"error: {tmp_path / 'a.png'} could not be written: No space left on device"
        assert list(tmp_path.iterdir()) == []
        return
    pred_out, generate, calls = tmp_path / "preds.json", panda.VideoPanda.generate, []

    def troubled(model, *args, **kwargs):
        calls.append(1)
        if trouble == "Ctrl-C" and len(calls) == 2:
            raise KeyboardInterrupt
        if trouble == "a full disk":  # from now on every file fails as it is flushed to the disk
            monkeypatch.setattr(os, "fsync", no_space)
        return generate(model, *args, **kwargs)
    monkeypatch.setattr(panda.VideoPanda, "generate", troubled)
    status = exit_of(qa_args(run, tmp_path) + [f"--pred_out={pred_out}", "--batch_size=1"])
    if trouble == "Ctrl-C":
        assert status == 130
        err = capsys.readouterr().err
        assert f"interrupted (Ctrl-C): 1 of 3 questions answered; this partial set is in {pred_out}" in err
        assert [r["id"] for r in json.loads(pred_out.read_text())] == ["q1"]
    else:
        assert status.startswith(f"error: --pred_out={pred_out} could not be written: No space left")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "q.json"]


# --------------------------------------------------------------------------- one question's problems

@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_a_question_too_long_or_in_unknown_words_is_that_questions_own_error(on_error, run, tmp_path,
                                                                            capsys):
    """Under skip it is named and counted and the other answers are kept; under raise, one line
    naming the question. q2's prompt fits the context, but not with 100 new tokens after it."""
    questions = [GOOD[0], {**GOOD[1], "question": "what color is the circle " * 30 + "?"},
                 {**GOOD[2], "question": "what colour is the circle?"}]  # "colour": not the task's word
    args = qa_args(run, tmp_path, questions) + [f"--pred_out={tmp_path / 'p.jsonl'}",
                                                "--max_new_tokens=100", f"--on_error={on_error}"]
    if on_error == "raise":
        assert "'q2'" in one_line_error(args)
        return
    sample.main(args)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q1"]
    out = capsys.readouterr().out
    assert "1 questions answered, 2 skipped" in out and "'q2'" in out and "'q3'" in out
