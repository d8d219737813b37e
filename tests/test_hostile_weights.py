"""Hostile and damaged weights files: every one is refused with a MixerError that names the
file and the problem, before it can cost memory, hang, or load silently with wrong weights;
and a loaded model never depends on its file again."""

from __future__ import annotations

import io
import json
import os
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

import mixer
from reference import random_images, random_params, reference_forward

SMALL = mixer.MixerConfig(patch_size=4, hidden_dim=24, num_blocks=2, tokens_mlp_dim=12,
                          channels_mlp_dim=40, num_classes=7, image_size=20)


@pytest.fixture(scope="module")
def params():
    return random_params(SMALL, seed=30)


@pytest.fixture(scope="module")
def images():
    return random_images(2, 20, seed=31)


def write_raw(path, header: bytes, data: bytes = b"") -> str:
    """A safetensors file from a raw header (already JSON bytes) and data."""
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)
    return str(path)


def write_st(path, entries: dict, data: bytes, metadata=None) -> str:
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    return write_raw(path, json.dumps(header).encode(), data)


def f32(shape, begin):
    n = 4 * int(np.prod(shape))
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


# --- safetensors headers --------------------------------------------------------------------

def hostile_safetensors(tmp, saved):
    """name -> (path, what the error must say)."""
    files = {}
    deep = b'{"a":' * 200_000 + b"1" + b"}" * 200_000
    files["nested 200,000 deep"] = (write_raw(tmp / "deep.st", deep), "nested too deeply")
    files["65 dimensions"] = (write_st(tmp / "dims.st", {"x": f32([1] * 65, 0)}, b"\0" * 4),
                              "65 dimensions")
    huge = {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}
    files["zero bytes, huge shape"] = (write_st(tmp / "zero.st", {"x": huge}, b""),
                                       "outside the file")
    files["duplicated name"] = (write_raw(
        tmp / "dup.st", b'{"x":' + json.dumps(f32([1], 0)).encode() + b',"x":'
        + json.dumps(f32([1], 4)).encode() + b"}", b"\0" * 8), "appears twice")
    files["overlapping tensors"] = (write_st(tmp / "overlap.st", {"a": f32([2], 0),
                                                                  "b": f32([2], 4)}, b"\0" * 12),
                                    "overlaps")
    files["a gap between tensors"] = (write_st(tmp / "gap.st", {"a": f32([1], 0),
                                                               "b": f32([1], 8)}, b"\0" * 12),
                                      "unused bytes")
    files["bytes after the last tensor"] = (write_st(tmp / "tail.st", {"a": f32([1], 0)},
                                                     b"\0" * 8), "after the last tensor")
    files["negative offset"] = (write_st(tmp / "neg.st", {"a": {"dtype": "F32", "shape": [1],
                                                                "data_offsets": [-4, 0]}}, b""),
                                "malformed header entry")
    files["shape is a string"] = (write_st(tmp / "str.st", {"a": {"dtype": "F32", "shape": "1",
                                                                  "data_offsets": [0, 4]}},
                                           b"\0" * 4), "malformed header entry")
    with open(saved, "rb") as f:
        blob = f.read()
    files["truncated by one byte"] = (str(tmp / "cut.st"), "truncated or corrupt")
    with open(files["truncated by one byte"][0], "wb") as f:
        f.write(blob[:-1])
    return files


def test_hostile_safetensors_headers(tmp_path, params):
    saved = str(tmp_path / "ok.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(saved)
    for name, (path, message) in hostile_safetensors(tmp_path, saved).items():
        with pytest.raises(mixer.MixerError) as e:
            mixer.load(path, backend="numpy")
        assert message in str(e.value), (name, str(e.value))
        assert path in str(e.value), (name, str(e.value))


def test_zero_dimensional_head(tmp_path, params):
    """A 0-d head/kernel in a file without our config: the shape is refused, no IndexError."""
    bad = {k: v for k, v in params.items()}
    bad["head/kernel"] = np.float32(1.0).reshape(())
    path = str(tmp_path / "h.safetensors")
    mixer.write_safetensors(path, bad, {})
    with pytest.raises(mixer.MixerError, match=r"head/kernel has shape \(\), expected"):
        mixer.load(path, backend="numpy")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, params, dtype, value):
    bad = dict(params)
    kernel = bad["MixerBlock_1/channel_mixing/Dense_0/kernel"].copy()
    kernel[3, 5] = value
    bad["MixerBlock_1/channel_mixing/Dense_0/kernel"] = kernel
    path = str(tmp_path / "nan.safetensors")
    mixer.write_safetensors(path, bad, {"mixer.config": json.dumps(SMALL.to_dict())}, dtype=dtype)
    with pytest.raises(mixer.MixerError, match="'MixerBlock_1/channel_mixing/Dense_0/kernel' "
                                               "holds NaN or infinite values"):
        mixer.load(path, backend="numpy")


def test_non_finite_npz_is_refused(tmp_path, params):
    bad = dict(params)
    bad["stem/bias"] = bad["stem/bias"].copy()
    bad["stem/bias"][0] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    with pytest.raises(mixer.MixerError, match="'stem/bias' holds NaN or infinite"):
        mixer.load_npz(tmp_path / "nan.npz", backend="numpy")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_not_a_regular_file_never_blocks(tmp_path, kind):
    """A FIFO given as weights or as an .npz used to block forever in open()."""
    path = {"fifo": str(tmp_path / "pipe"), "device": "/dev/zero", "directory": str(tmp_path)}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    result = {}

    def attempt():
        for fn in (mixer.load, mixer.load_npz, mixer.read_npz):
            try:
                fn(path)
            except mixer.MixerError as e:
                result.setdefault("errors", []).append(str(e))
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "blocked on a non-regular file"
    assert len(result["errors"]) == 3
    assert all("not a regular file" in e or "is a directory" in e for e in result["errors"])


# --- .npz archives ---------------------------------------------------------------------------

def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def refused_cheaply(path, message):
    """load_npz refuses `path` with `message` having allocated under 16 MiB on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(mixer.MixerError, match=message):
            mixer.load_npz(path, backend="numpy")
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()


def test_npz_header_claiming_48_tib_is_refused_without_allocating(tmp_path):
    """The header of a member says (2**22, 2**22, 768) float32 = 48 TiB; the member holds 0
    bytes of data. Refused from the header, before np.load would try to allocate it."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.float32))
    header["shape"] = (2**22, 2**22, 768)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("stem/kernel.npy", buf.getvalue())
    refused_cheaply(path, "claims shape .* corrupt or was crafted")


def test_deflate_bomb_is_refused_before_decompressing(tmp_path, params):
    """A compressed member whose header claims a small array but that inflates to 200 MB."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for k, v in params.items():
            data = npy_bytes(v)
            if k == "stem/kernel":
                data += b"\0" * (200 * 2**20)
            z.writestr(k + ".npy", data)
    assert os.path.getsize(path) < 2 * 2**20
    refused_cheaply(path, "'stem/kernel' claims shape")


def test_npz_duplicated_member_is_refused(tmp_path, params):
    path = tmp_path / "dup.npz"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in params.items():
            z.writestr(k + ".npy", npy_bytes(v))
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("stem/bias.npy", npy_bytes(np.zeros_like(params["stem/bias"])))
    with pytest.raises(mixer.MixerError, match="'stem/bias' appears twice"):
        mixer.load_npz(path, backend="numpy")


def test_npz_with_a_pickle_is_refused(tmp_path, params):
    path = tmp_path / "pickle.npz"
    np.savez(path, **params, extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(mixer.MixerError, match="'extra' holds pickled Python objects"):
        mixer.load_npz(path, backend="numpy")


def test_an_npz_loads_directly_and_equals_its_conversion(tmp_path, params, images):
    """mixer.load (and so `mixer.py --weights FILE.npz`) takes an official checkpoint as it is."""
    npz = tmp_path / "Mixer-tiny.npz"
    np.savez(npz, **params)
    direct = mixer.load(str(npz), backend="numpy")
    expected = reference_forward(params, images)[0]
    np.testing.assert_allclose(direct(images), expected, rtol=0, atol=1e-5)


def test_an_npz_given_as_safetensors_says_what_it_is(tmp_path, params):
    npz = tmp_path / "Mixer-tiny.npz"
    np.savez(npz, **params)
    with pytest.raises(mixer.MixerError, match="zip archive, such as an official .npz"):
        mixer.read_safetensors(str(npz))


# --- a loaded model and its file --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "mlx", "tinygrad"])
def test_loaded_model_is_immune_to_its_file(tmp_path, params, images, backend):
    """Truncating the file used to kill a numpy model with SIGBUS; copying another model over it
    silently changed its outputs. Now the weights are the model's own."""
    path = str(tmp_path / "w.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(path)
    model = mixer.load(path, backend=backend)
    before = model(images)
    with open(path, "r+b") as f:
        f.truncate(100)
    np.testing.assert_array_equal(model(images), before)
    mixer.Mixer(SMALL, random_params(SMALL, seed=99), backend="numpy").save(path + ".other")
    with open(path + ".other", "rb") as src, open(path, "wb") as dst:  # cp other path
        dst.write(src.read())
    np.testing.assert_array_equal(model(images), before)


def test_a_file_changed_while_loading_is_refused(tmp_path, params):
    path = str(tmp_path / "w.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(path)
    with mixer.SafetensorsFile(path) as f:
        first = f.read("stem/kernel")
        with open(path, "r+b") as g:  # another writer rewrites the file in place
            g.seek(-4, os.SEEK_END)
            g.write(b"\1\2\3\4")
            os.utime(g.fileno(), ns=(0, 0))
        with pytest.raises(mixer.MixerError, match="changed while it was being read"):
            f.read("head/bias")
    np.testing.assert_array_equal(first, params["stem/kernel"])


def test_loading_holds_one_tensor_at_a_time_on_the_host(tmp_path):
    """Onto MLX, numpy memory during a load peaks near the largest tensor, not the file."""
    config = mixer.MixerConfig(patch_size=4, hidden_dim=256, num_blocks=4, tokens_mlp_dim=16,
                               channels_mlp_dim=1024, num_classes=10, image_size=16)
    params = random_params(config, seed=12)
    path = str(tmp_path / "w.safetensors")
    mixer.Mixer(config, params, backend="numpy").save(path)
    total = sum(v.nbytes for v in params.values())
    largest = max(v.nbytes for v in params.values())
    del params
    tracemalloc.start()
    try:
        model = mixer.load(path, backend="mlx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 6 * largest
    assert peak < 2.5 * largest, (peak, largest, total)
    assert model.config == config
