"""Shared fixtures: the backends every numerical test runs on, and their tolerances.

`backend` yields the mixer backend name ("numpy", "mlx" or "tinygrad"); the tinygrad cases run
once on tinygrad's CPU device (clang) and once on CL (OpenCL, PoCL on CI machines). The OpenCL
path is promised, so a machine without a working OpenCL device FAILS the CL cases, never skips.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (REPO, TESTS):  # `import mixer` and `import reference` without installing anything
    if _path not in sys.path:
        sys.path.insert(0, _path)

BACKENDS = ["numpy", "mlx", "tinygrad-CPU", "tinygrad-CL"]

# Absolute tolerances on logits and pre-logits (both O(1) in these tests) against the float64
# reference. A float32 forward is ~1e-6 off; numpy is held to 1e-5 (a float32
# implementation of the official equations matches its outputs to ~1e-5). mlx and tinygrad
# reorder reductions and fuse kernels, so 1e-4: still below the ~5e-4 that an erf GELU moves S/32 logits (test_model
# checks that this tolerance would catch one).
TOLERANCE = {"numpy": 1e-5, "mlx": 1e-4, "tinygrad": 1e-4}


@contextlib.contextmanager
def tinygrad_device(device: str):
    """Makes `device` tinygrad's default for the block, then restores the previous default."""
    from tinygrad import Device, Tensor
    from tinygrad.helpers import Context, ContextVar

    if "DEV" in ContextVar._cache:  # tinygrad >= 0.12: Device.DEFAULT follows the DEV ContextVar
        switch = Context(DEV=device)
    else:  # older tinygrad: Device.DEFAULT is a plain attribute
        switch = _set_device_default(Device, device)
    with switch:
        assert Device.DEFAULT == device, f"tinygrad's default is {Device.DEFAULT}, not {device}"
        Device[device]  # opens it: raises here (a test error, not a skip) if it is unavailable
        probe = Tensor([1.0, 2.0]) * 2
        assert probe.device.startswith(device), probe.device
        assert probe.tolist() == [2.0, 4.0]
        yield


@contextlib.contextmanager
def _set_device_default(Device, device):
    old = Device.DEFAULT
    Device.DEFAULT = device
    try:
        yield
    finally:
        Device.DEFAULT = old


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The mixer backend name; for tinygrad, with the device of the case as tinygrad's default."""
    name, _, device = request.param.partition("-")
    if name == "tinygrad":
        with tinygrad_device(device):
            yield name
    else:
        yield name


@pytest.fixture
def tol(backend):
    return TOLERANCE[backend]


def assert_placed(model):
    """The model's weights live on the backend (and, for tinygrad, on the fixture's device)."""
    if model.backend == "tinygrad":
        from tinygrad import Device
        devices = {v.device for v in model.params.values()}
        assert all(d.startswith(Device.DEFAULT) for d in devices), (devices, Device.DEFAULT)
    elif model.backend == "mlx":
        import mlx.core as mx
        assert all(isinstance(v, mx.array) for v in model.params.values())
    else:
        import numpy as np
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32
                   for v in model.params.values())


class _SingleThreadedSpy:
    """MLX's real OpenBLAS, reporting 2 threads whatever the machine; records the thread count
    that each single-threaded section actually ran with."""

    def __init__(self, blas):
        self.blas, self.inside = blas, []

    def threads(self):
        return 2

    @contextlib.contextmanager
    def single_threaded(self):
        with self.blas.single_threaded():
            yield
            self.inside.append(self.blas.threads())


@pytest.fixture
def mlx_cpu_split(monkeypatch):
    """MLX on its CPU device, splitting batches as on a 2-core Linux machine: yields the spy on
    MLX's OpenBLAS (its `inside` lists one entry per split batch); checks afterwards that the
    OpenBLAS thread count was restored. Skips where MLX calls no OpenBLAS (not Linux)."""
    import mixer
    mx = mixer.import_mlx()
    blas = mixer.mlx_openblas()
    if blas is None:
        pytest.skip("MLX calls no OpenBLAS here (not Linux, or MIXER_NO_OPENBLAS is set)")
    threads = blas.threads()
    spy = _SingleThreadedSpy(blas)
    monkeypatch.setattr(mixer, "mlx_openblas", lambda: spy)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield spy
    finally:
        mx.set_default_device(device)
    assert blas.threads() == threads
