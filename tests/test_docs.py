"""The README tells the truth about the code: its line counts are `wc -l` of the files, every file and
doc it points to exists, and every script answers --help with its options."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readmes_line_counts_are_the_files():
    rows = re.findall(r"^\| `([\w/.]+)` \| (\d+) \|", README, re.M)
    assert len(rows) >= 10
    for name, lines in rows:
        path = ROOT / name
        count = sum(len(p.read_text().splitlines()) for p in sorted(path.glob("*.py"))) if path.is_dir() \
            else len(path.read_text().splitlines())
        assert count == int(lines), f"README says {name} has {lines} lines; it has {count}"


def test_the_files_and_docs_the_readme_names_exist():
    folders = "docs|tools|tests|real_video|checkpoints|distillation|multi_gpu|gpu_speed|teaching"
    named = set(re.findall(rf"`((?:{folders})/[\w./-]+)`", README))
    assert {"docs/paper.md", "gpu_speed/bench.py"} <= named
    assert [name for name in named if not (ROOT / name).exists()] == []


SCRIPTS = ["train.py", "sample.py", "gpu_speed/bench.py", "teaching/ablate.py", "checkpoints/export.py",
           "checkpoints/random_export.py", "real_video/loader_bench.py", "distillation/teacher_bench.py",
           "tools/shapes.py"]

# Runs each script as `python SCRIPT --help` would (its folder first on sys.path, run as __main__), all in one
# interpreter so that torch is imported once; the project's own modules are forgotten between scripts, so
# that each must find its imports itself.
HELP_RUNNER = """
import os, runpy, sys
root, scripts = sys.argv[1], sys.argv[2:]
path = list(sys.path[1:])
for script in scripts:
    files = {n: getattr(m, "__file__", None) or "" for n, m in sys.modules.items()}
    mine = [n for n, f in files.items() if f.startswith(root + os.sep) and "site-packages" not in f]
    for name in mine:  # the project's modules and packages (each folder has an __init__.py)
        del sys.modules[name]
    sys.path[:] = [os.path.dirname(os.path.join(root, script))] + path
    sys.argv = [script, "--help"]
    print(f"=== {script}", flush=True)
    try:
        runpy.run_path(os.path.join(root, script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    print(f"=== exit {code}", flush=True)
"""


@pytest.fixture(scope="module")
def help_pages():
    """{script: (exit code, what it printed)} for `python SCRIPT --help`, run from another folder."""
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, str(ROOT), *SCRIPTS], cwd=ROOT.parent,
                            capture_output=True, text=True, timeout=300)
    pages = re.findall(r"^=== (\S+)\n(.*?)^=== exit (\S+)$", result.stdout, re.M | re.S)
    assert [script for script, _, _ in pages] == SCRIPTS, result.stdout[-2000:] + result.stderr[-2000:]
    return {script: (code, text) for script, text, code in pages}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_its_options(script, help_pages):
    code, text = help_pages[script]
    assert code == "0" and "options (--key=value):" in text, text[-2000:]
    # every option is listed with its default and the comment its field has in the source
    assert re.search(r"^  --\w+=\S* +\w", text, re.M)
