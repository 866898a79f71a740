"""The paper's Table 4 on the synthetic task: train ablated variants of the STAB for several seeds and
tabulate held-out exact-match accuracy per question family, mean ± standard deviation over the seeds,
each variant's change from the full model, and the paper's numbers beside them.

    python teaching/ablate.py --sweep=class                 # for a class: LSD and LSTE, short runs, 2 cores
    python teaching/ablate.py                               # all of Table 4 at train.py's defaults (hours on a CPU)
    python teaching/ablate.py --device=cuda --parallel=21   # the same on one GPU, every run side by side
    python teaching/ablate.py --variants=full,no_fsra --seeds=1,2 --train_args="--max_steps=600"

Each run is train.py in a folder of its own, out_dir/<variant>-s<seed>/ (train.log, the checkpoint,
results.json). A run finished there is not repeated and a stopped one resumes, so the same command
again goes on where a sweep stopped (Ctrl-C stops every run after its current step). While it runs, a
line a minute says how far each run is and how long the sweep has left, and out_dir/results.md holds
the table of the runs finished so far; at the end the table is printed. Variants: full, no_split, no_fsra, lsd_avgpool, no_lste, no_gstra,
no_gstra_lste. docs/ablations.md has the measured tables and how to read them.
"""

import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, wherever this runs from
from tools import cli  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
VARIANTS = {  # name: (the row of the paper's Table 4, train.py's switches, the paper's MSVD-QA / ActivityNet-QA)
    "full": ("full Video-Panda", (), (64.7, 40.0)),
    "no_split": ("w/o <row> split tokens", ("--split_tokens=false",), (63.2, 39.5)),
    "no_fsra": ("w/o FSRA", ("--fsra=false",), (63.4, 39.2)),
    "lsd_avgpool": ("w/o LSD (avg pool)", ("--lsd=avgpool",), (58.0, 38.1)),
    "no_lste": ("w/o LSTE", ("--lste=false",), (63.6, 39.4)),
    "no_gstra": ("w/o GSTRA", ("--gstra=false",), (63.0, 38.2)),
    "no_gstra_lste": ("w/o GSTRA & LSTE", ("--gstra=false", "--lste=false"), (62.2, 38.1)),
}
SWEEPS = {  # name: (variants, seeds, train.py options); docs/ablations.md says how each was chosen
    "table4": (tuple(VARIANTS), "1,2,3", ""),
    "class": (("full", "lsd_avgpool", "no_lste"), "1,2,3,4", "--max_steps=400 --batch_size=16"),
}
SET_HERE = ("out_dir", "seed", "device", "init_from", "split_tokens", "fsra", "lsd", "lste", "gstra")  # ablate's to set
STEP = re.compile(r"(\d+)/(\d+) \[")  # train.py's progress bar: "640/1300 [04:10<..."


@dataclass
class AblateConfig:
    sweep: str = "table4"        # table4: Table 4's 7 variants at train.py's defaults | class: LSD and LSTE, short runs
    variants: str = ""           # comma-separated variant names; empty: the sweep's
    seeds: str = ""              # comma-separated seeds; empty: the sweep's
    train_args: str = ""         # more train.py options, space-separated, after the sweep's: "--max_steps=800"
    device: str = "auto"         # where the runs train (train.py --device); several runs can share one GPU
    parallel: int = 2            # runs at a time
    threads: int = 0             # CPU threads per run (OMP_NUM_THREADS); 0: this machine's cores / parallel
    out_dir: str = "out/ablate"  # a folder per run inside it, and the table, results.md


@dataclass
class Run:
    """One training run: a variant, a seed, its folder, and while it trains its process."""
    variant: str
    seed: int
    folder: Path
    args: list
    process: subprocess.Popen = None
    started: float = 0.0  # when its process started
    first_step: int = 0   # where it started from: 0, or the step of the checkpoint it resumed
    seconds: float = 0.0  # how long it took, once finished

    @property
    def name(self):
        """variant-sseed, its folder's name."""
        return self.folder.name

    def progress(self):
        """(steps done, steps in all) as train.py's progress bar last showed them; (0, 0) before it starts."""
        log = self.folder / "train.log"
        if not log.exists():
            return 0, 0
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            found = STEP.findall(f.read().decode(errors="replace"))
        return tuple(map(int, found[-1])) if found else (0, 0)


def plan(ac):
    """The runs the options ask for, each with its train.py arguments; bad options are errors here,
    before anything trains. train.py checks its own options when the first run starts."""
    if ac.sweep not in SWEEPS:
        raise ValueError(f"--sweep must be one of {', '.join(SWEEPS)}; got {ac.sweep!r}")
    variants, seeds, _ = SWEEPS[ac.sweep]
    variants = ac.variants.split(",") if ac.variants else variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in (ac.seeds or seeds).split(",")]
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated whole numbers, e.g. 1,2,3; got {ac.seeds!r}") from None
    if ac.parallel < 1 or ac.threads < 0:
        raise ValueError(f"--parallel must be at least 1 and --threads at least 0; got {ac.parallel} and {ac.threads}")
    out, shared = Path(ac.out_dir).resolve(), shared_options(ac)
    return [Run(v, s, out / f"{v}-s{s}", [*VARIANTS[v][1], f"--seed={s}", *shared]) for v in variants for s in seeds]


def shared_options(ac):
    """The train.py options of every run: --device, the sweep's, then --train_args."""
    extra = (SWEEPS[ac.sweep][2] + " " + ac.train_args).split()
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"--train_args holds train.py options as --key=value; got {arg!r}")
        if arg[2:].split("=")[0] in SET_HERE:
            raise ValueError(f"--train_args cannot set {arg.split('=')[0]}: ablate.py sets it for every run "
                             f"(--seeds, --variants, --device and --out_dir are its own options)")
    latest = {arg.split("=")[0]: arg for arg in extra}  # --train_args's value of a key replaces the sweep's
    return [f"--device={ac.device}", *latest.values()]


def check_folder(run):
    """A run's folder, if it exists, must be this run's: made by ablate.py with the same train.py options."""
    record = run.folder / "ablate.json"  # the options the folder's run was started with
    if run.folder.exists() and any(run.folder.iterdir()):
        made_with = json.loads(record.read_text()) if record.exists() else None
        if made_with != run.args:
            theirs = f"with {' '.join(made_with)}" if made_with else "not by ablate.py"
            raise ValueError(f"{run.folder} holds a run made {theirs}, not with {' '.join(run.args)}: "
                             f"pick another --out_dir")


def start(run, threads):
    """Start train.py for `run` in its folder (or resume it there), its output into train.log."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "ablate.json").write_text(json.dumps(run.args))
    resume = ["--init_from=resume"] if (run.folder / "ckpt.pt").exists() else []
    run.first_step = run.progress()[0] if resume else 0  # the log goes on: its last step is about the checkpoint's
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run.folder / "train.log", "ab") as log:
        # apart from the terminal: its Ctrl-C reaches ablate.py alone, which then stops each run once (stop())
        run.process = subprocess.Popen([sys.executable, str(TRAIN), f"--out_dir={run.folder}", *run.args, *resume],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, cwd=TRAIN.parent,
                                       start_new_session=True)
    run.started = time.time()


def clock(seconds):
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def status(running, waiting, finished, parallel):
    """One line: each running run's step and time left, and the sweep's. A run's time left is its own
    pace over its remaining steps; a waiting run is as long as the finished ones were on average
    (before any has finished: as the running ones will be); they share `parallel` slots."""
    parts, left, whole = [], [], []
    for run in running:
        done, total = run.progress()
        if done > run.first_step:
            spent = time.time() - run.started
            left.append(spent * (total - done) / (done - run.first_step))
            whole.append(spent + left[-1])
            parts.append(f"{run.name} {done}/{total} ({clock(left[-1])} left)")
        else:
            parts.append(f"{run.name} starting")
    typical = statistics.mean([r.seconds for r in finished] or whole or [math.nan])
    eta = (sum(left) + typical * len(waiting)) / parallel
    eta = "?" if math.isnan(eta) else clock(eta)
    return f"  {'; '.join(parts)}; sweep: {len(finished)} done, {len(waiting)} waiting, ~{eta} left"


def sweep(runs, ac, finished_one):
    """Train every run not finished yet, `parallel` at a time, reporting as they go; finished_one() is
    called after each run that finishes."""
    threads = ac.threads or max(1, (os.cpu_count() or 1) // ac.parallel)
    for run in runs:
        check_folder(run)
    waiting = [r for r in runs if not (r.folder / "results.json").exists()]
    finished, running, said = [], [], time.time()
    # Ctrl-C, and kill as `timeout` sends it, both stop the sweep; SIGINT explicitly too, because a shell that
    # starts a command in the background (`&`) starts it with Ctrl-C ignored, and Python then keeps it ignored
    on_signal = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"{len(runs)} runs, {len(runs) - len(waiting)} already done; {ac.parallel} at a time, "
          f"{threads} CPU thread(s) each; train.py {' '.join(shared_options(ac))}")
    try:
        while waiting or running:
            while waiting and len(running) < ac.parallel:
                run = waiting.pop(0)
                start(run, threads)
                running.append(run)
                print(f"start {run.name}: {run.folder / 'train.log'}", flush=True)
            time.sleep(1)
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                if run.process.returncode:
                    stop(running)
                    raise ValueError(f"{run.name} failed: {last_line(run.folder / 'train.log')} "
                                     f"(the whole log: {run.folder / 'train.log'})")
                run.seconds = time.time() - run.started
                finished.append(run)
                heldout = json.loads((run.folder / "results.json").read_text())["heldout"]
                print(f"done  {run.name} in {clock(run.seconds)}: held-out spatial {heldout['spatial']:.1%}, "
                      f"temporal {heldout['temporal']:.1%}", flush=True)
                finished_one()
            if running and time.time() - said >= 60:
                print(status(running, waiting, finished, ac.parallel), flush=True)
                said = time.time()
    except KeyboardInterrupt:
        stop(running)
        print("stopped; the same command again goes on from here")
        sys.exit(130)
    finally:
        for s, handler in on_signal.items():
            signal.signal(s, handler)


def stop(running):
    """Ask each run to stop after its current step, which it saves (the same command resumes it); wait for them."""
    for run in running:
        run.process.terminate()
    for run in running:
        run.process.wait()


def last_line(log):
    """The last line a run wrote (train.py's "error: ..." when it failed)."""
    lines = [line for line in re.split(r"[\r\n]", log.read_text(errors="replace")) if line.strip()]
    return lines[-1].strip() if lines else "(nothing written)"


# ------------------------------------------------------------------------------------ the table

def cell(values):
    """'mean ± sd' in percent over seeds (one seed: the value alone)."""
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.1f}{spread}"


def change(values, full):
    """The variant's mean minus the full model's, in points, ± two standard errors of that difference:
    a change larger than its ± is unlikely to be seed noise."""
    if len(values) < 2 or len(full) < 2:
        return f"{100 * (statistics.mean(values) - statistics.mean(full)):+.1f}"
    error = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(full) / len(full))
    return f"{100 * (statistics.mean(values) - statistics.mean(full)):+.1f} ± {200 * error:.1f}"


def table(runs):
    """The markdown table of the runs' results.json files: a row per variant."""
    results = {}
    for run in runs:
        results.setdefault(run.variant, []).append(json.loads((run.folder / "results.json").read_text()))
    rows = ["| variant | seeds | held-out spatial | held-out temporal | temporal, frames shuffled | "
            "change vs full: spatial, temporal | paper MSVD / ANet |", "|---|---|---|---|---|---|---|"]
    full = {f: [r["heldout"][f] for r in results.get("full", [])] for f in ("spatial", "temporal")}
    for variant, mine in results.items():
        spatial, temporal = ([r["heldout"][f] for r in mine] for f in ("spatial", "temporal"))
        versus = f"{change(spatial, full['spatial'])}, {change(temporal, full['temporal'])}" \
            if variant != "full" and full["spatial"] else ""
        label, _, paper = VARIANTS[variant]
        rows.append(f"| {label.replace('<', '`<').replace('>', '>`')} | {len(mine)} | {cell(spatial)} | "
                    f"{cell(temporal)} | {cell([r['heldout_shuffled']['temporal'] for r in mine])} | {versus} | "
                    f"{paper[0]} / {paper[1]} |")
    return "\n".join(rows)


def write_results(runs, ac, argv, began):
    """out_dir/results.md: the command, and the table of the runs finished so far; returns its text."""
    done = [r for r in runs if (r.folder / "results.json").exists()]
    text = (f"python teaching/ablate.py {shlex.join(argv)}\n\n{len(done)} of {len(runs)} runs finished after "
            f"{clock(time.time() - began)}; train.py {' '.join(shared_options(ac))}\n\n{table(done)}\n")
    (Path(ac.out_dir) / "results.md").write_text(text)
    return text


def main(argv):
    (changes,) = cli.parse_args(argv, __doc__, AblateConfig)
    ac = replace(AblateConfig(), **changes)
    runs, began = plan(ac), time.time()
    sweep(runs, ac, lambda: write_results(runs, ac, argv, began))
    print(write_results(runs, ac, argv, began))


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
