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
    named = set(re.findall(r"`((?:docs|tools|tests)/[\w./-]+)`", README))
    assert {"docs/paper.md", "tools/bench.py"} <= named
    assert [name for name in named if not (ROOT / name).exists()] == []


@pytest.mark.parametrize("script", ["train.py", "sample.py", "tools/bench.py", "tools/ablate.py", "tools/export.py",
                                    "tools/random_export.py", "tools/loader_bench.py", "tools/teacher_bench.py"])
def test_every_script_answers_help_with_its_options(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "options (--key=value):" in result.stdout, result.stderr[-2000:]
    # every option is listed with its default and the comment its field has in the source
    assert re.search(r"^  --\w+=\S* +\w", result.stdout, re.M)
