"""Ask a trained Video-Panda about a video; the answer streams token by token through the KV cache.

    python sample.py --video=synthetic:7                        # a held-out synthetic clip and its question
    python sample.py --video=clip.mp4 --question="what moves?"  # any mp4/webm/mkv/avi/mov/gif (PyAV)
    python sample.py --init_from=DIR --video=clip.mp4 --question="..."  # a pretrained checkpoint directory

Greedy by default; --temperature, --top_k and --seed sample instead.
"""

import sys
from dataclasses import dataclass, replace

import torch

import data
from panda import VIDEO_PLACEHOLDER
from train import load_checkpoint, parse_overrides, pick_device


@dataclass
class SampleConfig:
    out_dir: str = "out"        # where train.py left ckpt.pt and tokenizer.json
    init_from: str = "resume"   # resume (out_dir/ckpt.pt) or a pretrained checkpoint directory
    video: str = "synthetic:0"  # a video file, or synthetic:SEED for a held-out synthetic clip
    question: str = ""          # for synthetic clips, empty means the clip's own question
    max_new_tokens: int = 32
    temperature: float = 0.0    # 0 = greedy
    top_k: int = 0              # 0 = no top-k filtering
    seed: int = 1337
    device: str = "auto"


def load(sc, device):
    """The model, its tokenizer and its prompt template."""
    if sc.init_from == "resume":
        model, _ = load_checkpoint(f"{sc.out_dir}/ckpt.pt", device)
        return model.eval(), data.load_tokenizer(f"{sc.out_dir}/tokenizer.json"), data.SYNTHETIC_TEMPLATE
    import weights  # only pretrained checkpoints need it
    model, tokenizer = weights.from_pretrained(sc.init_from, device=device)
    return model.eval(), tokenizer, data.template_for(model)


def load_video(spec, cfg):
    """(1, T, C, S, S) float tensor, and for synthetic clips the sample (question, answer)."""
    if spec.startswith("synthetic:"):
        sample = data.make_sample(int(spec.split(":", 1)[1]), "heldout", cfg.n_frames, cfg.image_size)
        return data.normalize_frames(sample.video)[None], sample
    return data.load_video_tensor(spec, cfg)[None], None


def main(argv):
    (sc,) = parse_overrides(argv, SampleConfig)
    sc = replace(SampleConfig(), **sc)
    device = pick_device(sc.device)
    model, tokenizer, template = load(sc, device)
    video, sample = load_video(sc.video, model.cfg)
    question = sc.question or (sample.question if sample else "")
    if not question:
        raise ValueError("--question is required for a video file")
    ids = data.encode_prompt(tokenizer, template, question)
    assert ids.count(VIDEO_PLACEHOLDER) == 1
    print(f"Q: {question}")
    if sample is not None:
        print(f"(expected answer: {sample.answer})")
    generator = torch.Generator(device=device).manual_seed(sc.seed)
    tokens, printed = [], ""
    print("A:", end=" ", flush=True)
    for token in model.stream(video.to(device), torch.tensor([ids], device=device),
                              max_new_tokens=sc.max_new_tokens, temperature=sc.temperature,
                              top_k=sc.top_k or None, eos_id=data.eos_id(tokenizer), generator=generator):
        if int(token) == data.eos_id(tokenizer):
            break
        tokens.append(int(token))
        text = tokenizer.decode(tokens)  # decode the whole answer so far: pieces may merge
        print(text[len(printed):], end="", flush=True)
        printed = text
    print()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
