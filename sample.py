"""Ask a trained Video-Panda about a video; the answer streams token by token through the KV cache.

    python sample.py --video=synthetic:7       # a held-out synthetic clip and its question
    python sample.py --video=clip.mp4 --question="what moves?"  # mp4/webm/mkv/avi/mov/gif (PyAV)
    python sample.py --init_from=DIR --video=clip.mp4 --question="..."  # a checkpoint directory
    python sample.py --video=synthetic:7 --viz=attention.gif  # and what LSD, FSRA, GSTRA attend to

--init_from=DIR reads a checkpoint directory (checkpoints/checkpoint_dirs.py). A whole zero-shot QA
set in Video-ChatGPT's question and answer files (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA),
answered greedily in batches:

    python sample.py --init_from=DIR --eval=test_q.json --answers=test_a.json --video_folder=videos/

writes --pred_out: a JSON list of {"id", "video", "question", "answer", "pred"}, or with a .jsonl
name one such object per line, the file the release's GPT judge (eval_video_qa.py) reads; then
prints exact-match and contains-answer accuracy, quick checks beside that judge's. Ctrl-C stops
answering and writes the answers so far; an existing --pred_out is replaced only with
--overwrite=true.

The prompt: a model trained on the synthetic task is asked in that task's own words; pretrained
directories and models trained on instruction data get the release's evaluation prompt
(videopanda_v1); --template overrides. Greedy by default; --temperature, --top_k and --seed sample.
"""

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tools import cli

from checkpoints import run_files
import data


TEMPLATES = ("synthetic", "vicuna_v1", "videopanda_v1")  # the prompt formats a question is asked in


@dataclass
class SampleConfig:
    out_dir: str = "out"        # where train.py left ckpt.pt and tokenizer.json
    init_from: str = "resume"   # resume (out_dir/ckpt.pt) or a checkpoint directory
    video: str = "synthetic:0"  # a video file, or synthetic:N for held-out synthetic clip number N
    question: str = ""          # for synthetic clips, empty means the clip's own question
    template: str = "auto"      # auto | synthetic | vicuna_v1 | videopanda_v1 (see the top)
    max_new_tokens: int = 32    # the longest answer
    temperature: float = 0.0    # 0 = greedy
    top_k: int = 0              # 0 = no top-k filtering
    seed: int = 1337            # for sampling (temperature > 0)
    device: str = "auto"        # auto: cuda, then mps, then cpu
    viz: str = ""               # also draw LSD's, FSRA's and GSTRA's attention here (.gif or .png)
    viz_frame: int = 0          # the frame a .png shows (a .gif shows them all)
    # a zero-shot QA set instead of one video
    eval: str = ""              # the questions: [{"question_id", "video_name", "question"}, ...]
    answers: str = ""           # the answers: [{"question_id", "answer"}, ...]
    video_folder: str = ""      # where the video names are looked up
    pred_out: str = "preds.json"  # the predictions (.json, or .jsonl for one per line)
    batch_size: int = 8         # videos answered together
    num_workers: int = 2        # DataLoader processes decoding videos while the model answers
    on_error: str = "raise"     # an unusable video or question: raise (stop) | skip (and go on)
    overwrite: bool = False     # replace an existing --pred_out or --viz, never an input or a model

    def __post_init__(self):  # every option checked as it is parsed, before a model is loaded
        cli.require_ranges(self, positive=("max_new_tokens", "batch_size"),
                           non_negative=("temperature", "top_k", "num_workers", "viz_frame"),
                           choices={"template": ("auto", *TEMPLATES),
                                    "on_error": ("raise", "skip")})


def load(options, device):
    """The model (in eval mode), its tokenizer and the name of the template its questions are asked
    in."""
    if options.init_from == "resume":
        out = Path(options.out_dir)
        path = out / "ckpt.pt"
        if not path.exists() and (out / "ckpt_dcp").exists():
            raise FileNotFoundError(f"{options.out_dir} holds a sharded --fsdp checkpoint, which "
                                    f"sample.py cannot read: answer with the run's --export "
                                    f"directory (--init_from=DIR)")
        ckpt = run_files.load_checkpoint(path, device)
        trained_on = ckpt.get("template")
        if trained_on not in TEMPLATES:  # asked in another format, it would answer another question
            raise run_files.CheckpointError(f"{path}: its template {trained_on!r} is none of "
                                            f"{', '.join(TEMPLATES)}")
        model = run_files.build_model(ckpt, path, device)
        tokenizer_file = out / "tokenizer.json"
        tokenizer = run_files.read_tokenizer(tokenizer_file)
    else:
        from checkpoints import checkpoint_dirs
        model, tokenizer = checkpoint_dirs.from_pretrained(options.init_from, device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"{options.init_from} has no tokenizer.json "
                                    f"(checkpoint_dirs.from_pretrained's docstring says how to "
                                    f"make one)")
        tokenizer_file, trained_on = Path(options.init_from) / "tokenizer.json", "vicuna_v1"
    run_files.check_tokenizer(tokenizer, model.cfg.vocab_size, tokenizer_file)
    # The release trains with vicuna_v1 and asks its evaluation questions in videopanda_v1.
    if options.template != "auto":
        name = options.template
    else:
        name = "synthetic" if trained_on == "synthetic" else "videopanda_v1"
    return model.eval(), tokenizer, name


def template_named(name):
    if name == "synthetic":
        return data.SYNTHETIC
    from real_video import video_files  # the release's templates live with the real-video code
    return video_files.TEMPLATES[name]


def load_video(spec, cfg):
    """(1, T, C, S, S) float tensor in the model's geometry, and for synthetic clips the
    data.Sample. A video file's frames are sampled as the release does and never flipped."""
    if spec.startswith("synthetic:"):
        number = spec.removeprefix("synthetic:")
        if not number.isdigit():
            raise ValueError(f"--video={spec}: synthetic clips are named synthetic:N with N a "
                             f"whole number, e.g. synthetic:7")
        sample = data.make_sample(int(number), "heldout", cfg.n_frames, cfg.image_size, cfg.grid)
        return data.normalize_frames(sample.video)[None], sample
    from real_video import video_files
    frames, _ = video_files.read_video(spec, cfg.n_frames)  # a bad file: a VideoError naming it
    return video_files.model_input(frames, cfg)[None], None


def prompt_ids(tokenizer, template, question):
    """The prompt's ids, ending in "ASSISTANT:". A word the tokenizer does not know is an error: it
    would be read as <unk>, and the model would answer some other question."""
    unknown = data.unknown_words(tokenizer, question)
    if unknown:
        known = ""
        if template is data.SYNTHETIC:
            forms = sorted({form for _, _, form in data.QUESTIONS.values()})
            known = "; the synthetic task asks: " + " | ".join(forms)
        raise ValueError(f"the model does not know the word(s) {unknown} of {question!r}{known}")
    ids, _ = data.tokenize_conversation(tokenizer, template, [(question, None)])
    return ids


# ---------------------------------------------------------------------------------- a whole QA set

def answer_qa_set(options, model, tokenizer, template, device):
    """Answer every question of a QA file in batches, greedily; write the predictions and score
    them. Everything that can be checked first is (check_output): the answers are never lost to a
    bad --pred_out. Ctrl-C stops answering and writes the answers so far."""
    from real_video import video_files
    from torch.utils.data import DataLoader
    if not (options.answers and options.video_folder):
        raise ValueError("--eval needs --answers=ANSWERS.json and --video_folder=DIR as well")
    # A question too long to answer within the context, or with words the model does not know, is
    # that question's own error: raised, or under --on_error=skip named, counted and skipped.
    dataset = video_files.VideoQADataset(options.eval, options.answers, options.video_folder,
                                         tokenizer, model.cfg, template, on_error=options.on_error,
                                         max_new_tokens=options.max_new_tokens,
                                         decode_threads=1)  # one a worker: workers in parallel
    if len(dataset) == 0:
        raise ValueError(f"{options.eval}: no questions to answer")
    eos_id = data.special_token_id(tokenizer, template.eos)
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.num_workers,
                        collate_fn=video_files.collate_video_batch)
    records, skipped, stopped, pred_out = [], [], False, Path(options.pred_out)
    from tqdm import tqdm
    try:
        for batch in tqdm(loader, desc="answering", unit="batch", dynamic_ncols=True):
            video_files.apply_error_policy(batch, options.on_error, skipped)
            if batch["input_ids"] is None:  # nothing in this batch loaded
                continue
            answers = model.generate(batch["videos"].to(device), batch["input_ids"].to(device),
                                     batch["lengths"].to(device),
                                     max_new_tokens=options.max_new_tokens, eos_id=eos_id)
            for row, ids in enumerate(answers.tolist()):
                records.append({"id": batch["id"][row], "video": batch["video_name"][row],
                                "question": batch["question"][row], "answer": batch["answer"][row],
                                "pred": data.answer_text(tokenizer, ids, eos_id)})
    except KeyboardInterrupt:  # Ctrl-C: stop answering, but keep what was answered
        if not records:
            raise
        stopped = True
    if not records:
        raise ValueError(f"{options.eval}: not one of its {len(dataset)} questions could be "
                         f"answered (every one was skipped; is --video_folder right?); {pred_out} "
                         f"is left as it was")
    write_predictions(pred_out, records)
    if stopped:
        print(f"error: interrupted (Ctrl-C): {len(records)} of {len(dataset)} questions answered; "
              f"this partial set is in {pred_out}", file=sys.stderr)
        sys.exit(130)
    triples = [("all", r["answer"], r["pred"]) for r in records]
    exact, contains = data.accuracy(triples)["all"], data.accuracy(triples, contains=True)["all"]
    print(f"{len(records)} questions answered, {len(skipped)} skipped; predictions in {pred_out}")
    for message in skipped:
        print(f"  skipped {message}")
    print(f"exact match: {exact:.1%}, contains the answer: {contains:.1%}")


def write_predictions(pred_out, records):
    """A JSON list, or for a .jsonl name one object a line; written atomically, so a failure (a full
    disk) leaves --pred_out as it was."""
    if pred_out.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=1) + "\n"
    try:
        run_files.write_atomically(pred_out, lambda f: f.write(text.encode()))
    except OSError as err:
        raise OSError(f"--pred_out={pred_out} could not be written: {err.strerror or err}; "
                      f"it is left as it was") from None


def check_output(name, options):
    """Fail now, not after hours of answering: the file --name names is one this run may write.
    Not an input (questions, answers, the video), nothing of the model's and nothing under
    --video_folder; an existing file only with --overwrite=true; in a folder that can be written.
    Nothing is written to find out."""
    path = Path(getattr(options, name))
    target = path.resolve()
    out = Path(options.out_dir)
    inputs = [options.eval, options.answers, options.video, out / "ckpt.pt", out / "tokenizer.json"]
    if any(target == Path(p).resolve() for p in inputs if p):
        raise ValueError(f"--{name}={path} is one of the input files (the model's, a video, the "
                         f"questions or answers); it would be overwritten")
    read_folders = {"video_folder": options.video_folder,
                    "init_from": "" if options.init_from == "resume" else options.init_from}
    for folder_name, folder in read_folders.items():
        if folder and target.is_relative_to(Path(folder).resolve()):
            raise ValueError(f"--{name}={path} is inside --{folder_name}={folder}, which this run "
                             f"reads; write it elsewhere")
    if path.is_dir():
        raise ValueError(f"--{name}={path} is a directory; name a file in it")
    if path.exists() and not options.overwrite:
        raise FileExistsError(f"--{name}={path} exists; --overwrite=true replaces it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--{name}={path} cannot be written: {err}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--{name}={path} cannot be written: its folder is not writable")


# --------------------------------------------------------------------------------------- one video

def main(argv):
    (changes,) = cli.parse_args(argv, __doc__, SampleConfig)
    options = replace(SampleConfig(), **changes)
    if options.eval or options.viz:  # the file this run writes, checked before a model loads
        check_output("pred_out" if options.eval else "viz", options)
    device = cli.pick_device(options.device)
    model, tokenizer, template_name = load(options, device)
    template = template_named(template_name)
    if options.eval:
        return answer_qa_set(options, model, tokenizer, template, device)
    video, sample = load_video(options.video, model.cfg)
    question = options.question or (sample.question if sample else "")
    if not question:
        raise ValueError("--question is required for a video file")
    ids = prompt_ids(tokenizer, template, question)
    if options.viz:
        from teaching import attention_pictures  # only pictures need it
        picture = attention_pictures.write_attention(model, video.to(device), options.viz,
                                                     options.viz_frame)
        print(f"attention: {picture}")
    eos_id = data.special_token_id(tokenizer, template.eos)
    print(f"Q: {question}")
    if sample is not None and question == sample.question:  # the clip's own question: its answer
        print(f"(expected answer: {sample.answer})")
    generator = torch.Generator(device=device).manual_seed(options.seed)
    tokens, printed = [], ""
    print("A:", end=" ", flush=True)
    for token in model.stream(video.to(device), torch.tensor([ids], device=device),
                              max_new_tokens=options.max_new_tokens,
                              temperature=options.temperature, top_k=options.top_k or None,
                              eos_id=eos_id, generator=generator):
        if int(token) == eos_id:
            break
        tokens.append(int(token))
        text = tokenizer.decode(tokens).strip()  # decode the whole answer so far: pieces may merge
        print(text[len(printed):], end="", flush=True)
        printed = text
    print()


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
