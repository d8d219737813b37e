"""convert.py and mixer.load_npz: official-format .npz -> safetensors, checked against the float64
reference forward run straight on the .npz arrays, on every backend; and every refusal."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import convert
import mixer
from conftest import REPO, TOLERANCE, assert_placed
from reference import random_images, random_params, reference_forward

TINY = mixer.MixerConfig(patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                         channels_mlp_dim=24, num_classes=10, image_size=16)
S32 = mixer.VARIANTS["S/32"]
CONFIGS = {"tiny": TINY, "S/32": S32}


@functools.lru_cache(maxsize=None)
def official(name: str):
    """(params, images, reference logits, reference pre-logits) for a config, computed once."""
    config = CONFIGS[name]
    params = random_params(config, seed=0)
    x = random_images(2 if name == "tiny" else 1, config.image_size, seed=1)
    logits, pre_logits = reference_forward(params, x)
    return params, x, logits, pre_logits


def write_npz(path, params) -> str:
    np.savez(path, **params)  # what the official release is: np.savez, flat "/"-joined keys
    return str(path)


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# Conversion is exact: same outputs as the reference on the .npz arrays, on every backend.

@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
    """The official-format .npz of each config, with and without the head, written once."""
    folder = tmp_path_factory.mktemp("npz")
    files = {}
    for name in CONFIGS:
        params = official(name)[0]
        files[name] = write_npz(folder / f"{name.replace('/', '_')}.npz", params)
        files[name, "headless"] = write_npz(
            folder / f"{name.replace('/', '_')}-headless.npz",
            {k: v for k, v in params.items() if not k.startswith("head/")})
    return files


# "npz-without-head": a checkpoint saved without a classifier; "--no-head": one dropped by convert.
@pytest.mark.parametrize("name, head", [("tiny", "head"), ("tiny", "npz-without-head"),
                                        ("tiny", "--no-head"), ("S/32", "head"),
                                        ("S/32", "npz-without-head")])
def test_converted_model_matches_reference(tmp_path, npz_files, backend, tol, name, head):
    _, x, ref_logits, ref_pre = official(name)
    npz = npz_files[name, "headless"] if head == "npz-without-head" else npz_files[name]
    out = tmp_path / "out.safetensors"
    convert.convert(npz, str(out), head=head == "head")

    model = mixer.load(out, backend=backend)
    assert_placed(model)
    expected_config = CONFIGS[name] if head == "head" else \
        mixer.MixerConfig(**{**CONFIGS[name].to_dict(), "num_classes": None})
    assert model.config == expected_config
    np.testing.assert_allclose(model.features(x), ref_pre, rtol=0, atol=tol)
    if head == "head":
        np.testing.assert_allclose(model(x), ref_logits, rtol=0, atol=tol)
    else:
        with pytest.raises(mixer.MixerError, match="no head"):
            model(x)


def test_load_npz_without_a_file_round_trip(backend, tol, tmp_path):
    """mixer.load_npz alone (what `mixer.py --variant` uses) gives the same model directly."""
    params, x, ref_logits, _ = official("tiny")
    model = mixer.load_npz(write_npz(tmp_path / "tiny.npz", params), backend=backend)
    assert_placed(model)
    np.testing.assert_allclose(model(x), ref_logits, rtol=0, atol=tol)


# Unit roundoff u of the storage type: 2^-11 for float16 (10 explicit mantissa bits), 2^-8 for
# bfloat16 (7). Each stored weight is off by at most u relative; through a Dense those errors have
# random signs and add like a random walk, so the outputs move by O(u) relative to their size
# (measured on S/32: ~0.35u·max|logit| for float16 and ~0.85u for bfloat16). 4u·max|output| is
# the bound; the rounding itself is checked exactly, and the forward on the rounded weights is
# held to the float32 tolerance, so the bound only covers the rounding's effect.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_conversion(tmp_path, npz_files, dtype):
    params, x, ref_logits, ref_pre = official("S/32")
    out = tmp_path / f"{dtype}.safetensors"
    convert.convert(npz_files["S/32"], str(out), dtype=dtype)
    header = json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == \
        {"float16": {"F16"}, "bfloat16": {"BF16"}}[dtype]
    assert out.stat().st_size < 0.51 * sum(v.nbytes for v in params.values())

    model = mixer.load(out, backend="numpy")
    stored = model.numpy_params()
    u = UNIT_ROUNDOFF[dtype]
    for k, v in params.items():
        if dtype == "float16":  # numpy's cast rounds to nearest, subnormals included
            np.testing.assert_array_equal(stored[k], v.astype(np.float16).astype(np.float32))
        else:  # float32's exponent range: round to nearest is within u relative everywhere
            assert np.all(np.abs(stored[k] - v) <= u * np.abs(v)), k

    rounded_logits, rounded_pre = reference_forward(stored, x)
    np.testing.assert_allclose(model(x), rounded_logits, rtol=0, atol=TOLERANCE["numpy"])
    np.testing.assert_allclose(model.features(x), rounded_pre, rtol=0, atol=TOLERANCE["numpy"])
    np.testing.assert_allclose(model(x), ref_logits, rtol=0, atol=4 * u * np.abs(ref_logits).max())
    np.testing.assert_allclose(model.features(x), ref_pre, rtol=0,
                               atol=4 * u * np.abs(ref_pre).max())


# --------------------------------------------------------------------------------------------
# Metadata: config, variant, labels and source travel in the file.

def test_metadata_names_variant_labels_and_source(tmp_path):
    folder = tmp_path / "gsam"
    folder.mkdir()
    npz = write_npz(folder / "Mixer-S_32.npz", official("S/32")[0])
    out = tmp_path / "out.safetensors"
    model = convert.convert(npz, str(out))
    assert model.config.variant == "S/32"
    _, metadata = mixer.read_safetensors(out)
    assert metadata["mixer.source"] == "gsam/Mixer-S_32.npz"
    assert mixer.MixerConfig.from_dict(json.loads(metadata["mixer.config"])) == S32
    labels = json.loads(metadata["mixer.labels"])
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca"
    assert labels[-1] == "toilet tissue, toilet paper, bathroom tissue"


def test_custom_config_is_recorded(tmp_path, capsys):
    npz = write_npz(tmp_path / "tiny.npz", official("tiny")[0])
    out = tmp_path / "tiny.safetensors"
    assert convert.main([npz, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "custom Mixer" in printed and "10 classes" in printed
    model = mixer.load(out, backend="numpy")
    assert model.config == TINY and model.config.variant is None
    assert model.labels is None  # 10 classes: no known label set
    _, metadata = mixer.read_safetensors(out)
    assert metadata["mixer.source"] == "tiny.npz"


def test_imagenet21k_labels_for_21843_classes(tmp_path):
    config = mixer.MixerConfig(patch_size=8, hidden_dim=4, num_blocks=1, tokens_mlp_dim=4,
                               channels_mlp_dim=4, num_classes=21843, image_size=16)
    npz = write_npz(tmp_path / "Mixer-21k.npz", random_params(config, seed=0))
    model = convert.convert(npz, str(tmp_path / "out.safetensors"))
    assert len(model.labels) == 21843
    assert model.labels[0] == "organism, being"
    assert mixer.load(tmp_path / "out.safetensors", backend="numpy").labels == model.labels


def test_label_options(tmp_path):
    params = official("tiny")[0]
    npz = write_npz(tmp_path / "tiny.npz", params)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(10)), encoding="utf-8")
    assert convert.convert(npz, str(tmp_path / "a.safetensors"), labels=str(names)).labels == \
        [f"thing {i}" for i in range(10)]
    assert convert.convert(npz, str(tmp_path / "b.safetensors"), labels="none").labels is None

    names.write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(mixer.MixerError, match="2 labels, expected 10"):
        convert.convert(npz, str(tmp_path / "c.safetensors"), labels=str(names))
    with pytest.raises(mixer.MixerError, match="1000 labels, expected 10"):
        convert.convert(npz, str(tmp_path / "d.safetensors"), labels="imagenet1k")
    with pytest.raises(mixer.MixerError, match="without a head"):
        convert.convert(npz, str(tmp_path / "e.safetensors"), labels=str(names), head=False)
    assert files_in(tmp_path) == ["a.safetensors", "b.safetensors", "names.txt", "tiny.npz"]


def test_label_files_are_imagenet_in_class_order():
    labels_dir = os.path.join(REPO, "labels")
    in1k = mixer.read_labels(os.path.join(labels_dir, "imagenet1k.txt"))
    in21k = mixer.read_labels(os.path.join(labels_dir, "imagenet21k.txt"))
    assert len(in1k) == 1000 and len(in21k) == 21843
    assert in1k[0] == "tench, Tinca tinca" and in1k[1] == "goldfish, Carassius auratus"
    assert all(label.strip() == label and label for label in in1k + in21k)
    assert mixer.labels_dirs()[0] == labels_dir


# --------------------------------------------------------------------------------------------
# Refusals: a MixerError with one line, exit 2 from the command line, and no output file.

def _bad_npz(kind, folder):
    params = dict(official("tiny")[0])
    path = folder / "bad.npz"
    if kind == "not an npz":
        path.write_text("this is not a checkpoint\n")
    elif kind == "a single .npy":
        np.save(folder / "bad.npy", params["stem/kernel"])
        os.replace(folder / "bad.npy", path)
    elif kind == "pickled objects":
        params["stem/bias"] = np.array([{"evil": "pickle"}], dtype=object)
        np.savez(path, **params)
    elif kind == "a zip of other things":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif kind == "integer array":
        params["stem/bias"] = params["stem/bias"].astype(np.int32)
        np.savez(path, **params)
    elif kind == "missing key":
        del params["MixerBlock_1/channel_mixing/Dense_1/bias"]
        np.savez(path, **params)
    elif kind == "extra key":
        params["MixerBlock_0/token_mixing/Dense_2/kernel"] = np.zeros((8, 16), np.float32)
        np.savez(path, **params)
    elif kind == "inconsistent shapes":
        params["MixerBlock_1/token_mixing/Dense_0/kernel"] = np.zeros((16, 9), np.float32)
        np.savez(path, **params)
    elif kind == "truncated":
        np.savez(path, **params)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "unknown layout":  # e.g. a ViT checkpoint
        np.savez(path, **{"embedding/kernel": np.zeros((4, 4, 3, 8), np.float32),
                          "cls": np.zeros((1, 1, 8), np.float32),
                          "Transformer/encoder_norm/scale": np.ones(8, np.float32)})
    return path


REFUSALS = {
    "not an npz": "not an .npz archive",
    "a single .npy": "not an .npz archive",
    "pickled objects": "pickled Python objects",
    "a zip of other things": "not a numpy array",
    "integer array": "dtype int32, expected float32",
    "missing key": "'MixerBlock_1/channel_mixing/Dense_1/bias' is missing",
    "extra key": "unexpected tensor 'MixerBlock_0/token_mixing/Dense_2/kernel'",
    "inconsistent shapes": r"'MixerBlock_1/token_mixing/Dense_0/kernel' has shape \(16, 9\), "
                           r"expected \(16, 8\)",
    "truncated": "truncated or corrupt",
    "unknown layout": "not an official Mixer checkpoint",
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refusals(tmp_path, capsys, kind):
    bad = _bad_npz(kind, tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(mixer.MixerError, match=REFUSALS[kind]):
        convert.convert(str(bad), str(out))
    assert convert.main([str(bad), str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("convert: error: ") and captured.err.count("\n") == 1
    assert files_in(tmp_path) == ["bad.npz"]  # no output, no temporary file


def test_command_line_refusal_is_one_line_exit_2(tmp_path):
    bad = _bad_npz("truncated", tmp_path)
    result = subprocess.run([sys.executable, os.path.join(REPO, "convert.py"), str(bad),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert files_in(tmp_path) == ["bad.npz"]


def test_command_line_converts(tmp_path):
    npz = write_npz(tmp_path / "Mixer-tiny.npz", official("tiny")[0])
    out = tmp_path / "weights" / "tiny.safetensors"
    result = subprocess.run([sys.executable, os.path.join(REPO, "convert.py"), npz, str(out),
                             "--dtype", "bfloat16", "--no-head"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no head" in result.stdout and "bfloat16" in result.stdout
    assert mixer.load(out, backend="numpy").config.num_classes is None


# --------------------------------------------------------------------------------------------
# What OUT may be. Refused before anything is read: the input by any name, a folder, a device,
# a FIFO, a socket. Replaced: a regular file (another user's too) and a symlink (the link
# itself; its target is left as it was).

def _existing_output(kind, folder, npz):
    out = folder / "out.safetensors"
    if kind == "the input":
        return npz
    if kind == "the input by another path":
        (folder / "sub").mkdir()
        return folder / "sub" / ".." / npz.name
    if kind == "a symlink to the input":
        out.symlink_to(npz)
    elif kind == "a hard link to the input":
        os.link(npz, out)
    elif kind == "a folder":
        out.mkdir()
    elif kind == "a FIFO":
        os.mkfifo(out)
    elif kind == "a socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(out))
        sock.close()  # the socket file stays
    elif kind == "a device":
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    return out


OUTPUT_REFUSALS = {
    "the input": "is the input",
    "the input by another path": "is the input",
    "a symlink to the input": "is the input",
    "a hard link to the input": "is the input",
    "a folder": "is a folder; give a file name for the output",
    "a FIFO": "is a FIFO, not a regular file; refusing to replace it",
    "a socket": "is a socket, not a regular file; refusing to replace it",
    "a device": "is a device, not a regular file; refusing to replace it",
}


@pytest.mark.parametrize("kind", sorted(OUTPUT_REFUSALS))
def test_output_refusals(tmp_path, capsys, kind):
    npz = tmp_path / "tiny.npz"
    write_npz(npz, official("tiny")[0])
    data = npz.read_bytes()
    out = _existing_output(kind, tmp_path, npz)
    before = {name: os.lstat(tmp_path / name) for name in files_in(tmp_path)}
    assert convert.main([str(npz), str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("convert: error: ") and captured.err.count("\n") == 1
    assert OUTPUT_REFUSALS[kind] in captured.err
    assert npz.read_bytes() == data
    after = {name: os.lstat(tmp_path / name) for name in files_in(tmp_path)}
    assert {k: (v.st_ino, v.st_mode) for k, v in after.items()} == \
        {k: (v.st_ino, v.st_mode) for k, v in before.items()}  # nothing made, replaced or left


@pytest.mark.parametrize("kind", ["a regular file", "another user's file", "a symlink",
                                  "a dangling symlink"])
def test_output_replaced(tmp_path, kind):
    npz = write_npz(tmp_path / "tiny.npz", official("tiny")[0])
    out, target = tmp_path / "out.safetensors", tmp_path / "elsewhere.safetensors"
    if kind in ("a regular file", "another user's file"):
        out.write_bytes(b"old")
    if kind == "another user's file":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(out, 65534, 65534)
        out.chmod(0o444)
    if kind == "a symlink":
        target.write_bytes(b"someone else's weights")
    if "symlink" in kind:
        out.symlink_to(target)
    assert convert.main([npz, str(out)]) == 0
    assert not out.is_symlink() and mixer.load(out, backend="numpy").config == TINY
    if kind == "a symlink":
        assert target.read_bytes() == b"someone else's weights"
    assert not target.exists() or kind == "a symlink"
    assert [f for f in files_in(tmp_path) if f.startswith(".tmp-")] == []


SLOW_WRITE = """
import contextlib, sys, time
sys.path.insert(0, sys.argv[1])
import convert, mixer

real_atomic_write = mixer.atomic_write


class SlowFile:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        print("writing", flush=True)  # the temporary file beside OUT exists now
        time.sleep(60)
        return self.f.write(data)


@contextlib.contextmanager
def slow_atomic_write(path):
    with real_atomic_write(path) as f:
        yield SlowFile(f)


mixer.atomic_write = slow_atomic_write
sys.exit(convert.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig, status, says", [
    (signal.SIGTERM, 143, "convert: stopped by SIGTERM"),
    (signal.SIGHUP, 129, "convert: stopped by SIGHUP"),
    (signal.SIGINT, 130, "convert: interrupted")], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_while_writing_leaves_nothing(tmp_path, sig, status, says):
    """A real process stopped while OUT's temporary file is being written (the write is made
    slow so that the signal lands there): one line, the signal's status, no OUT, no .tmp-*."""
    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir()
    scripts.mkdir()
    npz = write_npz(work / "tiny.npz", official("tiny")[0])
    (scripts / "slow_convert.py").write_text(SLOW_WRITE)
    process = subprocess.Popen([sys.executable, str(scripts / "slow_convert.py"), REPO, npz,
                                str(work / "out.safetensors")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "writing\n"
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == status
    assert err == says + "\n"
    assert files_in(work) == ["tiny.npz"]
