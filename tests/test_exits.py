"""How the programs end: Ctrl-C while a program is still starting (importing numpy, mixer, a
backend) is one line and status 130, like Ctrl-C at any later moment; run_main turns every other
ending into one line and a status; a closed stdout ends quietly."""

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


# --- run_main: every way a program can end is one line and a status ---------------------------

def run_body(body, capsys):
    import mixer
    status = mixer.run_main("prog", body)
    return status, capsys.readouterr().err


def raiser(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize("exc, status, line", [
    (None, 0, ""),
    ("mixer", 2, "prog: error: bad input, what to do\n"),
    (OSError(28, "No space left on device", "/x/out.bin"), 2,
     "prog: error: /x/out.bin: No space left on device\n"),
    (MemoryError(), 2, "prog: error: out of memory (a smaller batch or model may fit)\n"),
    (KeyboardInterrupt(), 130, "prog: interrupted\n"),
    ("terminated", 143, "prog: stopped by SIGTERM\n"),
    (ZeroDivisionError("division by zero"), 1,
     "prog: internal error: ZeroDivisionError: division by zero (please report it; "
     "MIXER_DEBUG=1 shows the traceback)\n"),
])
def test_run_main_ends_each_way_in_one_line(capsys, exc, status, line):
    import signal

    import mixer
    exc = {"mixer": mixer.MixerError("bad input, what to do"),
           "terminated": mixer.Terminated(signal.SIGTERM)}.get(exc, exc)
    body = (lambda: 0) if exc is None else raiser(exc)
    assert run_body(body, capsys) == (status, line)


def test_run_main_restores_the_signal_handlers():
    import signal

    import mixer
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    seen = []
    mixer.run_main("prog", lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert seen[0] not in before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`python mixer.py a.jpg b.jpg --json | head -1` used to end in a BrokenPipeError traceback.
    `true` has exited before mixer.py writes (it starts in ~0.3 s), so the write always fails."""
    import mixer
    weights = str(tmp_path / "w.safetensors")
    config = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                               channels_mlp_dim=8, num_classes=3, image_size=8)
    mixer.init(config, backend="numpy").save(weights)
    image = os.path.join(REPO, "examples", "chelsea.jpg")
    command = (f"{sys.executable} {os.path.join(REPO, 'mixer.py')} {image} {image} --weights "
               f"{weights} --json --backend numpy | true; echo \" status=${{PIPESTATUS[0]}}\"")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.stderr == "" and done.stdout.endswith(" status=141\n"), done


def test_load_takes_a_path(tmp_path):
    import mixer
    for bad in (None, 12345, ["a.safetensors"]):
        with pytest.raises(mixer.MixerError, match="load\\(\\) takes the path of a weights file"):
            mixer.load(bad)


def test_label_extractor_explains_itself():
    done = subprocess.run([sys.executable, os.path.join(REPO, "labels", "extract.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "TIMM_WHEEL" in done.stdout
    done = subprocess.run([sys.executable, os.path.join(REPO, "labels", "extract.py"),
                           "/nonexistent.whl"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
