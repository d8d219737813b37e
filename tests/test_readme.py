"""The README as a new user meets it: every Python block runs as written (in a fresh folder
holding the repository's examples/), and every command it shows for our programs parses with
the program's own argument parser, so a renamed or removed flag fails here first."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

import bench
import convert
import mixer
import train
from conftest import REPO

with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    README = _f.read()

PROSE = re.sub(r"```.*?```", "", README, flags=re.S)  # the text outside code blocks
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
PARSERS = {"mixer.py": mixer.build_parser, "mixer": mixer.build_parser,
           "convert.py": convert.build_parser, "mixer-convert": convert.build_parser,
           "train.py": train.build_parser, "mixer-train": train.build_parser,
           "bench.py": bench.build_parser}


def commands():
    """Every invocation of our programs in the README: in sh blocks and in inline code."""
    texts = re.findall(r"```sh\n(.*?)```", README, re.S)
    texts += [span.replace("\n", " ") for span in re.findall(r"`([^`]{1,400})`", PROSE)
              if re.search(r"\b(mixer|convert|train|bench)\.py\b|\bmixer(-convert|-train)?\b ",
                           span)]
    found = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line.split("#")[0]):
                words = shlex.split(part)
                for i, word in enumerate(words):
                    program = os.path.basename(word)
                    runs = (i > 0 and re.fullmatch(r"python3?", os.path.basename(words[i - 1]))
                            if program.endswith(".py") else i == 0)
                    if program in PARSERS and runs:
                        if not any(w.startswith("[") for w in words):  # not a usage synopsis
                            found.append((program, words[i + 1:], part.strip()))
                        break
    return found


def test_the_readme_shows_commands_for_every_program():
    programs = {program for program, _, _ in commands()}
    assert {"mixer.py", "convert.py", "train.py", "bench.py"} <= programs, programs


@pytest.mark.parametrize("program,args,line", commands(), ids=lambda v: v if isinstance(v, str)
                         and " " in v else None)
def test_every_command_parses(program, args, line, capsys):
    try:
        PARSERS[program]().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"README command does not parse ({e.code}): {line}\n{capsys.readouterr().err}")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_blocks_run_as_written(index, tmp_path):
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    env = {**os.environ, "PYTHONPATH": REPO, "MIXER_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", PYTHON_BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
