"""Ctrl-C while a program is still starting (importing numpy, mixer, a backend) is one line and
status 130, like Ctrl-C at any later moment, never a KeyboardInterrupt traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("program", ["mixer.py", "convert.py", "train.py"])
def test_ctrl_c_while_importing_numpy(tmp_path, program):
    """A stand-in numpy, first on the path, interrupts its own import: the signal lands exactly
    where a real Ctrl-C during start-up would."""
    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    done = subprocess.run([sys.executable, os.path.join(REPO, program), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    name = program[:-len(".py")]
    assert (done.returncode, done.stderr, done.stdout) == (130, f"{name}: interrupted\n", "")
