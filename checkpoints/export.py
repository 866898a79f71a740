"""Write a trained model as a checkpoint directory others can load, in either layout
(docs/checkpoints.md).

    python checkpoints/export.py --checkpoint=out --out=out/hf  # a training run's ckpt.pt
    python checkpoints/export.py --checkpoint=out --layout=release --out=out/videopanda-mine
    python checkpoints/export.py --checkpoint=videopanda_fitu --out=out/fitu-hf  # the release

--layout=hf writes the decoder as a standard checkpoint of its family (Llama, Mistral or Qwen2),
which transformers' AutoModelForCausalLM and Llama-family runtimes load as they would the base LLM,
with the STAB and projector in panda_video.safetensors beside it. --layout=release writes the
release's own layout, for its evaluation scripts. checkpoint_dirs.from_pretrained reads both back
exactly.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# The repository root on the path, wherever this script runs from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402
from checkpoints import run_files  # noqa: E402
from checkpoints import checkpoint_dirs  # noqa: E402


@dataclass
class ExportOptions:
    checkpoint: str = "out"  # a run's out_dir or ckpt.pt, or a checkpoint directory (config.json)
    out: str = ""            # the directory to write (required); our own export there is replaced
    layout: str = "hf"       # hf (the decoder as its family's checkpoint, STAB beside) or release
    family: str = ""         # hf: llama, mistral or qwen2; empty: qwen2 with q/k/v bias, else llama
    dtype: str = ""          # float32, bfloat16 or float16; empty: the checkpoint's decoder's dtype
    max_shard_size: str = "5GB"  # above this the weights are split into shards with an index
    overwrite: bool = False  # replace a non-empty --out that is not one of our exports


def load(path):
    """(model, tokenizer or None, the dtype its decoder is stored in) from a training run's ckpt.pt
    (or the out_dir holding it, with the run's tokenizer.json) or from a checkpoint directory that
    holds a whole model."""
    file = path / "ckpt.pt" if path.is_dir() else path
    if file.is_file():
        ckpt = run_files.load_checkpoint(file)
        model = run_files.build_model(ckpt, file, "cpu")
        tokenizer_file = file.parent / "tokenizer.json"
        tokenizer = run_files.read_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
        return model.eval(), tokenizer, ckpt["model"]["decoder.embed_tokens.weight"].dtype
    if (path / "ckpt_dcp").is_dir():
        raise FileNotFoundError(f"--checkpoint={path} holds a sharded --fsdp checkpoint, which "
                                f"this tool cannot read: give the run train.py's --export=DIR, "
                                f"which gathers the model and writes it")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint={path}: neither a training checkpoint (ckpt.pt) nor "
                                f"a checkpoint directory (config.json)")
    config = checkpoint_dirs.read_config(path)
    if (config["model_type"] in checkpoint_dirs.LLM_TYPES
            and not (path / checkpoint_dirs.PANDA_CONFIG).is_file()):
        raise ValueError(f"--checkpoint={path} holds a language model only, with no STAB "
                         f"or projector: train from it (train.py --init_from={path}) and export "
                         f"that run")
    dtype = torch_dtype(config.get("dtype") or config.get("torch_dtype") or "float32",
                        path / "config.json")
    model, tokenizer = checkpoint_dirs.from_pretrained(path, dtype=dtype)
    return model, tokenizer, dtype


def torch_dtype(name, where):
    """The torch dtype called `name` (float32, bfloat16, float16), or a ValueError that names
    `where` it came from."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: dtype must be float32, bfloat16 or float16; got {name!r}")
    return dtype


def main(argv):
    (changes,) = cli.parse_args(argv, __doc__, ExportOptions)
    opts = ExportOptions(**changes)
    if not opts.out:
        raise ValueError("--out=DIR is required: the directory to write the export into")
    if opts.layout not in checkpoint_dirs.LAYOUTS:  # checked before a 7B model is read, not after
        raise ValueError(f"--layout must be one of {', '.join(checkpoint_dirs.LAYOUTS)}; "
                         f"got {opts.layout!r}")
    wanted = torch_dtype(opts.dtype, "--dtype") if opts.dtype else None
    model, tokenizer, stored = load(Path(opts.checkpoint))
    dtype = wanted or stored
    checkpoint_dirs.save_pretrained(model.to(dtype), tokenizer, opts.out, overwrite=opts.overwrite,
                                    layout=opts.layout, family=opts.family or None,
                                    max_shard_size=opts.max_shard_size)
    tokens = ("with tokenizer.json" if tokenizer is not None
              else "without a tokenizer (none beside the checkpoint)")
    print(f"{opts.out}: {opts.layout} layout, {str(dtype).removeprefix('torch.')}, {tokens}, "
          f"from {opts.checkpoint}")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
