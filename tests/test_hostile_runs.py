"""Training runs handed bad options, planted files and interruptions: nothing runs that a file carries,
nothing the run did not make is touched, nothing is allocated that cannot fit, every mistake is one
line naming the option or the file, and Ctrl-C ends a run with what it finished saved. Every run is the
nano preset for a step."""

import json
import os
import pickle
import signal

import pytest
import torch

from tools import cli

from checkpoints import run_files
import data
import train
from checkpoints import checkpoint_dirs

from test_faults import NANO, Payload, good_run, no_evaluation  # noqa: F401 (nano options, two fixtures)


GONE = object()


def copy_run(good_run, out, **changes):
    """good_run's tokenizer and checkpoint in out, the checkpoint's keys changed (GONE: removed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes((good_run / "tokenizer.json").read_bytes())
    state = run_files.load_checkpoint(good_run / "ckpt.pt") | changes
    torch.save({k: v for k, v in state.items() if v is not GONE}, out / "ckpt.pt")
    return out / "ckpt.pt"


def one_line_error(args, main=train.main):
    """main(args) as its command line runs it (cli.run): exit status 1 and one line, "error: ..."."""
    with pytest.raises(SystemExit) as stop:
        cli.run(main, args)
    line = stop.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
    return line


# --------------------------------------------------------------------------- code executed

@pytest.mark.parametrize("planted", ["ckpt_dcp alone", "ckpt_dcp beside ckpt.pt", "ckpt.pt saying fsdp"])
def test_a_planted_sharded_checkpoint_is_never_unpickled_without_fsdp(planted, good_run, tmp_path):
    """DCP reads a sharded checkpoint's .metadata with pickle. Without --fsdp=true on the command line,
    resume reads ckpt.pt only: a ckpt_dcp/ alone is one line saying how to resume it, one beside a
    ckpt.pt is not opened, and a ckpt.pt that says it was sharded is refused."""
    out, marker = tmp_path / "out", tmp_path / "was-run"
    state = run_files.load_checkpoint(good_run / "ckpt.pt")
    sharded = {k: v for k, v in state.items() if k not in ("model", "optimizer", "distill_head")}
    sharded["train_config"] = state["train_config"] | {"fsdp": True}
    (out / "ckpt_dcp").mkdir(parents=True)
    torch.save(sharded, out / "ckpt_dcp" / "train_state.pt")
    (out / "ckpt_dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (out / "tokenizer.json").write_bytes((good_run / "tokenizer.json").read_bytes())
    args = ["--init_from=resume", "--max_steps=2", f"--out_dir={out}"]
    if planted == "ckpt_dcp alone":
        line = one_line_error(args)
        assert str(out / "ckpt_dcp") in line and "--fsdp=true" in line
    elif planted == "ckpt_dcp beside ckpt.pt":
        copy_run(good_run, out)
        cli.run(train.main, args)  # goes on from ckpt.pt
        assert run_files.load_checkpoint(out / "ckpt.pt")["step"] == 2
    else:
        copy_run(good_run, out, train_config=state["train_config"] | {"fsdp": True})
        line = one_line_error(args)
        assert str(out / "ckpt.pt") in line and "--fsdp=true" in line
    assert not marker.exists()


# --------------------------------------------------------------------------- files the run did not make

@pytest.mark.parametrize("case", ["run.lock a symbolic link", "run.lock a hard link", "stale temporaries"])
def test_the_run_touches_no_file_it_did_not_make(case, tmp_path):
    """A run.lock that is a link is refused, naming it, and the file it points to stays as it was. The
    temporaries of a save that was killed (ckpt.pt.tmp-PID, ...) are removed when the next run starts,
    and nothing else is: not other names, not a link that looks like one. A link at the very name a
    save writes first is removed, not written through."""
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("someone's notes\n")
    args = NANO + ["--max_steps=1", f"--out_dir={out}"]
    if case != "stale temporaries":
        (out / "run.lock").symlink_to(victim) if "symbolic" in case else os.link(victim, out / "run.lock")
        assert str(out / "run.lock") in one_line_error(args)
        assert not (out / "ckpt.pt").exists()
    else:
        stale = ["ckpt.pt.tmp-4242", "tokenizer.json.tmp-7", "results.json.tmp-123456"]
        kept = ["ckpt.pt.tmp-abc", "notes.txt.tmp-12", "ckpt.pt.tmp-12.bak", "model.pt.tmp-99"]
        for name in stale + kept:
            (out / name).write_bytes(b"\0" * 1000)
        (out / "ckpt.pt.tmp-5").symlink_to(victim)
        (out / f"ckpt.pt.tmp-{os.getpid()}").symlink_to(victim)  # where this run's save will write
        train.main(args)
        assert [name for name in stale if (out / name).exists()] == []
        assert all((out / name).read_bytes() == b"\0" * 1000 for name in kept)
        assert (out / "ckpt.pt.tmp-5").is_symlink()
    assert victim.read_text() == "someone's notes\n"


# --------------------------------------------------------------------------- memory

@pytest.mark.parametrize("source", ["options", "checkpoint"])
def test_a_model_too_large_for_memory_is_refused_before_it_is_made(source, good_run, tmp_path):
    """Weights of 10^13 parameters fit no machine: the sizes and the bytes in one line, before any of
    them is allocated, whether the options or a checkpoint's model_config ask for them."""
    huge = {"d_model": 1_000_000, "ffn_dim": 1_000_000}
    if source == "options":
        line = one_line_error(NANO + ["--max_steps=1", "--d_model=1000000", "--ffn_dim=1000000",
                                      f"--out_dir={tmp_path / 'out'}"])
    else:
        state = run_files.load_checkpoint(good_run / "ckpt.pt")
        path = copy_run(good_run, tmp_path / "out", model_config=state["model_config"] | huge)
        line = one_line_error(["--init_from=resume", f"--out_dir={tmp_path / 'out'}"])
        assert str(path) in line
    assert "d_model=1000000" in line and "ffn_dim=1000000" in line and "GiB of float32 weights" in line
    assert "memory of cpu" in line


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("option", [
    "--eval_every=0", "--grad_accum=0", "--batch_size=0", "--max_steps=-5", "--out_dir=", "--lr_stab=nan",
    "--lr_decoder=-1", "--distill_weight=inf", "--weight_decay=-0.1", "--warmup_steps=-1", "--save_every=-1",
    "--max_new_tokens=0", "--eval_samples=0", "--on_error=ignore", "--stage=posttrain", "--device=bogus",
    "--device=cuda:64", "--export", "teacher_bench --batch=0"])
def test_a_bad_option_is_one_line_naming_it_before_anything_is_written(option, tmp_path, monkeypatch):
    """Checked as parsed, not deep in the run: the line names the option, and nothing is trained or
    written (an empty --out_dir would otherwise be the current directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    if option == "teacher_bench --batch=0":
        from distillation import teacher_bench
        line = one_line_error(["--device=cpu", "--preset=nano", "--vit=tiny", "--batch=0"], teacher_bench.main)
        assert "--batch" in line
        return
    if option == "--export":  # a folder that is not an export: refused now, not after the whole run
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("years of work")
        option = f"--export={tmp_path / 'mine'}"
    line = one_line_error(NANO + ["--max_steps=1", "--out_dir=out", option])
    assert option.split("=")[0] in line
    if option.startswith("--export"):
        assert "pick another --export" in line and "overwrite=True" not in line
        assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + ["mine"] * ("--export" in option))
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- resume state

def huge_id_tokenizer(out):
    """tokenizer.json with one more word, its id far past the model's embedding."""
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zebra"] = 100_000
    (out / "tokenizer.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("key, change", [
    ("train_config", lambda s: {"train_config": s["train_config"] | {"learning_rate": 1.0}}),
    ("train_config", lambda s: {"train_config": s["train_config"] | {"max_steps": "5"}}),
    ("train_config", lambda s: {"train_config": GONE}),
    ("step", lambda s: {"step": "1"}),
    ("data_place", lambda s: {"data_place": "nowhere"}),
    ("data_place", lambda s: {"data_place": []}),
    ("rng", lambda s: {"rng": [{"torch": torch.zeros(10, dtype=torch.uint8), "python": (3, (), None)}]}),
    ("rng", lambda s: {"rng": []}),
    ("optimizer", lambda s: {"optimizer": GONE}),
    ("optimizer", lambda s: {"optimizer": {"state": {}, "param_groups": []}}),
    ("optimizer", lambda s: {"optimizer": s["optimizer"] | {"state": {
        i: m | {"exp_avg": m["exp_avg"][..., :1]} for i, m in s["optimizer"]["state"].items()}}}),
    ("tokenizer.json", None),
])
def test_a_checkpoint_with_unusable_resume_state_is_one_line_naming_the_file_and_key(key, change, good_run,
                                                                                      tmp_path):
    out = tmp_path / "out"
    state = run_files.load_checkpoint(good_run / "ckpt.pt")
    path = copy_run(good_run, out, **(change(state) if change else {}))
    if key == "tokenizer.json":
        huge_id_tokenizer(out)
        path = out / "tokenizer.json"
    line = one_line_error(["--init_from=resume", "--max_steps=2", f"--out_dir={out}"])
    assert str(path) in line and key.split(".")[0] in line


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_ends_a_run_with_one_line_and_what_it_finished_saved(good_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the final evaluation stops before the next one and before the export: the last step
    is saved and the resume command finishes the run. A second Ctrl-C during a save stops at once: one
    line, exit 130, the lock released, no temporary left and the last checkpoint whole."""
    out, export = tmp_path / "out", tmp_path / "export"

    evaluations = []

    def interrupted(*args, **kwargs):
        if not evaluations:  # Ctrl-C, once, while the first evaluation runs
            os.kill(os.getpid(), signal.SIGINT)
        evaluations.append(args)
        return {"all": 0.0}
    monkeypatch.setattr(data, "evaluate", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.run(train.main, NANO + ["--max_steps=1", f"--out_dir={out}", f"--export={export}"])
    assert stop.value.code == 130
    assert f"stopped after step 1; saved: go on with python train.py --init_from=resume --out_dir={out}" \
        in capsys.readouterr().out
    assert not export.exists() and not (out / "results.json").exists()
    assert run_files.load_checkpoint(out / "ckpt.pt")["step"] == 1
    monkeypatch.setattr(data, "evaluate", lambda *args, **kwargs: {"all": 0.0})
    train.main(["--init_from=resume", f"--out_dir={out}"])  # the command it printed finishes the run
    assert (export / checkpoint_dirs.PANDA_CONFIG).is_file() and (out / "results.json").is_file()

    saved, step, save = (out / "ckpt.pt").read_bytes(), train.forward_backward, torch.save

    def first_ctrl_c(*args, **kwargs):  # during a step: it finishes, then its save begins
        os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    def second_ctrl_c(obj, f, *args, **kwargs):  # halfway through writing the checkpoint
        f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(train, "forward_backward", first_ctrl_c)
    monkeypatch.setattr(torch, "save", second_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        cli.run(train.main, ["--init_from=resume", "--max_steps=3", f"--out_dir={out}"])
    assert stop.value.code == 130 and "error: interrupted (Ctrl-C)" in capsys.readouterr().err
    assert (out / "run.lock").read_text() == ""
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []
    assert (out / "ckpt.pt").read_bytes() == saved
