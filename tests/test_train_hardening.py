"""train.py against careless and hostile use: run directories shared by two runs, bad paths and
numbers, damaged run directories, full disks, unreadable and strange data folders, signals at
every stage. Every refusal is exit status 2 and one line on stderr, with nothing left behind.

Runs are tiny (16px images, the SMALL architecture, batches of 4) so that each case takes about
a second; only the signal cases start a real process, since what they test is a process's exit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import mixer
import train
from conftest import REPO
from test_train import CLASSES, SMALL, make_dataset

TINY = [*(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()), "--image-size", "16",
        "--batch-size", "4", "--backend", "mlx"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 images of each of the 4 colours, no val/."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), {"train": 3}, size=16)


def cli(capsys, *argv):
    """train.main(argv) -> (exit status, stderr lines)."""
    code = train.main([str(a) for a in argv])
    return code, capsys.readouterr().err.splitlines()


def assert_refused(code, err, message):
    """Exit 2, and the error is the last line; lines before it (a run that had started) are the
    run's ordinary messages, never a traceback."""
    assert code == 2, err
    assert err and all(line.startswith("train: ") for line in err), err
    assert err[-1].startswith("train: error: ") and message in err[-1], err
    assert sum("error" in line for line in err) == 1, err


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`: to show that it was left alone."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------
# A run owns its directory.


def test_default_run_dirs_started_in_the_same_second_differ(data, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.time, "strftime", lambda *args: "20250101-120000")
    os.makedirs("runs/20250101-120000")  # made by another run in the same second
    first = train.RunDir.claim_new(None)  # a run that is still going
    try:
        code, err = cli(capsys, data, *TINY, "--steps", "1", "--val-fraction", "0")
        assert code == 0, err
        assert first.path == os.path.join("runs", "20250101-120000-2")
        assert err[-1].endswith("runs/20250101-120000-3/last.safetensors"), err
        assert sorted(os.listdir("runs")) == ["20250101-120000", "20250101-120000-2",
                                              "20250101-120000-3"]
        # the other runs' folders are untouched
        assert os.listdir("runs/20250101-120000") == []
        assert os.listdir(first.path) == ["train.lock"]
    finally:
        first.release()
    assert not os.path.exists(first.path)  # it saved nothing: it leaves nothing


def test_a_live_run_directory_is_refused(data, tmp_path, capsys):
    """The lock of a live run (held here in-process: flock conflicts between two opens of the
    file) refuses a new run with the same --out and a --resume of it."""
    out = str(tmp_path / "run")
    code, err = cli(capsys, data, *TINY, "--steps", "2", "--val-fraction", "0", "--out", out,
                    "--log-every", "1")
    assert code == 0, err
    before = snapshot(out)
    live = train.RunDir.claim_existing(out)
    try:
        for argv in ([data, *TINY, "--steps", "2", "--out", out], ["--resume", out]):
            code, err = cli(capsys, *argv)
            assert_refused(code, err, f"{out} is in use by another train.py run (process "
                                      f"{os.getpid()})")
            assert len(err) == 1
    finally:
        live.release()
    assert snapshot(out) == before
    code, err = cli(capsys, "--resume", out)  # free again
    assert code == 0, err


@pytest.mark.parametrize("content, message", [
    (None, None),  # an empty folder may be the run directory
    ("train.lock", None),  # left by a run that ended
    ("notes.txt", "is not empty (it holds 'notes.txt')"),
    ("metrics.jsonl", "is not empty (it holds 'metrics.jsonl')"),
    ("state.safetensors", "already holds a run: continue it with --resume"),
])
def test_existing_out_folder(data, tmp_path, capsys, content, message):
    out = tmp_path / "out"
    out.mkdir()
    if content:
        (out / content).write_text("someone else's")
    before = snapshot(out)
    code, err = cli(capsys, data, *TINY, "--steps", "1", "--val-fraction", "0", "--out", out)
    if message is None:
        assert code == 0, err
        assert sorted(os.listdir(out)) == ["curves.png", "last.safetensors", "metrics.jsonl",
                                           "state.safetensors", "train.lock"]
    else:
        assert_refused(code, err, message)
        assert len(err) == 1 and snapshot(out) == before


def test_a_run_that_saved_nothing_leaves_nothing(tmp_path, capsys):
    """A bad dataset is found after the run directory is claimed: the folder it made goes, and
    an empty folder given as --out is left empty."""
    (tmp_path / "data" / "train" / "red").mkdir(parents=True)
    given = tmp_path / "given"
    given.mkdir()
    for out in (tmp_path / "made", given):
        code, err = cli(capsys, tmp_path / "data", *TINY, "--steps", "1", "--out", out)
        assert_refused(code, err, "found only the class 'red'")
        assert len(err) == 1
    assert not (tmp_path / "made").exists() and os.listdir(given) == []


# --------------------------------------------------------------------------------------------
# Bad paths and numbers: one line, exit 2, nothing created.


@pytest.mark.parametrize("case, argv, message", [
    ("out is a file", ["--out", "{tmp}/file"], "--out {tmp}/file exists and is not a directory"),
    ("out under a file", ["--out", "{tmp}/file/run"], "{tmp}/file is not a directory"),
    ("runs/ is a file", [], "cannot create the run directory runs/"),
    ("epochs inf", ["--epochs", "inf"], "--epochs must be a finite positive number, got inf"),
    ("epochs nan", ["--epochs", "nan"], "--epochs must be a finite positive number, got nan"),
    ("lr inf", ["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    ("memory budget 0", ["--memory-budget", "0"],
     "--memory-budget must be a finite positive number, got 0.0"),
    ("memory budget nan", ["--memory-budget", "nan"],
     "--memory-budget must be a finite positive number, got nan"),
    ("memory budget -1", ["--memory-budget", "-1"],
     "--memory-budget must be a finite positive number, got -1.0"),
    ("image size 0", ["--image-size", "0"], "--image-size must be at least 1, got 0"),
    ("image size -16", ["--image-size", "-16"], "--image-size must be at least 1, got -16"),
    ("image size 20", ["--image-size", "20"], "--image-size 20: image_size 20 is not a multiple"),
    ("patch size 0", ["--patch-size", "0"], "--patch-size must be at least 1, got 0"),
    ("resume and out", ["--resume", "{tmp}", "--out", "{tmp}/run"], "drop --out"),
])
def test_bad_paths_and_numbers_exit_2(data, tmp_path, monkeypatch, capsys, case, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("a file")
    (tmp_path / "runs").write_text("a file where the default run folder goes")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--epochs" not in argv:
        argv += ["--steps", "1"]
    if "--out" not in argv and case != "runs/ is a file":  # past the run directory
        argv += ["--out", str(tmp_path / "run"), "--val-fraction", "0"]
    before = snapshot(tmp_path)
    code, err = cli(capsys, data, *TINY, *argv)
    assert_refused(code, err, message.replace("{tmp}", str(tmp_path)))
    assert len(err) == 1
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["file", "runs"]


def test_unwritable_folder_exit_2(data, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root writes into a read-only folder: the refusal is simulated where it would happen
        mkdir = os.mkdir

        def refusing(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(locked):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return mkdir(path, *args, **kwargs)
        monkeypatch.setattr(os, "mkdir", refusing)
    for argv, where in ((["--out", locked / "run"], locked / "run"), ([], "runs")):
        monkeypatch.chdir(locked)
        code, err = cli(capsys, data, *TINY, "--steps", "1", *argv)
        assert_refused(code, err, f"cannot create the run directory {where}")
    assert os.listdir(locked) == []


def test_no_training_backend_names_both(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MIXER_BACKEND", raising=False)
    monkeypatch.setattr(mixer, "installed", lambda module: False)
    code, err = cli(capsys, data, "--variant", "S/32", "--steps", "1", "--out", tmp_path / "r")
    assert_refused(code, err, 'pip install "mlx[cpu]" (Linux) or mlx (macOS), or pip install '
                              'tinygrad')
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------
# --resume of a damaged run directory.


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory):
    """A run stopped after step 1 of 3, with one metrics record."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    result = train.train(data_dir=data, **SMALL, image_size=16, batch_size=4, steps=3,
                         val_fraction=0, log_every=1, backend="mlx", out=out, stop_after=1,
                         quiet=True)
    assert result.interrupted and result.step == 1
    return out


def rewrite_state(path, change):
    """Rewrites state.safetensors after change(tensors, info) edits its tensors and metadata."""
    tensors, metadata = mixer.read_safetensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    info = json.loads(metadata["train.state"])
    info = change(tensors, info) or info
    metadata["train.state"] = json.dumps(info)
    mixer.write_safetensors(path, tensors, metadata)


def _drop(d, key):
    del d[key]


DAMAGE = {
    "state is a list": lambda t, i: [i],
    "no step": lambda t, i: _drop(i, "step"),
    "step 1.5": lambda t, i: i.update(step=1.5),
    "step '1'": lambda t, i: i.update(step="1"),
    "settings a list": lambda t, i: i.update(settings=[]),
    "no steps setting": lambda t, i: _drop(i["settings"], "steps"),
    "no window": lambda t, i: _drop(i, "window"),
    "missing tensor": lambda t, i: _drop(t, "params/head/bias"),
    "misshapen tensor": lambda t, i: t.update({"momentum/head/kernel": np.zeros((2, 2))}),
    "NaN parameter": lambda t, i: t["params/stem/bias"].__setitem__(0, np.nan),
}


RECORD = b'{"step": %d, "lr": 0.1, "loss": 1.0%s}\n'
METRICS_DAMAGE = {"partial metrics line": b'{"step": 2, "lo', "binary metrics": b"\x00\xff\x89PNG\n",
                  "metrics not a record": b"[2, 0.5]\n", "metrics step repeated": RECORD % (1, b""),
                  "metrics step negative": RECORD % (-5, b""),
                  "metrics line of 20 MB": RECORD % (2, b', "x": "' + b"x" * 20_000_000 + b'"'),
                  "metrics loss NaN": RECORD.replace(b"1.0", b"NaN") % (2, b"")}


@pytest.mark.parametrize("case", list(DAMAGE) + ["truncated state", "metrics a folder",
                                                 *METRICS_DAMAGE])
def test_resume_of_a_damaged_run_exit_2(stopped_run, tmp_path, capsys, case):
    run = str(tmp_path / "run")
    shutil.copytree(stopped_run, run)
    state, metrics = os.path.join(run, "state.safetensors"), os.path.join(run, "metrics.jsonl")
    if case in DAMAGE:
        rewrite_state(state, DAMAGE[case])
    elif case == "truncated state":
        os.truncate(state, os.path.getsize(state) // 2)
    elif case == "metrics a folder":
        os.remove(metrics)
        os.mkdir(metrics)
    else:
        with open(metrics, "ab") as f:  # after the run's own record of step 1
            f.write(METRICS_DAMAGE[case])
    before = snapshot(run)
    code, err = cli(capsys, "--resume", run)
    assert_refused(code, err, "the run directory is damaged")
    assert len(err) == 1
    assert f"--weights {run}/last.safetensors" in err[0]
    if "metrics" in case and "folder" not in case:
        assert "delete that line to resume" in err[0] and "line 2" in err[0], err
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------
# Writing the run directory: full disks, non-finite numbers.


@pytest.mark.parametrize("failure", ["ENOSPC", "short write"])
def test_full_disk_while_logging(data, tmp_path, monkeypatch, capsys, failure):
    """The second metrics record meets a full disk: exit 2 naming metrics.jsonl, which keeps the
    first record whole and nothing of the second; the state saved at step 1 resumes."""
    real_write, calls = os.write, []

    def write(fd, data):
        if data.startswith(b'{"step"'):
            calls.append(data)
            if len(calls) == 2:
                real_write(fd, data[:7])  # part of the line reaches the disk, then it is full
                if failure == "ENOSPC":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return 7
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)
    out = tmp_path / "run"
    code, err = cli(capsys, data, *TINY, "--steps", "3", "--val-fraction", "0", "--log-every",
                    "1", "--out", out)
    assert_refused(code, err, f"cannot write {out}/metrics.jsonl: No space left on device")
    with open(out / "metrics.jsonl", "rb") as f:
        assert f.read() == calls[0]
    assert train.load_state(str(out))[0]["step"] == 1


def test_metrics_are_always_valid_json(data, tmp_path, monkeypatch, capsys):
    """An infinite gradient norm stops the run like a NaN loss does, before anything writes a
    non-finite number; and the writer itself refuses one."""
    update, calls = train.Trainer.update, []

    def diverging(self, lr):
        loss, norm = update(self, lr)
        calls.append(lr)
        return loss, (math.inf if len(calls) == 2 else norm)
    monkeypatch.setattr(train.Trainer, "update", diverging)
    out = tmp_path / "run"
    code, err = cli(capsys, data, *TINY, "--steps", "3", "--val-fraction", "0", "--log-every",
                    "1", "--out", out)
    assert_refused(code, err, "the training diverged at step 2 (loss ")
    assert "gradient norm inf): start again with a lower --lr" in err[-1]
    strict = lambda name: pytest.fail(f"non-standard JSON constant {name}")  # noqa: E731
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line, parse_constant=strict) for line in f]
    assert [r["step"] for r in records] == [1]
    path = tmp_path / "m.jsonl"
    with pytest.raises(ValueError):
        train._append_jsonl(str(path), {"step": 1, "loss": math.nan})
    assert not path.exists()
    with pytest.raises(mixer.MixerError, match=f"cannot write {tmp_path}: Is a directory"):
        train._append_jsonl(str(tmp_path), {"step": 1})


# --------------------------------------------------------------------------------------------
# Data folders: unreadable, strange names, FIFOs, loops.


@pytest.mark.parametrize("folder", ["train", "train/red"])
def test_a_folder_that_cannot_be_listed_exit_2(data, tmp_path, monkeypatch, capsys, folder):
    """chmod 000 does not stop root, so the refusal is simulated where it would happen."""
    blocked, listdir = os.path.join(data, folder), os.listdir

    def refusing(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return listdir(path)
    monkeypatch.setattr(os, "listdir", refusing)
    code, err = cli(capsys, data, *TINY, "--steps", "1", "--out", tmp_path / "run")
    assert_refused(code, err, f"cannot list {blocked}: Permission denied (fix its permissions")
    assert len(err) == 1 and not (tmp_path / "run").exists()


def _bytes_name(folder, name: bytes, image=None):
    """Creates folder/name (bytes: not UTF-8) as a copy of `image`, or as a folder; skips where
    the filesystem refuses such names (macOS)."""
    path = os.path.join(os.fsencode(folder), name)
    try:
        if image is None:
            os.mkdir(path)
        else:
            shutil.copyfile(image, path)
    except OSError as e:
        pytest.skip(f"this filesystem refuses non-UTF-8 names: {e}")
    return os.fsdecode(path)


def test_non_utf8_names(tmp_path, capsys):
    """A file name that is not UTF-8 is an image like any other (the data digest hashes its
    bytes); a class folder so named is refused, since it would become a label."""
    root = make_dataset(tmp_path / "data", {"train": 2}, size=16)
    red = os.path.join(root, "train", "red")
    odd = _bytes_name(red, b"\xff\xfe.png", os.path.join(red, "001.png"))
    with train.concurrent.futures.ThreadPoolExecutor(2) as pool:
        _, split, _ = train.scan(root, 0, 0, pool, lambda msg: None)
        assert odd in split.files
        digest = train._digest(root, split)
        # UTF-8 names hash as before (runs saved by earlier versions still resume)
        os.remove(odd)
        _, split, _ = train.scan(root, 0, 0, pool, lambda msg: None)
    old = hashlib.sha256()
    for f, y in zip(split.files, split.labels):
        old.update(f"{os.path.relpath(f, root)}\t{y}\n".encode())
    assert train._digest(root, split) == old.hexdigest()[:16] != digest
    _bytes_name(os.path.join(root, "train"), b"caf\xe9")
    code, err = cli(capsys, root, *TINY, "--steps", "1", "--out", tmp_path / "run")
    assert_refused(code, err, "a class folder name that is not valid UTF-8; rename it")
    assert len(err) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_are_never_opened(tmp_path):
    """A FIFO among the images (or one that replaced an image after the scan) is skipped without
    being opened for a read that would wait for a writer forever."""
    root = make_dataset(tmp_path / "data", {"train": 2}, size=16)
    fifo = os.path.join(root, "train", "red", "fifo.png")
    os.mkfifo(fifo)
    found = {}

    def scan():
        with train.concurrent.futures.ThreadPoolExecutor(2) as pool:
            found["split"] = train.scan(root, 0, 0, pool, lambda msg: None)[1]
            found["probe"] = train._probe(fifo)
            loader = train.Loader(found["split"], 4, 16, "crop", True, 0, pool, print)
            found["decode"] = loader.decode(fifo, 0)
    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "blocked on the FIFO"
    assert fifo not in found["split"].files and len(found["split"].files) == 8
    assert found["probe"] == "is not a regular file (a pipe or a device), not an image"
    assert found["decode"] is None


@pytest.mark.parametrize("case, message", [
    ("only non-images", "green has no readable images"),
    ("symlink loops", None),
    ("train/ is a symlink loop", "train not found"),
    ("val/ without images", "val holds no readable images: add some, or remove val/"),
])
def test_hostile_data_folders(tmp_path, capsys, case, message):
    root = make_dataset(tmp_path / "data", {"train": 2}, size=16)
    train_dir = os.path.join(root, "train")
    if case == "only non-images":
        for name in os.listdir(os.path.join(train_dir, "green")):
            with open(os.path.join(train_dir, "green", name), "w") as f:
                f.write("not an image")
    elif case == "symlink loops":  # ignored: neither a class nor an image
        os.symlink("loop", os.path.join(train_dir, "loop"))
        os.symlink("loop2", os.path.join(train_dir, "red", "loop2"))
    elif case == "train/ is a symlink loop":
        shutil.rmtree(train_dir)
        os.symlink("train", train_dir)
    else:
        os.makedirs(os.path.join(root, "val", "red"))
    code, err = cli(capsys, root, *TINY, "--steps", "1", "--val-fraction", "0", "--out",
                    tmp_path / "run")
    if message is None:
        assert code == 0, err
        assert "4 classes" in err[0] and "8 training images" in err[0], err
    else:
        assert_refused(code, err, message)
        assert not (tmp_path / "run").exists()
        # the only other line: the unreadable files, named
        assert len(err) == 1 + (case == "only non-images"), err


# --------------------------------------------------------------------------------------------
# What a stop leaves, and progress from the first step.


def test_a_stop_names_the_weights_that_exist(tmp_path, capsys):
    """Stopped before the first evaluation: last.safetensors, and the message says so; after
    one: best.safetensors too."""
    root = make_dataset(tmp_path / "data", {"train": 3}, size=16)
    for stop_after in (1, 2):
        out = tmp_path / f"run{stop_after}"
        result = train.train(data_dir=root, **SMALL, image_size=16, batch_size=4, steps=4,
                             eval_every=2, val_fraction=0.34, backend="mlx", out=str(out),
                             stop_after=stop_after)
        err = capsys.readouterr().err
        assert result.interrupted
        stopped = next(line for line in err.splitlines() if "stopped after step" in line)
        assert f"python mixer.py IMAGE --weights {out}/last.safetensors" in stopped
        assert mixer.load(str(out / "last.safetensors"), backend="numpy").labels is not None
        assert (out / "best.safetensors").exists() == (stop_after == 2)
        assert (f"{out}/best.safetensors" in stopped) == (stop_after == 2)


# A real `train.py` process; HOLD makes it wait at a chosen moment, so that a signal lands there.
WRAPPER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import train
hold = os.environ["HOLD"]
scan, run = train.scan, train._run

def holding_scan(*args, **kwargs):
    if hold == "scan":
        print("train: HOLDING", file=sys.stderr, flush=True)
        time.sleep(60)
    return scan(*args, **kwargs)

def holding_run(*args, **kwargs):
    result = run(*args, **kwargs)
    if hold == "after":
        print("train: HOLDING", file=sys.stderr, flush=True)
        time.sleep(60)
    return result
train.scan, train._run = holding_scan, holding_run
sys.exit(train.main(sys.argv[1:]))
"""


def start(tmp_path, hold, argv):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(repo=REPO))
    return subprocess.Popen([sys.executable, str(script), *map(str, argv)], cwd=str(tmp_path),
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HOLD": hold})


def read_until(proc, marker, lines):
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            return
    pytest.fail(f"no {marker!r} in {''.join(lines)}")


@pytest.mark.parametrize("sig, status, message", [
    (signal.SIGINT, 130, "train: interrupted"),
    (signal.SIGTERM, 143, "train: stopped by SIGTERM"),
])
def test_signal_during_start_up(data, tmp_path, sig, status, message):
    """While the data is scanned (the run directory already claimed): exit at once, one line,
    no traceback, no run directory left."""
    proc = start(tmp_path, "scan", [data, *TINY, "--steps", "5", "--out", tmp_path / "run"])
    lines = []
    read_until(proc, "HOLDING", lines)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == status, "".join(lines) + rest
    assert rest.splitlines() == [message]
    assert not (tmp_path / "run").exists()


def test_signals_during_and_after_training(data, tmp_path, capsys):
    """Progress shows from step 1 (--log-every is far off); the live run's directory is refused
    to others; Ctrl-C finishes the step and saves; a SIGTERM after that exits 130 at once."""
    out = tmp_path / "run"
    proc = start(tmp_path, "after", [data, *TINY, "--steps", "100000", "--val-fraction", "0",
                                     "--log-every", "100000", "--out", out])
    lines = []
    try:
        read_until(proc, "step 1/100000", lines)
        code, err = cli(capsys, data, *TINY, "--steps", "1", "--out", out)
        assert_refused(code, err, f"{out} is in use by another train.py run (process "
                                  f"{proc.pid})")
        proc.send_signal(signal.SIGINT)
        read_until(proc, "HOLDING", lines)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 130, log
    assert rest.splitlines() == ["train: interrupted"] and "Traceback" not in log
    stopped = next(line for line in lines if "stopped after step" in line)
    assert f"--weights {out}/last.safetensors; continue with" in stopped
    info = train.load_state(str(out))[0]
    assert info["step"] >= 1 and not (out / "best.safetensors").exists()
    assert not (out / "metrics.jsonl").exists()  # no record is due before step 100000


def test_negative_seed_exit_2(data, tmp_path, capsys):
    """numpy's generators refuse negative seeds: this was 'internal error', status 1."""
    code, err = cli(capsys, data, *TINY, "--steps", "1", "--seed", "-1", "--out", tmp_path / "r")
    assert_refused(code, err, "--seed must be at least 0, got -1")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_for_metrics_never_blocks(data, tmp_path, capsys):
    """A FIFO in place of metrics.jsonl blocked --resume for ever (and the append too)."""
    run = tmp_path / "run"
    train.train(data_dir=data, **SMALL, image_size=16, batch_size=4, steps=2, backend="mlx",
                out=str(run), stop_after=1, quiet=True)
    os.remove(run / "metrics.jsonl")
    os.mkfifo(run / "metrics.jsonl")
    found = {}
    worker = threading.Thread(target=lambda: found.update(result=cli(capsys, "--resume", run)),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "blocked on the FIFO"
    assert_refused(*found["result"], "not a regular file")
    # with no reader, opening the FIFO fails at once (ENXIO); with one, the fstat check refuses
    with pytest.raises(mixer.MixerError, match="cannot write .*metrics.jsonl: "):
        train._append_jsonl(str(run / "metrics.jsonl"), {"step": 1})


def test_dataset_names_are_escaped(tmp_path, capsys):
    """A file name holding a terminal escape reached the terminal raw in the skip message."""
    root = make_dataset(tmp_path / "data", {"train": 2}, size=16)
    with open(os.path.join(root, "train", "red", "bad\x1b[2J.png"), "wb") as f:
        f.write(b"not an image")
    code, err = cli(capsys, root, *TINY, "--steps", "1", "--out", tmp_path / "r")
    assert code == 0, err
    assert any("bad\\x1b[2J.png" in line for line in err), err
    assert not any("\x1b" in line for line in err), err


@pytest.mark.parametrize("program", ["mixer.py", "convert.py", "train.py", "bench.py",
                                     os.path.join("examples", "shapes.py")])
def test_every_help_runs(program):
    """train.py's --help crashed (TypeError: %o format) on a '%' in the --memory-budget help."""
    done = subprocess.run([sys.executable, os.path.join(REPO, program), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout and done.stderr == "", done.stderr
    if program == "train.py":
        assert "25% of available RAM" in " ".join(done.stdout.split())


@pytest.mark.parametrize("value", ["1e300", "1e308", "inf"])  # nan, 0, -1: above
def test_memory_budget_out_of_range_exit_2(data, tmp_path, capsys, value):
    """--memory-budget 1e300 was 'internal error: OverflowError' (bytes as an int)."""
    code, err = cli(capsys, data, *TINY, "--steps", "1", "--memory-budget", value,
                    "--out", tmp_path / "r")
    assert_refused(code, err, f"--memory-budget must be")
    assert not (tmp_path / "r").exists()


def test_a_deep_out_folder(data, tmp_path, capsys):
    """--out 1500 missing folders deep was 'internal error: RecursionError' (os.makedirs
    recurses once per missing folder): the folders are made one by one."""
    out = os.path.join(tmp_path, *["d"] * 1500, "run")
    try:
        code, err = cli(capsys, data, *TINY, "--steps", "1", "--out", out)
        assert code == 0, err[-1:]
        assert os.path.isfile(os.path.join(out, "last.safetensors"))
    finally:  # shutil.rmtree (and pytest's clean-up) would recurse too
        shutil.rmtree(out, ignore_errors=True)
        for depth in range(1500, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(tmp_path, *["d"] * depth))


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled to the last byte. Mounting needs root: CI runs as root, so it
    never skips there."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError,
                                                                         match="No space"):
            while True:
                f.write(b"\0" * 4096)
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("mode", ["train", "--linear-probe", "--eval-only"])
def test_a_full_disk_leaves_no_run_folder(data, tmp_path, capsys, full_disk, mode):
    """With 0 bytes free the error was right, but the new run folder stayed, holding an empty
    train.lock (the lock's pid could not be written)."""
    weights = str(tmp_path / "w.safetensors")
    config = mixer.MixerConfig(**SMALL, num_classes=4, image_size=16)
    mixer.Mixer(config, mixer.init_params(config), backend="numpy", labels=CLASSES).save(weights)
    argv = {"train": [*TINY, "--steps", "1"], "--linear-probe": ["--weights", weights, mode],
            "--eval-only": ["--weights", weights, mode]}[mode]
    code, err = cli(capsys, data, *argv, "--out", full_disk / "run")
    assert_refused(code, err, "No space left on device")
    assert os.listdir(full_disk) == ["filler"]


def test_without_matplotlib_runs_say_so_once(data, tmp_path, capsys, monkeypatch):
    """matplotlib is optional: a run and an evaluation without it succeed, with one line each
    that says what is not drawn and how to get it."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import raises ImportError
    out = tmp_path / "run"
    code, err = cli(capsys, data, *TINY, "--steps", "4", "--eval-every", "2", "--out", out)
    assert code == 0, err
    note = [line for line in err if "is not installed" in line]
    assert note == ['train: matplotlib is not installed: no curves.png (pip install '
                    '"mlp-mixer-edge[plots]" draws it)'], err
    assert "curves.png" not in os.listdir(out)
    code, err = cli(capsys, data, "--weights", out / "last.safetensors", "--eval-only", "--out",
                    tmp_path / "eval")
    assert code == 0, err
    assert [line for line in err if "is not installed" in line] == [note[0].replace("curves",
                                                                              "confusion")]
    assert os.listdir(tmp_path / "eval") == ["eval.json"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--steps", "1", "--epochs", "2"], "argument --epochs: not allowed with argument --steps"),
    (["--variant", "Z/9"], "argument --variant: invalid choice: 'Z/9'"),
    (["--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_argument_errors_are_one_line(tmp_path, argv, message):
    """Every parser error, the argument groups' and the exclusive --steps/--epochs included:
    one line, exit 2, no usage block."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "DATA", *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith(f"train: error: {message}") and done.stderr.count("\n") == 1
