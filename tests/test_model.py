"""The model: every backend against the float64 reference, variants, init, input checks."""

import dataclasses
import math

import numpy as np
import pytest

import mixer
from conftest import TOLERANCE, assert_placed
from reference import gelu_erf, gelu_tanh, random_images, random_params, reference_forward

# Small, with every dimension different so that a swapped axis cannot go unnoticed:
# P=4 on 20x20 images -> S=25 tokens, C=24, D_S=12, D_C=40, 3 blocks, 7 classes.
SMALL = mixer.MixerConfig(patch_size=4, hidden_dim=24, num_blocks=3, tokens_mlp_dim=12,
                          channels_mlp_dim=40, num_classes=7, image_size=20)
S32 = dataclasses.replace(mixer.VARIANTS["S/32"], num_classes=10)


@pytest.fixture(scope="module")
def s32_case():
    """S/32 at 224 with random weights, batch 2, and its float64 reference outputs."""
    params = random_params(S32, seed=1)
    x = random_images(2, 224, seed=2)
    logits, pre_logits = reference_forward(params, x)
    return params, x, logits, pre_logits


def check_against_reference(model, params, x, tol):
    logits, pre_logits = reference_forward(params, x)
    x_before = x.copy()
    np.testing.assert_allclose(model(x), logits, rtol=0, atol=tol)
    np.testing.assert_allclose(model.features(x), pre_logits, rtol=0, atol=tol)
    np.testing.assert_array_equal(x, x_before)  # the input is not modified in place
    assert np.abs(logits).max() > 0.5 and np.abs(pre_logits).max() > 0.5  # outputs are O(1)


def test_small_matches_reference(backend, tol):
    params = random_params(SMALL, seed=0)
    model = mixer.Mixer(SMALL, params, backend=backend)
    assert model.backend == backend
    assert_placed(model)
    check_against_reference(model, params, random_images(3, 20, seed=1), tol)
    # a second, different batch through the same (compiled / jitted) model
    check_against_reference(model, params, random_images(3, 20, seed=2), tol)


def test_compiled_path_stays_exact(backend, tol):
    """The fast paths (mx.compile; TinyJit, which runs normally once, captures on the second call
    and replays captured kernels from the third) must give the reference outputs on every call,
    each with new input data, and again after a change of batch size (a new compilation)."""
    params = random_params(SMALL, seed=5)
    model = mixer.Mixer(SMALL, params, backend=backend)
    for seed, batch in enumerate([2, 2, 2, 2, 3, 3, 3, 2]):
        x = random_images(batch, 20, seed=100 + seed)
        logits, _ = reference_forward(params, x)
        np.testing.assert_allclose(model(x), logits, rtol=0, atol=tol,
                                   err_msg=f"call {seed + 1}, batch {batch}")


@pytest.mark.parametrize("hidden_chunk", [40 * 7, 40 * 75 - 1, 1])
def test_numpy_chunked_mlp_matches_reference(monkeypatch, hidden_chunk):
    """numpy's fused MLP runs a chunk of rows at a time; at test sizes one chunk holds every row,
    so shrink the chunk: several chunks of 7 rows (the last one shorter), one short of all the
    rows, and a single row per chunk."""
    monkeypatch.setattr(mixer.NumpyOps, "HIDDEN_CHUNK", hidden_chunk)
    params = random_params(SMALL, seed=6)
    x = random_images(3, 20, seed=7)
    logits, pre_logits = reference_forward(params, x)
    model = mixer.Mixer(SMALL, params, backend="numpy")
    np.testing.assert_allclose(model(x), logits, rtol=0, atol=TOLERANCE["numpy"])
    np.testing.assert_allclose(model.features(x), pre_logits, rtol=0, atol=TOLERANCE["numpy"])


def test_gelu_rewrites_hold_at_extremes():
    """numpy and MLX compute tanh GELU through rewritten formulas (faster on their CPUs); far
    out in both tails they must still give the function, and MLX's gradient must stay finite
    where exp would overflow."""
    x = np.concatenate([np.linspace(-60, 60, 2401), [-1e4, -100, -12.5, 12.5, 100, 1e4]])
    x = x.astype(np.float32)
    want = gelu_tanh(x.astype(np.float64))
    ours = x.copy()
    mixer.NumpyOps._gelu_in_place(ours, np.empty_like(ours))
    np.testing.assert_allclose(ours, want, rtol=2e-6, atol=1e-6)
    mx = mixer.import_mlx()
    np.testing.assert_allclose(np.array(mixer.MlxOps.gelu(mx.array(x))), want, rtol=2e-6,
                               atol=1e-6)
    grad = np.array(mx.grad(lambda a: mixer.MlxOps.gelu(a).sum())(mx.array(x)))
    assert np.isfinite(grad).all()
    assert abs(grad[x == -100]).max() < 1e-6 and abs(grad[x == 100] - 1).max() < 1e-6


def numpy_openblas():
    """numpy's OpenBLAS must be found wherever numpy says it was built on it (every wheel for
    Linux, Windows and Intel macOS)."""
    blas = mixer.openblas()
    if np.__config__.CONFIG["Build Dependencies"]["blas"]["name"] != "scipy-openblas":
        pytest.skip("this numpy is not built on its bundled OpenBLAS")
    assert blas is not None, "numpy's bundled OpenBLAS was not found"
    return blas


class TwoThreads:
    """The real OpenBLAS, reporting 2 threads whatever the machine, and recording each split."""

    def __init__(self, blas):
        self.blas, self.splits = blas, []

    def threads(self):
        return 2

    def map_single_threaded(self, fn, items):
        self.splits.append([len(item) for item in items])
        return self.blas.map_single_threaded(fn, items)


def test_numpy_data_parallel_matches_reference(monkeypatch):
    """Large batches run split across threads with OpenBLAS single-threaded meanwhile; the result
    must be the reference's, and OpenBLAS's thread count must be restored afterwards."""
    blas = numpy_openblas()
    threads = blas.threads()
    spy = TwoThreads(blas)
    monkeypatch.setattr(mixer, "openblas", lambda: spy)
    monkeypatch.setattr(mixer.NumpyOps, "MIN_ROWS_PER_THREAD", 2 * 25)  # SMALL has 25 tokens
    params = random_params(SMALL, seed=9)
    model = mixer.Mixer(SMALL, params, backend="numpy")
    x = random_images(6, 20, seed=10)
    logits, pre_logits = reference_forward(params, x)
    np.testing.assert_allclose(model(x), logits, rtol=0, atol=TOLERANCE["numpy"])
    np.testing.assert_allclose(model.features(x), pre_logits, rtol=0, atol=TOLERANCE["numpy"])
    assert spy.splits == [[3, 3], [3, 3]]
    assert blas.threads() == threads
    # serial: too few rows per thread (1 image of 25 tokens each), and 3 images on 2 threads
    for batch in (2, 3):
        x = random_images(batch, 20, seed=11)
        np.testing.assert_allclose(model(x), reference_forward(params, x)[0], rtol=0,
                                   atol=TOLERANCE["numpy"])
    assert len(spy.splits) == 2


def test_openblas_threads_restored_after_an_error():
    blas = numpy_openblas()
    threads = blas.threads()
    seen = []

    def fail(item):
        seen.append(blas.threads())
        raise ValueError(item)

    with pytest.raises(ValueError):
        blas.map_single_threaded(fail, ["a", "b"])
    assert seen and set(seen) == {1} and blas.threads() == threads  # map may cancel the 2nd


def test_mlx_data_parallel_on_cpu_matches_reference(mlx_cpu_split):
    """On a Linux CPU, MLX splits batches across CPU streams with its OpenBLAS single-threaded
    meanwhile: the result must be the reference's, the GEMMs must have run with one OpenBLAS
    thread, and the thread count must be restored afterwards (the fixture checks)."""
    params = random_params(SMALL, seed=12)
    model = mixer.Mixer(SMALL, params, backend="mlx")
    for batch, splits in ((6, 1), (2, 2), (3, 2), (1, 2)):  # 3 on 2 threads, 1: serial
        x = random_images(batch, 20, seed=13 + batch)
        np.testing.assert_allclose(model(x), reference_forward(params, x)[0], rtol=0,
                                   atol=TOLERANCE["mlx"], err_msg=f"batch {batch}")
        assert len(mlx_cpu_split.inside) == splits, f"batch {batch}"
    assert mlx_cpu_split.inside == [1, 1] and len(model._ops._streams) == 2


def test_s32_matches_reference(backend, tol, s32_case):
    params, x, logits, pre_logits = s32_case
    model = mixer.Mixer(S32, params, backend=backend)
    assert_placed(model)
    assert model.config.variant == "S/32"
    np.testing.assert_allclose(model(x), logits, rtol=0, atol=tol)
    np.testing.assert_allclose(model.features(x), pre_logits, rtol=0, atol=tol)


# Half precision against the float64 reference, as a share of the largest |logit| (logits are
# O(1)): float16 keeps 11 significant bits, bfloat16 8, so their errors are ~1e-3 and ~1e-2.
HALF_TOLERANCE = {"float16": 5e-3, "bfloat16": 4e-2}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_matches_reference(backend, dtype, s32_case):
    params, x, logits, pre_logits = s32_case
    if backend == "numpy":
        with pytest.raises(mixer.MixerError, match="float32 only"):
            mixer.Mixer(S32, params, backend=backend, dtype=dtype)
        return
    try:
        model = mixer.Mixer(S32, params, backend=backend, dtype=dtype)
    except mixer.MixerError as e:
        # tinygrad devices may lack a dtype (clang < 17 has no x86 bfloat16; PoCL declares no
        # float16); that must be a clear error, and never on MLX or for float16 on the CPU
        from tinygrad import Device
        assert backend == "tinygrad" and (Device.DEFAULT, dtype) != ("CPU", "float16"), e
        assert f"cannot compute in {dtype}" in str(e)
        return
    assert_placed(model)
    assert str(model.params["stem/kernel"].dtype).split(".")[-1] in (dtype, "half")
    assert repr(model).endswith(f"dtype={dtype})")
    for ours, want in ((model(x), logits), (model.features(x), pre_logits)):
        assert ours.dtype == np.float32
        error = np.abs(ours - want).max() / np.abs(want).max()
        assert error < HALF_TOLERANCE[dtype], f"{dtype} off by {error:.2e} of the largest output"


def test_dtype_of_backend_arrays_and_unknown_dtypes():
    """Backend arrays passed in are recast to the compute dtype (the same model as from numpy
    arrays); a dtype that is not one of COMPUTE_DTYPES is refused on every backend."""
    params = random_params(SMALL, seed=14)
    x = random_images(2, 20, seed=15)
    full = mixer.Mixer(SMALL, params, backend="mlx")
    half = mixer.Mixer(SMALL, full.params, backend="mlx", dtype="float16")
    assert all(str(v.dtype) == "mlx.core.float16" for v in half.params.values())
    np.testing.assert_array_equal(half(x), mixer.Mixer(SMALL, params, backend="mlx",
                                                       dtype="float16")(x))
    for backend in mixer.BACKENDS:
        with pytest.raises(mixer.MixerError, match="unknown dtype 'int8'"):
            mixer.Mixer(SMALL, params, backend=backend, dtype="int8")


def test_headless_model(backend, tol):
    config = dataclasses.replace(SMALL, num_classes=None)
    params = random_params(config, seed=3)
    assert not any(k.startswith("head/") for k in params)
    model = mixer.Mixer(config, params, backend=backend)
    x = random_images(2, 20, seed=4)
    with pytest.raises(mixer.MixerError, match="no head"):
        model(x)
    logits, pre_logits = reference_forward(params, x)
    assert logits is None
    features = model.features(x)
    assert features.shape == (2, 24)
    np.testing.assert_allclose(features, pre_logits, rtol=0, atol=tol)


def test_tolerance_catches_wrong_numerics(s32_case):
    """The comparisons above can fail: an erf GELU or LayerNorm eps 1e-5 moves the S/32 outputs
    by more than the loosest tolerance, while mixer is well within the tightest one."""
    params, x, logits, _ = s32_case
    ours = mixer.Mixer(S32, params, backend="numpy")(x)
    loosest = max(TOLERANCE.values())
    assert np.abs(ours - logits).max() < TOLERANCE["numpy"]
    erf_logits, _ = reference_forward(params, x, gelu=gelu_erf)
    assert np.abs(ours - erf_logits).max() > 2 * loosest
    eps_logits, _ = reference_forward(params, x, eps=1e-5)
    assert np.abs(ours - eps_logits).max() > 2 * loosest


def test_reference_stem_is_the_patch_flattening():
    """The official stem (a P x P conv, stride P) equals patches flattened as (row, col, rgb)
    times the kernel reshaped to (P*P*3, C), tokens row-major. Checks the reference's conv
    against that."""
    from reference import conv_stem
    rng = np.random.default_rng(0)
    x, k, b = rng.normal(size=(2, 8, 12, 3)), rng.normal(size=(4, 4, 3, 5)), rng.normal(size=5)
    tokens = conv_stem(x, k, b)
    assert tokens.shape == (2, 6, 5)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].reshape(-1)
                np.testing.assert_allclose(tokens[n, i * 3 + j], patch @ k.reshape(48, 5) + b)


# Paper Table 1: (blocks, patch, hidden C, D_S, D_C, S at 224, parameters in millions excluding
# the head). The paper rounds parameter counts to whole millions (S/32 has 18.59M parameters and
# is listed as 19M), so a count matches when it rounds to the table's figure:
# |count - paper * 1e6| <= 0.5e6.
# S/8 is not in the paper's table. With the S/16 widths at 224 it
# has 20.13M: its 784 tokens make each token-mixing MLP 2*784*256 weights (8 blocks: 3.2M, vs
# 0.8M for S/16). 20.13M is also what the released gsam/Mixer-S_8.npz size implies: (20.13M +
# 0.51M head) * 4 bytes = 78.8 MiB, consistent with the 71-79 MiB of the released S checkpoints.
# So S/8 is checked against 20M.
TABLE_1 = {
    "S/32": (8, 32, 512, 256, 2048, 49, 19),
    "S/16": (8, 16, 512, 256, 2048, 196, 18),
    "S/8": (8, 8, 512, 256, 2048, 784, 20),  # see above
    "B/32": (12, 32, 768, 384, 3072, 49, 60),
    "B/16": (12, 16, 768, 384, 3072, 196, 59),
    "L/32": (24, 32, 1024, 512, 4096, 49, 206),
    "L/16": (24, 16, 1024, 512, 4096, 196, 207),
    "H/14": (32, 14, 1280, 640, 5120, 256, 431),
}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_variants_match_table_1(name):
    blocks, patch, hidden, ds, dc, tokens, millions = TABLE_1[name]
    config = mixer.VARIANTS[name]
    assert (config.num_blocks, config.patch_size, config.hidden_dim, config.tokens_mlp_dim,
            config.channels_mlp_dim, config.image_size) == (blocks, patch, hidden, ds, dc, 224)
    assert config.num_tokens == tokens
    assert config.variant == name
    assert dataclasses.replace(config, num_classes=21843).variant == name
    shapes = mixer.param_shapes(config)
    assert len(shapes) == 4 + 12 * blocks + 2  # 102 arrays for S/32 with a head, 150 for B/16
    count = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("head/"))
    assert abs(count - millions * 1e6) <= 0.5e6, f"{name}: {count} parameters"
    assert shapes["head/kernel"] == (hidden, 1000)
    headless = mixer.param_shapes(dataclasses.replace(config, num_classes=None))
    assert set(shapes) - set(headless) == {"head/kernel", "head/bias"}
    assert mixer.infer_config(shapes) == config


def test_variant_names_only_for_table_architectures():
    assert SMALL.variant is None
    assert dataclasses.replace(mixer.VARIANTS["B/16"], hidden_dim=512).variant is None
    # another resolution is still the variant, even one that other variants' patches do not divide
    assert dataclasses.replace(mixer.VARIANTS["L/16"], image_size=400).variant == "L/16"
    assert dataclasses.replace(mixer.VARIANTS["H/14"], image_size=266).variant == "H/14"


def test_init_is_official():
    config = S32
    a = mixer.init(config, seed=0, backend="numpy").numpy_params()
    b = mixer.init(config, seed=0, backend="numpy").numpy_params()
    c = mixer.init(config, seed=1, backend="numpy").numpy_params()
    assert list(a) == list(mixer.param_shapes(config))
    for name, shape in mixer.param_shapes(config).items():
        assert a[name].shape == shape and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])  # same seed: same weights
        if name.endswith("/scale"):
            np.testing.assert_array_equal(a[name], 1.0)
        elif name.endswith("/bias") or name == "head/kernel":
            np.testing.assert_array_equal(a[name], 0.0)
        else:
            assert not np.array_equal(a[name], c[name])  # another seed: other weights
            # lecun_normal: truncated normal with std sqrt(1 / fan_in), fan_in = all but the last
            # axis (P*P*3 for the HWIO stem). The sampled std is within 3% (every kernel here
            # has >= 12544 entries: the std estimate's own error is < 1%).
            fan_in = math.prod(shape[:-1])
            std = math.sqrt(1.0 / fan_in)
            w = a[name].astype(np.float64)
            assert abs(w.std() / std - 1) < 0.03, (name, w.std(), std)
            assert abs(w.mean()) < 0.05 * std
            # truncated at 2 standard deviations of the underlying (untruncated) normal,
            # whose std is std / 0.8796: nothing beyond, but values close to the cut exist
            cut = 2 * std / 0.87962566103423978
            assert np.abs(w).max() <= cut * (1 + 1e-6)
            assert np.abs(w).max() > 0.97 * cut
    # large kernel (1M entries): the shape of the distribution, not just its std. A normal
    # truncated at +-2 sigma has 2 * (Phi(2) - Phi(1.8)) / (2 * Phi(2) - 1) = 2.76% of its mass
    # between 1.8 and 2 sigma, and none beyond; a plain normal with the same std would put 4.1%
    # beyond 1.8 sigma, 1.4% of it beyond 2 sigma.
    w = a["MixerBlock_0/channel_mixing/Dense_0/kernel"].astype(np.float64)
    sigma = math.sqrt(1.0 / 512) / 0.87962566103423978
    frac = np.mean(np.abs(w) > 1.8 * sigma)
    assert 0.0260 < frac < 0.0292, frac


def test_init_model_predicts_zero_logits():
    """A zero head gives zero logits, as the official init; pre-logits are not zero."""
    model = mixer.init(SMALL, seed=0, backend="numpy")
    x = random_images(2, 20, seed=0)
    np.testing.assert_array_equal(model(x), 0.0)
    np.testing.assert_allclose(model.features(x), reference_forward(model.numpy_params(), x)[1],
                               rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def small_numpy_model():
    return mixer.Mixer(SMALL, random_params(SMALL, seed=0), backend="numpy")


@pytest.mark.parametrize("shape, message", [
    ((2, 24, 24, 3), r"takes 20x20 images, got 24x24; use mixer.preprocess"),
    ((2, 22, 22, 3), r"got 22x22 \(and 22x22 is not a multiple of the patch size 4\)"),
    ((2, 20, 20, 1), r"expected images of shape \(B, H, W, 3\), got \(2, 20, 20, 1\)"),
    ((20, 20, 3), r"expected a batch \(B, H, W, 3\), got one image .*x\[None\]"),
    ((400, 3), r"expected images of shape \(B, H, W, 3\), got \(400, 3\)"),
])
def test_input_validation(small_numpy_model, shape, message):
    x = np.zeros(shape, np.float32)
    with pytest.raises(mixer.MixerError, match=message):
        small_numpy_model(x)
    with pytest.raises(mixer.MixerError, match=message):
        small_numpy_model.features(x)


def test_config_validation():
    with pytest.raises(mixer.MixerError, match="image_size 30 is not a multiple of patch_size 4"):
        dataclasses.replace(SMALL, image_size=30)
    with pytest.raises(mixer.MixerError, match="hidden_dim must be a positive int"):
        dataclasses.replace(SMALL, hidden_dim=0)
    with pytest.raises(mixer.MixerError, match="num_classes"):
        dataclasses.replace(SMALL, num_classes=0)
    with pytest.raises(mixer.MixerError, match="unknown backend 'jax'"):
        mixer.Mixer(SMALL, random_params(SMALL), backend="jax")


def test_weights_are_checked_on_construction():
    params = random_params(SMALL)
    params["MixerBlock_1/token_mixing/Dense_0/kernel"] = np.zeros((12, 25), np.float32)
    with pytest.raises(mixer.MixerError, match=r"Dense_0/kernel' has shape \(12, 25\), "
                                               r"expected \(25, 12\)"):
        mixer.Mixer(SMALL, params, backend="numpy")
    with pytest.raises(mixer.MixerError, match="3 labels given for a head with 7 classes"):
        mixer.Mixer(SMALL, random_params(SMALL), backend="numpy", labels=["a", "b", "c"])


def test_classify_array_batch(backend, tol):
    params = random_params(SMALL, seed=5)
    labels = [f"class {chr(ord('a') + i)}" for i in range(7)]
    model = mixer.Mixer(SMALL, params, backend=backend, labels=labels)
    x = random_images(5, 20, seed=6)
    logits, _ = reference_forward(params, x)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)

    results = model.classify(x, top_k=3, batch_size=2)  # batches of 2, 2, 1
    assert len(results) == 5
    for row, top, p in zip(results, np.argsort(-logits, axis=1)[:, :3], probs):
        assert [i for i, _, _ in row] == list(top)
        assert [label for _, label, _ in row] == [labels[i] for i in top]
        got = [prob for _, _, prob in row]
        assert got == sorted(got, reverse=True) and sum(got) <= 1 + 1e-9
        assert all(isinstance(i, int) and isinstance(q, float) for i, _, q in row)
        np.testing.assert_allclose(got, p[top], rtol=0, atol=tol)

    full = model.classify(x[:1], top_k=100)[0]  # k larger than the classes: all of them
    assert len(full) == 7 and sorted(i for i, _, _ in full) == list(range(7))
    assert abs(sum(q for _, _, q in full) - 1) < 1e-6


@pytest.mark.parametrize("resize", [None, "crop", "squash"])
def test_classify_images_in_batches(resize):
    """PIL images are preprocessed a batch at a time and give what the preprocessed array gives;
    `resize` overrides the weights' own preprocessing (here "squash")."""
    from PIL import Image
    model = mixer.Mixer(SMALL, random_params(SMALL, seed=8), backend="numpy",
                        preprocessing={"resize": "squash"})
    rng = np.random.default_rng(9)
    images = [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 45, 3), dtype=np.uint8))
              for i in range(5)]
    expected = np.stack([mixer.preprocess(im, size=20, resize=resize or "squash")
                         for im in images])
    got = model.classify(images, top_k=3, batch_size=2, resize=resize)
    want = model.classify(expected, top_k=3)
    assert [[i for i, _, _ in row] for row in got] == [[i for i, _, _ in row] for row in want]
    np.testing.assert_allclose([[p for _, _, p in row] for row in got],
                               [[p for _, _, p in row] for row in want], rtol=0, atol=1e-6)
    if resize == "crop":  # the two geometries really differ on these non-square images
        squashed = np.stack([mixer.preprocess(im, size=20, resize="squash") for im in images])
        assert not np.allclose(expected, squashed)


def test_classify_without_labels():
    model = mixer.Mixer(SMALL, random_params(SMALL), backend="numpy")
    assert model.labels is None
    row = model.classify(random_images(1, 20), top_k=2)[0]
    assert [label for _, label, _ in row] == [None, None]


def test_repr():
    model = mixer.Mixer(SMALL, random_params(SMALL), backend="numpy")
    assert repr(model) == "Mixer(custom, 20px, classes=7, backend=numpy)"
