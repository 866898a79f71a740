"""Shapes you can see: a preset's data flow, module by module, in the order a video flows, with the
shapes of a real forward pass, each module's parameters and where the paper writes the step.

    python tools/shapes.py --preset=tiny
    python tools/shapes.py --preset=paper               # the 7B decoder takes no memory
    python tools/shapes.py --preset=nano --n_frames=8   # any PandaConfig field as --key=value

One video and one question of the synthetic task go through the model, and forward hooks note
what each module took and gave. The STAB, the projector and the token embedding run on the CPU;
the decoder runs on the meta device, where tensors have shapes but no storage: the same code runs,
each operation works out the shape of its result, and a 7B decoder prints in seconds.
"""

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# The repository root on the path, wherever this script runs from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402
import data  # noqa: E402
from panda import VIDEO_PLACEHOLDER, PandaConfig, VideoPanda  # noqa: E402

QUESTION = "what color is the circle?"

# Module -> (the step's name, where the paper writes it: Sec. 3.1 and Fig. 3; the LLM, Sec. 3.2).
STEPS = {
    "stab.patch_embed": ("patch embedding", "Eq. 1"),
    "stab.lste": ("LSTE", "Eq. 2-3"),
    "stab.gstra": ("GSTRA: one per chunk", "Eq. 11-13"),
    "stab.lsd": ("LSD", "Eq. 4-7"),
    "stab.fsra": ("FSRA: one per frame", "Eq. 8-10"),
    "stab.fuse": ("fusion", "Eq. 14"),
    "stab": ("rows + split tokens", "Eq. 15-16"),
    "projector": ("projector", "Eq. 17"),
    "decoder.embed_tokens": ("prompt embedding", "Sec. 3.2"),
    "decoder": ("splice at <video>", "Sec. 3.2"),
    "decoder.layers": ("decoder blocks", "Sec. 3.2"),
    "decoder.norm": ("final RMSNorm", "Sec. 3.2"),
    "decoder.lm_head": ("logits", "Eq. 20"),
}


@dataclass
class ShapesOptions:
    preset: str = "tiny"  # nano, tiny or paper; then any PandaConfig field as --key=value


@dataclass
class Row:
    step: str         # the paper's name for it
    paper: str        # where the paper writes it
    module: str       # where it sits in the model, e.g. stab.lsd
    shape_in: tuple   # the shape of what the module took (its first input; () for none)
    shape_out: tuple  # and of what it gave
    params: int


def build(cfg):
    """VideoPanda(cfg) on the meta device, and its parameters per part; then what reads the video
    and the prompt is made real, on the CPU: the 7B decoder is never allocated."""
    with torch.device("meta"):
        model = VideoPanda(cfg)
    counts = model.num_params()
    # The STAB and projector, initialised as their constructors do, from a model whose decoder
    # has no blocks and a one-token vocabulary
    donor = VideoPanda(replace(cfg, n_layers=0, vocab_size=1))
    model.stab, model.projector = donor.stab, donor.projector
    # The token embedding, uninitialised: the prompt's rows are copied into the splice, whose
    # values the decoder on the meta device never reads
    model.decoder.embed_tokens.to_empty(device="cpu")
    return model.eval(), counts


def example_inputs(cfg):
    """One video (1, T, 3 or 4, S, S), every pixel real, and the synthetic task's question as
    data.py tokenises it (1, L_text), one <video> placeholder in it. Only the number of tokens
    matters here: ids past a small preset's vocabulary are folded into it."""
    channels = 4 if cfg.letterbox else 3  # the 4th channel, the letterbox mask: 1 on real pixels
    video = torch.rand(1, cfg.n_frames, channels, cfg.image_size, cfg.image_size)
    video[:, :, 3:] = 1.0
    ids, _ = data.tokenize_conversation(data.build_tokenizer(), data.SYNTHETIC, [(QUESTION, None)])
    ids = torch.tensor([ids])
    return video, torch.where(ids == VIDEO_PLACEHOLDER, ids, ids % cfg.vocab_size)


def trace(model, video, input_ids):
    """Runs the video and the prompt through the model as VideoPanda.forward does. Returns one Row
    per module call, in the order they ran (consecutive decoder blocks as one row)."""
    rows, modules = [], dict(model.named_modules())

    def note(name, shape_in, shape_out, params):
        block = name.startswith("decoder.layers.")
        step, paper = STEPS["decoder.layers" if block else name]
        last = rows[-1] if rows else None
        if block and last.step == step and (last.shape_in, last.shape_out) == (shape_in, shape_out):
            first = last.module.split("-")[0]  # decoder.layers.0-3: a block after one like it
            last.module, last.params = f"{first}-{name.split('.')[-1]}", last.params + params
        else:
            rows.append(Row(step, paper, name, shape_in, shape_out, params))

    def after(name, own_only=False):  # a hook on the module's output
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output  # STAB: (tokens, lengths)
            params = sum(p.numel() for p in module.parameters(recurse=not own_only))
            note(name, () if own_only else tuple(args[0].shape), tuple(out.shape), params)
        return modules[name].register_forward_hook(hook)

    def pixels(module, args):
        rows.append(Row("pixels", "Sec. 3.1", "", (), tuple(args[0].shape), 0))

    def splice(module, args):  # the decoder's input: the prompt with the video in its place
        note("decoder", (), tuple(args[0].shape), 0)

    hooks = [model.stab.register_forward_pre_hook(pixels),
             model.decoder.register_forward_pre_hook(splice),
             after("stab", own_only=True)]  # its own parameters: the split token, the fusion's mix
    names = [n for n in STEPS if n in modules and n not in ("stab", "decoder", "decoder.layers")]
    hooks += [after(n) for n in names + [f"decoder.layers.{i}" for i in range(model.cfg.n_layers)]]
    with torch.no_grad():
        x, _, _ = model.embed_inputs(video, input_ids)  # STAB, projector, splice: on the CPU
        x = x.to("meta")  # the decoder from here: shapes only
        model.decoder.lm_head(model.decoder(x, torch.arange(x.shape[1], device=x.device)[None]))
    for hook in hooks:
        hook.remove()
    if model.cfg.tie_embeddings:  # lm_head's weight is the embedding's, counted on that row
        rows[-1].params = 0
    return rows


def table(rows):
    widths = (22, 11, 22, 22, 20)  # step, paper, module, input, output; then the parameters

    def line(*cells):
        text = "".join(f"{cell:<{width}}" for cell, width in zip(cells, widths))
        return f"{text}{cells[-1]:>14}".rstrip()

    out = [line("step", "paper", "module", "input", "output", "parameters")]
    for r in rows:
        out.append(line(r.step, r.paper, r.module, str(r.shape_in or ""), str(r.shape_out),
                        f"{r.params:,}" if r.params else ""))
    return "\n".join(out)


def summary(cfg, rows, counts):
    """Where the numbers of tokens come from, and the parameters per part."""
    out = {r.module: r.shape_out for r in rows}
    frames, grid = rows[0].shape_out[1], out["stab.lsd"][1]  # T, and g cells a side
    n_vis, n_text, n_all = (out[m][1] for m in ("projector", "decoder.embed_tokens", "decoder"))
    row = f"{grid} cells + 1 split token" if cfg.split_tokens else f"{grid} cells"
    visual = counts["stab"] + counts["projector"]
    return "\n".join([
        f"visual tokens  {n_vis} = {frames} frames x (1 fused + {grid} rows x ({row}))",
        f"decoder input  {n_all} = {n_text} prompt tokens - 1 <video> + {n_vis} visual tokens",
        f"parameters     STAB {counts['stab']:,} + projector {counts['projector']:,} = {visual:,}; "
        f"decoder {counts['decoder']:,}; all {visual + counts['decoder']:,}"])


def main(argv):
    opts_changes, cfg_changes = cli.parse_args(argv, __doc__, ShapesOptions, PandaConfig)
    opts = ShapesOptions(**opts_changes)
    cfg = PandaConfig.preset(opts.preset, **cfg_changes)
    torch.manual_seed(0)
    model, counts = build(cfg)
    video, input_ids = example_inputs(cfg)
    rows = trace(model, video, input_ids)
    changed = "".join(f", {key}={value}" for key, value in cfg_changes.items())
    print(f"{opts.preset} preset{changed}: one video of {cfg.n_frames} frames of "
          f"{cfg.image_size} x {cfg.image_size} px, and the prompt "
          f"\"<s> USER: <video>\\n{QUESTION} ASSISTANT:\" ({input_ids.shape[1]} tokens)\n")
    print(table(rows))
    print()
    print(summary(cfg, rows, counts))
    return model, rows, counts


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
