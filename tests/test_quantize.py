"""Quantised weights (int8 / int4, MLX's affine group-wise format): the packing against MLX's
own, the layout rule on every variant, save/load round trips, load-time quantisation, each
backend's quantised forward against its float forward on the dequantised weights, MLX's
quantized_matmul path, at_resolution, train.py, convert.py, the CLI, and damaged files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import mixer
from conftest import REPO
from reference import random_images, random_params

# 49 tokens (7x7 patches of 4 px): token Dense_0 (49, 64) can only be grouped along its output
# axis; the stem (48, 64) likewise; with groups of 128 several kernels stay float16. The
# group sizes thus exercise all three layouts.
CFG = mixer.MixerConfig(patch_size=4, hidden_dim=64, num_blocks=2, tokens_mlp_dim=64,
                        channels_mlp_dim=128, num_classes=10, image_size=28)
TOKEN_0 = "MixerBlock_0/token_mixing/Dense_0/kernel"
CHANNEL_0 = "MixerBlock_0/channel_mixing/Dense_0/kernel"


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=120)


@pytest.fixture(scope="module")
def images():
    return random_images(4, 28, seed=121)


@pytest.fixture(scope="module")
def float_file(tmp_path_factory, params):
    path = str(tmp_path_factory.mktemp("q") / "float.safetensors")
    mixer.Mixer(CFG, params, backend="numpy").save(path)
    return path


def saved(tmp_path, params, dtype, group_size=64, name="q.safetensors") -> str:
    path = str(tmp_path / name)
    mixer.Mixer(CFG, params, backend="numpy").save(path, dtype=dtype, group_size=group_size)
    return path


def matrix(seed, rows=64, cols=256):
    """A kernel with a few outliers, as trained kernels have."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[rng.integers(0, rows, 8), rng.integers(0, cols, 8)] = 0.8
    return w


# --- the format against MLX's ----------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", mixer.GROUP_SIZES)
def test_packing_is_mlx_format(bits, group_size):
    """MLX reads our packed words as they are (mx.dequantize gives our floats exactly), we read
    mx.quantize's words as MLX does, and our rounding error is no worse than mx.quantize's."""
    mx = mixer.import_mlx()
    w = matrix(bits * 1000 + group_size)
    q = mixer.quantize(w, bits, group_size, "in_out")
    ours = q.dequantize()
    theirs = mx.dequantize(mx.array(q.packed), mx.array(q.scales.astype(np.float32)),
                           mx.array(q.biases.astype(np.float32)), group_size=group_size,
                           bits=bits)
    np.testing.assert_array_equal(np.array(theirs), ours)
    wq, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    mlx_w = np.array(mx.dequantize(wq, s, b, group_size=group_size, bits=bits))
    read = mixer.dequantize_matrix(np.array(wq), np.array(s), np.array(b), bits, group_size)
    np.testing.assert_allclose(read, mlx_w, rtol=0, atol=1e-6)
    rms = lambda a: float(np.sqrt(np.mean((a - w) ** 2)))  # noqa: E731
    assert rms(ours) <= rms(mlx_w)


def unpack(packed, bits):
    """The integers of packed words, element j of a row at bit (j * bits) % 32 of word
    j * bits // 32, read one bit field at a time."""
    per_word = 32 // bits
    fields = [(packed >> (bits * k)) & (2**bits - 1) for k in range(per_word)]
    return np.stack(fields, axis=-1).reshape(packed.shape[0], -1)


def min_max_error(stored, bits, group_size):
    """Per-group squared error of the plain min/max affine quantisation (float16 scale and
    bias, the nearest level): what each group's error may not exceed."""
    g = stored.reshape(stored.shape[0], -1, group_size).astype(np.float64)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = ((hi - lo) / (2**bits - 1)).astype(np.float16).astype(np.float64)
    bias = lo.astype(np.float16).astype(np.float64)
    q = np.clip(np.rint((g - bias) / np.where(scale == 0, 1, scale)), 0, 2**bits - 1)
    return ((q * scale + bias - g) ** 2).sum(-1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_quantised_values_follow_the_format(bits, layout):
    """The dequantised kernel is scale * q + bias with q the packed integers (read here bit
    field by bit field), in the layout's orientation; each group's error is at most that of
    the plain min/max quantisation."""
    w = matrix(7)
    q = mixer.quantize(w, bits, 32, layout)
    assert q.packed.dtype == np.uint32 and q.scales.dtype == np.float16
    rows, cols = q.stored_shape()
    assert q.packed.shape == (rows, cols * bits // 32)
    assert q.scales.shape == q.biases.shape == (rows, cols // 32)
    ints = unpack(q.packed.astype(np.int64), bits)
    s = np.repeat(q.scales.astype(np.float32), 32, axis=1)
    b = np.repeat(q.biases.astype(np.float32), 32, axis=1)
    stored = w.T if layout == "out_in" else w
    deq = q.dequantize()
    np.testing.assert_allclose(deq, (s * ints + b).T if layout == "out_in" else s * ints + b,
                               rtol=0, atol=1e-7)
    got = ((deq.T if layout == "out_in" else deq) - stored).astype(np.float64)
    error = (got.reshape(rows, -1, 32) ** 2).sum(-1)
    assert (error <= min_max_error(stored, bits, 32) * (1 + 1e-6) + 1e-12).all()


def test_constant_group_is_exact():
    w = np.full((32, 64), 0.25, np.float32)
    np.testing.assert_array_equal(mixer.quantize(w, 4, 32, "out_in").dequantize(), w)


# --- the layout rule, on every variant's shapes (no weights allocated) ------------------------

@pytest.mark.parametrize("variant", sorted(mixer.VARIANTS))
@pytest.mark.parametrize("group_size", mixer.GROUP_SIZES)
def test_layout_of_every_variant(variant, group_size):
    config = mixer.VARIANTS[variant]
    shapes = mixer.param_shapes(config)
    plan = mixer.quantization_plan(config, group_size)
    assert set(plan) == {k for k in shapes if k.endswith("/kernel")}
    assert plan.pop("head/kernel") == "float16"  # 1000 classes: at most 2.7% of the weights
    for name, layout in plan.items():
        n_in, n_out = int(np.prod(shapes[name][:-1])), shapes[name][-1]
        if n_in % group_size == 0:
            assert layout == "out_in", name
        elif n_out % group_size == 0:
            assert layout == "in_out", name
        else:
            assert layout == "float16", name
    # the token-mixing Dense_0 has the patches on its input axis: 49 (/32), 196 (/16) and 784
    # (/8) are divisible by no group size, so it is grouped along its output axis D_S (256,
    # 384, 512: all divisible by 32, 64 and 128); H/14's 256 patches are
    patches_grouped = config.num_tokens == 256
    for i in range(config.num_blocks):
        assert plan[f"MixerBlock_{i}/token_mixing/Dense_0/kernel"] == \
            ("out_in" if patches_grouped else "in_out")
        assert plan[f"MixerBlock_{i}/token_mixing/Dense_1/kernel"] == "out_in"
    assert "float16" not in plan.values()  # the rest of every official variant is quantised
    if variant == "H/14":  # its stem's input axis, 14 * 14 * 3 = 588, no group size divides
        assert plan["stem/kernel"] == "in_out"


@pytest.mark.parametrize("variant", ["S/32", "B/16", "L/16"])
def test_head_float16_only_while_small(variant):
    """A 21843-class head is 12-22% of the weights: quantised like the rest."""
    for classes, layout in ((1000, "float16"), (21843, "out_in")):
        config = dataclasses.replace(mixer.VARIANTS[variant], num_classes=classes)
        assert mixer.quantization_plan(config, 64)["head/kernel"] == layout
    big_head = dataclasses.replace(CFG, num_classes=640)  # (64, 640): 17% of CFG's kernels
    assert mixer.quantization_plan(big_head, 64)["head/kernel"] == "out_in"


def test_small_model_uses_all_three_layouts():
    assert set(mixer.quantization_plan(CFG, 64).values()) == {"out_in", "in_out", "float16"}
    plan = mixer.quantization_plan(CFG, 128)
    assert plan[TOKEN_0] == "float16" and plan[CHANNEL_0] == "in_out"  # (64, 128)
    assert plan["MixerBlock_0/channel_mixing/Dense_1/kernel"] == "out_in"  # (128, 64)


# --- files: round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("group_size", mixer.GROUP_SIZES)
def test_round_trip(tmp_path, params, dtype, group_size):
    bits = mixer.QUANTIZED_DTYPES[dtype]
    path = saved(tmp_path, params, dtype, group_size)
    tensors, metadata = mixer.read_safetensors(path)
    q = json.loads(metadata["mixer.quantization"])
    plan = mixer.quantization_plan(CFG, group_size)
    assert q == {"bits": bits, "group_size": group_size, "mode": "affine", "layout": plan}
    assert json.loads(metadata["mixer.config"]) == CFG.to_dict()  # the logical shapes
    model = mixer.load(path, backend="numpy")
    assert model.quantization == {"bits": bits, "group_size": group_size}
    assert f"int{bits} in groups of {group_size}" in repr(model)
    loaded = model.numpy_params()
    for name, w in params.items():
        layout = plan.get(name)
        if layout is None:  # biases and LayerNorm: float32, exact
            assert tensors[name].dtype == np.float32
            np.testing.assert_array_equal(loaded[name], w)
        elif layout == "float16":
            assert tensors[name].dtype == np.float16
            np.testing.assert_array_equal(loaded[name], w.astype(np.float16).astype(np.float32))
        else:
            expected = mixer.quantize(w, bits, group_size, layout)
            np.testing.assert_array_equal(tensors[name], expected.packed)
            np.testing.assert_array_equal(tensors[name + ".scales"], expected.scales)
            np.testing.assert_array_equal(tensors[name + ".biases"], expected.biases)
            np.testing.assert_array_equal(loaded[name], expected.dequantize())
    # saved again with the same bits and groups: the stored values, nothing rounded twice
    again = str(tmp_path / "again.safetensors")
    model.save(again, dtype=dtype, group_size=group_size)
    tensors_again, _ = mixer.read_safetensors(again)
    assert tensors_again.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(tensors_again[name], tensors[name])


def test_resaved_with_other_bits_is_requantised_from_the_dequantised_weights(tmp_path, params):
    model = mixer.load(saved(tmp_path, params, "int8"), backend="numpy")
    other = str(tmp_path / "int4.safetensors")
    model.save(other, dtype="int4", group_size=32)
    tensors, _ = mixer.read_safetensors(other)
    expected = mixer.quantize(model.numpy_params()[CHANNEL_0], 4, 32, "out_in")
    np.testing.assert_array_equal(tensors[CHANNEL_0], expected.packed)
    float_copy = str(tmp_path / "f.safetensors")
    model.save(float_copy)  # float32 from a quantised model: the dequantised weights
    np.testing.assert_array_equal(mixer.load(float_copy, backend="numpy").numpy_params()[CHANNEL_0],
                                  model.numpy_params()[CHANNEL_0])


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_load_time_quantisation_equals_saved_file(tmp_path, params, float_file, dtype):
    from_file = mixer.load(saved(tmp_path, params, dtype, 32), backend="numpy")
    at_load = mixer.load(float_file, backend="numpy", quantize=dtype, group_size=32)
    assert at_load.quantization == from_file.quantization
    for name, v in from_file.params.items():
        w = at_load.params[name]
        if isinstance(v, dict):
            for key in ("packed", "scales", "biases"):
                np.testing.assert_array_equal(w[key], v[key])
        else:
            np.testing.assert_array_equal(w, v)


def test_load_time_quantisation_reads_one_tensor_at_a_time(tmp_path):
    """load(float file, quantize="int4") never holds the float model: its peak allocation stays
    below half the float32 file (the int4 model is ~1/7 of it, the largest kernel 1/35: the
    peak is the quantisation of one kernel, ~10 of its size in temporaries)."""
    config = mixer.MixerConfig(patch_size=4, hidden_dim=128, num_blocks=16, tokens_mlp_dim=64,
                               channels_mlp_dim=512, num_classes=10, image_size=32)
    path = str(tmp_path / "big.safetensors")
    mixer.Mixer(config, random_params(config, 5), backend="numpy").save(path)
    size = mixer.num_params(config) * 4
    tracemalloc.start()
    try:
        model = mixer.load(path, backend="numpy", quantize="int4")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model.quantization == {"bits": 4, "group_size": 64}
    assert peak < size / 2, (peak, size)


def test_quantised_files_meet_the_size_targets(tmp_path):
    """int8 <= 0.28x and int4 <= 0.16x of the float32 file, on S/32's shapes at 64 px (the same
    kernels as at 224 px but for the token-mixing ones, which are small either way)."""
    config = dataclasses.replace(mixer.VARIANTS["S/32"], image_size=64, num_blocks=2)
    model = mixer.Mixer(config, random_params(config, 3), backend="numpy")
    sizes = {}
    for dtype in ("float32", "int8", "int4"):
        model.save(str(tmp_path / f"{dtype}.st"), dtype=dtype)
        sizes[dtype] = (tmp_path / f"{dtype}.st").stat().st_size
    assert sizes["int8"] <= 0.28 * sizes["float32"]
    assert sizes["int4"] <= 0.16 * sizes["float32"]


# --- the forward on every backend --------------------------------------------------------------

@pytest.mark.parametrize("dtype, group_size", [("int8", 64), ("int4", 32), ("int4", 128)])
def test_backend_forward_equals_float_forward_on_dequantised_weights(
        tmp_path, params, images, backend, tol, dtype, group_size):
    model = mixer.load(saved(tmp_path, params, dtype, group_size), backend=backend)
    assert model.quantization is not None
    dense = mixer.Mixer(CFG, model.numpy_params(), backend=backend)
    scale = np.abs(dense(images)).max()
    np.testing.assert_allclose(model(images), dense(images), rtol=0, atol=max(tol, 1e-5) * scale)
    np.testing.assert_allclose(model.features(images), dense.features(images), rtol=0,
                               atol=max(tol, 1e-5) * np.abs(dense.features(images)).max())
    # and the quantisation changed the outputs (the test would see a float model pass through)
    float_logits = mixer.Mixer(CFG, params, backend="numpy")(images)
    assert np.abs(model(images) - float_logits).max() > 1e-3


def test_numpy_data_parallel_forward(tmp_path, params, monkeypatch):
    """Batches split across threads: each thread dequantises into buffers of its own."""
    images = random_images(16, 28, seed=5)
    model = mixer.load(saved(tmp_path, params, "int4"), backend="numpy")
    monkeypatch.setattr(mixer, "DATA_PARALLEL", False)
    serial = model(images)
    monkeypatch.setattr(mixer, "DATA_PARALLEL", True)
    monkeypatch.setattr(mixer, "openblas", lambda: FakeBlas())
    np.testing.assert_allclose(model(images), serial, rtol=0, atol=1e-5)
    assert FakeBlas.splits == [4]


class FakeBlas:
    splits = []

    def threads(self):
        return 4

    def map_single_threaded(self, fn, items):
        import concurrent.futures
        FakeBlas.splits.append(len(items))
        with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
            return list(pool.map(fn, items))


@pytest.mark.parametrize("dtype, group_size", [("int8", 64), ("int4", 32)])
def test_mlx_quantized_matmul_equals_dequantised_path_on_cpu(tmp_path, params, images, dtype,
                                                             group_size):
    mx = mixer.import_mlx()
    path = saved(tmp_path, params, dtype, group_size)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        dequantised = mixer.load(path, backend="mlx")
        assert not dequantised._ops._quantized_matmul()  # the CPU default
        fused = mixer.load(path, backend="mlx")
        fused._ops.quantized_matmul = True
        ran = []
        real = mx.quantized_matmul
        with pytest.MonkeyPatch.context() as m:
            m.setattr(mx, "quantized_matmul", lambda *a, **k: ran.append(k) or real(*a, **k))
            logits = fused(images)
        assert {k["transpose"] for k in ran} == {True, False}  # both stored layouts
        np.testing.assert_allclose(logits, dequantised(images), rtol=0,
                                   atol=1e-4 * np.abs(logits).max())
    finally:
        mx.set_default_device(device)


def test_half_precision_compute_is_refused(tmp_path, params):
    with pytest.raises(mixer.MixerError, match="int4 weights are computed in float32"):
        mixer.load(saved(tmp_path, params, "int4"), backend="mlx", dtype="float16")


# --- at_resolution and train.py ------------------------------------------------------------------

def test_at_resolution_stays_quantised(tmp_path, params):
    model = mixer.load(saved(tmp_path, params, "int8", 32), backend="numpy")
    big = model.at_resolution(56)
    assert big.quantization == {"bits": 8, "group_size": 32}
    for name in (CHANNEL_0, "stem/kernel"):  # unchanged: the stored values
        np.testing.assert_array_equal(big.params[name]["packed"], model.params[name]["packed"])
    # the new token-mixing kernels: the float ones from the dequantised weights, quantised again
    expected = mixer.Mixer(CFG, model.numpy_params(), backend="numpy").at_resolution(56)
    new = big.params[TOKEN_0]
    assert new["shape"] == expected.params[TOKEN_0].shape
    again = mixer.quantize(expected.params[TOKEN_0], 8, 32, new["layout"])
    np.testing.assert_array_equal(new["packed"], again.packed)
    np.testing.assert_array_equal(new["scales"], again.scales.astype(np.float32))
    x = random_images(1, 56, seed=9)
    np.testing.assert_allclose(big(x), mixer.Mixer(big.config, big.numpy_params(),
                                                   backend="numpy")(x), rtol=0, atol=1e-5)


def test_train_starts_from_a_dequantised_float_copy(tmp_path, params):
    import train
    path = saved(tmp_path, params, "int4")
    config, start, _, source = train.build_model(["a", "b"], weights=path)
    assert "int4 weights: fine-tuned from their dequantised float32 copy" in source
    dequantised = mixer.load(path, backend="numpy").numpy_params()
    assert all(a.dtype == np.float32 for a in start.values())
    np.testing.assert_array_equal(start[CHANNEL_0], dequantised[CHANNEL_0])
    assert config.num_classes == 2


# --- convert.py and the command line ------------------------------------------------------------

def test_convert_dtype_int4(tmp_path, params, capsys):
    import convert
    npz = str(tmp_path / "m.npz")
    np.savez(npz, **params)
    out = str(tmp_path / "m-int4.safetensors")
    assert convert.main([npz, out, "--dtype", "int4", "--group-size", "32", "--labels",
                         "none"]) == 0
    assert "int4 in groups of 32" in capsys.readouterr().out
    model = mixer.load(out, backend="numpy")
    assert model.quantization == {"bits": 4, "group_size": 32}
    reference = mixer.load(saved(tmp_path, params, "int4", 32), backend="numpy")
    np.testing.assert_array_equal(model.params[CHANNEL_0]["packed"],
                                  reference.params[CHANNEL_0]["packed"])


@pytest.mark.parametrize("args, message", [
    (["--dtype", "int4", "--group-size", "48"], "group size 48 is not supported"),
    (["--dtype", "float16", "--group-size", "32"], "--group-size goes with --dtype int8 or int4"),
])
def test_convert_bad_group_size(tmp_path, params, args, message):
    npz = str(tmp_path / "m.npz")
    np.savez(npz, **params)
    done = subprocess.run([sys.executable, "convert.py", npz, str(tmp_path / "o.st"), *args],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "o.st").exists()


def test_cli_quantize(tmp_path, params, float_file, capsys):
    from PIL import Image
    image = str(tmp_path / "x.png")
    Image.fromarray((random_images(1, 40, seed=3)[0] * 127.5 + 127.5).astype(np.uint8)).save(image)
    assert mixer.main([image, "--weights", float_file, "--quantize", "int4", "--json",
                       "--backend", "numpy"]) == 0
    at_load = json.loads(capsys.readouterr().out)
    assert mixer.main([image, "--weights", saved(tmp_path, params, "int4"), "--json",
                       "--backend", "numpy"]) == 0
    assert json.loads(capsys.readouterr().out) == at_load
    assert mixer.main([image, "--weights", float_file, "--json", "--backend", "numpy"]) == 0
    assert json.loads(capsys.readouterr().out) != at_load  # int4 moved the probabilities


def test_load_npz_with_quantize_is_refused(tmp_path, params):
    npz = str(tmp_path / "m.npz")
    np.savez(npz, **params)
    with pytest.raises(mixer.MixerError, match="convert.py .* --dtype int4"):
        mixer.load(npz, quantize="int4")


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": "int3"}, "unknown quantisation 'int3'"),
    ({"quantize": "int4", "group_size": 16}, "group size 16 is not supported"),
    ({"quantize": "int4", "group_size": True}, "group size True is not supported"),
])
def test_bad_quantize_arguments(float_file, kwargs, message):
    with pytest.raises(mixer.MixerError, match=message):
        mixer.load(float_file, backend="numpy", **kwargs)


@pytest.mark.parametrize("name, message", [
    (CHANNEL_0, "cannot quantise weights up to 1e\\+05"),
    ("head/kernel", "cannot hold values up to 1e\\+05 in float16"),  # a float16 kernel
])
def test_values_beyond_float16_are_refused(tmp_path, params, name, message):
    bad = dict(params)
    bad[name] = bad[name].copy()
    bad[name][0, 0] = 1e5
    with pytest.raises(mixer.MixerError, match=f"save: '{name}': {message}"):
        mixer.Mixer(CFG, bad, backend="numpy").save(str(tmp_path / "x.st"), dtype="int8")
    assert not (tmp_path / "x.st").exists()
    path = str(tmp_path / "float.st")
    mixer.Mixer(CFG, bad, backend="numpy").save(path)
    with pytest.raises(mixer.MixerError, match=f"{path}: tensor '{name}': {message}"):
        mixer.load(path, backend="numpy", quantize="int8")


# --- damaged quantised files ---------------------------------------------------------------------

def damaged(tmp_path, good, change) -> str:
    """`good` rewritten after change(tensors, quantization, metadata) edits it in place."""
    tensors, metadata = mixer.read_safetensors(good)
    tensors = {k: v.copy() for k, v in tensors.items()}  # as read, they are read-only
    q = json.loads(metadata["mixer.quantization"])
    change(tensors, q, metadata)
    if "mixer.quantization" in metadata:
        metadata["mixer.quantization"] = json.dumps(q)
    codes = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<u4"): "U32"}
    path = str(tmp_path / "damaged.safetensors")
    mixer._write_tensors(path, {k: (codes[a.dtype], np.ascontiguousarray(a))
                                for k, a in tensors.items()}, metadata)
    return path


def _set(d, key, value):
    d[key] = value


DAMAGE = {
    "metadata of another shape": (
        lambda t, q, m: q.clear() or q.update(x=None), "must be a JSON object"),
    "U32 bias": (lambda t, q, m: _set(t, "stem/bias", t["stem/bias"].view(np.uint32)),
                 "'stem/bias' has dtype U32"),
    "4-bit words for 8 bits": (lambda t, q, m: _set(q, "bits", 8), "'stem/kernel' is U32"),
    "bits 3": (lambda t, q, m: _set(q, "bits", 3), "bits=3"),
    "group size 16": (lambda t, q, m: _set(q, "group_size", 16), "group_size=16"),
    "mode symmetric": (lambda t, q, m: _set(q, "mode", "symmetric"), "mode \"affine\""),
    "unknown layout": (lambda t, q, m: _set(q["layout"], CHANNEL_0, "rows"), "layout"),
    "layout names a bias": (lambda t, q, m: _set(q["layout"], "stem/bias", "float16"),
                            "'stem/bias', not a kernel"),
    "layout misses a packed kernel": (lambda t, q, m: q["layout"].pop(CHANNEL_0),
                                      f"'{CHANNEL_0}' has dtype U32"),
    "layout misses a float16 kernel": (lambda t, q, m: q["layout"].pop("head/kernel"),
                                       "no layout for 'head/kernel'"),
    "layout against the grouped axis": (lambda t, q, m: _set(q["layout"], TOKEN_0, "out_in"),
                                        f"'{TOKEN_0}' is stored out_in, grouped by 64 along an "
                                        f"axis of 49"),
    "scales missing": (lambda t, q, m: t.pop(CHANNEL_0 + ".scales"),
                       f"'{CHANNEL_0}.scales' is missing"),
    "extra tensor": (lambda t, q, m: _set(t, "extra", np.zeros(2, np.float32)),
                     "unexpected tensor 'extra'"),
    "scales of the wrong shape": (
        lambda t, q, m: _set(t, CHANNEL_0 + ".scales", t[CHANNEL_0 + ".scales"][:64].copy()),
        f"'{CHANNEL_0}.scales' is F16 (64, 1), expected F16 (128, 1)"),
    "scales in float32": (
        lambda t, q, m: _set(t, CHANNEL_0 + ".scales", t[CHANNEL_0 + ".scales"].astype(np.float32)),
        f"'{CHANNEL_0}.scales' is F32"),
    "infinite scale": (
        lambda t, q, m: t[CHANNEL_0 + ".scales"].__setitem__((0, 0), np.inf),
        f"'{CHANNEL_0}.scales' holds NaN or infinite values"),
    "NaN bias of a group": (
        lambda t, q, m: t[CHANNEL_0 + ".biases"].__setitem__((3, 0), np.nan),
        f"'{CHANNEL_0}.biases' holds NaN or infinite values"),
    "no config": (lambda t, q, m: m.pop("mixer.config"), "needs the metadata 'mixer.config'"),
    "packed words without their metadata": (lambda t, q, m: m.pop("mixer.quantization"),
                                            "'stem/kernel' has dtype U32"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_quantised_file(tmp_path, params, case):
    change, message = DAMAGE[case]
    good = saved(tmp_path, params, "int4", name="good.safetensors")
    path = damaged(tmp_path, good, change)
    with pytest.raises(mixer.MixerError) as e:
        mixer.load(path, backend="numpy")
    assert message in str(e.value), str(e.value)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_damaged_quantised_file_is_one_line_exit_2(tmp_path, params):
    good = saved(tmp_path, params, "int4", name="good.safetensors")
    path = damaged(tmp_path, good, lambda t, q, m: _set(q, "bits", 8))
    done = subprocess.run([sys.executable, "mixer.py", "x.png", "--weights", path], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'stem/kernel' is U32" in done.stderr
