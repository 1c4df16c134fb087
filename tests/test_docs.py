"""The commands the documentation shows are today's CLI: every `nin ...` line of a bash block, every inline `nin ...`
in the text, the shipped weights' commands and the recorded results' commands parse with `nin`'s own parser, name
registered models, and `--set` only fields that exist."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from nin.cli import build_parser
from nin.engine.config import TrainConfig, apply_overrides
from nin.errors import NinError
from nin.models import list_models
from nin.pretrained import PRETRAINED

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "RESULTS.md", *sorted((REPO / "docs").rglob("*.md"))]
# `FOO=bar nin ...`, `.venv/bin/nin ...`, `python -m nin ...`: what follows `nin`
NIN = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*/)?(?:nin|python3? -m nin)\s+(.*)$")
# an inline mention that is a pattern, not a command: `nin evaluate W --data-file ...`, `nin <command>: error`
PLACEHOLDER = re.compile(r"\.\.\.|…|<|\[|\s/\s|^\S+:")
# what an inline fragment may leave out: `nin predict --invert` names a flag, not a whole command
FRAGMENT = re.compile(r"required|expected one argument|invalid int value")


def doc_commands(text: str) -> list[tuple[str, str]]:
    """(kind, words after `nin`) for each command in a markdown text: "block" for a bash block's lines (joined over
    backslash continuations, split at `&&`, comments dropped), "inline" for `nin ...` in backticks."""
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                m = NIN.match(part.split(" #")[0].strip())
                if m:
                    found.append(("block", m.group(1)))
    for m in re.finditer(r"`((?:[A-Z_]+=\S+\s+)*nin [^`]+)`", text):
        found.append(("inline", NIN.match(" ".join(m.group(1).split())).group(1)))  # a span may wrap a line
    return [(kind, words) for kind, words in found if kind == "block" or not PLACEHOLDER.search(words)]


def _flags(parser: argparse.ArgumentParser, words: list[str]) -> set[str]:
    """The flags `nin WORDS` may use: those of each parser on the way to its (sub)command."""
    flags = {"-h", "--help"}
    for word in words:
        flags |= {s for a in parser._actions for s in a.option_strings}
        if word.startswith("-"):
            continue
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
        if word not in choices:
            break
        parser = choices[word]
    return flags | {s for a in parser._actions for s in a.option_strings}


def command_problem(words: str, fragment: bool = False) -> str | None:
    """Why `nin WORDS` is not a command of today's CLI, or None. Flags must be spelled out (argparse would take a
    prefix, which a later flag can make ambiguous)."""
    parser = build_parser()
    argv = shlex.split(words)
    known = _flags(parser, argv)
    unknown = [w for w in argv if w.startswith("--") and w.split("=")[0] not in known]
    if unknown:
        return f"{' '.join(unknown)}: not a flag of this command"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as e:
        message = (err.getvalue().strip().splitlines() or [""])[-1]
        if e.code == 0 or (fragment and FRAGMENT.search(message)):
            return None
        return message
    model = getattr(args, "model", None)
    if model is not None and model not in list_models():
        return f"--model {model}: not a registered model"
    try:
        apply_overrides(TrainConfig(dataset="cifar10"), getattr(args, "set", None) or [])
    except NinError as e:
        return str(e)
    return None


def test_the_checker_fails_on_what_it_should():
    assert command_problem("train --dataset cifar10 --epoks 3") is not None  # no such flag
    assert command_problem("train --dataset cifar10 --epoch 3") is not None  # a prefix: argparse takes it, docs may not
    assert command_problem("train --dataset cifar10 --set weight_decy=1e-4") is not None  # no such field
    assert command_problem("train --dataset cifar10 --model nin_cifar11") is not None
    assert command_problem("predik fast-mnist a.png") is not None
    assert command_problem("predict --invert") is not None and command_problem("predict --invert", fragment=True) is None
    assert command_problem("predict --inverted", fragment=True) is not None
    assert command_problem("--debug reproduce record runs/x --name x --results-dir r") is None
    assert command_problem("--debug reproduce record runs/x --name x --out-root r") is not None
    assert command_problem("train --dataset mnist --recipe paper --set seed=2 --set model.dropout=0") is None
    assert doc_commands("```bash\nnin train --dataset mnist \\\n  --epochs 2   # two\n```\n`nin evaluate W ...`") == \
        [("block", "train --dataset mnist    --epochs 2")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_parse(doc):
    commands = doc_commands(doc.read_text())
    problems = [f"nin {words}: {problem}" for kind, words in commands
                if (problem := command_problem(words, fragment=kind == "inline"))]
    assert not problems, "\n".join(problems)


def test_the_readme_shows_commands():  # the checker finds what it checks
    kinds = [kind for kind, _ in doc_commands((REPO / "README.md").read_text())]
    assert kinds.count("block") >= 20 and kinds.count("inline") >= 10


@pytest.mark.parametrize("tag", list(PRETRAINED))
def test_shipped_weights_commands_parse(tag):
    command = PRETRAINED[tag].command.replace("DATA", "data")
    assert command.startswith("nin ")
    assert command_problem(command[len("nin "):]) is None


@pytest.mark.parametrize("result", sorted((REPO / "results").glob("*.json")), ids=lambda p: p.name)
def test_recorded_commands_parse(result):
    command = json.loads(result.read_text())["command"]
    assert command.startswith("nin ")
    assert command_problem(command[len("nin "):]) is None


def test_the_readme_own_network_example_runs():
    """README's "In your own network" block, run as written: its GAP logits are the model's, its own net works."""
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class MyNet" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    torch = scope["torch"]
    assert scope["maps"].shape == (2, 10, 8, 8)
    assert torch.allclose(scope["logits"], scope["model"](scope["x"]), atol=1e-6)
    assert scope["MyNet"]()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
