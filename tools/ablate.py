"""Train every ablation of the paper's Table 4 on the synthetic task, for several seeds, and tabulate
held-out exact-match accuracy per question family (mean and spread over seeds).

    python ablate.py                                  # all variants, seeds 1 2 3, 2 runs at a time
    python ablate.py --seeds=1,2 --parallel=8 --device=cuda --max_steps=1800

Every other --key=value goes to train.py unchanged. Each run writes out/ablate/<variant>-s<seed>/,
and results.json there; the table goes to out/ablate/results.md.
"""

import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = {  # name in the paper's Table 4 -> PandaConfig switches
    "full Video-Panda": [],
    "w/o <row> split tokens": ["--split_tokens=false"],
    "w/o FSRA": ["--fsra=false"],
    "w/o LSD (avg pool)": ["--lsd=avgpool"],
    "w/o LSTE": ["--lste=false"],
    "w/o GSTRA": ["--gstra=false"],
    "w/o GSTRA & LSTE": ["--gstra=false", "--lste=false"],
}
PAPER = {  # Table 4: MSVD-QA and ActivityNet-QA accuracy (%)
    "full Video-Panda": (64.7, 40.0), "w/o <row> split tokens": (63.2, 39.5), "w/o FSRA": (63.4, 39.2),
    "w/o LSD (avg pool)": (58.0, 38.1), "w/o LSTE": (63.6, 39.4), "w/o GSTRA": (63.0, 38.2),
    "w/o GSTRA & LSTE": (62.2, 38.1),
}


def run(variant, seed, out_root, extra):
    out = out_root / f"{variant.replace(' ', '_').replace('/', '').replace('<', '').replace('>', '')}-s{seed}"
    if not (out / "results.json").exists():  # finished runs are kept: rerunning fills in the missing ones
        cmd = [sys.executable, "train.py", f"--out_dir={out}", f"--seed={seed}", *VARIANTS[variant], *extra]
        log = out.with_suffix(".log")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    return json.loads((out / "results.json").read_text())


def cell(values):
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.1%}" if len(values) > 1 else ""
    return f"{mean:.1%}{spread}"


def main(argv):
    seeds, parallel, out_root, extra = [1, 2, 3], 2, Path("out/ablate"), []
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key == "seeds":
            seeds = [int(s) for s in value.split(",")]
        elif key == "parallel":
            parallel = int(value)
        elif key == "out_root":
            out_root = Path(value)
        else:
            extra.append(arg)
    jobs = [(v, s) for v in VARIANTS for s in seeds]
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda job: run(*job, out_root, extra), jobs))
    rows = ["| variant | held-out spatial | held-out temporal | temporal, frames shuffled | paper MSVD / ANet |",
            "|---|---|---|---|---|"]
    for variant in VARIANTS:
        mine = [r for (v, _), r in zip(jobs, results) if v == variant]
        rows.append(f"| {variant} | {cell([r['heldout']['spatial'] for r in mine])} | "
                    f"{cell([r['heldout']['temporal'] for r in mine])} | "
                    f"{cell([r['heldout_shuffled']['temporal'] for r in mine])} | "
                    f"{PAPER[variant][0]} / {PAPER[variant][1]} |")
    table = "\n".join(rows)
    (out_root / "results.md").write_text(f"seeds {seeds}; train.py {' '.join(extra)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
