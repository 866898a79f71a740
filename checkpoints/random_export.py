"""A model with random weights, exported like a trained one, with a tokenizer and an instruction
file over a folder of clips: what a multi-GPU timing run of the 7B stages needs, with no 7B
download.

    python checkpoints/random_export.py --out=out/random-paper --videos=../shared/data/videos
    torchrun --standalone --nproc_per_node=2 train.py --init_from=out/random-paper \\
        --stage=pretrain --data=out/random-paper/instructions.json \\
        --video_folder=../shared/data/videos --fsdp=true ...

The weights come from the model's own initialisation (PandaConfig.preset(--preset), any PandaConfig
field as --key=value), drawn on the GPU when there is one (a second for 7B; minutes on a CPU) and
saved in --dtype. The tokenizer is a small BPE learnt from the instruction text and the chat
template, so token counts are those of English text (an answer is ~130 tokens), but its words are
not Vicuna's. Loss values of such a run mean nothing; its step time and memory are those of real
weights.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The repository root on the path, wherever this script runs from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402
from real_video import video_files  # noqa: E402
from checkpoints import checkpoint_dirs  # noqa: E402
from panda import PandaConfig, VideoPanda  # noqa: E402

SENTENCES = [  # what a Video-ChatGPT-style answer sounds like; eight of them make one answer
    "The video shows a scene filmed outdoors on a bright day with soft light and green grass.",
    "A large animal walks slowly across the frame from the left side toward the right side.",
    "The camera stays still while the subject moves, and the background trees sway in the wind.",
    "Several small objects swing back and forth, striking each other in a regular rhythm.",
    "A colorful bird turns its head, raises its crest and looks directly at the camera.",
    "The clip ends as the subject leaves the frame and the scene becomes quiet again.",
]
QUESTIONS = ["Describe the video in detail.", "What is happening in this video?",
             "What does the main subject do?", "Summarize the events of the clip."]


@dataclass
class ExportConfig:
    out: str = "out/random-paper"  # the export; instructions.json is written into it too
    videos: str = ""               # the folder of clips the instructions name (required)
    preset: str = "paper"
    samples: int = 24              # instructions, cycling over the clips and the questions
    dtype: str = "bfloat16"        # of the saved weights (train.py loads them as fp32 masters)
    device: str = "auto"
    seed: int = 0


def instructions(video_names, n):
    """n Video-ChatGPT-style entries: one question about a clip, an answer of eight sentences."""
    return [{"id": f"random-{i}", "video": video_names[i % len(video_names)], "conversations": [
        {"from": "human", "value": f"<video>\n{QUESTIONS[i % len(QUESTIONS)]}"},
        {"from": "gpt", "value": " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(8))}]}
        for i in range(n)]


def learn_tokenizer():
    """BPE over the answers, the questions and the chat templates, with Llama's special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    texts = SENTENCES + QUESTIONS + [video_files.VICUNA_V1.system, video_files.VIDEOPANDA_V1.system,
                                     "USER: ASSISTANT:"]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return tokenizer


def main(argv):
    ec_changes, cfg_changes = cli.parse_args(argv, __doc__, ExportConfig, PandaConfig)
    ec = ExportConfig(**ec_changes)
    folder = Path(ec.videos)
    names = sorted(p.name for p in folder.iterdir()
                   if p.suffix.lower() in video_files.VIDEO_EXTENSIONS) if folder.is_dir() else []
    if not names:
        raise ValueError(f"--videos={ec.videos!r}: expected a folder with video files "
                         f"({', '.join(video_files.VIDEO_EXTENSIONS)}), found none")
    tokenizer = learn_tokenizer()
    cfg = PandaConfig.preset(ec.preset, **cfg_changes)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than "
                         f"vocab_size={cfg.vocab_size}: pass a larger --vocab_size")
    torch.manual_seed(ec.seed)
    with torch.device(cli.pick_device(ec.device)):
        model = VideoPanda(cfg).to(getattr(torch, ec.dtype))
    checkpoint_dirs.save_pretrained(model, tokenizer, ec.out)
    (Path(ec.out) / "instructions.json").write_text(
        json.dumps(instructions(names, ec.samples), indent=1))
    n = model.num_params()
    print(f"{ec.out}: {sum(n.values()):,} random parameters ({ec.preset} preset, {ec.dtype}); "
          f"instructions.json: {ec.samples} entries over {len(names)} clips of {folder}")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
