"""Weights files: round trips, interop with the safetensors package and MLX, float16/bfloat16,
strict and corrupt-file errors, atomic writes."""

import dataclasses
import json
import math
import os
import stat

import numpy as np
import pytest
import safetensors.numpy

import mixer
from conftest import assert_placed
from reference import random_images, random_params, reference_forward

SMALL = mixer.MixerConfig(patch_size=4, hidden_dim=24, num_blocks=3, tokens_mlp_dim=12,
                          channels_mlp_dim=40, num_classes=7, image_size=20)
LABELS = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "électrique",
          "cock"]
PREPROCESSING = {"resize": "squash", "crop_pct": 0.875, "interpolation": "bicubic",
                 "scale": "x / 127.5 - 1"}


@pytest.fixture(scope="module")
def params():
    return random_params(SMALL, seed=10)


@pytest.fixture(scope="module")
def images():
    return random_images(3, 20, seed=11)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
    """A float32 file written by Mixer.save with labels, preprocessing and a source."""
    path = str(tmp_path_factory.mktemp("weights") / "small.safetensors")
    model = mixer.Mixer(SMALL, params, backend="numpy", labels=LABELS, preprocessing=PREPROCESSING)
    model.save(path, source="test run 1")
    return path


def header_of(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


# --- round trips ------------------------------------------------------------------------------


def test_round_trip(backend, saved, params, images):
    original = mixer.Mixer(SMALL, params, backend=backend)
    loaded = mixer.load(saved, backend=backend)
    assert loaded.backend == backend
    assert_placed(loaded)
    assert loaded.config == SMALL
    assert loaded.labels == LABELS
    assert loaded.preprocessing == PREPROCESSING
    for name, value in loaded.numpy_params().items():
        np.testing.assert_array_equal(value, params[name])
    np.testing.assert_array_equal(loaded(images), original(images))
    # and saving what was loaded gives the same tensors again
    again = os.path.join(os.path.dirname(saved), f"again-{backend}.safetensors")
    loaded.save(again)
    tensors, metadata = mixer.read_safetensors(again)
    assert metadata["mixer.labels"] == json.dumps(LABELS)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, params[name])


def test_metadata_layout(saved):
    metadata = header_of(saved)["__metadata__"]
    assert metadata["format"] == "mixer"
    assert metadata["mixer.source"] == "test run 1"
    assert mixer.MixerConfig.from_dict(json.loads(metadata["mixer.config"])) == SMALL
    assert json.loads(metadata["mixer.labels"]) == LABELS
    assert json.loads(metadata["mixer.preprocessing"]) == PREPROCESSING
    assert all(isinstance(v, str) for v in metadata.values())  # safetensors: str -> str only


def test_header_is_aligned(saved):
    """The data starts 8-byte aligned (the safetensors convention), tensors back to back."""
    with open(saved, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0
    header = header_of(saved)
    header.pop("__metadata__")
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == os.path.getsize(saved) - 8 - n


def test_saved_file_is_readable_by_others(tmp_path, params):
    """Saving goes through a temporary file, which mkstemp creates 0600; the result must get the
    ordinary permissions of a new file (0666 minus the umask), like open(path, "w")."""
    old = os.umask(0o022)
    try:
        mixer.Mixer(SMALL, params, backend="numpy").save(str(tmp_path / "w.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == 0o644


# --- interop ----------------------------------------------------------------------------------


def test_safetensors_reads_our_files(saved, params):
    tensors = safetensors.numpy.load_file(saved)
    assert set(tensors) == set(params)
    for name, value in tensors.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, params[name])
    from safetensors import safe_open
    with safe_open(saved, framework="numpy") as f:
        assert f.metadata()["format"] == "mixer"


@pytest.mark.parametrize("headless", [False, True])
def test_we_read_plain_safetensors_files(tmp_path, headless, images):
    """A file with the official names and no metadata: the config comes from the shapes."""
    config = SMALL if not headless else mixer.MixerConfig(4, 24, 3, 12, 40, None, 20)
    params = random_params(config, seed=12)
    path = str(tmp_path / "plain.safetensors")
    safetensors.numpy.save_file(params, path)
    model = mixer.load(path, backend="numpy")
    assert model.config == config
    assert model.labels is None
    assert model.preprocessing == mixer.DEFAULT_PREPROCESSING
    logits, pre_logits = reference_forward(params, images)
    np.testing.assert_allclose(model.features(images), pre_logits, rtol=0, atol=1e-5)
    if not headless:
        np.testing.assert_allclose(model(images), logits, rtol=0, atol=1e-5)


# --- float16 and bfloat16 ---------------------------------------------------------------------


def read_rounded(path, dtype):
    """The weights of a float16/bfloat16 file as float64, read by another library."""
    if dtype == "float16":
        tensors = safetensors.numpy.load_file(path)
        assert all(v.dtype == np.float16 for v in tensors.values())
        return {k: v.astype(np.float64) for k, v in tensors.items()}
    import mlx.core as mx  # numpy has no bfloat16; MLX reads BF16 safetensors files
    tensors = mx.load(path)
    assert all(v.dtype == mx.bfloat16 for v in tensors.values())
    return {k: np.asarray(v.astype(mx.float32)).astype(np.float64) for k, v in tensors.items()}


# Relative rounding error of one weight: float16 2^-11 (10 mantissa bits), bfloat16 2^-8 (7);
# below the smallest normal number the absolute error is half the subnormal step instead.
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SUBNORMAL_ERROR = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files(backend, tmp_path, params, images, dtype):
    path = str(tmp_path / f"{dtype}.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy", labels=LABELS).save(path, dtype=dtype)
    code = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    header = header_of(path)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {code}
    with open(path, "rb") as f:  # 2 bytes a weight after the header
        assert os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little") == \
            2 * sum(v.size for v in params.values())

    model = mixer.load(path, backend=backend)
    assert_placed(model)
    assert model.labels == LABELS
    rounded = read_rounded(path, dtype)
    for name, value in model.numpy_params().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, rounded[name])  # exact: no second rounding
        err = np.abs(rounded[name] - params[name])
        # round to nearest
        assert np.all(err <= UNIT_ROUNDOFF[dtype] * np.abs(params[name]) + SUBNORMAL_ERROR[dtype])

    logits = model(images)
    # against the float64 reference on the same rounded weights: as tight as float32
    np.testing.assert_allclose(logits, reference_forward(rounded, images)[0], rtol=0, atol=1e-4)
    # against the float32 weights. Each weight has a relative error up to u (above), random in
    # sign, so a Dense output moves by about u times its size; through this model's 2 * 3 + 2
    # Dense layers (with LayerNorms renormalising in between) such errors add up in quadrature:
    # ~u * sqrt(8) relative. Logits here are O(1) (max |logit| < 4), so 4 * u * sqrt(8) *
    # max|logit| is a bound with a 4x margin: 0.02 for bfloat16, 0.003 for float16. It must
    # also not be exact: the file really holds fewer bits.
    exact = reference_forward(params, images)[0]
    diff = np.abs(logits - exact).max()
    assert 0 < diff < 4 * UNIT_ROUNDOFF[dtype] * math.sqrt(8) * np.abs(exact).max(), diff


def test_bfloat16_round_to_nearest_even():
    """Hand-computed: bfloat16 keeps 7 mantissa bits, so around 1.0 its step is 2^-7."""
    x = np.array([
        1.0,                        # exact                               -> 0x3F80
        1 + 2 ** -8,                # halfway 1 .. 1+2^-7: to even (1)    -> 0x3F80
        1 + 3 * 2 ** -8,            # halfway 1+2^-7 .. 1+2^-6: to even   -> 0x3F82
        1 + 2 ** -8 + 2 ** -20,     # just above halfway: up              -> 0x3F81
        1 + 2 ** -8 - 2 ** -20,     # just below halfway: down            -> 0x3F80
        -(1 + 3 * 2 ** -8),         # sign kept                           -> 0xBF82
        3.0e38,                     # 1.7632 * 2^127: mantissa 0.7632 * 128 = 97.7 -> 0x7F62
        3.4028235e38,               # float32 max: rounds up to infinity  -> 0x7F80
        np.inf, -np.inf,            #                                     -> 0x7F80, 0xFF80
        1e-40,                      # float32 subnormal 0x000116C2: down  -> 0x0001
        0.0, -0.0,                  #                                     -> 0x0000, 0x8000
    ], np.float32)
    bits = mixer.to_bfloat16_bits(x)
    assert bits.dtype == np.uint16
    expected = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82, 0x7F62, 0x7F80, 0x7F80, 0xFF80,
                0x0001, 0x0000, 0x8000]
    assert [hex(b) for b in bits] == [hex(e) for e in expected]
    nan = mixer.to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(mixer.as_float32(nan.view(mixer._Bfloat16Bits))).all()
    # and back: bfloat16 bits are the top half of the float32 bits
    back = mixer.as_float32(bits.view(mixer._Bfloat16Bits))
    np.testing.assert_array_equal(back[:3], [1.0, 1.0, 1 + 2 ** -6])


def test_bfloat16_matches_mlx(tmp_path, params, images):
    """MLX writes and reads BF16 safetensors itself: both directions agree bit for bit."""
    import mlx.core as mx
    # written by MLX: its header has no padding and "__metadata__": null
    theirs = str(tmp_path / "mlx-bf16.safetensors")
    mx.save_safetensors(theirs, {k: mx.array(v).astype(mx.bfloat16) for k, v in params.items()})
    ours = str(tmp_path / "mixer-bf16.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(ours, dtype="bfloat16")
    a, b = mixer.load(theirs, backend="numpy"), mixer.load(ours, backend="numpy")
    assert a.config == b.config == SMALL
    for name, value in a.numpy_params().items():
        np.testing.assert_array_equal(value, b.numpy_params()[name])
    for name, value in mx.load(ours).items():
        np.testing.assert_array_equal(np.asarray(value.astype(mx.float32)), a.params[name])
    np.testing.assert_array_equal(a(images), b(images))


def test_unknown_save_dtype(tmp_path, params):
    with pytest.raises(mixer.MixerError, match="unsupported dtype 'int3'"):
        mixer.Mixer(SMALL, params, backend="numpy").save(str(tmp_path / "x"), dtype="int3")
    assert os.listdir(tmp_path) == []


# --- strict loading ---------------------------------------------------------------------------


def metadata_of(config):
    return {"format": "mixer", "mixer.config": json.dumps(config.to_dict())}


@pytest.mark.parametrize("with_metadata", [True, False])
def test_missing_tensor(tmp_path, params, with_metadata):
    broken = dict(params)
    del broken["MixerBlock_1/token_mixing/Dense_1/bias"]
    path = str(tmp_path / "missing.safetensors")
    safetensors.numpy.save_file(broken, path, metadata_of(SMALL) if with_metadata else None)
    with pytest.raises(mixer.MixerError) as e:
        mixer.load(path, backend="numpy")
    assert "'MixerBlock_1/token_mixing/Dense_1/bias' is missing" in str(e.value)
    assert "(25,)" in str(e.value) and path in str(e.value)


def test_missing_head(tmp_path, params):
    """Metadata says 7 classes but the head is gone: not silently a feature extractor."""
    broken = {k: v for k, v in params.items() if not k.startswith("head/")}
    path = str(tmp_path / "headless.safetensors")
    safetensors.numpy.save_file(broken, path, metadata_of(SMALL))
    with pytest.raises(mixer.MixerError, match=r"'head/kernel' is missing \(expected shape "
                                               r"\(24, 7\); 2 missing in all\)"):
        mixer.load(path, backend="numpy")


def test_extra_tensor(tmp_path, params):
    broken = dict(params, **{"MixerBlock_0/token_mixing/Dense_2/kernel": np.zeros((3, 3),
                                                                                 np.float32)})
    path = str(tmp_path / "extra.safetensors")
    safetensors.numpy.save_file(broken, path, metadata_of(SMALL))
    with pytest.raises(mixer.MixerError, match=r"unexpected tensor "
                                               r"'MixerBlock_0/token_mixing/Dense_2/kernel' "
                                               r"with shape \(3, 3\)"):
        mixer.load(path, backend="numpy")
    # a fourth block beyond what the metadata says is extra too
    broken = dict(params, **{"MixerBlock_3/LayerNorm_0/scale": np.ones(24, np.float32)})
    safetensors.numpy.save_file(broken, path, metadata_of(SMALL))
    with pytest.raises(mixer.MixerError, match="unexpected tensor 'MixerBlock_3/LayerNorm_0"):
        mixer.load(path, backend="numpy")


@pytest.mark.parametrize("with_metadata", [True, False])
@pytest.mark.parametrize("name, shape", [
    ("MixerBlock_2/channel_mixing/Dense_0/kernel", (40, 24)),  # transposed
    ("MixerBlock_1/token_mixing/Dense_1/kernel", (12, 24)),
    ("stem/bias", (24, 1)),
    ("head/bias", (8,)),
])
def test_wrong_shape(tmp_path, params, with_metadata, name, shape):
    broken = dict(params, **{name: np.zeros(shape, np.float32)})
    path = str(tmp_path / "shape.safetensors")
    safetensors.numpy.save_file(broken, path, metadata_of(SMALL) if with_metadata else None)
    with pytest.raises(mixer.MixerError) as e:
        mixer.load(path, backend="numpy")
    expected = mixer.param_shapes(SMALL)[name]
    assert f"{name!r} has shape {shape}, expected {expected}" in str(e.value)


def test_wrong_stem_shape_without_metadata(tmp_path, params):
    broken = dict(params, **{"stem/kernel": np.zeros((4, 4, 1, 24), np.float32)})
    path = str(tmp_path / "stem.safetensors")
    safetensors.numpy.save_file(broken, path)
    with pytest.raises(mixer.MixerError, match=r"stem/kernel has shape \(4, 4, 1, 24\), "
                                               r"expected \(P, P, 3, C\)"):
        mixer.load(path, backend="numpy")


@pytest.mark.parametrize("dtype, code", [(np.float64, "F64"), (np.int32, "I32"),
                                         (np.uint8, "U8")])
def test_unsupported_dtype(tmp_path, params, dtype, code):
    broken = dict(params)
    broken["MixerBlock_0/LayerNorm_1/bias"] = broken["MixerBlock_0/LayerNorm_1/bias"].astype(dtype)
    path = str(tmp_path / "dtype.safetensors")
    safetensors.numpy.save_file(broken, path)
    with pytest.raises(mixer.MixerError, match=f"tensor 'MixerBlock_0/LayerNorm_1/bias' has "
                                               f"dtype {code}; supported: F32, F16, BF16"):
        mixer.load(path, backend="numpy")


def write_raw(path, header, data=b""):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + data)


def corrupt_files(folder, saved):
    """name -> (path, what the message must say)."""
    valid = open(saved, "rb").read()
    files = {}

    def add(name, content, message):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(content)
        files[name] = (path, message)

    add("random.safetensors", np.random.default_rng(0).bytes(5000), "bad header length")
    add("empty.safetensors", b"", "bad header length")
    add("tiny.safetensors", b"\x10\x00", "bad header length")
    add("truncated.safetensors", valid[:-100], "truncated or corrupt")
    add("cut-in-header.safetensors", valid[:200], "bad header length")
    n = int.from_bytes(valid[:8], "little")
    add("not-json.safetensors", valid[:8] + b"\xff" * n + valid[8 + n:], "header is not JSON")
    add("json-list.safetensors", (4).to_bytes(8, "little") + b"[1] ", "not a JSON object")
    lies = {
        "offsets-past-end": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "offsets-too-short": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]},
        "offsets-reversed": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]},
        "negative-offsets": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
        "negative-shape": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]},
        "float-shape": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
        "float-offsets": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]},
        "list-dtype": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
        "no-offsets": {"dtype": "F32", "shape": [2]},
        "string-entry": "stem/kernel",
    }
    for name, entry in lies.items():
        path = os.path.join(folder, name + ".safetensors")
        write_raw(path, {"stem/kernel": entry}, b"\0" * 8)
        files[name] = (path, "stem/kernel")
    return files


def test_corrupt_files(tmp_path, saved):
    for name, (path, message) in corrupt_files(str(tmp_path), saved).items():
        with pytest.raises(mixer.MixerError) as e:
            mixer.load(path, backend="numpy")
        assert message in str(e.value), (name, str(e.value))
        assert path in str(e.value), (name, str(e.value))


def test_not_a_file(tmp_path):
    with pytest.raises(mixer.MixerError, match="is a directory"):
        mixer.load(str(tmp_path), backend="numpy")
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(mixer.MixerError, match=f"{missing}: no such file"):
        mixer.load(missing, backend="numpy")


def test_bad_metadata(tmp_path, params):
    path = str(tmp_path / "meta.safetensors")
    safetensors.numpy.save_file(params, path, {"mixer.config": "{not json"})
    with pytest.raises(mixer.MixerError, match="'mixer.config' is not valid JSON"):
        mixer.load(path, backend="numpy")
    safetensors.numpy.save_file(params, path, {"mixer.config": '{"patch_size": 4, "depth": 3}'})
    with pytest.raises(mixer.MixerError, match="bad Mixer config"):
        mixer.load(path, backend="numpy")
    safetensors.numpy.save_file(params, path, {**metadata_of(SMALL), "mixer.labels": "[oops"})
    with pytest.raises(mixer.MixerError, match="'mixer.labels' is not valid JSON"):
        mixer.load(path, backend="numpy")
    # the metadata's config disagrees with the tensors
    other = mixer.MixerConfig(4, 24, 3, 16, 40, 7, 20)
    safetensors.numpy.save_file(params, path, metadata_of(other))
    with pytest.raises(mixer.MixerError, match=r"Dense_0/kernel' has shape \(25, 12\), "
                                               r"expected \(25, 16\)"):
        mixer.load(path, backend="numpy")


@pytest.mark.parametrize("key, value, message", [
    ("mixer.labels", "5", "'mixer.labels' must be a JSON list, got int"),
    ("mixer.labels", '[1, 2, 3, 4, 5, 6, 7]', "'mixer.labels' must be a JSON list of strings"),
    ("mixer.config", '[4, 24]', "'mixer.config' must be a JSON dict, got list"),
    ("mixer.config", '{"patch_size": 4}', "bad Mixer config"),
    ("mixer.preprocessing", '"squash"', "'mixer.preprocessing' must be a JSON dict, got str"),
])
def test_metadata_of_the_wrong_type(tmp_path, params, key, value, message):
    path = str(tmp_path / "meta.safetensors")
    safetensors.numpy.save_file(params, path, {**metadata_of(SMALL), key: value})
    with pytest.raises(mixer.MixerError, match=message):
        mixer.load(path, backend="numpy")


def test_metadata_values_must_be_strings(tmp_path, saved):
    header = header_of(saved)
    header["__metadata__"]["mixer.labels"] = ["tench"]  # safetensors allows only str -> str
    path = str(tmp_path / "bad.safetensors")
    with open(saved, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        data = f.read()
    write_raw(path, header, data)
    with pytest.raises(mixer.MixerError, match="__metadata__ must map str to str"):
        mixer.load(path, backend="numpy")


# --- atomic writes ----------------------------------------------------------------------------


class FailingFile:
    """Wraps the file that atomic_write opens; raises `error` once `limit` bytes are written."""

    def __init__(self, file, limit, error):
        self.file, self.limit, self.error, self.written = file, limit, error, 0

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self.written + n > self.limit:
            self.file.write(bytes(memoryview(data).cast("B")[:self.limit - self.written]))
            raise self.error
        self.written += n
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("error, expected", [
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(28, "No space left on device"), mixer.MixerError),
])
def test_failed_save_keeps_the_old_file(tmp_path, params, monkeypatch, error, expected):
    path = str(tmp_path / "model.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(path)
    before = open(path, "rb").read()
    size = len(before)

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen",
                        lambda *a, **k: FailingFile(real_fdopen(*a, **k), size // 2, error))
    other = mixer.Mixer(SMALL, random_params(SMALL, seed=99), backend="numpy")
    with pytest.raises(expected) as e:
        other.save(path)
    monkeypatch.undo()
    if expected is mixer.MixerError:
        assert f"cannot write {path}: No space left on device" in str(e.value)
    assert open(path, "rb").read() == before  # the old file, untouched
    assert os.listdir(tmp_path) == ["model.safetensors"]  # and no temporary file left behind
    mixer.load(path, backend="numpy")


def test_failed_rename_leaves_no_temporary(tmp_path, params, monkeypatch):
    path = str(tmp_path / "model.safetensors")

    def fail(*args):
        raise OSError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(mixer.MixerError, match="cannot write .*: Permission denied"):
        mixer.Mixer(SMALL, params, backend="numpy").save(path)
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_folder(tmp_path, params):
    path = str(tmp_path / "new" / "folder" / "model.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(path)
    assert mixer.load(path, backend="numpy").config == SMALL


# --- loading -----------------------------------------------------------------------------------


def test_numpy_backend_converts_half_precision(tmp_path, params):
    path = str(tmp_path / "f16.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(path, dtype="float16")
    model = mixer.load(path, backend="numpy")
    assert all(v.dtype == np.float32 for v in model.params.values())
