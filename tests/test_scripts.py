"""train.py and sample.py end to end, in process and small: the nano preset trained for two steps,
video files written by the tests (a square of colour moving across the frame), and a tiny random
Hugging Face Llama with a word-level tokenizer as the pretrained decoder."""

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tools import cli

from checkpoints import run_files
import data
import sample
import train
from real_video import video_files
from checkpoints import checkpoint_dirs
from checkpoints import random_export

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"

# Small settings for every synthetic run: two steps, a handful of evaluation questions.
NANO = ["--preset=nano", "--device=cpu", "--max_steps=2", "--batch_size=4", "--grad_accum=1", "--warmup_steps=1",
        "--eval_every=1000", "--save_every=1000", "--eval_samples=4", "--questions_per_clip=1"]


def write_moving_clip(path, color=(255, 0, 0), n_frames=12, height=48, width=64):
    """A square of one colour sliding left to right over grey, as an H.264 mp4."""
    frames = np.full((n_frames, height, width, 3), 60, dtype=np.uint8)
    for t in range(n_frames):
        x = t * (width - 16) // (n_frames - 1)
        frames[t, 16:32, x:x + 16] = color
    iio.imwrite(path, frames, plugin="pyav", fps=6, codec="libx264", out_pixel_format="yuv420p")
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_moving_clip(folder / "red.mp4", (255, 0, 0))
    write_moving_clip(folder / "blue.mp4", (0, 0, 255))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    return folder


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The out_dir of a nano model trained for two steps on the synthetic task."""
    out = tmp_path_factory.mktemp("synthetic")
    train.main(NANO + [f"--out_dir={out}"])
    return out


# --------------------------------------------------------------------------- sample.py, one video

def test_sample_answers_a_video_file(synthetic_run, videos, capsys):
    sample.main([f"--out_dir={synthetic_run}", f"--video={videos / 'red.mp4'}", "--question=what color is the square?",
                 "--max_new_tokens=4", "--device=cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert "Q: what color is the square?" in lines
    assert lines[-1].startswith("A:")


def test_sample_answers_a_real_clip(synthetic_run, capsys):
    clip = VIDEOS / "newtonscradle.gif"
    if not clip.is_file():
        pytest.skip(f"real test clips not found in {VIDEOS}")
    sample.main([f"--out_dir={synthetic_run}", f"--video={clip}", "--question=how many objects are there?", "--max_new_tokens=2",
                 "--device=cpu"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("A:")


def test_sample_on_a_synthetic_clip_shows_the_expected_answer(synthetic_run, capsys):
    sample.main([f"--out_dir={synthetic_run}", "--video=synthetic:3", "--max_new_tokens=4", "--device=cpu"])
    out = capsys.readouterr().out
    assert "(expected answer: " in out and out.splitlines()[-1].startswith("A:")


def test_corrupt_video_exits_with_one_line_naming_the_file(synthetic_run, videos):
    """The real command line, in a subprocess: exit status 1 and one line, no traceback."""
    broken = videos / "broken.mp4"
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={synthetic_run}", f"--video={broken}",
                             "--question=how many objects are there?", "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(broken) in lines[0], result.stderr


def test_missing_video_and_missing_question_are_clean_errors(synthetic_run, videos):
    with pytest.raises(SystemExit, match=r"error: .*nowhere\.mp4: no such file"):
        cli.run(sample.main, [f"--out_dir={synthetic_run}", "--video=nowhere.mp4", "--question=q", "--device=cpu"])
    with pytest.raises(SystemExit, match="--question is required"):
        cli.run(sample.main, [f"--out_dir={synthetic_run}", f"--video={videos / 'red.mp4'}", "--device=cpu"])


def test_synthetic_run_resumes_exactly(synthetic_run, tmp_path):
    """Two steps, or one step and a resumed one: the same weights, bit for bit (the stream is index-based)."""
    train.main(NANO + ["--max_steps=1", f"--out_dir={tmp_path}"])
    train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_steps=2"])
    whole = run_files.load_checkpoint(synthetic_run / "ckpt.pt")
    parts = run_files.load_checkpoint(tmp_path / "ckpt.pt")
    assert parts["data_place"] == whole["data_place"] == [8]
    assert all(torch.equal(whole["model"][name], parts["model"][name]) for name in whole["model"])


def test_sample_asks_in_the_words_the_model_was_trained_on():
    tokenizer, stream = data.build_tokenizer(), data.SyntheticQA(data.build_tokenizer())
    for index in range(20):
        item = stream[index]  # what training saw: the clip's first question, its answer, more turns
        question, ids, labels = item["sample"].question, item["input_ids"], item["labels"]
        prompt = sample.prompt_ids(tokenizer, data.SYNTHETIC, question)
        assert ids[:len(prompt)] == prompt and set(labels[:len(prompt)]) == {data.IGNORE_INDEX}


# --------------------------------------------------------------------------- sample.py, a QA set

def write_qa_files(folder, videos):
    questions = [{"question_id": "q1", "video_name": "red", "question": "what color is the square?"},
                 {"question_id": "q2", "video_name": "blue.mp4", "question": "which way does the square move?"},
                 {"question_id": 3, "video_name": "red.mp4", "question": "how many objects are there?"},
                 {"question_id": "q4", "video_name": "ghost", "question": "what color is the circle?"}]  # no such video
    answers = [{"question_id": "q1", "answer": "red"}, {"question_id": "q2", "answer": "right"},
               {"question_id": 3, "answer": "one"}, {"question_id": "q4", "answer": "nothing"}]
    (folder / "q.json").write_text(json.dumps(questions))
    (folder / "a.json").write_text(json.dumps(answers))
    return ["--eval=" + str(folder / "q.json"), "--answers=" + str(folder / "a.json"), f"--video_folder={videos}"]


@pytest.mark.parametrize("name", ["preds.json", "preds.jsonl"])
def test_eval_writes_predictions_and_prints_both_accuracies(name, synthetic_run, videos, tmp_path, capsys):
    pred_out = tmp_path / name
    sample.main([f"--out_dir={synthetic_run}", f"--pred_out={pred_out}", "--batch_size=2", "--num_workers=1",
                 "--max_new_tokens=3", "--on_error=skip", "--device=cpu"] + write_qa_files(tmp_path, videos))
    text = pred_out.read_text()
    records = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2", "3"]
    assert all(set(r) == {"id", "video", "question", "answer", "pred"} for r in records)
    assert [r["answer"] for r in records] == ["red", "right", "one"]
    assert all(isinstance(r["pred"], str) for r in records)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed into place
    out = capsys.readouterr().out
    assert "3 questions answered, 1 skipped" in out and "skipped sample 'q4': video 'ghost'" in out
    assert "exact match: " in out and "contains the answer: " in out


def test_eval_that_answers_nothing_fails_and_leaves_the_predictions_file_as_it_was(synthetic_run, videos, tmp_path):
    pred_out = tmp_path / "preds.json"
    pred_out.write_text("[{\"a good\": \"earlier result\"}]")
    args = write_qa_files(tmp_path, videos)
    with pytest.raises(SystemExit, match="error: .*not one of its 4 questions could be answered .*is left as it was"):
        cli.run(sample.main, [f"--out_dir={synthetic_run}", f"--pred_out={pred_out}", "--on_error=skip",
                                 "--overwrite=true", "--num_workers=0", "--device=cpu", *args[:2],
                                 f"--video_folder={videos / 'none'}"])
    assert pred_out.read_text() == "[{\"a good\": \"earlier result\"}]"


@pytest.mark.parametrize("bad", ["empty", "the question file", "a directory", "under a file"])
def test_eval_refuses_bad_inputs_before_answering_anything(bad, synthetic_run, videos, tmp_path):
    args = write_qa_files(tmp_path, videos)
    pred_out = {"empty": tmp_path / "p.json", "the question file": tmp_path / "q.json",
                "a directory": tmp_path, "under a file": tmp_path / "q.json" / "p.json"}[bad]
    if bad == "empty":
        (tmp_path / "q.json").write_text("[]")
    before = (tmp_path / "q.json").read_text()
    expected = {"empty": "no questions to answer", "the question file": "is one of the input files",
                "a directory": "is a directory", "under a file": "cannot be written"}[bad]
    with pytest.raises(SystemExit, match=expected):
        cli.run(sample.main, [f"--out_dir={synthetic_run}", f"--pred_out={pred_out}", "--num_workers=0",
                                 "--device=cpu", *args])
    assert (tmp_path / "q.json").read_text() == before


def test_eval_on_error_raise_names_the_missing_video(synthetic_run, videos, tmp_path):
    with pytest.raises(SystemExit, match=r"error: sample 'q4': video 'ghost' resolves to no file"):
        cli.run(sample.main, [f"--out_dir={synthetic_run}", f"--pred_out={tmp_path / 'p.json'}", "--batch_size=4",
                    "--num_workers=0", "--max_new_tokens=2", "--device=cpu"] + write_qa_files(tmp_path, videos))
    assert not (tmp_path / "p.json").exists()  # no predictions are written for a run that stopped


# --------------------------------------------------------------------------- a tiny pretrained LLM

def instruction_entries():
    """Video-ChatGPT instruction entries over the test videos; "ghost" names a video that does not exist."""
    def entry(sample_id, video, question, answer):
        return {"id": sample_id, "video": video, "conversations": [
            {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}
    return [entry("v1", "red.mp4", "What color is the square?", "It is red."),
            entry("v2", "blue", "Which way does the square move?", "It moves to the right."),
            entry("ghost", "ghost.mp4", "What happens?", "Nothing.")]


def word_tokenizer(texts):
    """A WordLevel tokenizer over the words of texts, with Llama's special tokens."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 2-layer Llama of width 64, written by transformers, with a tokenizer.json beside it."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-llama")
    texts = [video_files.VICUNA_V1.system, video_files.VIDEOPANDA_V1.system, "USER: ASSISTANT:"]
    texts += [turn["value"] for e in instruction_entries() for turn in e["conversations"]]
    tokenizer = word_tokenizer(texts)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      max_position_embeddings=512)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def instructions(tmp_path, videos):
    annotation = tmp_path / "instructions.json"
    annotation.write_text(json.dumps(instruction_entries()))
    return [f"--data={annotation}", f"--video_folder={videos}"]


SEED = 1337


def pretrained_run(llm, out, *options):
    """train.py on the tiny LLM: a nano STAB (letterboxed, so the mask channel is exercised too)."""
    train.main([f"--init_from={llm}", "--preset=nano", "--letterbox=true", "--device=cpu", "--batch_size=2",
                "--grad_accum=1", "--max_steps=2", "--num_workers=0", "--save_every=1000", "--eval_every=1",
                f"--seed={SEED}", f"--out_dir={out}", *options])
    return run_files.load_checkpoint(out / "ckpt.pt")


def initial_model(llm):
    """The model train.py starts from: it seeds with --seed before making the fresh STAB."""
    torch.manual_seed(SEED)
    model, _ = checkpoint_dirs.from_pretrained(llm, dtype=torch.float32, preset="nano", letterbox=True)
    return model.state_dict()


def part(state, prefix):
    return {name: tensor for name, tensor in state.items() if name.startswith(prefix)}


def changed(before, after):
    return [name for name in before if not torch.equal(before[name], after[name])]


def test_prealign_freezes_the_decoder_bit_for_bit_and_trains_the_stab(tiny_llm, instructions, tmp_path):
    ckpt = pretrained_run(tiny_llm, tmp_path / "out", "--stage=prealign", "--on_error=skip", *instructions)
    before, after = initial_model(tiny_llm), ckpt["model"]
    assert not changed(part(before, "decoder."), part(after, "decoder."))
    assert changed(part(before, "stab."), part(after, "stab.")) and changed(part(before, "projector."), after)
    assert ckpt["train_config"]["lr_stab"] == train.STAGES["prealign"]["lr_stab"]
    assert ckpt["template"] == "vicuna_v1" and ckpt["model_config"]["letterbox"]


def test_pretrain_trains_decoder_and_stab_and_exports(tiny_llm, instructions, tmp_path, videos, capsys):
    export = tmp_path / "export"
    ckpt = pretrained_run(tiny_llm, tmp_path / "out", "--stage=pretrain", "--on_error=skip", f"--export={export}",
                          "--grad_checkpoint=true", *instructions)
    before, after = initial_model(tiny_llm), ckpt["model"]
    assert changed(part(before, "decoder."), part(after, "decoder."))
    assert changed(part(before, "stab."), part(after, "stab."))
    # the export answers a question about a video, in the release's evaluation prompt
    capsys.readouterr()
    sample.main([f"--init_from={export}", f"--video={videos / 'blue.mp4'}", "--question=What happens?",
                 "--max_new_tokens=3", "--device=cpu"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("A:")


def test_real_data_on_error_raise_names_the_missing_video(tiny_llm, instructions, tmp_path):
    with pytest.raises(ValueError, match=r"sample 'ghost': video 'ghost\.mp4' resolves to no file"):
        pretrained_run(tiny_llm, tmp_path / "out", "--stage=prealign", "--batch_size=3", "--max_steps=1",
                       *instructions)


def test_real_data_on_error_skip_logs_and_counts_the_skipped_sample(tiny_llm, instructions, tmp_path, capsys):
    ckpt = pretrained_run(tiny_llm, tmp_path / "out", "--stage=prealign", "--on_error=skip", "--num_workers=1",
                          *instructions)
    out = capsys.readouterr().out
    assert "skipped sample 'ghost': video 'ghost.mp4' resolves to no file" in out  # logged when it happens
    assert "skipped 1 time(s), 1 distinct sample(s) with unusable videos" in out  # and counted at the end
    assert ckpt["skipped"] == [next(line for line in out.splitlines() if "ghost" in line).removeprefix("skipped ")]
    assert ckpt["step"] == 2


def test_real_data_resumes_at_its_epoch_and_position(tiny_llm, instructions, tmp_path):
    """Two steps in one go and one step plus one resumed end at the same place in the seeded order, and,
    with no worker processes (flips from the checkpointed RNG), at the same weights."""
    whole = pretrained_run(tiny_llm, tmp_path / "whole", "--stage=prealign", "--on_error=skip", *instructions)
    pretrained_run(tiny_llm, tmp_path / "parts", "--stage=prealign", "--on_error=skip", "--max_steps=1",
                   *instructions)
    train.main([f"--out_dir={tmp_path / 'parts'}", "--init_from=resume", "--max_steps=2"])
    parts = run_files.load_checkpoint(tmp_path / "parts" / "ckpt.pt")
    assert parts["data_place"] == whole["data_place"]
    assert not changed(whole["model"], parts["model"])


@pytest.mark.parametrize("options, message", [
    (["--init_from={llm}"], "a pretrained decoder trains on real data"),
    (["--data=x.json", "--video_folder=."], "--data needs a pretrained decoder"),
    (["--init_from={llm}", "--stage=warmup", "--data=x.json"], "--stage must be one of"),
])
def test_unsupported_combinations_say_what_to_do(options, message, tiny_llm, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.main([option.format(llm=tiny_llm) for option in options] + NANO + [f"--out_dir={tmp_path}"])


# --------------------------------------------------------------------------- random_export.py

@pytest.mark.skipif(not VIDEOS.is_dir(), reason="needs ../shared/data/videos")
def test_random_export_trains_on_its_own_instructions(tmp_path, capsys):
    export, out = tmp_path / "random", tmp_path / "out"
    random_export.main([f"--out={export}", f"--videos={VIDEOS}", "--preset=nano", "--vocab_size=512",
                        "--letterbox=true", "--samples=4", "--device=cpu"])
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    entries = json.loads((export / "instructions.json").read_text())
    assert len(entries) == 4 and all((VIDEOS / e["video"]).is_file() for e in entries)
    train.main([f"--init_from={export}", "--stage=pretrain", f"--data={export / 'instructions.json'}",
                f"--video_folder={VIDEOS}", "--device=cpu", "--batch_size=2", "--max_steps=1", "--num_workers=0",
                "--save_every=0", f"--out_dir={out}"])
    assert "no checkpoint (--save_every=0)" in capsys.readouterr().out
    assert not (out / "ckpt.pt").exists()


@pytest.mark.skipif(not VIDEOS.is_dir(), reason="needs ../shared/data/videos")
def test_a_tokenizer_larger_than_the_embedding_is_an_error(tmp_path):
    export = tmp_path / "random"
    random_export.main([f"--out={export}", f"--videos={VIDEOS}", "--preset=nano", "--vocab_size=512", "--device=cpu"])
    word_tokenizer([f"word{i}" for i in range(600)]).save(str(export / "tokenizer.json"))
    with pytest.raises(ValueError, match="its token ids go up to 602, but the model's embedding has 512 rows"):
        train.main([f"--init_from={export}", "--stage=pretrain", f"--data={export / 'instructions.json'}",
                    f"--video_folder={VIDEOS}", "--device=cpu", f"--out_dir={tmp_path / 'out'}"])


def test_random_export_needs_a_folder_of_videos(tmp_path):
    with pytest.raises(ValueError, match="expected a folder with video files"):
        random_export.main([f"--out={tmp_path / 'random'}", f"--videos={tmp_path}", "--preset=nano"])


def test_the_synthetic_run_needs_none_of_the_real_video_or_checkpoint_packages(tmp_path):
    """train.py and sample.py on the synthetic task with PyAV, Pillow, imageio and safetensors made
    unimportable: the tiny run needs only torch, numpy, tokenizers and tqdm."""
    block = ("import sys\nfor name in ('av', 'PIL', 'imageio', 'safetensors'):\n    sys.modules[name] = None\n"
             "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    for script, options in (("train.py", NANO + [f"--out_dir={tmp_path}"]),
                            ("sample.py", [f"--out_dir={tmp_path}", "--video=synthetic:2", "--max_new_tokens=2",
                                           "--device=cpu"])):
        result = subprocess.run([sys.executable, "-c", block, script, *options], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


def test_real_data_distils_from_a_vit_teacher_and_resumes(tiny_llm, instructions, tmp_path, capsys):
    """--teacher=DIR: a CLIP vision checkpoint (here tiny and random: 28-px frames in 14-px patches, the
    nano student's 2x2 grid) distils in the prealign stage on letterboxed real clips; the head is saved
    and the run resumes. Without real data, --teacher is an error that says so."""
    transformers = pytest.importorskip("transformers")
    teacher = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
        image_size=28)).save_pretrained(teacher)
    out = tmp_path / "out"
    ckpt = pretrained_run(tiny_llm, out, "--stage=prealign", "--on_error=skip", f"--teacher={teacher}", *instructions)
    assert ckpt["train_config"]["distill"] == "vit" and ckpt["distill_head"]["input_layer.weight"].shape == (32, 64)
    assert f"distillation vit ({teacher})" in capsys.readouterr().out
    train.main([f"--out_dir={out}", "--init_from=resume", "--max_steps=3"])
    assert run_files.load_checkpoint(out / "ckpt.pt")["step"] == 3
    with pytest.raises(ValueError, match="--teacher=DIR is the ViT that distils on real data"):
        train.main(NANO + [f"--teacher={teacher}", f"--out_dir={tmp_path / 'synthetic'}"])
