"""Nothing lost, nothing executed: what train.py and sample.py do with files someone hands them and with
runs that go wrong. Bad checkpoints and tokenizers end in one line naming the file; a checkpoint that
would run code is refused without running it; a diverging run stops before writing non-finite weights;
one run per out_dir; Ctrl-C saves the step it finished; resuming with other options is refused;
--grad_clip=0 means no clipping. Every run is the nano preset for a step or two."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools import cli

from checkpoints import run_files
import data
import sample
import train

ROOT = Path(__file__).resolve().parents[1]
NANO = ["--preset=nano", "--device=cpu", "--batch_size=2", "--warmup_steps=1", "--eval_every=1000",
        "--eval_samples=2", "--questions_per_clip=1", "--save_every=1"]


@pytest.fixture(autouse=True)
def no_evaluation(monkeypatch):
    monkeypatch.setattr(data, "evaluate", lambda *args, **kwargs: {"all": 0.0})  # answering is not tested here


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """An out_dir with a checkpoint after one step and its tokenizer."""
    out = tmp_path_factory.mktemp("good")
    train.main(NANO + ["--max_steps=1", f"--out_dir={out}"])
    return out


def one_line_error(args, script="sample.py"):
    """The script's main as its command line runs it (cli.run), in this process: it stops with exit
    status 1 and one line, "error: ...", and no other exception escapes. (tests/test_scripts.py runs the
    real command line in a subprocess: the same line, on stderr, and no traceback.)"""
    with pytest.raises(SystemExit) as stop:
        cli.run({"sample.py": sample.main, "train.py": train.main}[script], args)
    line = stop.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line  # exit status 1
    return line


# --------------------------------------------------------------------------- files someone hands you

class Payload:
    """Unpickling this calls Path.touch(marker): what a hostile ckpt.pt could do with any function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("name", ["ckpt.pt", "ckpt_dcp/train_state.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running(name, good_run, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "was-run"
    (out / name).parent.mkdir(parents=True)
    state = run_files.load_checkpoint(good_run / "ckpt.pt")
    torch.save(state | {"note": Payload(marker)}, out / name)
    (out / "tokenizer.json").write_bytes((good_run / "tokenizer.json").read_bytes())
    if name == "ckpt.pt":
        line = one_line_error([f"--out_dir={out}", "--video=synthetic:1", "--device=cpu"])
    else:
        with pytest.raises(run_files.CheckpointError) as error:
            run_files.load_train_state(out / name, "cpu", train.TrainConfig, sharded=True)  # as --fsdp=true reads it
        line = str(error.value)
    assert str(out / name) in line and "could run code" in line
    assert not marker.exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "not a readable panda checkpoint"),
    (b"\x00\x01 not a zip archive at all" * 40, "not a readable panda checkpoint"),
    ("truncated", "not a readable panda checkpoint"),
    ("state_dict", "a bare state_dict"),
    ("wrong config", "its weights and model_config do not fit together"),
])
def test_a_bad_checkpoint_is_one_line_naming_it(content, reason, good_run, tmp_path):
    path = tmp_path / "ckpt.pt"
    good = (good_run / "ckpt.pt").read_bytes()
    if content == "truncated":
        content = good[:len(good) // 2]
    elif content == "state_dict":
        torch.save(run_files.load_checkpoint(good_run / "ckpt.pt")["model"], path)
    elif content == "wrong config":
        state = run_files.load_checkpoint(good_run / "ckpt.pt")
        torch.save(state | {"model_config": state["model_config"] | {"stab_dim": 48}}, path)
    if isinstance(content, bytes):
        path.write_bytes(content)
    (tmp_path / "tokenizer.json").write_bytes((good_run / "tokenizer.json").read_bytes())
    line = one_line_error([f"--out_dir={tmp_path}", "--video=synthetic:1", "--device=cpu"])
    assert str(path) in line and reason in line


def test_a_truncated_tokenizer_is_one_line_naming_it(good_run, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes((good_run / "ckpt.pt").read_bytes())
    tokenizer = (good_run / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(tokenizer[:len(tokenizer) // 3])
    line = one_line_error([f"--out_dir={tmp_path}", "--video=synthetic:1", "--device=cpu"])
    assert str(tmp_path / "tokenizer.json") in line and "not a readable tokenizer.json" in line


# --------------------------------------------------------------------------- runs that go wrong

def test_a_diverging_run_stops_before_the_update_and_keeps_the_last_checkpoint(good_run, tmp_path, monkeypatch):
    """Step 2's gradient is NaN (as when a run diverges): the run stops, naming the step, before the
    optimizer writes NaN into the weights, and step 1's checkpoint stays as it was, byte for byte."""
    out = tmp_path / "out"
    train.main(NANO + ["--max_steps=1", f"--out_dir={out}"])
    saved = (out / "ckpt.pt").read_bytes()
    step = train.forward_backward

    def diverging(run, *args, **kwargs):
        loss = step(run, *args, **kwargs)
        next(p for p in run.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return loss
    monkeypatch.setattr(train, "forward_backward", diverging)
    with pytest.raises(train.NonFiniteStep, match="step 2: the loss is .* gradient norm nan: stopped before"):
        train.main(["--init_from=resume", "--max_steps=3", f"--out_dir={out}"])
    assert (out / "ckpt.pt").read_bytes() == saved


def test_a_learning_rate_far_too_high_ends_in_one_line_and_no_nonfinite_checkpoint(tmp_path):
    out = tmp_path / "out"
    line = one_line_error(NANO + ["--max_steps=6", "--lr_stab=1e30", "--lr_decoder=1e30", "--distill=",
                                  f"--out_dir={out}"], "train.py")
    assert "stopped before the update" in line or "the weights hold inf or NaN" in line
    if (out / "ckpt.pt").exists():  # what was saved before the run stopped is finite
        state = run_files.load_checkpoint(out / "ckpt.pt")
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_grad_clip_0_means_no_clipping(tmp_path):
    """Not a zero norm to clip to (that would freeze training): the gradients as they are, exactly
    what a clip far above the gradient's norm leaves."""
    runs = {}
    for clip in ("0", "1e9"):
        train.main(NANO + ["--max_steps=1", f"--grad_clip={clip}", f"--out_dir={tmp_path / clip}"])
        runs[clip] = run_files.load_checkpoint(tmp_path / clip / "ckpt.pt")["model"]
    torch.manual_seed(1337)
    fresh = run_files.build_model(run_files.load_checkpoint(tmp_path / "0" / "ckpt.pt"), "", "cpu", weights=False)
    assert all(torch.equal(runs["0"][name], runs["1e9"][name]) for name in runs["0"])
    assert any(not torch.equal(runs["0"][name], t) for name, t in fresh.state_dict().items()
               if t.is_floating_point())


def test_resuming_with_other_options_is_refused_and_names_them(good_run):
    with pytest.raises(ValueError, match=r"these differ: --lr_stab=0.1 \(0.003 there\), --stab_dim=48 \(32 there\)"):
        train.main(["--init_from=resume", f"--out_dir={good_run}", "--lr_stab=0.1", "--stab_dim=48"])
    with pytest.raises(ValueError, match="these differ: --stage=pretrain"):
        train.main(["--init_from=resume", f"--out_dir={good_run}", "--stage=pretrain"])


# --------------------------------------------------------------------------- one run per out_dir

def test_a_second_run_in_the_same_out_dir_is_refused_and_told_who_holds_it(tmp_path):
    lock = run_files.RunLock(tmp_path).acquire()  # as a run in another process would hold it
    try:
        with pytest.raises(FileExistsError, match=f"in use by another run \\(pid {os.getpid()} on "):
            train.main(NANO + ["--max_steps=1", f"--out_dir={tmp_path}"])
    finally:
        lock.release()
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    (tmp_path / "run.lock").write_text("pid 99999 on a-machine, since 2026-01-01 00:00:00: train.py\n")
    train.main(NANO + ["--max_steps=1", f"--out_dir={tmp_path}"])
    assert "names a run that no longer holds it (pid 99999 on a-machine" in capsys.readouterr().out
    assert (tmp_path / "run.lock").read_text() == ""  # released at the end: empty means a clean exit


def test_ctrl_c_saves_the_step_it_finished_and_the_run_goes_on_from_it(tmp_path):
    """SIGINT in the middle of a long run: it finishes the step, saves it, says how to go on and exits
    130. Resumed for two more steps, it ends bit for bit where an uninterrupted run of as many steps ends."""
    out = tmp_path / "stopped"
    constant = ["--min_lr_ratio=1.0", "--save_every=1000000"]  # the same rate at every step, whatever max_steps
    run = subprocess.Popen([sys.executable, "train.py", *NANO, *constant, "--max_steps=100000", f"--out_dir={out}"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "model:" not in run.stdout.readline():  # the model is built: training starts now
        assert run.poll() is None, run.stderr.read()
    time.sleep(2)  # some steps in (how many does not matter: the comparison below holds for any)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert f"saved: go on with python train.py --init_from=resume --out_dir={out}" in stdout
    step = run_files.load_checkpoint(out / "ckpt.pt")["step"]
    assert 0 <= step < 100000
    train.main(["--init_from=resume", f"--max_steps={step + 2}", f"--out_dir={out}"])
    train.main(NANO + constant + [f"--max_steps={step + 2}", f"--out_dir={tmp_path / 'straight'}"])
    resumed, straight = (run_files.load_checkpoint(path / "ckpt.pt") for path in (out, tmp_path / "straight"))
    assert resumed["step"] == straight["step"] == step + 2
    assert all(torch.equal(resumed["model"][name], t) for name, t in straight["model"].items())
