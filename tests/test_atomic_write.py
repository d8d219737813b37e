"""atomic_write, under interruption: the target is the old file or the whole new one, and no
temporary outlives its process for longer than the next write into the same folder."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import mixer
from conftest import REPO


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("where", ["write", "flush", "fsync", "replace"])
def test_ctrl_c_anywhere_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    """Ctrl-C landing in flush or fsync used to leave a full-size .tmp-* file."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    if where in ("fsync", "replace"):
        monkeypatch.setattr(os, where, interrupt)
    with pytest.raises(KeyboardInterrupt):
        with mixer.atomic_write(path) as f:
            f.write(b"new" * 1000)
            if where == "write":
                interrupt()
            if where == "flush":
                monkeypatch.setattr(f, "flush", interrupt)
    monkeypatch.undo()
    assert listing(tmp_path) == ["out.bin"] and path.read_bytes() == b"old"


def test_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(mixer.MixerError, match="cannot write .*No space left on device"):
        with mixer.atomic_write(tmp_path / "out.bin") as f:
            f.write(b"x")
    assert listing(tmp_path) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """Only mixer's own names, made on this host by a process that is gone, are removed."""
    dead, alive = dead_pid(), os.getppid()
    mine = mixer._temporary_prefix().rsplit("-", 2)[0]  # .tmp-mixer-<this host>
    (tmp_path / f"{mine}-{dead}-0a1b2c3d-model.safetensors").write_bytes(b"partial")
    (tmp_path / f"{mine}-{dead}-9f8e7d6c-download").mkdir()
    (tmp_path / f"{mine}-{dead}-9f8e7d6c-download" / "Mixer-B_16.npz").write_bytes(b"partial")
    kept = [f"{mine}-{alive}-11223344-other.safetensors",  # a live process's
            f".tmp-mixer-otherhost-{dead}-55667788-x.safetensors",  # another machine's
            f"{mine}-{dead}-notahexx-x",  # not a name mixer makes
            f".tmp-{dead}-0a1b2c3d-notes",  # someone else's naming
            "keep.txt"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / f"{mine}-{dead}-aabbccdd-my-folder").mkdir()  # a folder, but not a download's
    kept.append(f"{mine}-{dead}-aabbccdd-my-folder")
    with mixer.atomic_write(tmp_path / "new.bin") as f:
        f.write(b"x")
    assert listing(tmp_path) == sorted(kept + ["new.bin"])


def test_sigkill_mid_write_is_cleaned_up_by_the_next_write(tmp_path):
    """A process killed outright inside atomic_write leaves its temporary; the next write into
    the folder, from another process, removes it."""
    code = ("import sys, time, mixer\n"
            "with mixer.atomic_write(sys.argv[1]) as f:\n"
            "    f.write(b'x' * 1000000); f.flush(); print('ready', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "big.bin")], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    mine = mixer._temporary_prefix().rsplit("-", 2)[0]
    assert [n for n in listing(tmp_path) if n.startswith(f"{mine}-{child.pid}-")]
    mixer.Mixer(SMALL, mixer.init_params(SMALL), backend="numpy").save(tmp_path / "m.safetensors")
    assert listing(tmp_path) == ["m.safetensors"]


SMALL = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                          channels_mlp_dim=8, num_classes=3, image_size=8)


def test_the_umask_is_never_touched(tmp_path, monkeypatch):
    """Reading the umask means setting it, which raced with other threads creating files (3 of
    108,350 got mode 0600); the mode now comes from os.open applying the umask itself."""
    old = os.umask(0o027)
    try:
        def forbidden(*args):
            raise AssertionError("os.umask called")
        monkeypatch.setattr(os, "umask", forbidden)
        mixer.Mixer(SMALL, mixer.init_params(SMALL), backend="numpy").save(tmp_path / "m.st")
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.st").st_mode) == 0o640


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_target_that_is_not_a_file_is_refused(tmp_path, kind):
    target = {"directory": tmp_path / "d", "fifo": tmp_path / "p", "device": "/dev/null"}[kind]
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    before = os.stat(target)
    with pytest.raises(mixer.MixerError, match="cannot write .*(is a directory|not a regular)"):
        mixer.Mixer(SMALL, mixer.init_params(SMALL), backend="numpy").save(target)
    after = os.stat(target)
    assert (before.st_ino, before.st_mode) == (after.st_ino, after.st_mode)
    assert not [n for n in listing(tmp_path) if n.startswith(".tmp-")]


def test_a_symlink_target_is_replaced_and_its_file_left_alone(tmp_path):
    real = tmp_path / "real.st"
    real.write_bytes(b"untouched")
    link = tmp_path / "link.st"
    link.symlink_to(real)
    mixer.Mixer(SMALL, mixer.init_params(SMALL), backend="numpy").save(link)
    assert real.read_bytes() == b"untouched"
    assert not link.is_symlink() and mixer.load(link, backend="numpy").config == SMALL


def test_concurrent_writers_never_expose_a_partial_file(tmp_path):
    """Two threads saving different models to one path, a third loading it meanwhile: every
    load sees one whole model or the other."""
    import threading
    models = [mixer.Mixer(SMALL, mixer.init_params(SMALL, seed=s), backend="numpy")
              for s in (1, 2)]
    path = tmp_path / "m.st"
    models[0].save(path)
    heads = {tuple(np.asarray(m.params["MixerBlock_0/channel_mixing/Dense_0/kernel"]).ravel())
             for m in models}
    stop, seen, errors = threading.Event(), [], []

    def writer(model):
        while not stop.is_set():
            model.save(path)

    def reader():
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                m = mixer.load(path, backend="numpy")
            except mixer.MixerError as e:
                errors.append(str(e))
                continue
            seen.append(tuple(np.asarray(
                m.params["MixerBlock_0/channel_mixing/Dense_0/kernel"]).ravel()))
    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    reader()
    stop.set()
    for t in threads:
        t.join()
    assert seen and set(seen) <= heads and not errors, errors[:3]
    assert listing(tmp_path) == ["m.st"]
