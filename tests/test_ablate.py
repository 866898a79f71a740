"""teaching/ablate.py: its own options checked before anything trains, one folder per run wherever it is
started from, finished runs kept, a failing run stops the sweep with train.py's message, progress read
from train.py's bar, and the table's means, spreads and changes."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tools import cli
from teaching import ablate

NANO = ("--train_args=--preset=nano --max_steps=2 --batch_size=2 --warmup_steps=1 --eval_samples=2 "
        "--questions_per_clip=1 --eval_every=100 --save_every=100")


def test_a_typo_in_its_options_is_an_error():
    with pytest.raises(ValueError, match="unknown option --seed; did you mean --seeds"):
        ablate.main(["--seed=1"])


@pytest.mark.parametrize("option, message", [
    ("--variants=full,no_such", "unknown variant"), ("--seeds=1,x", "--seeds expects"),
    ("--sweep=big", "--sweep must be"), ("--parallel=0", "--parallel must be"),
    ("--train_args=--seed=3", "cannot set --seed"), ("--train_args=--lste=false", "cannot set --lste"),
    ("--train_args=max_steps=3", "--key=value")])
def test_bad_options_are_errors_before_anything_trains(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        ablate.main([option, f"--out_dir={tmp_path / 'sweep'}"])
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_from_another_directory_keeps_each_run_in_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # train.py is found from ablate.py's own place, not the working directory
    argv = ["--variants=full,lsd_avgpool", "--seeds=3", "--parallel=2", "--threads=1", "--device=cpu",
            "--out_dir=sweep", NANO]
    ablate.main(argv)
    runs = ablate.plan(ablate.AblateConfig(**cli.parse_args(argv, "", ablate.AblateConfig)[0]))
    assert [r.folder for r in runs] == [tmp_path / "sweep" / "full-s3", tmp_path / "sweep" / "lsd_avgpool-s3"]
    for run in runs:
        assert run.progress() == (2, 2)  # read from train.py's own progress bar
        saved = json.loads((run.folder / "ablate.json").read_text())
        assert saved == run.args and "--seed=3" in saved
    assert "--lsd=avgpool" in runs[1].args and "--lsd=avgpool" not in runs[0].args
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| full Video-Panda | 1 |" in table and "| w/o LSD (avg pool) | 1 |" in table
    assert "done  full-s3" in capsys.readouterr().out and "2 of 2 runs finished" in table

    logs = [(r.folder / "train.log").read_text() for r in runs]
    ablate.main(argv)  # again: finished runs are kept, not trained again
    assert [(r.folder / "train.log").read_text() for r in runs] == logs
    with pytest.raises(ValueError, match="holds a run made with"):  # other options into the same folders
        ablate.main([*argv[:-1], NANO.replace("--max_steps=2", "--max_steps=3")])


def test_ctrl_c_stops_every_run_after_its_step_and_the_same_command_resumes(tmp_path, monkeypatch):
    options = ["--variants=full", "--seeds=1", "--device=cpu", "--threads=1", f"--out_dir={tmp_path}",
               NANO.replace("--max_steps=2", "--max_steps=100000")]
    # started as a background job would be, with Ctrl-C ignored: ablate.py must still stop on it
    sweep = subprocess.Popen([sys.executable, str(ablate.TRAIN.parent / "teaching" / "ablate.py"), *options],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run = ablate.plan(ablate.AblateConfig(**cli.parse_args(options, "", ablate.AblateConfig)[0]))[0]
    try:
        waited = 0
        while run.progress()[0] < 2 and sweep.poll() is None and waited < 600:  # until it has trained a step or two
            time.sleep(0.1)
            waited += 1
        sweep.send_signal(signal.SIGINT)
        out = sweep.communicate(timeout=120)[0]
    finally:  # a sweep that did not stop is stopped here, with its run (SIGTERM: ablate.py stops its runs)
        if sweep.poll() is None:
            sweep.terminate()
            sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "stopped; the same command again goes on" in out
    assert (run.folder / "ckpt.pt").exists() and not (run.folder / "results.json").exists()
    started = []
    monkeypatch.setattr(ablate.subprocess, "Popen", lambda command, **kwargs: started.append(command))
    ablate.start(run, threads=1)
    assert started[0][-1] == "--init_from=resume" and run.first_step >= 2


def test_a_failing_run_stops_the_sweep_with_train_pys_message(tmp_path):
    with pytest.raises(ValueError, match=r"full-s1 failed: error: unknown option --max_step; did you mean --max_steps"):
        ablate.main(["--variants=full", "--seeds=1", "--device=cpu", f"--out_dir={tmp_path}",
                     "--train_args=--max_step=5"])


def test_the_status_line_counts_time_left_from_each_runs_pace(tmp_path, monkeypatch):
    running = ablate.Run("full", 1, tmp_path / "full-s1", [])
    running.folder.mkdir()
    (running.folder / "train.log").write_text("model: ...\n  1%|          | 7/40 [00:14<01:06,  2.0s/it]"
                                              "\r 25%|##        | 10/40 [00:20<01:00,  2.0s/it, loss=1.0]")
    running.started = 1000.0
    monkeypatch.setattr(ablate.time, "time", lambda: 1020.0)
    waiting = [ablate.Run("no_lste", 1, tmp_path / "no_lste-s1", [])]
    # 10 of 40 steps in 20 s: 60 s left, 80 s a run; the waiting run takes as long: (60 + 80) / 1 slot
    line = ablate.status([running], waiting, [], parallel=1)
    assert "full-s1 10/40 (1:00 left)" in line and "1 waiting, ~2:20 left" in line
    finished = ablate.Run("full", 2, tmp_path / "full-s2", [], seconds=100.0)
    assert "~1:20 left" in ablate.status([running], waiting, [finished], parallel=2)  # (60 + 100) / 2


def test_the_table_gives_means_spreads_and_changes_beyond_the_noise(tmp_path):
    accuracy = {("full", 1): (0.9, 0.8), ("full", 2): (0.8, 0.9), ("lsd_avgpool", 1): (0.7, 0.6),
                ("lsd_avgpool", 2): (0.6, 0.6)}
    runs = []
    for (variant, seed), (spatial, temporal) in accuracy.items():
        run = ablate.Run(variant, seed, tmp_path / f"{variant}-s{seed}", [])
        run.folder.mkdir()
        heldout = {"spatial": spatial, "temporal": temporal}
        (run.folder / "results.json").write_text(json.dumps(
            {"heldout": heldout, "test": heldout, "heldout_shuffled": {"spatial": spatial, "temporal": 0.5}}))
        runs.append(run)
    rows = ablate.table(runs).splitlines()
    # full: spatial 85.0 ± 7.1 (sd of 0.9, 0.8), temporal 85.0 ± 7.1; avg pool: 65.0 ± 7.1 and 60.0 ± 0.0
    assert rows[2].startswith("| full Video-Panda | 2 | 85.0 ± 7.1 | 85.0 ± 7.1 | 50.0 ± 0.0 |  | 64.7 / 40.0 |")
    # spatial: -20.0 ± 2 * sqrt(0.005/2 + 0.005/2) = ± 14.1; temporal: -25.0 ± 2 * sqrt(0.005/2) = ± 10.0
    assert rows[3] == ("| w/o LSD (avg pool) | 2 | 65.0 ± 7.1 | 60.0 ± 0.0 | 50.0 ± 0.0 | -20.0 ± 14.1, -25.0 ± 10.0 "
                       "| 58.0 / 38.1 |")
