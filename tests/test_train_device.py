"""The device that training and inference run on, exact float32 on MLX (no silent TF32), uint8
batches normalised on the device while the previous micro-batch computes, tinygrad's evaluation
JIT freed after evaluation, and the float32 token mean.

No GPU here: the GPU branches are reached by monkeypatching what reports the device.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import mixer
import train
from conftest import REPO, tinygrad_device
from reference import random_params
from test_train import SMALL, make_dataset

TINY = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                         channels_mlp_dim=8, num_classes=3, image_size=8)


def as_tf32(a: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32's 10 mantissa bits (round to nearest even), as a tensor core
    reads its inputs: an independent emulation of what MLX_ENABLE_TF32=1 does to a GEMM."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    keep = 23 - 10
    half = (1 << (keep - 1)) - 1 + ((bits >> keep) & 1)
    return (((bits + half) >> keep) << keep).astype(np.uint32).view(np.float32)


# --------------------------------------------------------------------------------------------
# Exact float32 on MLX


def test_the_probe_tells_float32_from_tf32():
    a, b = mixer.TF32_PROBE
    assert mixer.float32_matmul_exact(a @ b)
    assert not mixer.float32_matmul_exact(as_tf32(a) @ as_tf32(b))
    assert as_tf32(np.float32(1 + 2 ** -10)) == np.float32(1 + 2 ** -10)  # TF32 keeps 10 bits
    mx = mixer.import_mlx()
    assert mixer.float32_matmul_exact(np.array(mx.array(a) @ mx.array(b)))  # MLX's CPU: exact


def test_mlx_import_asks_mlx_for_float32_and_keeps_a_users_choice(monkeypatch):
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    mixer.import_mlx()
    assert os.environ["MLX_ENABLE_TF32"] == "0"
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    mixer.import_mlx()
    assert os.environ["MLX_ENABLE_TF32"] == "1"


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_mlx_refuses_tf32_unless_the_user_asked_for_it(monkeypatch, setting):
    """When MLX already computes in TF32 (it read MLX_ENABLE_TF32 before mixer set it), a
    float32 model is refused, unless the user opted in; half precision is not concerned."""
    monkeypatch.setattr(mixer, "_mlx_float32_exact", lambda device: False)
    mixer.import_mlx()
    if setting is None:
        monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    else:
        monkeypatch.setenv("MLX_ENABLE_TF32", setting)
    if setting == "1":
        mixer.MlxOps("float32")
    else:
        with pytest.raises(mixer.MixerError, match="MLX_ENABLE_TF32=0 .* MLX_ENABLE_TF32=1"):
            mixer.MlxOps("float32")
        with pytest.raises(mixer.MixerError, match="TF32"):
            train.get_backend("mlx")
    mixer.MlxOps("bfloat16")


# --------------------------------------------------------------------------------------------
# The right device


@pytest.fixture
def machine(monkeypatch):
    """A machine described by monkeypatching: set(mlx_gpu=..., dev=..., backend=...)."""
    monkeypatch.delenv("MIXER_BACKEND", raising=False)
    monkeypatch.delenv("DEV", raising=False)

    def set_up(mlx_gpu=False, dev=None, backend=None):
        monkeypatch.setattr(mixer, "mlx_has_gpu", lambda: mlx_gpu)
        if dev:
            monkeypatch.setenv("DEV", dev)
        if backend:
            monkeypatch.setenv("MIXER_BACKEND", backend)
    return set_up


@pytest.mark.parametrize("mlx_gpu, dev, backend, inference, training", [
    (False, None, None, "numpy", "mlx"),  # a CPU: numpy infers, MLX's CPU trains
    (False, "CUDA", None, "tinygrad", "tinygrad"),  # used to train on MLX's CPU
    (False, "CL:1", None, "tinygrad", "tinygrad"),
    (False, "CPU", None, "numpy", "mlx"),  # DEV=CPU names no accelerator
    (True, None, None, "mlx", "mlx"),  # Metal, or CUDA with mlx[cuda13]
    (True, "CUDA", None, "mlx", "mlx"),  # MLX's GPU first, as on Apple silicon before
    (True, "CUDA", "numpy", "numpy", "mlx"),  # MIXER_BACKEND=numpy cannot train
    (False, "CUDA", "mlx", "mlx", "mlx"),  # MIXER_BACKEND overrides DEV
])
def test_the_backend_follows_the_accelerator(machine, mlx_gpu, dev, backend, inference,
                                             training):
    machine(mlx_gpu, dev, backend)
    assert mixer.default_backend() == inference
    assert train.default_train_backend() == training


def test_mlx_gpu_is_found_on_apple_silicon_and_with_cuda(monkeypatch):
    class FakeMlx:  # mlx.core's cuda.is_available, as mlx[cuda13] answers it
        class cuda:
            available = True
            is_available = staticmethod(lambda: FakeMlx.cuda.available)

    monkeypatch.setattr(mixer.sys, "platform", "linux")
    monkeypatch.setattr(mixer, "import_mlx", lambda: FakeMlx)
    installed = set()
    monkeypatch.setattr(mixer, "_distribution", lambda name: name in installed)
    assert not mixer.mlx_has_gpu()  # mlx[cpu]: not even imported
    installed.add("mlx-cuda-13")
    assert mixer.mlx_has_gpu()
    FakeMlx.cuda.available = False  # the CUDA wheel on a machine without a working GPU
    assert not mixer.mlx_has_gpu()
    monkeypatch.setattr(mixer.sys, "platform", "darwin")
    monkeypatch.setattr(mixer.platform, "machine", lambda: "arm64")
    assert mixer.mlx_has_gpu() == mixer.installed("mlx")


def test_dev_without_its_device_is_one_clear_error(tmp_path):
    """DEV=CUDA used to train on MLX's CPU without a word; now it means tinygrad on CUDA, and
    a machine without one says so (tinygrad reads DEV when imported: a fresh process)."""
    data = make_dataset(tmp_path / "data", {"train": 2})
    env = {k: v for k, v in os.environ.items() if k != "MIXER_BACKEND"}
    done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), data, "--steps", "1",
                           "--variant", "S/32", "--out", str(tmp_path / "run")],
                          env={**env, "DEV": "NOSUCHDEVICE"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("train: error: tinygrad cannot open DEV=NOSUCHDEVICE"), \
        done.stderr
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_training_prints_the_backend_and_device_first(tmp_path):
    """In the first line, once the data is read (a bad dataset stays one line)."""
    data = make_dataset(tmp_path / "data", {"train": 2})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train.train(data_dir=data, backend="mlx", **SMALL, image_size=32, steps=1,
                    batch_size=4, val_fraction=0, out=str(tmp_path / "run"))
    first = err.getvalue().splitlines()[0]
    assert first.startswith("train: 8 training images in 4 classes") \
        and first.endswith(", on mlx, device cpu"), first


def test_tinygrad_names_its_device():
    for device in ("CPU", "CL"):
        with tinygrad_device(device):
            assert train.get_backend("tinygrad").ops.device() == device


def test_mlx_names_its_gpu(monkeypatch):
    ops = mixer.MlxOps()
    assert ops.device() == "cpu"
    mx = ops.mx
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert ops.device() == "gpu (CUDA)"
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert ops.device() == "gpu (Metal)"


# --------------------------------------------------------------------------------------------
# uint8 batches, normalised on the device, the next micro-batch prepared during the current one


@pytest.mark.parametrize("backend", ["mlx", "tinygrad-CPU", "tinygrad-CL"])
def test_images_are_normalised_on_the_device_as_preprocess_does(backend):
    """Every pixel value: on MLX bit for bit what mixer.preprocess computes on the host; on
    tinygrad within 2**-23 = 1.2e-7, one float32 ulp of x / 127.5 (it computes x / 127.5 as
    x * (1 / 127.5)), a thousandth of the tolerance the backends are held to."""
    name, _, device = backend.partition("-")
    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(1, 16, 16, 3)
    with tinygrad_device(device) if device else contextlib.nullcontext():
        xp = train.get_backend(name)
        got = xp.ops.numpy(xp.images(pixels))
    want = pixels.astype(np.float32) / 127.5 - 1.0
    assert got.dtype == np.float32
    if name == "mlx":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -23)
        assert not np.array_equal(got, want)  # if this fails, make the MLX case's equality hold


def test_the_loader_hands_out_uint8_pixels_of_what_decode_gives(tmp_path):
    data = make_dataset(tmp_path, {"train": 3})
    with train.concurrent.futures.ThreadPoolExecutor(2) as pool:
        _, split, _ = train.scan(data, None, 0, pool, lambda msg: None)
        for augment in (True, False):
            loader = train.Loader(split, 4, 32, "crop", augment, 0, pool, lambda msg: None)
            x, _ = next(loader.batches(1, 6, 0, 1))
            assert x.dtype == np.uint8 and x.shape == (6, 32, 32, 3)
            floats = np.stack([loader.decode(split.files[loader.sample_index(p)], p)
                               for p in range(6)])
            np.testing.assert_array_equal(x.astype(np.float32) / 127.5 - 1.0, floats)


def steps(xp, pixels, onehot, images, accum=3, sync_each=False):
    """Losses, norms and weights after two steps of `accum` micro-batches, fed float32 images
    normalised on the host (images=False) or uint8 pixels normalised on the device."""
    trainer = train.Trainer(xp, TINY, random_params(TINY, seed=2), accum_steps=accum)
    x = pixels if images else pixels.astype(np.float32) / 127.5 - 1.0
    micro = len(x) // accum
    out = []
    for lr in (0.5, 0.2):
        for i in range(accum):
            trainer.accumulate(x[i * micro:(i + 1) * micro], onehot[i * micro:(i + 1) * micro])
            if sync_each:  # the code before: wait for every micro-batch
                xp.sync(trainer.state)
        out.append(trainer.update(lr))
    return out, trainer.numpy("params")


@pytest.mark.parametrize("backend", ["mlx-gpu-like", "mlx-cpu-split", "tinygrad-CPU"])
def test_uint8_on_the_device_with_overlap_trains_as_before(backend, monkeypatch):
    """Two steps of 3 micro-batches: uint8 normalised on the device, each micro-batch queued
    while the previous finishes, equal the host-normalised float32 path that waited for every
    micro-batch (the code before), on MLX run whole as on a GPU, MLX split across CPU streams,
    and tinygrad."""
    name, _, device = backend.partition("-")
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    onehot = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 12)]
    with tinygrad_device(device) if name == "tinygrad" else contextlib.nullcontext():
        xp = train.get_backend(name)
        if device == "gpu":
            monkeypatch.setattr(xp.ops, "split_batch", lambda batch, fn: None)
        before = steps(xp, pixels, onehot, images=False, sync_each=True)
        now = steps(xp, pixels, onehot, images=True)
    np.testing.assert_allclose(now[0], before[0], rtol=1e-6)
    assert before[0][0] != before[0][1]  # the steps did something
    for k in before[1]:
        np.testing.assert_allclose(now[1][k], before[1][k], rtol=0, atol=1e-7, err_msg=k)


def test_accumulate_waits_for_the_micro_batch_before_not_the_current_one(monkeypatch):
    xp = train.get_backend("mlx")
    monkeypatch.setattr(xp.ops, "split_batch", lambda batch, fn: None)
    calls = []
    monkeypatch.setattr(xp, "start", lambda tree: calls.append(("start", id(tree[0]))))
    monkeypatch.setattr(xp, "sync", lambda tree: calls.append(("sync", id(tree[0]))))
    trainer = train.Trainer(xp, TINY, random_params(TINY, seed=2), accum_steps=3)
    x = np.zeros((2, 8, 8, 3), np.uint8)
    onehot = np.eye(3, dtype=np.float32)[[0, 1]]
    for _ in range(3):
        trainer.accumulate(x, onehot)
    assert [c[0] for c in calls] == ["start", "start", "sync", "start", "sync"]
    assert calls[2][1] == calls[0][1] and calls[4][1] == calls[1][1]


# --------------------------------------------------------------------------------------------
# tinygrad: the evaluation JIT's buffers are freed after evaluation


def test_tinygrad_frees_the_evaluation_jit(tmp_path):
    from tinygrad.helpers import GlobalCounters
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    onehot = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    with tinygrad_device("CPU"):
        xp = train.get_backend("tinygrad")
        trainer = train.Trainer(xp, TINY, random_params(TINY, seed=2))
        for _ in range(3):  # TinyJit captures at the second call
            trainer.accumulate(pixels, onehot)
            trainer.update(0.1)
        gc.collect()  # tinygrad buffers of earlier tests, freed now rather than mid-test
        training = GlobalCounters.mem_used
        x = pixels.astype(np.float32) / 127.5 - 1.0
        first = trainer.logits(x)
        for _ in range(2):
            trainer.logits(x)
        assert GlobalCounters.mem_used > training  # the evaluation JIT's own buffers
        trainer.end_evaluation()
        assert GlobalCounters.mem_used == training
        np.testing.assert_array_equal(trainer.logits(x), first)  # a fresh JIT, the same model


# --------------------------------------------------------------------------------------------
# The token mean in float32


@pytest.mark.parametrize("backend, dtype", [("mlx", "float16"), ("mlx", "bfloat16"),
                                            ("tinygrad", "float16")])
def test_token_mean_accumulates_in_float32(backend, dtype):
    """Two tokens of 60000: their float16 sum overflows (65504 is float16's largest), their
    mean does not; MLX's CPU float16 mean returned inf before."""
    with tinygrad_device("CPU") if backend == "tinygrad" else contextlib.nullcontext():
        ops = mixer.get_ops(backend, dtype)
        x = ops.asarray(np.full((1, 2, 3), 60000.0, np.float32))
        got = ops.numpy(ops.token_mean(x))
    expected = ops.numpy(ops.asarray(np.full((1, 3), 60000.0, np.float32)))  # 60000 in dtype
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------------
# bench.py's peak RSS where there is no /proc (macOS)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's /proc")
@pytest.mark.parametrize("platform, proc", [("linux", True), ("darwin", False),
                                            ("freebsd", False)])
def test_bench_peak_rss_without_proc(monkeypatch, capsys, platform, proc):
    import builtins
    import resource

    import bench

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)
    monkeypatch.setattr(sys, "platform", platform)
    exec(bench.PEAK_RSS, {"open": builtins.open if proc else no_proc})
    peak = int(capsys.readouterr().err)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB here, on Linux
    if proc:
        with open("/proc/self/status") as f:
            hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM")][0]
        assert 0 < peak == hwm * 1024
    else:
        assert peak == (maxrss if platform == "darwin" else maxrss * 1024) > 0


# --------------------------------------------------------------------------------------------
# MLX compiles from the second call on


def test_mlx_compiles_from_the_second_call(monkeypatch):
    ops = mixer.MlxOps()
    ran = []

    def fake_compile(fn):
        def compiled(*args):
            ran.append("compiled")
            return fn(*args)
        return compiled
    monkeypatch.setattr(ops.mx, "compile", fake_compile)
    monkeypatch.setattr(ops, "split_batch", lambda batch, fn: None)
    run = ops.compile(lambda p, x: x * p)
    for k in range(3):
        assert ops.numpy(run(ops.mx.array(2.0), ops.mx.array([1.0, k]))).tolist() == [2.0, 2 * k]
    assert ran == ["compiled", "compiled"]  # calls 2 and 3
