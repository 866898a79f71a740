"""Ask a trained Video-Panda about a video; the answer streams token by token through the KV cache.

    python sample.py --video=synthetic:7                        # a held-out synthetic clip and its question
    python sample.py --video=clip.mp4 --question="what moves?"  # any mp4/webm/mkv/avi/mov/gif (PyAV)
    python sample.py --init_from=DIR --video=clip.mp4 --question="..."  # a checkpoint directory (weights.py)
    python sample.py --video=synthetic:7 --viz=attention.gif    # also a picture of what LSD, FSRA, GSTRA attend to

A whole zero-shot QA set in Video-ChatGPT's question and answer files (MSVD-QA, MSRVTT-QA, TGIF-QA,
ActivityNet-QA), answered greedily in batches:

    python sample.py --init_from=DIR --eval=test_q.json --answers=test_a.json --video_folder=videos/

writes --pred_out: a JSON list of {"id", "video", "question", "answer", "pred"}, or with a .jsonl name one
such object per line, the file the release's GPT judge (eval_video_qa.py) reads; then prints exact-match
and contains-answer accuracy, quick checks beside that judge's.

The prompt: a model trained on the synthetic task is asked in that task's own words; pretrained
directories and models trained on instruction data get the release's evaluation prompt
(videopanda_v1); --template overrides. Greedy by default; --temperature, --top_k and --seed sample.
"""

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import common
import data


@dataclass
class SampleConfig:
    out_dir: str = "out"        # where train.py left ckpt.pt and tokenizer.json
    init_from: str = "resume"   # resume (out_dir/ckpt.pt) or a checkpoint directory (weights.from_pretrained)
    video: str = "synthetic:0"  # a video file, or synthetic:N for held-out synthetic clip number N
    question: str = ""          # for synthetic clips, empty means the clip's own question
    template: str = "auto"      # auto | synthetic | vicuna_v1 | videopanda_v1 (see the top of this file)
    max_new_tokens: int = 32    # the longest answer
    temperature: float = 0.0    # 0 = greedy
    top_k: int = 0              # 0 = no top-k filtering
    seed: int = 1337            # for sampling (temperature > 0)
    device: str = "auto"        # auto: cuda, then mps, then cpu
    viz: str = ""               # also draw LSD's, FSRA's and GSTRA's attention on the video here (.gif or .png)
    viz_frame: int = 0          # the frame a .png shows (a .gif shows them all)
    # a zero-shot QA set instead of one video
    eval: str = ""              # the question file: [{"question_id", "video_name", "question"}, ...]
    answers: str = ""           # the answer file: [{"question_id", "answer"}, ...]
    video_folder: str = ""      # where the video names are looked up
    pred_out: str = "preds.json"  # the predictions (.json, or .jsonl for one per line)
    batch_size: int = 8         # videos answered together
    num_workers: int = 2        # DataLoader processes decoding videos while the model answers
    on_error: str = "raise"     # an unusable video: raise (stop) | skip (name it, count it, go on)


def load(sc, device):
    """The model (in eval mode), its tokenizer and the name of the template its questions are asked in."""
    if sc.init_from == "resume":
        path = Path(sc.out_dir) / "ckpt.pt"
        if not path.exists() and (Path(sc.out_dir) / "ckpt_dcp").exists():
            raise FileNotFoundError(f"{sc.out_dir} holds a sharded --fsdp checkpoint, which sample.py cannot read: "
                                    f"answer with the run's --export directory (--init_from=DIR)")
        ckpt = common.load_checkpoint(path, device)
        model = common.build_model(ckpt, path, device)
        tokenizer, trained_on = common.read_tokenizer(Path(sc.out_dir) / "tokenizer.json"), ckpt["template"]
    else:
        import weights
        model, tokenizer = weights.from_pretrained(sc.init_from, device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"{sc.init_from} has no tokenizer.json (weights.from_pretrained's "
                                    f"docstring says how to make one)")
        trained_on = "vicuna_v1"
    # The release trains with vicuna_v1 and asks its evaluation questions in videopanda_v1.
    name = sc.template if sc.template != "auto" else "synthetic" if trained_on == "synthetic" else "videopanda_v1"
    if name not in ("synthetic", "vicuna_v1", "videopanda_v1"):
        raise ValueError(f"--template must be auto, synthetic, vicuna_v1 or videopanda_v1; got {name!r}")
    return model.eval(), tokenizer, name


def template_named(name):
    if name == "synthetic":
        return data.SYNTHETIC
    import video  # the release's templates live with the real-video code
    return video.TEMPLATES[name]


def load_video(spec, cfg):
    """(1, T, C, S, S) float tensor in the model's geometry, and for synthetic clips the data.Sample."""
    if spec.startswith("synthetic:"):
        number = spec.removeprefix("synthetic:")
        if not number.isdigit():
            raise ValueError(f"--video={spec}: synthetic clips are named synthetic:N with N a whole number, "
                             f"e.g. synthetic:7")
        sample = data.make_sample(int(number), "heldout", cfg.n_frames, cfg.image_size, cfg.grid)
        return data.normalize_frames(sample.video)[None], sample
    import video
    return video.video_tensor(spec, cfg)[None], None  # a bad file is a video.VideoError naming it


def prompt_ids(tokenizer, template, question):
    """The prompt's ids, ending in "ASSISTANT:". A word the tokenizer does not know is an error: it
    would be read as <unk>, and the model would answer some other question."""
    unk, encoding = tokenizer.token_to_id("<unk>"), tokenizer.encode(question, add_special_tokens=False)
    unknown = [question[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets) if unk is not None and i == unk]
    if unknown:
        known = ""
        if template is data.SYNTHETIC:
            forms = sorted({form for _, _, form in data.QUESTIONS.values()})
            known = "; the synthetic task asks: " + " | ".join(forms)
        raise ValueError(f"the model does not know the word(s) {unknown} of {question!r}{known}")
    ids, _ = data.tokenize_conversation(tokenizer, template, [(question, None)])
    return ids


# ------------------------------------------------------------------------------------ a whole QA set

def answer_qa_set(sc, model, tokenizer, template, device):
    """Answer every question of a QA file in batches, greedily; write the predictions and score them.
    Everything that can be checked first is: the answers are never lost to a bad --pred_out."""
    import video
    from torch.utils.data import DataLoader
    if not (sc.answers and sc.video_folder):
        raise ValueError("--eval needs --answers=ANSWERS.json and --video_folder=DIR as well")
    pred_out = Path(sc.pred_out)
    check_pred_out(pred_out, [sc.eval, sc.answers])
    dataset = video.VideoQADataset(sc.eval, sc.answers, sc.video_folder, tokenizer, model.cfg, template,
                                   on_error=sc.on_error, decode_threads=1)  # one thread a worker: workers in parallel
    if len(dataset) == 0:
        raise ValueError(f"{sc.eval}: no questions to answer")
    eos_id = data.special_token_id(tokenizer, template.eos)
    loader = DataLoader(dataset, batch_size=sc.batch_size, num_workers=sc.num_workers,
                        collate_fn=video.collate_video_batch)
    records, skipped = [], []
    from tqdm import tqdm
    for batch in tqdm(loader, desc="answering", unit="batch", dynamic_ncols=True):
        video.apply_error_policy(batch, sc.on_error, skipped)
        if batch["input_ids"] is None:  # nothing in this batch loaded
            continue
        answers = model.generate(batch["videos"].to(device), batch["input_ids"].to(device),
                                 batch["lengths"].to(device), max_new_tokens=sc.max_new_tokens, eos_id=eos_id)
        for row, ids in enumerate(answers.tolist()):
            records.append({"id": batch["id"][row], "video": batch["video_name"][row],
                            "question": batch["question"][row], "answer": batch["answer"][row],
                            "pred": data.answer_text(tokenizer, ids, eos_id)})
    if not records:
        raise ValueError(f"{sc.eval}: not one of its {len(dataset)} questions could be answered (every video "
                         f"was unusable; is --video_folder right?); {pred_out} is left as it was")
    text = "".join(json.dumps(r) + "\n" for r in records) if pred_out.suffix == ".jsonl" \
        else json.dumps(records, indent=1) + "\n"
    common.write_atomically(pred_out, lambda f: f.write(text.encode()))
    triples = [("all", r["answer"], r["pred"]) for r in records]
    exact, contains = data.accuracy(triples)["all"], data.accuracy(triples, contains=True)["all"]
    print(f"{len(records)} questions answered, {len(skipped)} skipped; predictions in {pred_out}")
    for message in skipped:
        print(f"  skipped {message}")
    print(f"exact match: {exact:.1%}, contains the answer: {contains:.1%}")


def check_pred_out(pred_out, inputs):
    """Fail now, not after hours of answering: --pred_out must be a file we can write, and not an input."""
    if any(pred_out.resolve() == Path(p).resolve() for p in inputs):
        raise ValueError(f"--pred_out={pred_out} is one of the input files; it would be overwritten")
    if pred_out.is_dir():
        raise ValueError(f"--pred_out={pred_out} is a directory; name a file in it")
    try:
        pred_out.parent.mkdir(parents=True, exist_ok=True)
        common.write_atomically(pred_out.with_name(pred_out.name + ".check"), lambda f: None)
        pred_out.with_name(pred_out.name + ".check").unlink()
    except OSError as err:
        raise ValueError(f"--pred_out={pred_out} cannot be written: {err}") from None


# ------------------------------------------------------------------------------------ one video

def main(argv):
    (changes,) = common.parse_args(argv, __doc__, SampleConfig)
    sc = replace(SampleConfig(), **changes)
    device = common.pick_device(sc.device)
    model, tokenizer, template_name = load(sc, device)
    template = template_named(template_name)
    if sc.eval:
        return answer_qa_set(sc, model, tokenizer, template, device)
    video, sample = load_video(sc.video, model.cfg)
    question = sc.question or (sample.question if sample else "")
    if not question:
        raise ValueError("--question is required for a video file")
    ids = prompt_ids(tokenizer, template, question)
    if sc.viz:
        import viz  # only pictures need it
        print(f"attention: {viz.write_attention(model, video.to(device), sc.viz, sc.viz_frame)}")
    eos_id = data.special_token_id(tokenizer, template.eos)
    print(f"Q: {question}")
    if sample is not None and question == sample.question:  # the clip's own question has a known answer
        print(f"(expected answer: {sample.answer})")
    generator = torch.Generator(device=device).manual_seed(sc.seed)
    tokens, printed = [], ""
    print("A:", end=" ", flush=True)
    for token in model.stream(video.to(device), torch.tensor([ids], device=device),
                              max_new_tokens=sc.max_new_tokens, temperature=sc.temperature,
                              top_k=sc.top_k or None, eos_id=eos_id, generator=generator):
        if int(token) == eos_id:
            break
        tokens.append(int(token))
        text = tokenizer.decode(tokens).strip()  # decode the whole answer so far: pieces may merge
        print(text[len(printed):], end="", flush=True)
        printed = text
    print()


if __name__ == "__main__":
    common.run(main, sys.argv[1:])
