"""tools/shapes.py prints the shapes a real forward pass produces, in the order a video flows, every
parameter once, and the paper preset's totals without allocating its decoder."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from panda import PandaConfig, VideoPanda
from tools import shapes

ROOT = Path(__file__).resolve().parents[1]
FLOW = ["pixels", "patch embedding", "LSTE", "GSTRA: one per chunk", "LSD", "FSRA: one per frame",
        "fusion", "rows + split tokens", "projector", "prompt embedding", "splice at <video>",
        "decoder blocks", "final RMSNorm", "logits"]

# Worked by hand from the tiny preset: T = 8 frames of S = 48 px in chunks of k = 4, patches of
# P = 8 (p = 6 a side), LSD windows of s = 2 (g = 3 a side), C = 96, D = 128:
# 8 x (1 + 3 x (3 + 1)) = 104 visual tokens.
TINY = {
    "": ((), (1, 8, 3, 48, 48)),
    "stab.patch_embed": ((8, 3, 48, 48), (8, 6, 6, 96)),
    "stab.lste": ((2, 4, 6, 6, 96), (2, 4, 6, 6, 96)),
    "stab.gstra": ((2, 4 * 6 * 6, 96), (2, 96)),
    "stab.lsd": ((8, 6, 6, 96), (8, 3, 3, 96)),
    "stab.fsra": ((8, 3 * 3, 96), (8, 96)),
    "stab.fuse": ((8, 96), (8, 96)),
    "stab": ((), (1, 104, 96)),
    "projector": ((1, 104, 96), (1, 104, 128)),
}


def test_tiny_shapes_are_the_ones_the_preset_gives():
    _, rows, _ = shapes.main(["--preset=tiny"])
    assert [r.step for r in rows] == FLOW
    assert {r.module: (r.shape_in, r.shape_out) for r in rows if r.module in TINY} == TINY


@pytest.mark.parametrize("preset", ["nano", "tiny"])
def test_printed_shapes_are_those_of_a_real_forward(preset, capsys):
    _, rows, counts = shapes.main([f"--preset={preset}"])
    printed = capsys.readouterr().out
    cfg = PandaConfig.preset(preset)
    model = VideoPanda(cfg).eval()  # all of it real, on the CPU
    video, input_ids = shapes.example_inputs(cfg)
    with torch.no_grad():
        visual, _ = model.encode_videos(video)          # (1, L_vis, D)
        spliced, _, _ = model.embed_inputs(video, input_ids)  # (1, L, D)
        logits = model(video, input_ids)                # (1, L, V)
    out = {r.module: r.shape_out for r in rows}
    assert out["projector"] == visual.shape and out["decoder"] == spliced.shape
    assert rows[-1].shape_out == logits.shape
    assert f"visual tokens  {visual.shape[1]} = " in printed
    assert f"decoder input  {spliced.shape[1]} = " in printed
    for shape in (video.shape, visual.shape, spliced.shape, logits.shape):
        assert str(tuple(shape)) in printed
    # every parameter on exactly one row, and the totals the model counts
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    assert counts == model.num_params()


def test_paper_preset_prints_its_totals_without_allocating_the_decoder(capsys):
    model, rows, counts = shapes.main(["--preset=paper"])
    printed = capsys.readouterr().out
    assert "visual tokens  2184 = 8 frames x (1 fused + 16 rows x (16 cells + 1 split token))" \
        in printed
    assert "STAB 24,086,866 + projector 20,979,712 = 45,066,578;" in printed
    assert counts["decoder"] == 6_738_415_616
    blocks = rows[FLOW.index("decoder blocks")]
    n_text = rows[FLOW.index("prompt embedding")].shape_out[1]
    assert blocks.module == "decoder.layers.0-31"
    assert blocks.shape_out == (1, n_text - 1 + 2184, 4096)
    assert all(p.is_meta for p in model.decoder.layers.parameters())
    assert not any(p.is_meta for p in model.stab.parameters())


def test_runs_as_a_script_from_anywhere_and_answers_help(tmp_path):
    script = str(ROOT / "tools" / "shapes.py")
    done = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--preset=tiny" in done.stdout and "--n_frames=8" in done.stdout
    done = subprocess.run([sys.executable, script, "--preset=huge"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: unknown preset 'huge'")
