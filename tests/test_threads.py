"""Threads and process-wide state: a model shared by a thread pool gives serial results on every
backend; mixer restores (or never touches) what belongs to the host program: os.environ["DEV"],
OpenBLAS's thread count; tinygrad's device problems are one line."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

import mixer
from conftest import REPO
from reference import random_images, random_params

SMALL = mixer.MixerConfig(patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                          channels_mlp_dim=32, num_classes=5, image_size=16)


@pytest.fixture(scope="module")
def params():
    return random_params(SMALL, seed=40)


def test_a_thread_pool_gets_the_serial_results(backend, params, request):
    """Warmed up on this thread with batches of 1, 2 and 4 (MLX splits 2 and 4 across CPU
    streams), then called from 4 threads at once with all three: every result equals the
    serial one (MLX used to fail with 'There is no Stream(cpu, N) in current thread', tinygrad
    with 'TinyJit inside another TinyJit')."""
    if backend == "mlx":
        request.getfixturevalue("mlx_cpu_split")
    model = mixer.Mixer(SMALL, params, backend=backend)
    batches = [random_images(n, 16, seed=n) for n in (1, 2, 4)]
    serial = [model(x) for x in batches]
    jobs = [i % 3 for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: model(batches[i]), jobs))
    tol = 1e-5 if backend == "numpy" else 1e-4  # MLX threads run the graph uncompiled
    for i, out in zip(jobs, results):
        np.testing.assert_allclose(out, serial[i], rtol=0, atol=tol)


QUANTISED = mixer.MixerConfig(patch_size=4, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
                              channels_mlp_dim=128, num_classes=5, image_size=32)


def test_a_thread_pool_gets_the_serial_results_quantised(backend, tmp_path, request):
    """The same with int4 weights, whose kernels each call dequantises for itself: threads
    running the model at once must not share (or overwrite) each other's float buffers."""
    if backend == "mlx":
        request.getfixturevalue("mlx_cpu_split")
    path = str(tmp_path / "int4.safetensors")
    mixer.Mixer(QUANTISED, random_params(QUANTISED, seed=41), backend="numpy").save(
        path, dtype="int4", group_size=32)
    model = mixer.load(path, backend=backend)
    assert model.quantization == {"bits": 4, "group_size": 32}
    batches = [random_images(n, 32, seed=n) for n in (1, 2, 4)]
    serial = [model(x) for x in batches]
    jobs = [i % 3 for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: model(batches[i]), jobs))
    tol = 1e-5 if backend == "numpy" else 1e-4
    for i, out in zip(jobs, results):
        np.testing.assert_allclose(out, serial[i], rtol=0, atol=tol)


MLX_THREADS = """
import threading, numpy as np, mixer
config = mixer.MixerConfig(patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                           channels_mlp_dim=32, num_classes=5, image_size=16)
model = mixer.init(config, backend="mlx")
x = np.zeros((4, 16, 16, 3), np.float32)
model(x)
threads = [threading.Thread(target=model, args=(x,)) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print("done")
"""


def test_mlx_from_threads_exits_cleanly():
    """MLX 0.32 aborts at exit (status 134, 'terminate called without an active exception') in
    about half the runs once a compiled function has run in another thread; mixer runs the
    uncompiled graph there. Six runs, so that a regression shows (all six pass by chance about
    once in 64)."""
    runs = [subprocess.Popen([sys.executable, "-c", MLX_THREADS], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert (run.returncode, out, err) == (0, "done\n", "")


DEFAULT_AFTER_TINYGRAD = """
import os, numpy as np, mixer
os.environ.pop("DEV", None); os.environ.pop("MIXER_BACKEND", None)
before = mixer.default_backend()
from tinygrad import Tensor
assert Tensor([1.0, 2.0]).tolist() == [1.0, 2.0]  # tinygrad picks a device: writes DEV
assert os.environ.get("DEV"), "tinygrad no longer writes DEV: this test proves nothing"
after_user_code = mixer.default_backend()
os.environ.pop("DEV")
config = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                           channels_mlp_dim=8, num_classes=3, image_size=8)
mixer.init(config, backend="tinygrad")(np.zeros((1, 8, 8, 3), np.float32))
print(before, after_user_code, mixer.default_backend(), os.environ.get("DEV"))
"""


def test_the_default_backend_does_not_follow_tinygrad():
    """tinygrad writes the device it picks into os.environ["DEV"]; backend=None used to pick
    tinygrad from then on. In a fresh process, so that tinygrad really picks a device here."""
    done = subprocess.run([sys.executable, "-c", DEFAULT_AFTER_TINYGRAD], cwd=REPO, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # numpy before, after the user's tinygrad use, after mixer's own; and no DEV left behind
    assert done.stdout.split() == ["numpy", "numpy", "numpy", "None"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_mlx_from_a_thread_pool_starts_few_threads(params, mlx_cpu_split):
    """MLX keeps an OS thread for every stream, and a thread's streams live as long as the
    process. Split batches made 2 streams in every calling thread (a process grew from 6 to 96
    OS threads for 30 request threads); now other threads run batches whole, on their one
    default stream, so a pool of 2 threads adds about 2 OS threads however many calls it runs."""
    model = mixer.Mixer(SMALL, params, backend="mlx")
    x = random_images(4, 16, seed=4)
    expected = model(x)  # the main thread's streams, made once
    before = len(os.listdir("/proc/self/task"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for out in pool.map(lambda _: model(x), range(20)):
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
        during = len(os.listdir("/proc/self/task"))
    assert during <= before + 2 + 2, (before, during)  # the pool's 2, and one MLX thread each


def run_cli(args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "mixer.py"), *args], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, params):
    path = str(tmp_path_factory.mktemp("w") / "small.safetensors")
    mixer.Mixer(SMALL, params, backend="numpy").save(path)
    return path


@pytest.mark.parametrize("dev", ["BOGUS", "CUDA"])
def test_a_tinygrad_device_that_cannot_open_is_one_line(weights, dev):
    if dev == "CUDA" and os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has an NVIDIA GPU: DEV=CUDA opens")
    image = os.path.join(REPO, "examples", "chelsea.jpg")
    done = run_cli([image, "--weights", weights, "--backend", "tinygrad"], {"DEV": dev})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"tinygrad cannot open DEV={dev}" in done.stderr


def test_an_unsupported_half_type_says_so_in_one_line(weights):
    """Through tinygrad, clang's refusal of __bf16 (clang < 17 on x86) printed 8-10 lines of
    compiler errors before our message."""
    image = os.path.join(REPO, "examples", "chelsea.jpg")
    done = run_cli([image, "--weights", weights, "--backend", "tinygrad", "--dtype", "bfloat16"],
                   {"DEV": "CPU"})
    if done.returncode == 0:  # a clang that compiles bfloat16: nothing to refuse
        assert done.stderr == ""
    else:
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "cannot compute in bfloat16" in done.stderr


# --- OpenBLAS's thread count belongs to the host program --------------------------------------

@pytest.fixture
def blas():
    found = mixer.openblas()
    if found is None:
        pytest.skip("numpy here does not use an OpenBLAS that mixer can reach")
    threads = found.threads()
    yield found
    found._set(threads)


def test_a_count_set_meanwhile_is_kept(blas):
    start = blas.threads()
    with blas.single_threaded():
        assert blas.threads() == 1
        blas._set(3)  # the host program, from another thread
    assert blas.threads() == 3
    blas._set(start)
    with blas.single_threaded():
        pass
    assert blas.threads() == start


def test_data_parallel_can_be_switched_off(blas, params, monkeypatch):
    """With DATA_PARALLEL off, a batch that would run data-parallel never changes the count."""
    calls = []
    real = blas._set
    monkeypatch.setattr(blas, "_set", lambda n: (calls.append(n), real(n)))
    monkeypatch.setattr(blas, "threads", lambda: 2)  # as on a 2-core machine
    model = mixer.Mixer(SMALL, params, backend="numpy")
    x = random_images(16, 16, seed=3)  # 16 images x 16 tokens: 128 rows per thread
    expected = model(x)
    assert calls, "the batch did not run data-parallel: the test proves nothing"
    calls.clear()
    monkeypatch.setattr(mixer, "DATA_PARALLEL", False)
    np.testing.assert_allclose(model(x), expected, rtol=0, atol=1e-5)
    assert calls == []


def test_the_switch_is_read_from_the_environment():
    code = "import mixer; print(mixer.DATA_PARALLEL)"
    for value, expected in (("0", "False"), ("1", "True")):
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "MIXER_DATA_PARALLEL": value})
        assert done.stdout.strip() == expected
