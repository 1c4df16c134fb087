"""The code lints clean: no unused imports or names, no undefined names, no redefinitions (pyflakes)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    folders = [str(REPO / name) for name in ("src", "tests", "experiments", "benchmarks")]
    done = subprocess.run([sys.executable, "-m", "pyflakes", *folders], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr


def test_pyflakes_would_say_so(tmp_path):
    """The check above can fail: pyflakes reports an unused import and an undefined name, with the file."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    done = subprocess.run([sys.executable, "-m", "pyflakes", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "bad.py" in done.stdout
    assert "'os' imported but unused" in done.stdout and "undefined name 'undefined_name'" in done.stdout
