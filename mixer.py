"""MLP-Mixer for MLX, tinygrad and numpy, in one file.

Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021, arXiv:2105.01601.
The names are those of the official code (google-research/vision_transformer,
vit_jax/models_mixer.py) and its checkpoints: "stem/kernel", "MixerBlock_0/token_mixing/...".

The file reads top to bottom: numerics, config and variants, the model (written once), the backend
shim (numpy, mlx, tinygrad) and its speed machinery, weights files, quantisation, the Mixer class,
images, official checkpoints, the command line. It needs numpy plus the backend you use (Pillow
for images), and downloads and converts the official checkpoints itself (standard library only).

    import mixer
    model = mixer.pretrained("B/16")  # gsam/Mixer-B_16.npz, downloaded and converted once
    model = mixer.load("weights/gsam-Mixer-B_16.safetensors")
    print(model.classify(["cat.jpg"]))

    python mixer.py cat.jpg --variant B/16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.client
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile

if __name__ == "__main__":
    def _interrupted_while_starting(kind, value, tb, report=sys.excepthook):
        """Ctrl-C while numpy and a backend import (before run_main's handling): one line, 130."""
        if issubclass(kind, KeyboardInterrupt):
            print("mixer: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        report(kind, value, tb)
    sys.excepthook = _interrupted_while_starting

import numpy as np  # noqa: E402 -- after the start-up handler above

# Numerics that decide parity with the official (flax) outputs.
LN_EPS = 1e-6  # flax nn.LayerNorm's default; MLX and tinygrad default to 1e-5
GELU_C = math.sqrt(2.0 / math.pi)  # flax nn.gelu is the tanh approximation (approximate=True)


def gelu_tanh(x, tanh):
    """0.5 x (1 + tanh(GELU_C (x + 0.044715 x^3))) for any array type, given its tanh."""
    return 0.5 * x * (1.0 + tanh(GELU_C * (x + 0.044715 * (x * x * x))))


class MixerError(Exception):
    """A user-facing problem (bad file, image or argument); the message says what to do."""


def _is_int(value) -> bool:
    """Whether value is an int or a numpy integer, not a bool (nor a float that equals an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------------------------
# Config and variants (paper Table 1), with the official code's field names.

@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """The architecture; frozen, with the official field names."""
    patch_size: int  # P: stem conv kernel = stride
    hidden_dim: int  # C: channels per token
    num_blocks: int  # N: Mixer blocks
    tokens_mlp_dim: int  # D_S: hidden width of the token-mixing MLP
    channels_mlp_dim: int  # D_C: hidden width of the channel-mixing MLP
    num_classes: int | None = 1000  # None: no head, the model returns pre-logits
    image_size: int = 224  # fixes S, the token-mixing input size: (image_size / P) ** 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "num_classes" and value is None:
                continue
            if not _is_int(value) or value < 1:
                raise MixerError(f"MixerConfig.{field.name} must be a positive int"
                                 f"{' or None' if field.name == 'num_classes' else ''}, "
                                 f"got {value!r}")
            object.__setattr__(self, field.name, int(value))  # numpy integers as ints (JSON)
        if self.image_size % self.patch_size:
            raise MixerError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def num_tokens(self) -> int:
        """S, the number of patches."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def variant(self) -> str | None:
        """The paper's name ("B/16") when the architecture is one of VARIANTS, else None."""
        arch = lambda c: dataclasses.astuple(c)[:5]  # noqa: E731 -- the fields before the head
        return next((name for name, v in VARIANTS.items() if arch(v) == arch(self)), None)

    def to_dict(self) -> dict:
        """The fields as a dict (what a weights file's metadata holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MixerConfig":
        """The config of to_dict's dict; a MixerError naming the keys for anything else."""
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        if not isinstance(d, dict) or not names.issuperset(d) or not required.issubset(d):
            raise MixerError(f"bad Mixer config {d!r}: expected the keys {sorted(names)}")
        return cls(**d)


VARIANTS = {  # patch_size P, hidden_dim C, num_blocks N, tokens_mlp_dim D_S, channels_mlp_dim D_C
    "S/32": MixerConfig(32, 512, 8, 256, 2048),
    "S/16": MixerConfig(16, 512, 8, 256, 2048),
    "S/8": MixerConfig(8, 512, 8, 256, 2048),
    "B/32": MixerConfig(32, 768, 12, 384, 3072),
    "B/16": MixerConfig(16, 768, 12, 384, 3072),
    "L/32": MixerConfig(32, 1024, 24, 512, 4096),
    "L/16": MixerConfig(16, 1024, 24, 512, 4096),
    "H/14": MixerConfig(14, 1280, 32, 640, 5120),
}


# --------------------------------------------------------------------------------------------
# The model, written once over the backend shim below. `params` maps the official names to
# backend arrays; Dense kernels are (in, out): y = x @ kernel + bias.

def mlp(ops, params, prefix, x):
    """MlpBlock: Dense_1(gelu(Dense_0(x))) over the last axis."""
    p = lambda name: params[prefix + name]  # noqa: E731
    return ops.mlp(x, p("Dense_0/kernel"), p("Dense_0/bias"), p("Dense_1/kernel"), p("Dense_1/bias"))


def mixer_block(ops, params, prefix, x):
    """x (B, S, C): token mixing across the S tokens (T swaps tokens and channels), then channel
    mixing across the C channels; each pre-norm, with a residual."""
    ln = lambda name, y: ops.layer_norm(y, params[prefix + name + "/scale"],  # noqa: E731
                                        params[prefix + name + "/bias"])
    x = x + ops.swap(mlp(ops, params, prefix + "token_mixing/", ops.swap(ln("LayerNorm_0", x))))
    return x + mlp(ops, params, prefix + "channel_mixing/", ln("LayerNorm_1", x))


def forward(ops, params, x, num_blocks: int, head: bool = True):
    """x: (B, H, W, 3) in [-1, 1] -> logits (B, num_classes), or pre-logits (B, C) if not head."""
    kernel = params["stem/kernel"]
    p = kernel_shape(kernel)[0]
    if not isinstance(kernel, dict):  # the P x P, stride-P conv is a Dense on flattened patches
        kernel = kernel.reshape(p * p * 3, kernel.shape[3])  # (a quantised one is stored so)
    x = ops.dense(ops.patchify(x, p), kernel, params["stem/bias"])  # (B, S, C)
    for i in range(num_blocks):
        x = mixer_block(ops, params, f"MixerBlock_{i}/", x)
    x = ops.layer_norm(x, params["pre_head_layer_norm/scale"], params["pre_head_layer_norm/bias"])
    x = ops.token_mean(x)  # (B, C) pre-logits
    return ops.dense(x, params["head/kernel"], params["head/bias"]) if head else x


def param_shapes(config: MixerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's official name and shape, in forward order."""
    p, c, s = config.patch_size, config.hidden_dim, config.num_tokens
    ds, dc = config.tokens_mlp_dim, config.channels_mlp_dim
    shapes = {"stem/kernel": (p, p, 3, c), "stem/bias": (c,)}
    for i in range(config.num_blocks):
        b = f"MixerBlock_{i}/"
        shapes.update({
            b + "LayerNorm_0/scale": (c,), b + "LayerNorm_0/bias": (c,),
            b + "token_mixing/Dense_0/kernel": (s, ds), b + "token_mixing/Dense_0/bias": (ds,),
            b + "token_mixing/Dense_1/kernel": (ds, s), b + "token_mixing/Dense_1/bias": (s,),
            b + "LayerNorm_1/scale": (c,), b + "LayerNorm_1/bias": (c,),
            b + "channel_mixing/Dense_0/kernel": (c, dc), b + "channel_mixing/Dense_0/bias": (dc,),
            b + "channel_mixing/Dense_1/kernel": (dc, c), b + "channel_mixing/Dense_1/bias": (c,),
        })
    shapes.update({"pre_head_layer_norm/scale": (c,), "pre_head_layer_norm/bias": (c,)})
    if config.num_classes is not None:
        shapes.update({"head/kernel": (c, config.num_classes), "head/bias": (config.num_classes,)})
    return shapes


def infer_config(shapes: dict[str, tuple[int, ...]]) -> MixerConfig:
    """The architecture read off a checkpoint's official-named shapes (check_shapes validates)."""
    def get(name):
        if name not in shapes:
            raise MixerError(f"tensor {name!r} is missing: this is not a Mixer checkpoint")
        return shapes[name]

    stem = get("stem/kernel")
    if len(stem) != 4 or stem[0] != stem[1] or stem[2] != 3:
        raise MixerError(f"stem/kernel has shape {stem}, expected (P, P, 3, C)")
    num_blocks = 0
    while f"MixerBlock_{num_blocks}/LayerNorm_0/scale" in shapes:
        num_blocks += 1
    if num_blocks == 0:
        raise MixerError("no MixerBlock_0 tensors found: this is not a Mixer checkpoint")
    tok = get("MixerBlock_0/token_mixing/Dense_0/kernel")
    ch = get("MixerBlock_0/channel_mixing/Dense_0/kernel")
    if len(tok) != 2 or len(ch) != 2:
        raise MixerError(f"Dense_0 kernels have shapes {tok} and {ch}, expected 2-D")
    side = math.isqrt(tok[0])
    if side * side != tok[0]:
        raise MixerError(f"token_mixing/Dense_0/kernel has {tok[0]} input tokens, not a square grid")
    head = shapes.get("head/kernel")
    if head is not None and len(head) != 2:
        raise MixerError(f"head/kernel has shape {head}, expected (C, num_classes)")
    return MixerConfig(patch_size=stem[0], hidden_dim=stem[3], num_blocks=num_blocks,
                       tokens_mlp_dim=tok[1], channels_mlp_dim=ch[1],
                       num_classes=None if head is None else head[-1],
                       image_size=side * stem[0])


def check_shapes(config: MixerConfig, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Strict: every tensor of `config` present with its exact shape, nothing extra."""
    _check_tensors(what, param_shapes(config), shapes)


def _check_tensors(what: str, expected: dict, shapes: dict, dtypes: dict | None = None,
                  dtype_of=None, why: str = "") -> None:
    """Strict: each `expected` name -> shape in `shapes`, with dtype_of(name) == dtypes[name]
    where dtypes names one, and nothing else; `why` ends each message."""
    missing = [k for k in expected if k not in shapes]
    extra = sorted(k for k in shapes if k not in expected)
    if missing:
        raise MixerError(f"{what}: tensor {missing[0]!r} is missing (expected shape "
                         f"{expected[missing[0]]}; {len(missing)} missing in all){why}")
    if extra:
        raise MixerError(f"{what}: unexpected tensor {extra[0]!r} with shape {shapes[extra[0]]} "
                         f"({len(extra)} extra in all){why}")
    for k, shape in expected.items():
        want = (dtypes or {}).get(k)
        if tuple(shapes[k]) == shape and not (want and dtype_of(k) != want):
            continue
        if dtypes is None:
            raise MixerError(f"{what}: tensor {k!r} has shape {tuple(shapes[k])}, expected "
                             f"{shape}{why}")
        raise MixerError(f"{what}: tensor {k!r} is {dtype_of(k)} {tuple(shapes[k])}, expected "
                         f"{want or 'a float'} {shape}{why}")


def positive_int(value, what: str) -> int:
    """value as an int >= 1 (numpy integers too; bools, floats and strings refused)."""
    if not _is_int(value) or value < 1:
        raise MixerError(f"{what} must be a positive int, got {value!r}")
    return int(value)


# What a terminal acts on or what breaks a line (C0 and C1 controls, DEL, U+2028/9), and lone
# surrogates, which cannot be printed (U+DC80..U+DCFF are a file name's undecodable bytes).
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNPRINTABLE.update({c: f"\\u{c:04x}" for c in [0x2028, 0x2029, *range(0xD800, 0xE000)]})
_UNPRINTABLE.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})


def printable(text: str) -> str:
    """text with those characters as escapes (\\x1b, \\x0a, an undecodable byte as \\xff), other
    Unicode kept: a label or a file name cannot move the cursor or start a new output line."""
    return text.translate(_UNPRINTABLE)


# --------------------------------------------------------------------------------------------
# The backend shim: every primitive the model uses, the same on each backend.
#   asarray(np) -> backend array       numpy(a) -> np.ndarray (float32, or uint32 words)
#   words(np uint32) -> backend array  a quantised kernel's packed words, as they are
#   dense(x, kernel, bias)             x @ kernel + bias over the last axis
#   mlp(x, kernel_0, bias_0, kernel_1, bias_1)   Dense_1(gelu(Dense_0(x))), tanh GELU
#   layer_norm(x, scale, bias)         over the last axis, eps LN_EPS, statistics in float32
#   swap(x)                            (B, M, N) -> (B, N, M): the paper's T
#   patchify(x, p)                     (B, H, W, 3) -> (B, H/p * W/p, p * p * 3), row-major
#   token_mean(x)                      (B, S, C) -> (B, C), in float32
#   compile(fn)                        fn(params, x), compiled (and split, see Speed)
#   quantized(w)                       a QuantizedTensor as a kernel dict that dense and mlp
#                                      take, dequantised a layer at a time
# dtype (COMPUTE_DTYPES) is what asarray makes, and so what the forward computes in.

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# MLX and tinygrad keep process-wide state (graph evaluation, compile caches, JIT capture) that
# two threads must not drive at once: the shim holds its backend's lock in every call into them.
BACKEND_LOCKS = {"mlx": threading.RLock(), "tinygrad": threading.RLock()}


def kernel_shape(kernel) -> tuple:
    """A kernel's official shape, a quantised one's (a dict, see quantized) too."""
    return kernel["shape"] if isinstance(kernel, dict) else kernel.shape


class _Ops:
    """What the three backends share: the dtype check, patchify and quantised kernels."""
    lock = contextlib.nullcontext()

    def __init__(self, dtype: str):
        if dtype not in COMPUTE_DTYPES:
            raise MixerError(f"unknown dtype {dtype!r}: expected one of "
                             f"{', '.join(COMPUTE_DTYPES)}")
        self.dtype = dtype

    def patchify(self, x, p):
        b, h, w, c = x.shape
        x = self.transpose(x.reshape(b, h // p, p, w // p, p, c), (0, 1, 3, 2, 4, 5))
        return x.reshape(b, (h // p) * (w // p), p * p * c)  # (row-in-patch, col-in-patch, rgb)

    def quantized(self, w):
        # bits, group size, layout and shape ride along as constants (mx.compile and TinyJit
        # take non-array leaves as they are)
        with self.lock:
            return {"packed": self.words(w.packed), "scales": self.asarray(w.scales),
                    "biases": self.asarray(w.biases), "bits": w.bits, "group_size": w.group_size,
                    "layout": w.layout, "shape": w.shape}

    def mlp(self, x, kernel_0, bias_0, kernel_1, bias_1):
        return self.dense(self.gelu(self.dense(x, kernel_0, bias_0)), kernel_1, bias_1)


class NumpyOps(_Ops):
    """Inference with numpy alone, in float32: one GEMM over all rows, element-wise work in place,
    and T as a free view, so that token mixing copies no activation."""
    name = "numpy"
    HIDDEN_CHUNK = 1 << 21  # hidden activations per MLP chunk (8 MiB): they stay in cache
    MIN_ROWS_PER_THREAD = 96  # token rows per thread below which a batch runs serially
    transpose = staticmethod(np.transpose)
    words = numpy = staticmethod(np.asarray)

    def __init__(self, dtype: str = "float32"):
        super().__init__(dtype)
        if dtype != "float32":
            raise MixerError(f"the numpy backend computes in float32 only (numpy has no fast "
                             f"{dtype} matmul): use backend \"mlx\" or \"tinygrad\" (--backend) "
                             f"for {dtype}")

    def asarray(self, a):
        return np.asarray(a, dtype=np.float32)

    @staticmethod
    def _matrix(kernel):
        """A kernel as an (in, out) float32 matrix, a quantised one dequantised into a buffer
        of this call's own (so threads can share the model), freed with the layer."""
        if not isinstance(kernel, dict):
            return kernel
        m = dequantize_matrix(kernel["packed"], kernel["scales"], kernel["biases"],
                              kernel["bits"], kernel["group_size"])
        return m.T if kernel["layout"] == "out_in" else m  # BLAS reads the transposed view

    def dense(self, x, kernel, bias):
        kernel = self._matrix(kernel)
        y = (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[1])
        y += bias
        return y

    def layer_norm(self, x, scale, bias):
        mean = np.einsum("...c->...", x)[..., None]  # faster than x.mean
        mean *= 1.0 / x.shape[-1]
        y = x - mean
        var = np.einsum("...c,...c->...", y, y)[..., None]
        var *= 1.0 / x.shape[-1]
        var += LN_EPS
        np.sqrt(var, out=var)
        y /= var
        y *= scale
        y += bias
        return y

    def mlp(self, x, kernel_0, bias_0, kernel_1, bias_1):
        """A chunk of rows at a time, so that the hidden activations (4x wider than x) stay in
        cache; T(x) an image at a time, a transposed matrix that BLAS reads without a copy."""
        kernel_0 = self._matrix(kernel_0)
        if x.flags.c_contiguous:
            rows = x.reshape(-1, x.shape[-1])
            step = max(1, self.HIDDEN_CHUNK // kernel_0.shape[1])
            chunks = [rows[i:i + step] for i in range(0, len(rows), step)]
        else:
            chunks = list(x)
        n = max(len(c) for c in chunks)
        hidden, scratch = (np.empty((n, kernel_0.shape[1]), np.float32) for _ in range(2))
        out = np.empty((sum(map(len, chunks)), kernel_shape(kernel_1)[-1]), np.float32)
        start = 0
        for c in chunks:
            h = hidden[:len(c)]
            np.matmul(c, kernel_0, out=h)
            h += bias_0
            self._gelu_in_place(h, scratch[:len(c)])
            if isinstance(kernel_1, dict):  # dequantised at first use, with one chunk after
                kernel_0 = None if len(chunks) == 1 else kernel_0  # Dense_0's is let go
                kernel_1 = self._matrix(kernel_1)
            np.matmul(h, kernel_1, out=out[start:start + len(c)])
            start += len(c)
        out += bias_1
        return out.reshape(*x.shape[:-1], kernel_1.shape[1])

    @staticmethod
    def _gelu_in_place(x, t):
        """x <- x * (0.5 + 0.5 tanh(GELU_C (x + 0.044715 x^3))), t as scratch: numpy's float32
        tanh is SIMD, so this beats a rewrite through exp."""
        np.multiply(x, x, out=t)
        t *= GELU_C * 0.044715
        t += GELU_C
        t *= x
        np.tanh(t, out=t)
        t *= 0.5
        t += 0.5
        x *= t

    def swap(self, x):
        return x.transpose(0, 2, 1)

    def token_mean(self, x):
        return x.mean(axis=1)

    def device(self) -> str:
        return "cpu"

    def compile(self, fn):
        return data_parallel(fn, self.MIN_ROWS_PER_THREAD)


class MlxOps(_Ops):
    """MLX: Apple-silicon GPU, NVIDIA GPU (mlx[cuda13]) or CPU; differentiable (train.py).
    Quantised kernels use mx.quantized_matmul on a GPU; on the CPU, where that is far slower
    than the float32 GEMM, they are dequantised a layer at a time."""
    name = "mlx"
    lock = BACKEND_LOCKS["mlx"]
    quantized_matmul = None  # None: on a GPU only; True forces it (tests)

    def __init__(self, dtype: str = "float32"):
        self.mx = import_mlx()
        super().__init__(dtype)
        self._dtype, self.transpose = getattr(self.mx, dtype), self.mx.transpose
        self._streams = []  # the main thread's CPU streams, for split_batch
        if dtype == "float32":
            self._check_float32()

    def asarray(self, a):
        with self.lock:
            a = self.mx.array(np.asarray(a, dtype=np.float32))
            return a if self.dtype == "float32" else a.astype(self._dtype)

    def words(self, a):
        return self.mx.array(a)

    def numpy(self, a):
        with self.lock:
            return np.array(a if a.dtype in (self.mx.float32, self.mx.uint32)
                            else a.astype(self.mx.float32))

    def _quantized_matmul(self) -> bool:
        if self.quantized_matmul is None:
            return self.mx.default_device() != self.mx.cpu
        return self.quantized_matmul

    def dense(self, x, kernel, bias):
        if isinstance(kernel, dict):
            k = kernel
            if self._quantized_matmul():
                return self.mx.quantized_matmul(
                    x, k["packed"], k["scales"], k["biases"], transpose=k["layout"] == "out_in",
                    group_size=k["group_size"], bits=k["bits"]) + bias
            kernel = self.mx.dequantize(k["packed"], k["scales"], k["biases"],
                                        group_size=k["group_size"], bits=k["bits"])
            kernel = kernel.T if k["layout"] == "out_in" else kernel
        return self.mx.addmm(bias, x, kernel) if x.ndim == 2 else x @ kernel + bias

    def swap(self, x):
        return self.mx.swapaxes(x, 1, 2)

    def token_mean(self, x):  # a float16 mean would accumulate in half on Metal
        return x.mean(axis=1) if x.dtype == self.mx.float32 else \
            x.astype(self.mx.float32).mean(axis=1).astype(x.dtype)

    def layer_norm(self, x, scale, bias):
        return self.mx.fast.layer_norm(x, scale, bias, LN_EPS)

    @staticmethod
    def gelu(x):
        """The tanh GELU (train.py's MlxTrainingOps replaces it with one of a lighter backward)."""
        # the tanh GELU as x / (1 + exp(-2 GELU_C u)): MLX's CPU transcendentals are scalar and
        # exp is the faster one. Capped at 80 so that exp stays finite (inf * 0 = nan gradients).
        import mlx.core as mx
        z = (-2.0 * GELU_C) * (x + 0.044715 * (x * x * x))
        return x / (1.0 + mx.exp(mx.minimum(z, 80.0)))

    def device(self) -> str:
        """"cpu", "gpu (CUDA)" or "gpu (Metal)": where MLX computes."""
        if self.mx.default_device() == self.mx.cpu:
            return "cpu"
        return "gpu (CUDA)" if self.mx.cuda.is_available() else "gpu (Metal)"

    def _check_float32(self) -> None:
        """Float32 must be float32: refuses a process in which MLX already computes float32
        GEMMs in TF32 (it read MLX_ENABLE_TF32 before import_mlx could set it) unless the user
        opted in."""
        if os.environ.get("MLX_ENABLE_TF32", "0").strip() in ("", "0") \
                and not _mlx_float32_exact(str(self.mx.default_device())):
            raise MixerError("MLX computes float32 matmuls in TF32 in this process (~1e-3 "
                             "error), because MLX read MLX_ENABLE_TF32 before mixer could set "
                             "it to 0: start Python with MLX_ENABLE_TF32=0 for exact float32, "
                             "or with MLX_ENABLE_TF32=1 to accept TF32")

    def compile(self, fn):
        """mx.compile(fn), its batches split across CPU streams (split_batch). The first call
        runs uncompiled (compiling does not pay for a one-shot run), and so do calls from other
        threads than the main one: MLX 0.32 can abort the process at exit once a compiled
        function has run in another thread."""
        compiled, calls = self.mx.compile(fn), itertools.count()

        def run(params, x):
            main = threading.current_thread() is threading.main_thread()
            with self.lock:
                f = compiled if main and next(calls) > 0 else fn
                parts = self.split_batch(x.shape[0], lambda lo, hi: f(params, x[lo:hi]))
                out = f(params, x) if parts is None else self.mx.concatenate(parts)
                self.mx.eval(out)
                return out
        return run

    def split_batch(self, batch: int, fn):
        """[fn(lo, hi) for each part of the batch], on CPU streams of their own, or None: run it
        whole (see split_on_streams)."""
        return split_on_streams(self, batch, fn)


# 1 + 2**-12 needs 13 mantissa bits: TF32 (10) rounds it to 1, float32 (23) keeps it, so a
# (256, 256) GEMM of it with ones is 256 + 2**-4 in float32 and 256 in TF32; as large as the
# model's own GEMMs, so that it takes their path.
TF32_PROBE = np.full((256, 256), 1.0 + 2.0 ** -12, np.float32), np.ones((256, 256), np.float32)


def float32_matmul_exact(product: np.ndarray) -> bool:
    """Whether `product`, a matmul of TF32_PROBE's two matrices, was computed in float32."""
    return bool(np.all(product == np.float32(256.0 + 2.0 ** -4)))


@functools.cache
def _mlx_float32_exact(device: str) -> bool:
    """Whether MLX computes float32 matmuls exactly on its default device, `device`; once."""
    import mlx.core as mx
    with BACKEND_LOCKS["mlx"]:
        a, b = TF32_PROBE
        return float32_matmul_exact(np.array(mx.array(a) @ mx.array(b)))


class TinygradOps(_Ops):
    """tinygrad on the device DEV selects (CUDA, NV, AMD, METAL, CL, CPU); differentiable."""
    name = "tinygrad"
    transpose = staticmethod(lambda a, axes: a.permute(axes))

    def __init__(self, dtype: str = "float32"):
        self.tg = import_tinygrad()
        super().__init__(dtype)
        self._dtype = getattr(self.tg.dtypes, dtype)
        self._open_device()
        if dtype != "float32" and not self._device_computes(self._dtype):
            raise MixerError(f"tinygrad's {self.tg.Device.DEFAULT} device cannot compute in "
                             f"{dtype} here: use another dtype (float32 always works) or device")

    @property
    @contextlib.contextmanager
    def lock(self):
        """BACKEND_LOCKS["tinygrad"], with tinygrad's on-disk kernel cache left out while this
        thread holds it if the cache's sqlite connection (one per process, opened at first use)
        belongs to another thread: sqlite refuses it there (ProgrammingError)."""
        with BACKEND_LOCKS["tinygrad"]:
            other_thread = False
            try:
                db = getattr(self.tg.helpers, "_db_connection", None)
                if db is not None:
                    db.cursor().close()
            except sqlite3.ProgrammingError:
                other_thread = True
            with self.tg.Context(CACHELEVEL=0) if other_thread else contextlib.nullcontext():
                yield

    def _open_device(self):
        """Opens the default device once, so that one that cannot work here is one clear error;
        DEV, which tinygrad sets to the device it chose, is left as the user set it."""
        before = os.environ.get("DEV")
        try:
            with self.lock:
                self.tg.Device[self.tg.Device.DEFAULT]
        except Exception as e:  # noqa: BLE001 -- each runtime fails its own way
            wanted = f"DEV={before}" if before else "its default device"
            first = (str(e).splitlines() or [""])[0]
            raise MixerError(f"tinygrad cannot open {wanted} here ({type(e).__name__}: {first}); "
                             f"set DEV to a device this machine has (CPU, CL, CUDA, METAL, ...) or "
                             f"use another backend") from None
        finally:
            if before is None:
                os.environ.pop("DEV", None)
            else:
                os.environ["DEV"] = before

    def _device_computes(self, dtype) -> bool:
        """Whether the default device declares `dtype` and compiles a kernel with it (tinygrad
        declares bfloat16 on CPU, but clang before 17 has no x86 __bf16)."""
        device = self.tg.Device[self.tg.Device.DEFAULT]
        renderer, compiler = getattr(device, "renderer", None), getattr(device, "compiler", None)
        supported = getattr(renderer, "supported_dtypes", None)
        if supported is not None and dtype not in supported():
            return False
        if type(compiler).__name__ == "ClangCompiler" and hasattr(renderer, "render_dtype") \
                and not _clang_compiles(os.environ.get("CC", "clang"),
                                        getattr(compiler, "arch", None),
                                        tuple(getattr(compiler, "args", [])),
                                        renderer.render_dtype(dtype)):
            return False
        try:
            with self.lock:
                stored = self.tg.Tensor([1.5, -2.0]).cast(dtype).realize()
                return stored.float().tolist() == [1.5, -2.0]
        except Exception:  # noqa: BLE001 -- the device's compiler rejects the kernel
            return False

    def asarray(self, a):
        with self.lock:  # a copy: tinygrad's OpenCL upload needs a writable buffer
            t = self.tg.Tensor(np.array(a, dtype=np.float32, order="C"))
            return (t if self.dtype == "float32" else t.cast(self._dtype)).realize()

    def words(self, a):
        return self.tg.Tensor(np.array(a)).realize()

    def numpy(self, a):
        if isinstance(a, np.ndarray):  # compile's results, read out already
            return a
        with self.lock:
            return (a if a.dtype == self.tg.dtypes.uint32 else a.float()).numpy()

    def _matrix(self, kernel):
        """A kernel as an (in, out) matrix, a quantised one dequantised by the ops that feed the
        matmul (the packed words read as little-endian bytes: the elements in order)."""
        if not isinstance(kernel, dict):
            return kernel
        q = kernel["packed"].bitcast(self.tg.dtypes.uint8)
        if kernel["bits"] == 4:
            q = (q & 0xF).unsqueeze(-1).cat((q >> 4).unsqueeze(-1), dim=-1)
        rows = kernel["packed"].shape[0]
        q = q.reshape(rows, -1, kernel["group_size"]).float()
        m = (q * kernel["scales"].unsqueeze(-1) + kernel["biases"].unsqueeze(-1)).reshape(rows, -1)
        return m.T if kernel["layout"] == "out_in" else m

    def dense(self, x, kernel, bias):
        return x @ self._matrix(kernel) + bias

    def swap(self, x):
        return x.transpose(1, 2)

    def token_mean(self, x):
        return x.float().mean(axis=1).cast(x.dtype)  # no-op casts in float32

    def layer_norm(self, x, scale, bias):
        return x.float().layernorm(axis=-1, eps=LN_EPS).cast(x.dtype) * scale + bias

    @staticmethod
    def gelu(x):
        """The tanh GELU."""
        return gelu_tanh(x, lambda t: t.tanh())

    def device(self) -> str:
        return self.tg.Device.DEFAULT

    def compile(self, fn):
        # TinyJit replays captured kernels: one per input shape. A replay writes into the same
        # output buffer as the last one, so the result is read out before the lock is let go.
        jits = {}

        def run(params, x):
            with self.lock:
                if x.shape not in jits:
                    jits[x.shape] = self.tg.TinyJit(lambda p, t: fn(p, t).realize())
                return self.numpy(jits[x.shape](params, x.realize()))
        return run


@functools.cache
def _clang_compiles(cc: str, arch: str | None, args: tuple, ctype: str) -> bool:
    """Whether tinygrad's clang takes pointers to and bit casts into `ctype`, asked directly
    so that a refusal is not 8-10 lines of clang errors through tinygrad; once per process."""
    import subprocess
    target = [f"--target={arch}-none-unknown-elf"] if arch else []
    try:
        done = subprocess.run([cc, "-c", "-x", "c", *target, *args, "-", "-o", os.devnull],
                              input=f"void f({ctype}* p, unsigned short u) {{ *p = "
                                    f"__builtin_bit_cast({ctype}, u); }}\n".encode(),
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


BACKENDS = {"mlx": MlxOps, "tinygrad": TinygradOps, "numpy": NumpyOps}


def import_mlx():
    """mlx.core with OpenBLAS preloaded (Linux) and TF32 off, or a MixerError saying how to
    install it. MLX computes float32 GEMMs in TF32 on CUDA and M5 GPUs unless MLX_ENABLE_TF32=0,
    read once at the first such GEMM and with no API: so it is set unless the user set it."""
    if "mlx.core" not in sys.modules and platform.system() == "Linux":
        _preload_openblas()
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    try:
        import mlx.core as mx
    except ImportError as e:
        raise MixerError(f"the mlx backend needs MLX: pip install mlx  (or \"mlx[cpu]\" on "
                         f"Linux, \"mlx[cuda13]\" for NVIDIA GPUs) ({e})") from None
    return mx


def import_tinygrad():
    """The tinygrad package, or a MixerError that says how to install it."""
    try:
        import tinygrad
    except ImportError as e:
        raise MixerError(f"the tinygrad backend needs tinygrad: pip install tinygrad ({e})") \
            from None
    return tinygrad


def default_backend() -> str:
    """The backend that `backend=None` picks: MIXER_BACKEND; else MLX with a GPU, tinygrad when
    DEV names an accelerator, else numpy (on CPUs the fastest of the three)."""
    choice = os.environ.get("MIXER_BACKEND")
    if choice and choice not in BACKENDS:
        raise MixerError(f"MIXER_BACKEND={choice!r}: expected one of {sorted(BACKENDS)}")
    return choice or ("mlx" if mlx_has_gpu() else "tinygrad" if tinygrad_accelerator()
                      else "numpy")


def mlx_has_gpu() -> bool:
    """Whether MLX is installed with a GPU: Apple silicon, or a CUDA wheel where CUDA works
    (MLX is imported in that case only, so that choosing numpy stays quick)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return installed("mlx")
    if not any(_distribution(d) for d in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")):
        return False
    try:
        return bool(import_mlx().cuda.is_available())
    except (MixerError, AttributeError, RuntimeError):
        return False


def tinygrad_accelerator() -> bool:
    """Whether the user's DEV names an accelerator (CUDA, NV, AMD, METAL, CL, ...) and tinygrad
    is installed. A DEV that tinygrad wrote itself (the device it picked) is not the user's."""
    dev = os.environ.get("DEV", "")
    device = getattr(sys.modules.get("tinygrad"), "Device", None)
    if device is not None and dev == vars(device).get("_select_device"):
        return False
    dev = dev.split(":")[0].upper()
    return bool(dev) and dev not in ("CPU", "CLANG", "LLVM", "PYTHON") and installed("tinygrad")


def _distribution(name: str) -> bool:
    import importlib.metadata
    try:
        return bool(importlib.metadata.distribution(name))
    except importlib.metadata.PackageNotFoundError:
        return False


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    import importlib.util
    return importlib.util.find_spec(module) is not None


def get_ops(backend: str | None, dtype: str = "float32"):
    """The shim of `backend` (None: default_backend()) computing in `dtype`."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise MixerError(f"unknown backend {backend!r}: expected one of {sorted(BACKENDS)}")
    return BACKENDS[backend](dtype)


# --------------------------------------------------------------------------------------------
# Speed: data-parallel CPU forwards. numpy runs its element-wise work on one core while BLAS's
# threads wait, and MLX runs a CPU stream's element-wise kernels on that stream's one thread;
# so a large batch is split, one part per OpenBLAS thread, with OpenBLAS single-threaded
# meanwhile (figures in README, "Speed"). The one switch: DATA_PARALLEL = False (or
# MIXER_DATA_PARALLEL=0) and mixer never changes OpenBLAS's thread count, for programs that
# manage BLAS threads themselves. The count is restored after each forward either way.

DATA_PARALLEL = os.environ.get("MIXER_DATA_PARALLEL", "1") != "0"


class OpenBLAS:
    """An OpenBLAS reached through ctypes, to read and set its thread count: numpy's bundled
    one (openblas()) or the one MLX calls on Linux (mlx_openblas()). Not numpy or MLX API:
    both are None wherever it does not apply, and forwards then run serially."""
    _lock = threading.Lock()  # one thread-count change at a time: it is process-wide

    def __init__(self, lib, symbol: str):
        """lib: a ctypes.CDLL; symbol: its names' pattern, e.g. "scipy_openblas_{}64_"."""
        import ctypes
        self.lib, self.symbol = lib, symbol
        self._get, self._set = (getattr(lib, symbol.format(f)) for f in ("get_num_threads",
                                                                          "set_num_threads"))
        self._get.restype, self._get.argtypes = ctypes.c_int, []
        self._set.restype, self._set.argtypes = None, [ctypes.c_int]

    @classmethod
    def from_library(cls, lib, prefixes: tuple = ("openblas",)) -> OpenBLAS | None:
        """The OpenBLAS in lib under one of the symbol prefixes, else None."""
        for symbol in (f"{p}_{{}}{s}" for p in prefixes for s in ("64_", "")):
            if all(hasattr(lib, symbol.format(f)) for f in ("get_num_threads", "set_num_threads")):
                return cls(lib, symbol)
        return None

    def threads(self) -> int:
        """Its thread count now."""
        return self._get()

    @contextlib.contextmanager
    def single_threaded(self):
        """OpenBLAS on one thread inside; restored after, unless someone else changed it."""
        with self._lock:
            threads = self._get()
            self._set(1)
            try:
                yield
            finally:
                if self._get() == 1:
                    self._set(threads)

    def map_single_threaded(self, fn, items: list) -> list:
        """fn over items, one Python thread each, OpenBLAS single-threaded meanwhile (numpy
        releases the GIL in GEMMs and element-wise loops, so every core does both)."""
        from concurrent.futures import ThreadPoolExecutor
        with self.single_threaded(), ThreadPoolExecutor(len(items)) as pool:
            return list(pool.map(fn, items))


@functools.cache
def openblas() -> OpenBLAS | None:
    """numpy's bundled OpenBLAS (the library numpy loaded), looked up once."""
    import ctypes
    import glob
    root = os.path.dirname(np.__file__)
    for path in sorted(glob.glob(os.path.join(root, os.pardir, "numpy.libs", "*openblas*"))
                       + glob.glob(os.path.join(root, ".dylibs", "*openblas*"))):
        with contextlib.suppress(OSError):
            blas = OpenBLAS.from_library(ctypes.CDLL(path), ("scipy_openblas", "openblas"))
            if blas:
                return blas
    return None


@functools.cache
def mlx_openblas() -> OpenBLAS | None:
    """The OpenBLAS that MLX's GEMMs call on Linux (see _preload_openblas), once; else None."""
    import ctypes
    if platform.system() != "Linux":
        return None
    import_mlx()  # preloads it, unless MLX was imported first
    try:
        return OpenBLAS.from_library(ctypes.CDLL(None))
    except OSError:
        return None


def _preload_openblas():
    """MLX's Linux CPU wheel bundles a reference BLAS far slower than OpenBLAS: the system's
    OpenBLAS, loaded into the global namespace first, takes its sgemm calls. MIXER_NO_OPENBLAS=1
    turns this off."""
    if os.environ.get("MIXER_NO_OPENBLAS"):
        return
    import ctypes
    import ctypes.util
    for path in filter(None, [ctypes.util.find_library("openblas"), "libopenblas.so.0",
                              "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
                              "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"]):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def _split_count(batch: int, rows: int, threads: int, min_rows: int) -> int:
    """Into how many parts to split a batch of `rows` token rows: 1 (serial) below `min_rows`
    rows per thread, when the parts would be unequal (3 images on 2 threads is slower), or
    when DATA_PARALLEL is off."""
    if not DATA_PARALLEL:
        return 1
    n = min(batch, rows // min_rows, threads)
    return n if n >= 2 and batch / (n * -(-batch // n)) >= 0.9 else 1


def data_parallel(fn, min_rows: int):
    """numpy's compiled fn(params, x): large batches split across one Python thread per BLAS
    thread, from `min_rows` token rows per thread (below it, every thread reading every weight
    costs what the threads gain)."""
    def quiet(params, x):
        # outputs that overflow are the caller's to report (classify names the image), not
        # numpy's RuntimeWarnings on stderr; errstate is per thread
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(params, x)

    def run(params, x):
        blas, p = openblas(), kernel_shape(params["stem/kernel"])[0]
        rows = x.shape[0] * (x.shape[1] // p) * (x.shape[2] // p)
        n = _split_count(x.shape[0], rows, blas.threads() if blas else 1, min_rows)
        if n < 2:
            return quiet(params, x)
        return np.concatenate(blas.map_single_threaded(lambda part: quiet(params, part),
                                                       np.array_split(x, n)))
    return run


def split_on_streams(ops: MlxOps, batch: int, fn):
    """[fn(lo, hi) for each part of the batch], each part's graph on a CPU stream of its own,
    evaluated with OpenBLAS single-threaded; None (run it whole) on a GPU, without an OpenBLAS
    to set, for too few images, and off the main thread (an MLX stream belongs to its thread
    and owns an OS thread that MLX never frees)."""
    mx = ops.mx
    if threading.current_thread() is not threading.main_thread():
        return None
    blas = mlx_openblas() if mx.default_device() == mx.cpu else None
    n = _split_count(batch, batch, blas.threads() if blas else 1, 1)
    if n < 2:
        return None
    while len(ops._streams) < n:
        ops._streams.append(mx.new_stream(mx.cpu))
    bounds = [batch * i // n for i in range(n + 1)]
    with blas.single_threaded():
        parts = []
        for stream, lo, hi in zip(ops._streams, bounds, bounds[1:]):
            with mx.stream(stream):
                parts.append(fn(lo, hi))
        mx.eval(parts)  # here, so that the GEMMs run while OpenBLAS is single-threaded
    return parts


# --------------------------------------------------------------------------------------------
# Weights: safetensors (an 8-byte little-endian header length, a JSON header, the raw
# little-endian data), read and written here with numpy alone.

FORMAT_VERSION = "1"  # bump when the metadata layout changes
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "U32": np.dtype("<u4")}  # U32: only a quantised file's packed kernels
_MAX_HEADER = 100 * 2**20
_MAX_DIMS = 8  # a Mixer tensor has at most 4; the cap keeps hostile shapes away from numpy


def open_regular(path, name: str | None = None, what: str = "a weights file"):
    """`path` opened for binary reading if it is a regular file, else a MixerError naming it
    `name` and saying it is not `what` (a FIFO would block forever, /dev/zero never ends). The
    open does not block, and the check is on what was opened: no window between the two."""
    path = os.fspath(path)
    name = name or path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise MixerError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise MixerError(f"{name}: is a directory, not {what}") from None
    except OSError as e:
        raise MixerError(f"cannot read {name}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "is a directory" if stat.S_ISDIR(mode) else \
            "is not a regular file (a pipe or a device)"
        raise MixerError(f"{name}: {kind}, not {what}")
    if getattr(os, "O_NONBLOCK", 0):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _unique_keys(pairs):
    """json object_pairs_hook: a name given twice is an error (the format forbids it)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"the name {k!r} appears twice")
        d[k] = v
    return d


class _OpenFile:
    """A file held open by an object (self._file) that is its own context manager."""

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(_OpenFile):
    """An open safetensors file whose header has been checked in full; tensors are read on
    demand (read(name), items()) into memory of their own, never memory-mapped: a model never
    depends on its file after loading, and a file that changes while it is read is an error.
    Checked first: a JSON object of at most 100 MiB, no name twice; each entry a known dtype,
    at most 8 non-negative dimensions, offsets that fit; the tensors tile the data exactly."""

    def __init__(self, path, name: str | None = None):
        self.path = os.fspath(path)
        self.name = name or self.path
        self._file = open_regular(self.path, self.name)
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self):
        f, name = self._file, self.name
        self._stat = os.fstat(f.fileno())
        size = self._stat.st_size
        bad = f"{name}: not a safetensors file"
        try:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, _MAX_HEADER):
                raise MixerError(f"{bad} (bad header length)" + _npz_hint(f, name))
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MixerError(f"{bad} (header is not JSON)") from None
        except RecursionError:
            raise MixerError(f"{bad} (header nested too deeply)") from None
        except ValueError as e:  # _unique_keys
            raise MixerError(f"{name}: corrupt safetensors header ({e})") from None
        except OSError as e:
            raise MixerError(f"cannot read weights {name}: {e.strerror or e}") from None
        if not isinstance(header, dict):
            raise MixerError(f"{bad} (header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise MixerError(f"{bad} (__metadata__ must map str to str)")
        self.metadata, self._start = metadata, 8 + n
        self.quantization = _quantization_metadata(metadata, name)
        self._packed = _packed_names(self.quantization)
        self._entries = {k: self._check_entry(k, v, size - 8 - n) for k, v in header.items()}
        position = 0  # the tensors, in file order, must tile the data exactly
        for key, (_, _, begin, end) in sorted(self._entries.items(), key=lambda e: e[1][2:]):
            if begin != position:
                what = "overlaps the tensor before it" if begin < position else \
                    "leaves unused bytes before it"
                raise MixerError(f"{name}: tensor {key!r} {what}: the file is corrupt or was "
                                 f"crafted")
            position = end
        if position != size - 8 - n:
            raise MixerError(f"{name}: {size - 8 - n - position} bytes after the last tensor: "
                             f"the file is corrupt or was crafted")

    def _check_entry(self, key, info, data_size):
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not isinstance(dtype, str) or not all(type(v) is int and v >= 0
                                                     for v in (*shape, begin, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise MixerError(f"{self.name}: tensor {key!r} has a malformed header entry") from None
        if dtype not in _DTYPES or (dtype == "U32" and key not in self._packed):
            raise MixerError(f"{self.name}: tensor {key!r} has dtype {dtype}; supported: F32, "
                             f"F16, BF16 (and U32 for the kernels that the metadata "
                             f"'mixer.quantization' names as quantised)")
        if len(shape) > _MAX_DIMS:
            raise MixerError(f"{self.name}: tensor {key!r} has {len(shape)} dimensions; a Mixer "
                             f"tensor has at most 4")
        nbytes = _DTYPES[dtype].itemsize * math.prod(shape)
        if max(shape, default=0) > data_size or not begin <= end == begin + nbytes <= data_size:
            raise MixerError(f"{self.name}: tensor {key!r} lies outside the file or has the "
                             f"wrong size: the file is truncated or corrupt")
        return dtype, shape, begin, end

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, as stored."""
        return {k: e[1] for k, e in self._entries.items()}

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype code ("F32", "U32", ...)."""
        return self._entries[key][0]

    def read(self, key: str, finite: bool = False) -> np.ndarray:
        """The tensor, read-only in memory of its own (BF16 as _Bfloat16Bits, see as_float32).
        finite: refuse NaN and infinity, naming the tensor."""
        dtype, shape, begin, end = self._entries[key]
        a = np.empty(shape, _DTYPES[dtype])
        view, done = memoryview(a.reshape(-1)).cast("B"), 0
        try:
            while done < len(view):
                got = self._read_at(view[done:], self._start + begin + done)
                if not got:
                    break
                done += got
            now = os.fstat(self._file.fileno())
        except OSError as e:
            raise MixerError(f"cannot read weights {self.name}: {e.strerror or e}") from None
        if done < len(view) or (now.st_size, now.st_mtime_ns) != (self._stat.st_size,
                                                                   self._stat.st_mtime_ns):
            raise MixerError(f"{self.name} changed while it was being read: load it again once "
                             f"it is complete")
        a.flags.writeable = False  # a model's weights change only through a new Mixer
        a = a.view(_Bfloat16Bits) if dtype == "BF16" else a
        if finite and not np.isfinite(as_float32(a) if dtype == "BF16" else a).all():
            raise MixerError(f"{self.name}: tensor {key!r} holds NaN or infinite values: the "
                             f"weights are damaged (a diverged training run, a bad conversion)")
        return a

    def _read_at(self, view, offset):
        if hasattr(os, "preadv"):  # not on Windows
            return os.preadv(self._file.fileno(), [view], offset)
        self._file.seek(offset)
        return self._file.readinto(view)

    def items(self, finite: bool = False):
        """(name, tensor) pairs, each tensor read when the iteration reaches it."""
        for key in self._entries:
            yield key, self.read(key, finite)




def _npz_hint(f, name) -> str:
    """What to say when a file given as safetensors is an .npz archive (an official checkpoint)."""
    f.seek(0)
    if f.read(2) == b"PK":
        return (": it is a zip archive, such as an official .npz checkpoint; convert it with "
                "`python convert.py` or `mixer-convert`, or load it with mixer.load_npz")
    return ""


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A whole safetensors file (checked as SafetensorsFile): (name -> array, metadata), BF16
    tensors as bit patterns that as_float32 converts."""
    with SafetensorsFile(path) as f:
        return dict(f.items()), f.metadata


class _Bfloat16Bits(np.ndarray):
    """Marks a uint16 array that holds bfloat16 bit patterns."""


def as_float32(a: np.ndarray) -> np.ndarray:
    """float32 view or copy of a tensor from read_safetensors (F32 stays a zero-copy view)."""
    if isinstance(a, _Bfloat16Bits):
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN kept NaN)."""
    bits = np.asarray(a, dtype=np.float32, order="C").view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(a), 0x7FC0, rounded).astype(np.uint16)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                      dtype: str = "float32") -> None:
    """Writes the tensors in `dtype` (COMPUTE_DTYPES) atomically (see atomic_write)."""
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype)
    if code is None:
        raise MixerError(f"unsupported dtype {dtype!r}: expected float32, float16 or bfloat16")
    _write_tensors(path, {name: (code, to_bfloat16_bits(a) if code == "BF16" else
                                 np.asarray(a, dtype=_DTYPES[code], order="C"))  # 0-d stays 0-d
                          for name, a in tensors.items()}, metadata)


def _write_tensors(path: str, tensors: dict[str, tuple[str, np.ndarray]],
                   metadata: dict[str, str]) -> None:
    """write_safetensors for arrays already in their stored form: name -> (dtype code, array)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, (code, a) in tensors.items():
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, a in tensors.values():
            f.write(memoryview(a).cast("B"))


class atomic_write:
    """`with atomic_write(path) as f:` writes a temporary file beside `path`, renamed into place
    only when the block ends without an exception: `path` is the old file or the whole new one.
    Errors, Ctrl-C and SIGTERM (under run_main) remove the temporary; one left by a killed
    process (`.tmp-mixer-<host>-<pid>-...`) is removed by the next atomic_write into its folder
    on that host (remove_stale_temporaries). A symlink target is replaced as a link; a
    directory, FIFO or device is refused."""

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG
        except OSError as e:
            raise MixerError(f"cannot write {self.path}: {e.strerror or e}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            kind = "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
            raise MixerError(f"cannot write {self.path}: it {kind}; give the path of a file")
        try:
            os.makedirs(folder, exist_ok=True)
            remove_stale_temporaries(folder)
            self.tmp, fd = _create_temporary(folder, "-" + os.path.basename(self.path))
        except OSError as e:
            raise MixerError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                os.replace(self.tmp, self.path)
                _fsync_folder(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            self._discard()
            raise MixerError(f"cannot write {self.path}: {e.strerror or e}") from None
        except BaseException:  # Ctrl-C while flushing: still leave nothing behind
            self._discard()
            raise
        if kind is not None:
            self._discard()
        if isinstance(value, OSError):
            raise MixerError(f"cannot write {self.path}: {value.strerror or value}") from None
        return False

    def _discard(self):
        try:
            with contextlib.suppress(OSError):
                self.file.close()
        finally:  # even when a second Ctrl-C lands in close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def _temporary_prefix() -> str:
    """`.tmp-mixer-<host>-<pid>-`, the start of this process's temporary names (a pid means
    something on its own host only: a folder may be shared over NFS or by containers)."""
    host = "".join(c if c.isalnum() else "_" for c in platform.node())[:32] or "host"
    return f".tmp-mixer-{host}-{os.getpid()}-"


def _create_temporary(folder: str, suffix: str) -> tuple[str, int]:
    """A new file `<_temporary_prefix()><8 hex digits><suffix>` in folder: (path, fd), its mode
    what open() would give, without touching the process's umask."""
    for _ in range(100):
        path = os.path.join(folder, f"{_temporary_prefix()}{os.urandom(4).hex()}{suffix}")
        with contextlib.suppress(FileExistsError):
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | getattr(os, "O_BINARY", 0), 0o666)
    raise FileExistsError(f"no free temporary name in {folder}")


def _fsync_folder(folder: str) -> None:
    """Makes a rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Removes, and returns, the temporaries in `folder` of atomic_write (files) and of the
    download cache (folders ending in -download) whose process, on this host, no longer exists;
    only names of exactly that form are touched, so this is safe at any time."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    mine = _temporary_prefix().rsplit("-", 2)[0] + "-"  # `.tmp-mixer-<host>-`
    for name in names:
        pid, _, rest = name[len(mine):].partition("-")
        if not (name.startswith(mine) and pid.isdigit() and rest[8:9] == "-"
                and all(c in "0123456789abcdef" for c in rest[:8])) or _process_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                if not name.endswith("-download"):
                    continue
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows has no harmless probe: keep them
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's, or not a pid
        return pid > 0
    return True


# --------------------------------------------------------------------------------------------
# Quantised weights: MLX's affine group-wise format, in numpy. A kernel, as an (in, out)
# matrix (the stem's as (P*P*3, C)), is stored transposed, (out, in), grouped along `in`
# ("out_in", mlx-lm's layout), or as it is, grouped along `out` ("in_out"). Each `group_size`
# consecutive elements of a stored row share a scale and a bias, w = scale * q + bias, q an
# unsigned `bits`-bit integer packed little-endian into uint32 words, as mx.quantize packs.

QUANTIZED_DTYPES = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)  # what MLX accepts
DEFAULT_GROUP_SIZE = 64  # MLX's default
QUANTIZED_LAYOUTS = ("out_in", "in_out", "float16")
HEAD_FLOAT16_SHARE = 0.05  # a head with at most this share of the kernels stays float16
_SCALES, _BIASES = ".scales", ".biases"  # suffixes of a kernel's group scales and biases


def quantization_layout(shape: tuple, group_size: int) -> str:
    """Grouped along the input axis where the group size divides it ("out_in"), else along the
    output axis ("in_out": token-mixing Dense_0, whose input is the 49 or 196 patches), else
    kept in float16."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return "out_in" if rows % group_size == 0 else "in_out" if cols % group_size == 0 \
        else "float16"


def quantization_plan(config: MixerConfig, group_size: int) -> dict[str, str]:
    """The layout of every kernel of `config`; a small head stays float16 (its error goes
    straight into the logits). Biases and LayerNorms stay float32."""
    shapes = param_shapes(config)
    plan = {k: quantization_layout(s, group_size) for k, s in shapes.items()
            if k.endswith("/kernel")}
    kernels = sum(math.prod(shapes[k]) for k in plan)
    if "head/kernel" in plan and math.prod(shapes["head/kernel"]) <= HEAD_FLOAT16_SHARE * kernels:
        plan["head/kernel"] = "float16"
    if all(kind == "float16" for kind in plan.values()):  # a "quantised" model of float16 kernels
        raise MixerError(f"no kernel of this model has an axis that {group_size} divides, so "
                         f"none can be quantised in groups of {group_size}: use another group "
                         f"size ({', '.join(map(str, GROUP_SIZES))}) or keep it in float")
    return plan


def check_quantization(dtype, group_size) -> tuple[int, int]:
    """(bits, group size) for a quantised dtype name and group size, or a MixerError."""
    if not isinstance(dtype, str) or dtype not in QUANTIZED_DTYPES:
        raise MixerError(f"unknown quantisation {dtype!r}: expected one of "
                         f"{', '.join(QUANTIZED_DTYPES)}")
    if not _is_int(group_size) or group_size not in GROUP_SIZES:
        raise MixerError(f"group size {group_size!r} is not supported: expected one of "
                         f"{', '.join(map(str, GROUP_SIZES))} (MLX's)")
    return QUANTIZED_DTYPES[dtype], int(group_size)


def _stored_shape(shape: tuple, layout: str) -> tuple[int, int]:
    """The quantised matrix's (rows, cols): (out, in) for "out_in", (in, out) for "in_out"."""
    n_in, n_out = math.prod(shape[:-1]), shape[-1]
    return (n_out, n_in) if layout == "out_in" else (n_in, n_out)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One quantised kernel on the host: `packed` (uint32, stored rows, cols * bits / 32),
    `scales` and `biases` (float16, rows, cols / group_size), and its official `shape`."""
    packed: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int
    layout: str  # "out_in" or "in_out"
    shape: tuple

    @property
    def dtype(self) -> str:
        """"int8" or "int4"."""
        return f"int{self.bits}"

    def stored_shape(self) -> tuple[int, int]:
        """The packed matrix's (rows, cols) before packing: (out, in) or (in, out)."""
        return _stored_shape(self.shape, self.layout)

    def dequantize(self) -> np.ndarray:
        """The kernel in float32, official shape and layout."""
        m = dequantize_matrix(self.packed, self.scales.astype(np.float32),
                              self.biases.astype(np.float32), self.bits, self.group_size)
        return (m.T if self.layout == "out_in" else m).reshape(self.shape)


def quantize(w: np.ndarray, bits: int, group_size: int, layout: str) -> QuantizedTensor:
    """The kernel w (official shape) quantised in `layout`. Each group takes the better (least
    squared error) of two scales and biases, both rounded to float16 before q is computed: its
    range split into 2^bits - 1 steps, or mx.quantize's choice, whose levels hold 0 exactly."""
    w = np.asarray(w, dtype=np.float32)
    m = w.reshape(-1, w.shape[-1])
    m = np.ascontiguousarray(m.T if layout == "out_in" else m)  # its groups, row by row
    rows, cols = m.shape
    if cols % group_size:
        raise MixerError(f"a {layout} kernel of shape {w.shape} cannot be grouped by {group_size}")
    if not np.isfinite(m).all():
        raise MixerError("cannot quantise non-finite weights")
    if m.size and np.abs(m).max() > np.finfo(np.float16).max / 2:
        raise MixerError(f"cannot quantise weights up to {np.abs(m).max():.3g}: the group "
                         f"scales and biases are float16 (at most 65504)")
    g = m.reshape(rows, cols // group_size, group_size)
    lo, hi, top = g.min(axis=-1), g.max(axis=-1), 2**bits - 1
    step = (hi - lo) / top
    # mx.quantize's: the end of larger magnitude is the bias, the scale (negative when that end
    # is the max) adjusted so that a whole number of steps leads from it to 0
    low_end = np.abs(lo) > np.abs(hi)
    edge, signed = np.where(low_end, lo, hi), np.where(low_end, step, -step)
    q0 = np.rint(edge / np.where(signed == 0, 1, signed))
    zero_scale = np.where(q0 != 0, edge / np.where(q0 == 0, 1, q0), signed)
    best = None
    for scales, biases in ((step, lo), (zero_scale, np.where(q0 == 0, 0, edge))):
        scales, biases = scales.astype(np.float16), biases.astype(np.float16)
        s, b = scales.astype(np.float32)[..., None], biases.astype(np.float32)[..., None]
        q = np.clip(np.rint((g - b) / np.where(s == 0, 1, s)), 0, top)
        error = np.square(q * s + b - g).sum(axis=-1)
        if best is None:
            best = scales, biases, q, error
            continue
        better = error < best[3]
        best = (np.where(better, scales, best[0]), np.where(better, biases, best[1]),
                np.where(better[..., None], q, best[2]))
    scales, biases, q = best
    q = q.astype(np.uint8).reshape(rows, cols)
    if bits == 4:  # two to a byte, the even element in the low nibble
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    packed = np.ascontiguousarray(q).view("<u4")
    return QuantizedTensor(packed, scales, biases, bits, group_size, layout, tuple(w.shape))


def _float16(w: np.ndarray) -> np.ndarray:
    """A kernel that a quantised file keeps in float16, or a MixerError if it cannot be."""
    if w.size and np.abs(w).max() > np.finfo(np.float16).max:
        raise MixerError(f"cannot hold values up to {np.abs(w).max():.3g} in float16 (at most "
                         f"65504): keep this model in float32")
    return w.astype(np.float16)


def dequantize_matrix(packed, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """The stored matrix (rows, cols) in float32 from its packed words and float32 group scales
    and biases (rows, groups), written in place into one new array (no full-size temporaries:
    peak memory is what quantised weights are for)."""
    rows, cols = packed.shape[0], packed.shape[1] * 32 // bits
    out = np.empty((rows, cols), np.float32)
    q = packed.view(np.uint8)  # little-endian words: the bytes are the elements in order
    if bits == 4:  # the even element in the low nibble
        pairs = out.reshape(rows, cols // 2, 2)
        pairs[..., 0] = q & 0xF
        pairs[..., 1] = q >> 4
    else:
        out[...] = q
    groups = out.reshape(rows, cols // group_size, group_size)
    groups *= scales[..., None]
    groups += biases[..., None]
    return out


def _quantization_metadata(metadata: dict, name: str) -> dict | None:
    """The file's "mixer.quantization" metadata, checked: {"bits": 8 or 4, "group_size": 32, 64
    or 128, "mode": "affine", "layout": {kernel: a QUANTIZED_LAYOUT}}; None for a float file."""
    q = _json_metadata(metadata, "mixer.quantization", name, dict)
    if q is None:
        return None
    layout = q.get("layout")
    if set(q) != {"bits", "group_size", "mode", "layout"} or q["mode"] != "affine" \
            or not isinstance(layout, dict) \
            or not all(isinstance(v, str) and v in QUANTIZED_LAYOUTS for v in layout.values()):
        raise MixerError(f"{name}: metadata 'mixer.quantization' must be a JSON object with "
                         f"bits, group_size, mode \"affine\" and layout (each kernel's "
                         f"{', '.join(QUANTIZED_LAYOUTS)}); the file is damaged or was made by "
                         f"another tool")
    if not _is_int(q["bits"]) or q["bits"] not in QUANTIZED_DTYPES.values() \
            or not _is_int(q["group_size"]) or q["group_size"] not in GROUP_SIZES:
        raise MixerError(f"{name}: quantised with bits={q['bits']!r}, group_size="
                         f"{q['group_size']!r}; this version reads bits 8 or 4 and group sizes "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    return q


def _packed_names(quantization: dict | None) -> set[str]:
    """The tensors that a quantised file stores as packed uint32 words."""
    return {k for k, v in (quantization or {}).get("layout", {}).items() if v != "float16"}


def _check_quantized_shapes(config: MixerConfig, f: SafetensorsFile, q: dict) -> None:
    """check_shapes for a quantised file: each quantised kernel as its packed words (U32),
    scales and biases (F16) of the shapes its layout, bits and group size give, a "float16"
    kernel in F16, the other tensors as float ones."""
    name, bits, gs, layout = f.name, q["bits"], q["group_size"], q["layout"]
    shapes = param_shapes(config)
    unknown = sorted(k for k in layout if k not in shapes or not k.endswith("/kernel"))
    if unknown:
        raise MixerError(f"{name}: metadata 'mixer.quantization' names {unknown[0]!r}, not a "
                         f"kernel of this model")
    expected, dtypes = dict(shapes), {}
    for k, shape in shapes.items():
        if k.endswith("/kernel") and k not in layout:
            raise MixerError(f"{name}: metadata 'mixer.quantization' gives no layout for "
                             f"{k!r}: the file is damaged or was made by another tool")
        if layout.get(k) == "float16":
            dtypes[k] = "F16"
        elif k in layout:
            rows, cols = _stored_shape(shape, layout[k])
            if cols % gs:
                raise MixerError(f"{name}: {k!r} is stored {layout[k]}, grouped by {gs} along "
                                 f"an axis of {cols}, which {gs} does not divide: it is damaged")
            expected[k], dtypes[k] = (rows, cols * bits // 32), "U32"
            for suffix in (_SCALES, _BIASES):
                expected[k + suffix], dtypes[k + suffix] = (rows, cols // gs), "F16"
    _check_tensors(name, expected, f.shapes(), dtypes, f.dtype,
                   f" in this {bits}-bit file (groups of {gs}): it is damaged or was made by "
                   f"another tool")


class QuantizedReader:
    """The tensors of an open safetensors file `f` (checked against `config`), read one at a
    time as Mixer takes them: quantised kernels as QuantizedTensor, the rest float. `target`
    (bits, group size) quantises float tensors, and re-quantises others, as they are read;
    None keeps the file's own."""

    def __init__(self, f: SafetensorsFile, config: MixerConfig, target=None):
        self.name, self._file, self._config, self._q = f.name, f, config, f.quantization
        if self._q is not None:
            target = target or (self._q["bits"], self._q["group_size"])
            _check_quantized_shapes(config, f, self._q)
        else:
            check_shapes(config, f.shapes(), f.name)
        self.bits, self.group_size = target
        self._plan = quantization_plan(config, self.group_size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The official shapes of the tensors items() gives."""
        return param_shapes(self._config)

    def items(self, finite: bool = True):
        """(name, tensor) pairs, one tensor read (and quantised) at a time."""
        f, layout = self._file, (self._q or {}).get("layout", {})
        for k, shape in param_shapes(self._config).items():
            if layout.get(k, "float16") != "float16":
                w = QuantizedTensor(f.read(k), f.read(k + _SCALES, finite=True),
                                    f.read(k + _BIASES, finite=True), self._q["bits"],
                                    self._q["group_size"], layout[k], shape)
            else:
                w = as_float32(f.read(k, finite=True))
            try:
                w = _planned(w, self._plan.get(k), self.bits, self.group_size)
            except MixerError as e:
                raise MixerError(f"{self.name}: tensor {k!r}: {e}") from None
            yield k, w if isinstance(w, QuantizedTensor) else np.asarray(w, np.float32)


def _planned(w, layout: str | None, bits: int, group_size: int):
    """A tensor (float, or a QuantizedTensor) as a file of `bits` in groups of `group_size`
    holds it: quantised in `layout`, float16, or (layout None: not a kernel) as it is. A kernel
    quantised with those bits and groups is kept: nothing is rounded twice."""
    if isinstance(w, QuantizedTensor):
        if (w.bits, w.group_size) == (bits, group_size):
            return w
        w = w.dequantize()
    if layout == "float16":
        return _float16(w)
    return w if layout is None else quantize(w, bits, group_size, layout)


# --------------------------------------------------------------------------------------------
# The user-facing model.

DEFAULT_PREPROCESSING = {"resize": "crop", "crop_pct": 0.875, "interpolation": "bicubic",
                         "scale": "x / 127.5 - 1"}
# at_resolution refuses new token-mixing weights larger than this (they grow as K^4)
AT_RESOLUTION_MAX_BYTES = 4 * 2**30


def format_gib(n: int) -> str:
    """A byte count in GiB for people: 3.4 GiB."""
    return f"{n / 2**30:,.1f} GiB"


class Mixer:
    """A Mixer with its weights on one backend. Call it on float32 NHWC numpy images in [-1, 1].

    dtype: what the weights are held and computed in ("float32", or "float16"/"bfloat16" on mlx
    and tinygrad); outputs are float32 numpy arrays either way.
    """

    def __init__(self, config: MixerConfig, params: dict, backend: str | None = None,
                 labels: list[str] | None = None, preprocessing: dict | None = None,
                 dtype: str = "float32"):
        lazy = isinstance(params, (SafetensorsFile, QuantizedReader))  # read one at a time
        if not lazy and not isinstance(params, dict):
            raise MixerError(f"params must be a dict of official names to arrays (see "
                             f"param_shapes), got {type(params).__name__}")
        shapes = params.shapes() if lazy else {k: tuple(v.shape) for k, v in params.items()}
        check_shapes(config, shapes, params.name if lazy else "weights")
        if labels is not None and (config.num_classes is None or len(labels) != config.num_classes):
            raise MixerError(f"{len(labels)} labels given for a head with "
                             f"{config.num_classes} classes")
        self.config = config
        self.labels = list(labels) if labels is not None else None
        self.preprocessing = dict(preprocessing or DEFAULT_PREPROCESSING)
        self._ops = get_ops(backend, dtype)
        self.backend, self.dtype = self._ops.name, dtype
        self.params = {}
        for k, v in params.items(finite=True) if lazy else params.items():
            if isinstance(v, QuantizedTensor):
                if dtype != "float32":
                    raise MixerError(f"{v.dtype} weights are computed in float32 (dequantised "
                                     f"a layer at a time), not {dtype}: drop the dtype")
                self.params[k] = self._ops.quantized(v)
            elif isinstance(v, np.ndarray) and not (self.backend == "numpy"
                                                    and v.dtype == np.float32):
                self.params[k] = self._ops.asarray(as_float32(v))
            elif isinstance(v, np.ndarray) or self.dtype == "float32":
                self.params[k] = v  # the backend's own array (a float32 one, on mlx/tinygrad)
            else:  # another backend array, recast through numpy
                self.params[k] = self._ops.asarray(self._ops.numpy(v))
        n = config.num_blocks
        self._logits = self._ops.compile(lambda p, x: forward(self._ops, p, x, n, head=True))
        self._features = self._ops.compile(lambda p, x: forward(self._ops, p, x, n, head=False))

    def _run(self, fn, x, width: int) -> np.ndarray:
        """fn's float32 output (B, width) for the batch x, checked first."""
        try:
            x = np.asarray(x)
        except ValueError as e:  # a ragged list of arrays
            raise MixerError(f"expected images of shape (B, H, W, 3), got {e}") from None
        if x.ndim == 3:
            raise MixerError(f"expected a batch (B, H, W, 3), got one image of shape {x.shape}: "
                             f"use x[None]")
        size, p = self.config.image_size, self.config.patch_size
        if x.ndim != 4 or x.shape[3] != 3:
            raise MixerError(f"expected images of shape (B, H, W, 3), got {x.shape}")
        if x.dtype.kind != "f":  # uint8 pixels straight from a file are the usual mistake
            raise MixerError(f"expected float images scaled to [-1, 1] (mixer.preprocess makes "
                             f"them), got an array of {x.dtype}")
        if x.shape[1:3] != (size, size):
            hint = "" if x.shape[1] % p == 0 and x.shape[2] % p == 0 else \
                f" (and {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p})"
            raise MixerError(f"this model takes {size}x{size} images, got "
                             f"{x.shape[1]}x{x.shape[2]}{hint}; use mixer.preprocess(image, "
                             f"size={size}) or Mixer.at_resolution for a new size")
        if not np.isfinite(x).all():
            raise MixerError("non-finite input: the images hold NaN or infinite values")
        if len(x) == 0:  # the same on every backend, without asking one to compute nothing
            return np.zeros((0, width), np.float32)
        return self._ops.numpy(fn(self.params, self._ops.asarray(x)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, num_classes) for float images (B, H, W, 3) scaled to [-1, 1]; an empty
        batch gives an empty (0, num_classes) result. Non-finite inputs are refused."""
        if self.config.num_classes is None:
            raise MixerError("this model has no head (num_classes=None); use Mixer.features")
        return self._run(self._logits, x, self.config.num_classes)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Pre-logits (B, hidden_dim): the token mean after the pre-head LayerNorm."""
        return self._run(self._features, x, self.config.hidden_dim)

    def classify(self, images, top_k: int = 5, batch_size: int = 32, resize: str | None = None,
                 exact: bool = False):
        """For each image a list of its top_k classes as (index, label or None, probability),
        most probable first: one entry per image, also when given one image.

        images: an iterable (a generator too) of paths and PIL images; one path or PIL image;
        or an array batch (B, H, W, 3) from preprocess. Paths are decoded by preprocess
        (resize: default the weights file's, else "crop"; exact: see preprocess) in
        DECODE_THREADS threads while the model runs on the batch before. An unreadable file,
        and a model whose outputs are not finite, are a MixerError: no made-up probabilities.
        """
        results = []
        with contextlib.closing(self._classify_each(images, top_k, batch_size, resize,
                                                    exact)) as each:
            for _, _, top in each:
                if isinstance(top, MixerError):
                    raise top
                results.append(top)
        return results

    def _classify_each(self, images, top_k, batch_size, resize, exact):
        """classify's work, an image at a time in input order: (index, image, its top_k or the
        MixerError it could not be read with), so that the command line can report an
        unreadable file and go on. Arguments are checked before the first result. Close the
        generator when stopping early: that ends its decoding threads."""
        top_k, batch_size = positive_int(top_k, "top_k"), positive_int(batch_size, "batch_size")
        if resize not in (None, "crop", "squash"):
            raise MixerError(f"resize must be 'crop', 'squash' or None, got {resize!r}")
        if self.config.num_classes is None:
            raise MixerError("this model has no head (num_classes=None): nothing to classify")
        if isinstance(images, (str, bytes, os.PathLike)) or _is_pil_image(images):
            images = [images]  # one image, not an iterable of characters, bytes or pixels
        if isinstance(images, np.ndarray):  # an empty or misshapen one goes to the model whole
            slices = ([images[i:i + batch_size] for i in range(0, len(images), batch_size)]
                      if images.ndim == 4 and len(images) else [images])
            rows = (top for x in slices for top in self._top_k(x, top_k))
            yield from ((i, None, top) for i, top in enumerate(rows))
            return
        try:
            images = iter(images)
        except TypeError:
            raise MixerError(f"expected images (paths, PIL images or an array batch), got "
                             f"{type(images).__name__}") from None
        decode = functools.partial(preprocess, size=self.config.image_size, exact=exact,
                                   resize=resize or self.preprocessing.get("resize", "crop"))
        with contextlib.closing(decode_ahead(images, batch_size, decode)) as batches:
            for batch in batches:
                good = [pixels for _, _, pixels in batch if not isinstance(pixels, MixerError)]
                tops = iter(self._top_k(np.stack(good), top_k) if good else [])
                for index, image, pixels in batch:
                    top = pixels if isinstance(pixels, MixerError) else next(tops)
                    if isinstance(top, MixerError) and top is not pixels:  # non-finite outputs
                        top = MixerError(f"{image_name(image)}: {top}")
                    yield index, image, top

    def _top_k(self, x, top_k: int) -> list:
        """classify's rows for the batch x; a MixerError in place of an image whose outputs are
        not finite (no probabilities are made up), so that the others are still classified."""
        rows = []
        for row in self(x).astype(np.float64):
            if not np.isfinite(row).all():
                rows.append(MixerError("the model produced non-finite outputs: its weights are "
                                       "damaged or the input is out of range"))
                continue
            row = np.exp(row - row.max())
            row /= row.sum()
            rows.append([(int(i), self.labels[i] if self.labels else None, float(row[i]))
                         for i in np.argsort(-row, kind="stable")[:top_k]])
        return rows

    def numpy_params(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy arrays by official name, in the official layouts: on
        numpy the model's own arrays (copy one before changing it), else copies; quantised
        kernels dequantised."""
        return {k: self._host_quantized(v).dequantize() if isinstance(v, dict)
                else self._ops.numpy(v) for k, v in self.params.items()}

    @property
    def quantization(self) -> dict | None:
        """{"bits": 8 or 4, "group_size": ...} when the model holds quantised kernels, else None."""
        q = next((v for v in self.params.values() if isinstance(v, dict)), None)
        return None if q is None else {"bits": q["bits"], "group_size": q["group_size"]}

    def _host_quantized(self, kernel: dict) -> QuantizedTensor:
        """A quantised kernel of this model back in numpy, exactly (its scales and biases came
        from float16)."""
        scales, biases = (self._ops.numpy(kernel[k]).astype(np.float16) for k in
                          ("scales", "biases"))
        return QuantizedTensor(self._ops.numpy(kernel["packed"]), scales, biases, kernel["bits"],
                               kernel["group_size"], kernel["layout"], tuple(kernel["shape"]))

    def at_resolution(self, image_size: int) -> "Mixer":
        """This model for images K times larger (paper Appendix C), K an integer: each
        token-mixing MLP becomes K² block-diagonal copies of itself, one per K x K tile of the
        token grid, so until fine-tuned its logits are the mean of this model's on the K² tiles.
        A quantised model gives one quantised alike (unchanged kernels keep their values)."""
        old, d = self.config.image_size, self.config.tokens_mlp_dim  # D_S
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
                or image_size < old or image_size % old:
            raise MixerError(f"at_resolution needs an integer multiple of the current size "
                             f"{old} (e.g. {2 * old}), got {image_size!r}")
        image_size = int(image_size)
        k, g = image_size // old, old // self.config.patch_size  # K, old grid side
        need = self.config.num_blocks * 2 * (k * k * g * g) * (k * k * d) * 4
        if need > AT_RESOLUTION_MAX_BYTES:
            raise MixerError(f"at_resolution({image_size}) would need {format_gib(need)} for "
                             f"the new token-mixing weights (the limit is "
                             f"{format_gib(AT_RESOLUTION_MAX_BYTES)}): choose a smaller "
                             f"multiple of {old}")
        t = np.arange((k * g) ** 2)[:, None]  # every new token, row-major over the new grid
        y, x = divmod(t, k * g)
        q = (y // g) * k + x // g  # its tile
        s = ((y % g) * g + x % g)[:, 0]  # its index inside the tile (the old token index)
        cols = q * d + np.arange(d)  # (K²S, D_S): its tile's block of hidden units
        params = self.numpy_params()
        for i in range(self.config.num_blocks):
            b = f"MixerBlock_{i}/token_mixing/"
            dense_0 = np.zeros((k * k * g * g, k * k * d), np.float32)
            dense_0[t, cols] = params[b + "Dense_0/kernel"][s]  # (S, D_S) rows, by s
            dense_1 = np.zeros((k * k * d, k * k * g * g), np.float32)
            dense_1[cols, t] = params[b + "Dense_1/kernel"][:, s].T  # (D_S, S) columns, by s
            params[b + "Dense_0/kernel"], params[b + "Dense_1/kernel"] = dense_0, dense_1
            params[b + "Dense_0/bias"] = np.tile(params[b + "Dense_0/bias"], k * k)
            params[b + "Dense_1/bias"] = params[b + "Dense_1/bias"][s]
        for name, w in self.params.items():
            if isinstance(w, dict):
                w = self._host_quantized(w)
                layout = quantization_layout(params[name].shape, w.group_size)
                if params[name].shape == w.shape:
                    params[name] = w
                elif layout != "float16":
                    params[name] = quantize(params[name], w.bits, w.group_size, layout)
        config = dataclasses.replace(self.config, image_size=image_size, tokens_mlp_dim=k * k * d)
        return Mixer(config, params, backend=self.backend, labels=self.labels,
                     preprocessing=self.preprocessing, dtype=self.dtype)

    def save(self, path: str, dtype: str = "float32", source: str | None = None,
             group_size: int = DEFAULT_GROUP_SIZE) -> None:
        """Writes the model to a safetensors file that load reads back, atomically: the weights
        under their official names, and as metadata the config, labels, preprocessing and
        `source` (a free-text note). dtype is what the file stores: "float32" (exact),
        "bfloat16" or "float16" (half the size; values beyond 65504 refused), or "int8"/"int4"
        in groups of `group_size` (quantised kernels of the same bits and groups are kept as
        they are). Non-finite weights are refused."""
        if not isinstance(path, (str, os.PathLike)):
            raise MixerError(f"save needs a file path, got {type(path).__name__}")
        if dtype not in (*COMPUTE_DTYPES, *QUANTIZED_DTYPES):
            raise MixerError(f"save: unsupported dtype {dtype!r}: expected float32, float16, "
                             f"bfloat16, {', '.join(QUANTIZED_DTYPES)}")
        if source is not None and not isinstance(source, str):
            raise MixerError(f"save: source must be a string or None, got {type(source).__name__}")
        metadata = {"format": "mixer", "mixer.format_version": FORMAT_VERSION,
                    "mixer.config": json.dumps(self.config.to_dict()),
                    "mixer.preprocessing": json.dumps(self.preprocessing)}
        if self.labels is not None:
            metadata["mixer.labels"] = json.dumps(self.labels)
        if source:
            metadata["mixer.source"] = source
        if dtype in QUANTIZED_DTYPES:
            bits, group_size = check_quantization(dtype, group_size)
            tensors, layout = self._quantized_tensors(bits, group_size)
            metadata["mixer.quantization"] = json.dumps(
                {"bits": bits, "group_size": group_size, "mode": "affine", "layout": layout})
            return _write_tensors(path, tensors, metadata)
        params = self.numpy_params()
        for name, a in params.items():
            _check_finite(name, a)
            if dtype == "float16" and a.size and np.abs(a).max() > np.finfo(np.float16).max:
                raise MixerError(f"save: {name!r} holds values up to {np.abs(a).max():.3g}, "
                                 f"beyond float16's 65504: save as bfloat16 or float32")
        write_safetensors(path, params, metadata, dtype=dtype)

    def _quantized_tensors(self, bits: int, group_size: int):
        """save's tensors for a quantised file, (name -> (dtype code, array), kernel name ->
        layout), one kernel in float at a time."""
        plan = quantization_plan(self.config, group_size)
        tensors, layout = {}, {}
        for name, v in self.params.items():
            w = self._host_quantized(v) if isinstance(v, dict) else self._ops.numpy(v)
            if isinstance(w, np.ndarray):
                _check_finite(name, w)
            try:
                w = _planned(w, plan.get(name), bits, group_size)
            except MixerError as e:
                raise MixerError(f"save: {name!r}: {e}: nothing written") from None
            if isinstance(w, QuantizedTensor):
                tensors[name], layout[name] = ("U32", w.packed), w.layout
                tensors[name + _SCALES] = ("F16", w.scales)
                tensors[name + _BIASES] = ("F16", w.biases)
            elif name in plan:
                tensors[name], layout[name] = ("F16", w), "float16"
            else:
                tensors[name] = ("F32", np.ascontiguousarray(w, dtype=np.float32))
        return tensors, layout

    def __repr__(self):
        q, dtype = self.quantization, "" if self.dtype == "float32" else f", dtype={self.dtype}"
        dtype += f", int{q['bits']} in groups of {q['group_size']}" if q else ""
        return (f"Mixer({self.config.variant or 'custom'}, {self.config.image_size}px, "
                f"classes={self.config.num_classes}, backend={self.backend}{dtype})")


def _check_finite(name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise MixerError(f"save: the weights hold non-finite values (first in {name!r}): "
                         f"nothing written")


def load(path: str, backend: str | None = None, dtype: str = "float32",
         quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> Mixer:
    """Loads a weights file onto `backend` (None: default_backend()), held and computed in
    `dtype`: a mixer safetensors file, or an official .npz checkpoint (see load_npz). Strict:
    a missing, extra or misshapen tensor, or a NaN or infinite weight, is an error naming it. A
    file without our metadata has its config read off its shapes. Tensors are read one at a
    time into the model's own memory. Quantised files load quantised; quantize ("int8" or
    "int4", in groups of group_size) quantises a float file as it is read."""
    if path is None or not isinstance(path, (str, bytes, os.PathLike)):
        raise MixerError(f"load() takes the path of a weights file, got {path!r}")
    target = None if quantize is None else check_quantization(quantize, group_size)
    with open_regular(path) as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        if target:
            raise MixerError(f"{path}: quantize= reads .safetensors files; convert this .npz "
                             f"with `convert.py {path} OUT.safetensors --dtype {quantize}`")
        return load_npz(path, backend=backend, dtype=dtype)
    with SafetensorsFile(path) as f:
        metadata, name = f.metadata, f.name
        version = metadata.get("mixer.format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise MixerError(f"{name}: weights format version {printable(version)!r}; this "
                             f"mixer.py reads version {FORMAT_VERSION!r}: the file was written "
                             f"by a newer version (update mixer.py) or by another tool")
        config = _json_metadata(metadata, "mixer.config", name, dict)
        if config is None and f.quantization is not None:
            raise MixerError(f"{name}: a quantised file needs the metadata 'mixer.config' (its "
                             f"tensors' shapes are packed): the file is damaged")
        held = len(f.shapes())
        config = infer_config(f.shapes()) if config is None else MixerConfig.from_dict(config)
        if 12 * config.num_blocks > held:  # before listing what the config expects
            raise MixerError(f"{name}: metadata 'mixer.config' claims {config.num_blocks} "
                             f"blocks (12 tensors each), the file holds {held} tensors: the "
                             f"file is damaged")
        if f.quantization is not None or target is not None:
            f = QuantizedReader(f, config, target)  # checks the shapes, packed ones included
        labels = _json_metadata(metadata, "mixer.labels", name, list)
        if labels is not None and not all(isinstance(label, str) for label in labels):
            raise MixerError(f"{name}: metadata 'mixer.labels' must be a JSON list of strings")
        preprocessing = _json_metadata(metadata, "mixer.preprocessing", name, dict)
        _check_preprocessing(preprocessing or {}, name)
        return Mixer(config, f, backend=backend, labels=labels, preprocessing=preprocessing,
                     dtype=dtype)


def _check_preprocessing(preprocessing: dict, name: str) -> None:
    """Each entry of a file's 'mixer.preprocessing' is something this code does, or an error:
    a model must not be run on pixels prepared otherwise than it asks."""
    for key, value in preprocessing.items():
        if value not in ("crop", "squash") if key == "resize" else \
                DEFAULT_PREPROCESSING.get(key, ()) != value:
            fixed = ", ".join(f"{k} {json.dumps(v)}" for k, v in DEFAULT_PREPROCESSING.items()
                              if k != "resize")
            raise MixerError(f"{name}: metadata 'mixer.preprocessing' asks for "
                             f"{printable(key)} {printable(json.dumps(value))}, which this "
                             f"version does not do (resize \"crop\" or \"squash\", {fixed}): "
                             f"the file was written by a newer version or by another tool")


def _json_metadata(metadata, key, path, kind):
    """metadata[key] parsed as JSON of type `kind`, or None when absent."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise MixerError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise MixerError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}, "
                         f"got {type(value).__name__}")
    return value


def num_params(config: MixerConfig) -> int:
    """How many numbers the weights of `config` hold, without listing them (a config can be too
    large to list)."""
    p, c, s = config.patch_size, config.hidden_dim, config.num_tokens
    ds, dc, n = config.tokens_mlp_dim, config.channels_mlp_dim, config.num_classes
    block = 4 * c + (2 * s * ds + ds + s) + (2 * c * dc + dc + c)  # 2 LayerNorms, 2 MLPs
    return p * p * 3 * c + c + config.num_blocks * block + 2 * c + (0 if n is None else c * n + n)


def _physical_memory() -> int | None:
    """This machine's RAM in bytes, where the system says (POSIX); else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def init_params(config: MixerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The official initialisation: lecun-normal kernels (truncated normal, fan-in), zero biases,
    LayerNorm scale 1, a zero head. A config too large for this machine's memory is refused
    before anything is allocated."""
    if not isinstance(config, MixerConfig):
        raise MixerError(f"expected a MixerConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MixerError(f"seed must be a non-negative int, got {seed!r}")
    # float32 weights, plus the largest kernel's float64 draw and its scaled copy
    largest = max(config.tokens_mlp_dim * config.num_tokens,
                  config.channels_mlp_dim * config.hidden_dim,
                  config.patch_size ** 2 * 3 * config.hidden_dim)
    need, memory = 4 * num_params(config) + 16 * largest, _physical_memory()
    if memory is not None and need > memory:
        raise MixerError(f"this config's {num_params(config):,} weights need {format_gib(need)}, "
                         f"more than this machine's {format_gib(memory)} of memory")
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("/scale"):
            params[name] = np.ones(shape, np.float32)
        elif name.endswith("/bias") or name == "head/kernel":
            params[name] = np.zeros(shape, np.float32)
        else:  # flax lecun_normal: truncated at 2 std, std corrected for the truncation
            w = rng.standard_normal(shape)
            while (bad := np.abs(w) > 2).any():
                w[bad] = rng.standard_normal(int(bad.sum()))
            std = math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978
            params[name] = (w * std).astype(np.float32)
    return params


def init(config: MixerConfig, seed: int = 0, backend: str | None = None) -> Mixer:
    """A Mixer with freshly initialised weights (as the official code), no file needed."""
    return Mixer(config, init_params(config, seed), backend=backend)


# --------------------------------------------------------------------------------------------
# Official checkpoints: the released .npz files (google-research/vision_transformer), their
# label names, and the download cache behind `--variant`.

# variant -> {source: file under WEIGHTS_URL}. The first source is the default: the best released
# ImageNet-1k model of the variant, GSAM where released (the GSAM paper reports it above SAM
# and plain training). imagenet21k files are pre-trained only: 21843-way heads.
OFFICIAL_CHECKPOINTS = {
    "S/8": {"gsam": "gsam/Mixer-S_8.npz"},
    "S/16": {"gsam": "gsam/Mixer-S_16.npz"},
    "S/32": {"gsam": "gsam/Mixer-S_32.npz"},
    "B/16": {"gsam": "gsam/Mixer-B_16.npz", "sam": "sam/Mixer-B_16.npz",
             "imagenet1k": "imagenet1k/Mixer-B_16.npz",
             "imagenet21k": "imagenet21k/Mixer-B_16.npz"},
    "B/32": {"gsam": "gsam/Mixer-B_32.npz", "sam": "sam/Mixer-B_32.npz"},
    "L/16": {"imagenet1k": "imagenet1k/Mixer-L_16.npz",
             "imagenet21k": "imagenet21k/Mixer-L_16.npz"},
}
WEIGHTS_URL = "https://storage.googleapis.com/mixer_models/"  # MIXER_WEIGHTS_URL overrides
# Label sets by head size (ILSVRC-2012 order; Google's ImageNet-21k order): text files with one
# name per line in class order, and the official lists that a lone copy of this file fetches.
LABEL_SETS = {"imagenet1k": 1000, "imagenet21k": 21843}
LABELS_URL = "https://storage.googleapis.com/bit_models/"  # MIXER_LABELS_URL overrides
LABEL_FILES = {"imagenet1k": "ilsvrc2012_wordnet_lemmas.txt",
               "imagenet21k": "imagenet21k_wordnet_lemmas.txt"}
DOWNLOAD_ATTEMPTS = 3  # a dropped connection is retried (resumed) this many times in all
DOWNLOAD_STALL = 30.0  # seconds without a byte: the attempt fails (and is retried)
DOWNLOAD_MIN_RATE = (64 * 1024, 60.0)  # fewer bytes in that many seconds: too slow (retried)
DOWNLOAD_DEADLINE = 3600.0  # seconds for it all, retries included (MIXER_DOWNLOAD_TIMEOUT)


def labels_dirs() -> list[str]:
    """Where label files are looked for: labels/ beside this file (a checkout), where `pip
    install` puts them, then the download cache (where a lone copy keeps those it fetched)."""
    return [os.path.join(os.path.dirname(os.path.abspath(__file__)), "labels"),
            os.path.join(sys.prefix, "share", "mlp-mixer", "labels"), cache_dir()]


def read_labels(path: str) -> list[str]:
    """A UTF-8 text file with one class name per line, in class-index order."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MixerError(f"cannot read labels {path}: {getattr(e, 'strerror', None) or e}") \
            from None


def find_labels(spec: str | None, num_classes: int | None) -> list[str] | None:
    """Class names for a head with num_classes outputs. spec "auto": the label set of that
    size, None where there is none or its file is not found (callers show class indices);
    "imagenet1k" or "imagenet21k": that set, an error if not found; None or "none": no labels;
    any other string: a file, one name per line."""
    auto = spec == "auto"
    if auto:
        spec = next((name for name, n in LABEL_SETS.items() if n == num_classes), None)
    if spec is None or spec == "none":
        return None
    if num_classes is None:
        raise MixerError(f"labels {spec!r} given for a model without a head")
    path = spec
    if spec in LABEL_SETS:
        found = [p for p in (os.path.join(d, spec + ".txt") for d in labels_dirs())
                 if os.path.isfile(p)]
        if not found and not auto:
            raise MixerError(f"labels {spec!r} not found: expected {spec}.txt in "
                             f"{' or '.join(labels_dirs())}")
        if not found:
            return None
        path = found[0]
    labels = read_labels(path)
    if len(labels) != num_classes:
        raise MixerError(f"{path} has {len(labels)} labels, expected {num_classes} (one per "
                         f"class of the head)")
    return labels


def download_labels(spec: str) -> list[str]:
    """The official names of a label set (a key of LABEL_SETS) from MIXER_LABELS_URL (a folder
    URL ending in /) or LABELS_URL, checked (UTF-8, one printable line per class) and cached as
    SPEC.txt for find_labels; with spaces for the WordNet lemmas' underscores, as in labels/."""
    url = _env_url("MIXER_LABELS_URL", LABELS_URL, "the label files") + LABEL_FILES[spec]
    classes = LABEL_SETS[spec]
    with _scratch_folder(cache_dir()) as scratch:
        download(url, os.path.join(scratch, "labels"), max_size=256 * classes)
        with open(os.path.join(scratch, "labels"), "rb") as f:
            data = f.read()
    try:
        labels = data.decode("utf-8").replace("_", " ").splitlines()
    except UnicodeDecodeError:
        labels = []
    if len(labels) != classes or not all(label.strip() and label.isprintable()
                                         for label in labels):
        raise MixerError(f"{url} is not {classes} class names, one per line of UTF-8 text "
                         f"(found {len(data)} bytes, {len(data.splitlines())} lines); refusing "
                         f"to use it")
    with atomic_write(os.path.join(cache_dir(), spec + ".txt")) as f:
        f.write(("\n".join(labels) + "\n").encode("utf-8"))
    return labels


class NpzFile(_OpenFile):
    """An official checkpoint (.npz: a zip of .npy arrays, by numpy.savez) opened with every
    member's header checked, nothing unpickled, no data read until `read`: absurd shapes, a
    pickle or a decompression bomb cost no memory. Errors name the file as `name`."""

    def __init__(self, path, name: str | None = None):
        self.name = name or os.fspath(path)
        self._file = open_regular(path, self.name, "an .npz checkpoint")
        try:
            # Checked first: np.load would take any other file for a pickle and refuse it as one.
            magic = self._file.read(4)
            if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
                raise MixerError(f"{self.name}: not an .npz archive (a zip written by "
                                 f"numpy.savez); found {magic!r} where a zip starts with "
                                 f"b'PK\\x03\\x04'")
            self._members = {}
            with self._errors("archive"):
                self._zip = zipfile.ZipFile(self._file)
                for info in self._zip.infolist():
                    self._add(info)
        except BaseException:
            self._file.close()
            raise

    @contextlib.contextmanager
    def _errors(self, what):
        try:
            yield
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
                RuntimeError) as e:  # RuntimeError: an encrypted member
            raise MixerError(f"{self.name}: truncated or corrupt .npz {what} ({e}); fetch it "
                             f"again") from None

    def _add(self, info):
        key = info.filename.removesuffix(".npy")
        if key == info.filename or info.is_dir():
            raise MixerError(f"{self.name}: member {info.filename!r} is not a numpy array "
                             f"(.npy): not an archive written by numpy.savez")
        with self._errors(f"array {key!r}"), self._zip.open(info) as m:
            shape, fortran, dtype = self._header(m)
            nbytes = info.file_size - m.tell()
        problem = (
            "appears twice in the archive" if key in self._members else
            "holds pickled Python objects; refusing to load it (a checkpoint holds plain float "
            "arrays)" if dtype.hasobject else
            f"has dtype {dtype}, expected float32" if dtype.kind != "f" else
            f"has shape {shape}; a Mixer array has at most 4 dimensions"
            if len(shape) > _MAX_DIMS or any(d < 0 for d in shape) else
            f"claims shape {shape} ({dtype.itemsize * math.prod(shape)} bytes) but its member "
            f"holds {nbytes}: the archive is corrupt or was crafted"
            if nbytes != dtype.itemsize * math.prod(shape) else None)
        if problem:
            raise MixerError(f"{self.name}: array {key!r} {problem}")
        self._members[key] = (info, shape, fortran, dtype)

    @staticmethod
    def _header(m):
        version = np.lib.format.read_magic(m)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(m)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(m)
        raise ValueError(f"unsupported .npy format version {version}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every array's shape, by key, as the headers give them."""
        return {k: tuple(m[1]) for k, m in self._members.items()}

    def read(self, key: str, finite: bool = False) -> np.ndarray:
        """The array as float32 (finite: NaN and infinity refused, naming the array)."""
        info, shape, fortran, dtype = self._members[key]
        with self._errors(f"array {key!r}"), self._zip.open(info) as m:
            self._header(m)
            data = m.read(dtype.itemsize * math.prod(shape))
        a = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if finite and not np.isfinite(a).all():
            raise MixerError(f"{self.name}: array {key!r} holds NaN or infinite values: the "
                             f"checkpoint is damaged")
        return a


def read_npz(path: str, name: str | None = None) -> dict[str, np.ndarray]:
    """Every array of a numpy .npz archive as float32, checked as NpzFile does."""
    with NpzFile(path, name) as npz:
        return {key: npz.read(key) for key in npz.shapes()}


def load_npz(path: str, backend: str | None = None, labels: str | None = "auto",
             head: bool = True, name: str | None = None, dtype: str = "float32") -> Mixer:
    """An official checkpoint (.npz, flat keys such as "stem/kernel") as a Mixer, its
    architecture read off the arrays' headers and checked before any array is read; NaN or
    infinity refused. labels: see find_labels. head=False: a feature extractor."""
    with NpzFile(path, name) as npz:
        shapes = {k: v for k, v in npz.shapes().items()
                  if head or k not in ("head/kernel", "head/bias")}
        if "stem/kernel" not in shapes:
            found = ", ".join(repr(k) for k in sorted(shapes)[:3]) or "no arrays"
            raise MixerError(f"{npz.name}: no 'stem/kernel' array, so not an official Mixer "
                             f"checkpoint (found {found}{', ...' if len(shapes) > 3 else ''})")
        try:
            config = infer_config(shapes)
        except MixerError as e:
            raise MixerError(f"{npz.name}: {e}") from None
        check_shapes(config, shapes, npz.name)
        params = {key: npz.read(key, finite=True) for key in shapes}
    return Mixer(config, params, backend=backend, labels=find_labels(labels, config.num_classes),
                 dtype=dtype)


def official_checkpoint(variant: str, source: str | None = None) -> str:
    """The released file for a variant ("gsam/Mixer-B_16.npz"); source None: the default."""
    released = OFFICIAL_CHECKPOINTS.get(variant)
    listing = "; ".join(f"{v}: {', '.join(s)}" for v, s in OFFICIAL_CHECKPOINTS.items())
    if variant not in VARIANTS:
        raise MixerError(f"unknown variant {variant!r}: expected one of {sorted(VARIANTS)}")
    if released is None:
        raise MixerError(f"no official weights were released for Mixer-{variant}; released "
                         f"(variant: sources): {listing}")
    if source is not None and source not in released:
        raise MixerError(f"no {source!r} checkpoint of Mixer-{variant} was released; for "
                         f"{variant} use source {' or '.join(map(repr, released))} (--source) "
                         f"(all released: {listing})")
    return released[source] if source else next(iter(released.values()))


def cache_dir() -> str:
    """Where downloads are kept: MIXER_HOME; else weights/ beside this file if writable (a
    checkout); else the user's cache."""
    if os.environ.get("MIXER_HOME"):
        return os.environ["MIXER_HOME"]
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
    if os.path.isdir(here) and os.access(here, os.W_OK):
        return here
    if sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    elif sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~/AppData/Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "mlp-mixer")


def cache_path(checkpoint: str) -> str:
    """The cached conversion of a released file, folder in the name (the file names repeat
    across the release's folders): gsam-Mixer-B_16.safetensors."""
    stem = checkpoint.removesuffix(".npz")
    return os.path.join(cache_dir(), stem.replace("/", "-") + ".safetensors")


def weights_url() -> str:
    """MIXER_WEIGHTS_URL (a mirror, or a file:// folder laid out like the release), else
    WEIGHTS_URL."""
    return _env_url("MIXER_WEIGHTS_URL", WEIGHTS_URL, "the release")


def _env_url(variable: str, default: str, what: str) -> str:
    url = os.environ.get(variable) or default
    if not _is_download_url(url):
        raise MixerError(f"{variable}={_one_line(url)!r} is not an http://, https:// or file:// "
                         f"URL: set it to a copy of {what} laid out like {default}, or unset it")
    return url.rstrip("/") + "/"


def download_deadline() -> float:
    """Seconds a download may take: MIXER_DOWNLOAD_TIMEOUT, else DOWNLOAD_DEADLINE."""
    value = os.environ.get("MIXER_DOWNLOAD_TIMEOUT") or ""
    try:
        seconds = float(value) if value else DOWNLOAD_DEADLINE
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise MixerError(f"MIXER_DOWNLOAD_TIMEOUT={_one_line(value)!r}: expected a number of "
                         f"seconds above 0 (the limit for a whole download; default "
                         f"{DOWNLOAD_DEADLINE:.0f})")
    return seconds


def pretrained(variant: str, source: str | None = None, backend: str | None = None,
               progress=None, dtype: str = "float32", quantize: str | None = None) -> Mixer:
    """The official checkpoint of a variant, downloaded, checked and converted on first use
    (with its label names: find_labels, else download_labels, else none), then loaded from
    cache_path() with no network access. A cached file that is not that variant's architecture
    and head, or names another source, is an error that says to delete it. progress: see
    download."""
    checkpoint = official_checkpoint(variant, source)
    get_ops(backend, dtype)  # an unusable backend or dtype fails here, before any download
    path = cache_path(checkpoint)
    if not os.path.exists(path):
        _download_official(variant, checkpoint, path, progress)
    elif not os.path.isfile(path):  # reading a FIFO would wait for ever, a folder cannot be read
        raise MixerError(f"{path}, the cache of {checkpoint}, is not a regular file: delete it "
                         f"to download {checkpoint} again")
    try:
        with SafetensorsFile(path) as f:  # the header only
            found_source, found_quantization = f.metadata.get("mixer.source"), f.quantization
        model = load(path, backend=backend, dtype=dtype, quantize=quantize)
    except MixerError as e:
        raise MixerError(f"{e} (a cached download: delete it to fetch it again)") from None
    # refused, not replaced: it may be someone's work, and a download may not be possible
    expected = _expected_config(variant, checkpoint)
    if model.config != expected or found_quantization is not None or \
            found_source not in (None, checkpoint, os.path.basename(checkpoint)):
        held = _describe(model.config) + (f" converted from {found_source!r}"
                                          if found_source else "")
        if found_quantization is not None:  # not the released weights: rounded
            held += f", quantised to int{found_quantization['bits']}"
        raise MixerError(f"{path} holds {held}, not {_describe(expected)} from {checkpoint}: it "
                         f"is not the cached download of Mixer-{variant}; delete it to download "
                         f"{checkpoint} again (or set MIXER_HOME to another folder)")
    if model.labels is None:  # converted without names; a label file may be here now
        model.labels = find_labels("auto", model.config.num_classes)
    return model


def _label_set(checkpoint: str) -> str:
    """The label set of a released file's head: imagenet21k for those files, else imagenet1k."""
    return "imagenet21k" if checkpoint.startswith("imagenet21k/") else "imagenet1k"


def _expected_config(variant: str, checkpoint: str) -> MixerConfig:
    """A released file's architecture: the variant's, with its label set's head."""
    return dataclasses.replace(VARIANTS[variant], num_classes=LABEL_SETS[_label_set(checkpoint)])


def _describe(config: MixerConfig) -> str:
    name = f"Mixer-{config.variant}" if config.variant else f"a custom Mixer {config.to_dict()}"
    return f"{name} with {config.num_classes} classes" if config.num_classes else \
        f"{name} without a head"


@contextlib.contextmanager
def _scratch_folder(folder: str):
    """A private folder in `folder` (same disk), removed afterwards; named as atomic_write's
    temporaries, so that a later writer reclaims it if this process is killed outright."""
    try:
        os.makedirs(folder, exist_ok=True)
        scratch = os.path.join(folder, f"{_temporary_prefix()}{os.urandom(4).hex()}-download")
        os.mkdir(scratch, 0o700)
    except OSError as e:
        raise MixerError(f"cannot write to the weights cache {folder}: {e.strerror or e} "
                         f"(set MIXER_HOME to a writable folder)") from None
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _download_official(variant, checkpoint, path, progress):
    """The released file fetched, checked, and kept converted (with its labels) at `path`."""
    url = weights_url() + checkpoint
    expected = _expected_config(variant, checkpoint)
    with _scratch_folder(os.path.dirname(os.path.abspath(path))) as scratch:
        npz = os.path.join(scratch, os.path.basename(checkpoint))
        # twice the float32 arrays (room for float64) bounds what a server can make us store
        floats = sum(math.prod(shape) for shape in param_shapes(expected).values())
        try:
            download(url, npz, progress=progress, max_size=8 * floats + 2**20)
        except MixerError as e:
            raise MixerError(f"{e}. {_offline_hint(checkpoint, path)}") from None
        model = load_npz(npz, backend="numpy", labels="auto", name=url)
        if model.config != expected:
            raise MixerError(f"{url} holds {_describe(model.config)}, not the expected "
                             f"{_describe(expected)}; refusing to cache it")
        if model.labels is None:
            with contextlib.suppress(MixerError):  # without them: class indices, and a note
                model.labels = download_labels(_label_set(checkpoint))
        model.save(path, source=checkpoint)


def _offline_hint(checkpoint: str, path: str) -> str:
    """How to use a copy fetched elsewhere, in the commands installed here (if any)."""
    name = os.path.basename(checkpoint)
    hint = f"To use a copy of {checkpoint} fetched elsewhere, pass it as --weights {name}"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py")
    command = "mixer-convert" if shutil.which("mixer-convert") else None
    if command is None and os.path.isfile(script):
        command = "python " + ("convert.py" if os.path.dirname(script) == os.getcwd() else script)
    return hint + (f", or convert it once into this cache: {command} {name} {path}"
                   if command else "")


def download(url: str, path: str, progress=None, attempts: int = DOWNLOAD_ATTEMPTS,
             timeout: float = DOWNLOAD_STALL, min_rate: tuple[int, float] = DOWNLOAD_MIN_RATE,
             deadline: float | None = None, max_size: int | None = None) -> None:
    """Fetches url (http://, https:// or file://) into path atomically, once complete (checked
    against Content-Length). A dropped connection is retried, resumed with a Range request
    where the server allows; an HTTP error such as 404 is not. An attempt fails (and is
    retried) when no byte arrives for `timeout` seconds or fewer than min_rate[0] bytes in
    min_rate[1] seconds; the whole download once it has taken `deadline` seconds (None:
    download_deadline()); more than max_size bytes are refused. progress(done, total or None)
    is called as bytes arrive."""
    if not _is_download_url(url):
        raise MixerError(f"cannot download {_one_line(url)!r}: expected an http://, https:// or "
                         f"file:// URL")
    limit = download_deadline() if deadline is None else deadline
    ends = time.monotonic() + limit
    with atomic_write(path) as f:
        for attempt in range(1, attempts + 1):
            try:
                done, total = _fetch(url, f, progress, timeout, min_rate, ends, max_size)
                if total is None or done == total:
                    return
                problem = f"the connection closed after {done} of {total} bytes"
            except urllib.error.HTTPError as e:
                if e.code == 416:  # our Range was refused: start again from byte 0
                    f.seek(0)
                    f.truncate()
                elif e.code < 500 and e.code not in (408, 429):  # retrying will not help
                    raise MixerError(f"cannot download {url}: HTTP {e.code} "
                                     f"{_one_line(e.reason)}") from None
                problem = f"HTTP {e.code} {_one_line(e.reason)}"
            except urllib.error.URLError as e:  # no connection at all: offline, DNS, refused
                raise MixerError(f"cannot download {url}: {_one_line(e.reason)}") from None
            except (OSError, http.client.HTTPException) as e:  # a stall, a trickle, a drop
                problem = _one_line(str(e) if isinstance(e, TimeoutError) else
                                    f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            if time.monotonic() >= ends:
                raise MixerError(f"cannot download {url}: not complete after {limit:g} s, the "
                                 f"limit for a download ({f.tell()} bytes received); set "
                                 f"MIXER_DOWNLOAD_TIMEOUT to the seconds to allow")
            if attempt < attempts:
                time.sleep(min(0.5 * attempt, max(0.0, ends - time.monotonic())))
        raise MixerError(f"cannot download {url}: {problem} (tried {attempts} times)")


def _fetch(url, f, progress, timeout, min_rate, ends, max_size):
    """One GET appending to f from f.tell() -> (bytes in f, total or None); _Ended for a stall,
    a trickle (per window of min_rate[1] s) and once time.monotonic() passes `ends`."""
    done = f.tell()
    headers = {"User-Agent": f"mlp-mixer (mixer.py format {FORMAT_VERSION})"}
    if done:
        headers["Range"] = f"bytes={done}-"
    start = time.monotonic()
    if start >= ends:
        raise _Ended("out of time")
    min_bytes, window = min_rate
    mark = (start, done)  # where the current window of the rate check began
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=min(timeout, ends - start)) as response:
            if done and not (response.status == 206 and response.headers.get(
                    "Content-Range", "").startswith(f"bytes {done}-")):
                f.seek(0)  # the server sent the whole file (or another range): start again
                f.truncate()
                done = 0
            length = response.headers.get("Content-Length", "")
            total = done + int(length) if length.isdigit() else None
            if max_size is not None and total is not None and total > max_size:
                raise MixerError(f"cannot download {url}: the server announces {total} bytes, "
                                 f"more than the {max_size} that the file can be")
            while True:
                if progress:
                    progress(done, total)
                # read1: whatever has arrived, so that a trickle cannot hold one call for long
                chunk = response.read1(1 << 20)
                if not chunk:
                    return done, total
                try:  # a full or failing disk is not a network problem to retry
                    f.write(chunk)
                except OSError as e:
                    raise MixerError(f"cannot save the download of {url}: {e.strerror or e}") \
                        from None
                done += len(chunk)
                if max_size is not None and done > max_size:
                    raise MixerError(f"cannot download {url}: more than {max_size} bytes "
                                     f"received, more than the file can be")
                now = time.monotonic()
                if now >= ends:
                    raise _Ended("out of time")
                if now - mark[0] >= window:
                    if done - mark[1] < min_bytes:
                        raise _Ended(f"less than {format_size(min_bytes)} arrived in "
                                           f"{window:g} s")
                    mark = (now, done)
    except _Ended:
        raise
    except TimeoutError:  # the socket's: nothing arrived for the whole timeout
        raise _Ended(f"no data for {min(timeout, ends - start):g} s") from None


class _Ended(TimeoutError):
    """A transfer ended by download()'s limits: a stall, a trickle or the deadline."""


def _is_download_url(url: str) -> bool:
    """An http(s):// URL with a host and a valid port, or a file:// URL."""
    if not isinstance(url, str) or any(c.isspace() or not c.isprintable() for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        return False
    return bool(parts.hostname) if parts.scheme in ("http", "https") else parts.scheme == "file"


def _one_line(text, limit: int = 200) -> str:
    """A server's or user's text for one line of a message: spaces joined, escaped, cut."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# Images: one decoder, for classifying (preprocess) and for training (train.py's Loader).

MAX_IMAGE_SIZE = 8192  # preprocess's largest output side: 8192^2 x 3 float32 = 768 MiB
REDUCED_MARGIN = 2  # preprocess keeps a picture this many times what its resize needs (README)


def file_signature(file) -> tuple:
    """What tells versions of a file (a path or an open descriptor) apart: a rewrite changes
    its size or times, a replacement (a rename over it) its inode."""
    st = os.stat(file)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


@dataclasses.dataclass(frozen=True)
class Picture:
    """An image decoded once, to be cropped as often as wanted (training crops; preprocess
    decodes and crops once, the same way, without the copy into `pixels`)."""

    pixels: np.ndarray  # uint8 RGB (rows, columns, 3), upright, read-only, at 1/scale of
    scale: int
    width: int  # the upright full-resolution size, in which crop boxes are given
    height: int
    signature: tuple | None  # file_signature() of the file as read; None for a PIL image

    @classmethod
    def open(cls, image, max_reduction=None) -> "Picture":
        """A path or a PIL image (never changed) decoded: EXIF orientation applied, any mode as
        RGB (16-bit and float ones rescaled), the first frame of several. max_reduction(width,
        height): the largest factor per side it may shrink by (None: 1); a JPEG file is decoded
        at 1/2, 1/4 or 1/8 scale by libjpeg (draft mode), the rest box-reduced (Image.reduce).
        Refused with a MixerError: anything but a path or a PIL image, not a regular file, not
        an image Pillow can decode, more pixels than PIL.Image.MAX_IMAGE_PIXELS."""
        img, scale, width, height, signature = _decode(image, max_reduction)
        pixels = np.asarray(img)
        pixels.flags.writeable = False  # shared by the threads that crop it
        return cls(pixels, scale, width, height, signature)

    def crop(self, box, size: int) -> np.ndarray:
        """The box (x0, y0, x1, y1) of the upright full-resolution picture, bicubic-resampled to
        uint8 (size, size, 3): what resizing the whole picture so that the box becomes size x
        size and cutting it out gives, for the work of the box alone (see _resample)."""
        whole = tuple(box) == (0, 0, self.width, self.height)
        return _resample(self.pixels, [v / self.scale for v in box], size, whole)

    def evaluation(self, size: int = 224, resize: str = "crop") -> np.ndarray:
        """preprocess's pixels, uint8 (size, size, 3) (see evaluation_box)."""
        return self.crop(evaluation_box(self.width, self.height, size, resize), size)


def _decode(image, max_reduction):
    """Picture.open's work: (RGB PIL image, scale, width, height, signature)."""
    Image, _ = _import_pil()
    is_path = isinstance(image, (str, bytes, os.PathLike))
    if not is_path and not isinstance(image, Image.Image):
        raise MixerError(f"expected an image file's path or a PIL image, got "
                         f"{type(image).__name__} (a preprocessed array goes straight to the "
                         f"model as a batch (B, H, W, 3))")
    name = image_name(image)
    try:
        if not is_path:
            return _decode_opened(image, name, max_reduction, None)
        with open_regular(image, name, "an image") as f, Image.open(f) as img:
            return _decode_opened(img, name, max_reduction, file_signature(f.fileno()))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # the warning arrives as an exception where warnings are errors (the command line)
        raise MixerError(f"{name}: {e} (Pillow's limit: raise PIL.Image.MAX_IMAGE_PIXELS to "
                         f"read an image this large that you trust)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MixerError(printable(f"{name}: cannot read the image ({e})")) from None


def image_name(image) -> str:
    """How messages name an image: its path, printable, or "image" for a PIL image."""
    return printable(os.fsdecode(image)) if isinstance(image, (str, bytes, os.PathLike)) \
        else "image"


def _decode_opened(img, name, max_reduction, signature):
    Image, ImageOps = _import_pil()
    w, h = img.size  # read from the header: nothing decoded yet
    limit = Image.MAX_IMAGE_PIXELS  # Pillow itself only warns between 1x and 2x its limit
    if not w or not h or limit is not None and w * h > limit:
        raise MixerError(f"{name}: the image has no pixels ({w}x{h})" if not w or not h else
                         f"{name}: {w}x{h} is {w * h} pixels, more than Pillow's limit of "
                         f"{limit} (raise PIL.Image.MAX_IMAGE_PIXELS to read an image this "
                         f"large that you trust)")
    most, scale = max_reduction(w, h) if max_reduction else 1, 1
    # draft changes the image object: only ours (a file's), never the caller's
    if most >= 2 and signature is not None and img.format in ("JPEG", "MPO"):
        drafted = img.draft(img.mode, (math.ceil(w / most), math.ceil(h / most)))
        if drafted:  # the full image's box, in decoded pixels
            scale = round(w / drafted[1][2])
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: a quarter turn
        w, h = h, w
    img = _to_rgb(ImageOps.exif_transpose(img))
    if int(most / scale) >= 2:  # after _to_rgb: averaged palette indices mean nothing
        img, scale = img.reduce(int(most / scale)), scale * int(most / scale)
    img.load()  # while the file is open
    return img, scale, w, h, signature


def evaluation_box(width: int, height: int, size: int, resize: str = "crop") -> tuple:
    """preprocess's source box in a width x height picture. resize="crop": the paper's
    geometry, the shorter side resized to int(size / 0.875), then the centre size x size;
    "squash": all of it."""
    if resize == "squash":
        return 0, 0, width, height
    short = int(size / 0.875)
    new = (short, max(short, round(height * short / width))) if width <= height else \
        (max(short, round(width * short / height)), short)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    sx, sy = width / new[0], height / new[1]
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _resample(source, box, size: int, whole: bool) -> np.ndarray:
    """The box (x0, y0, x1, y1) of a uint8 RGB array or PIL image, bicubic-resampled to uint8
    (size, size, 3); whole: the box is all of the picture (one resize, as Image.resize).

    Only the pixels the filter reads are cut out and resampled (2 either side of an output
    pixel's centre, times the scale when shrinking), so the box Pillow is given (as float32)
    stays small and exact. A part is resampled one pass at a time, horizontal first, as Pillow
    before 13 resized a whole picture, so that results do not depend on Pillow's version;
    vertical first for a narrow and tall box, which spares Pillow before 13 an intermediate
    image size / width times the source."""
    Image, _ = _import_pil()
    x0, y0, x1, y1 = box
    mx = math.ceil(2 * max((x1 - x0) / size, 1)) + 1
    my = math.ceil(2 * max((y1 - y0) / size, 1)) + 1
    cols, rows = source.size if isinstance(source, Image.Image) else source.shape[1::-1]
    # libjpeg and reduce() round partial blocks up: pixels may reach a little past the box
    c0, r0 = max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my)
    c1, r1 = min(cols, math.ceil(x1) + mx), min(rows, math.ceil(y1) + my)
    if isinstance(source, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(source[r0:r1, c0:c1]))
    else:
        img = source if (c0, r0, c1, r1) == (0, 0, cols, rows) else source.crop((c0, r0, c1, r1))
    x0, y0, x1, y1 = x0 - c0, y0 - r0, x1 - c0, y1 - r0
    cols, rows = img.size
    if x1 - x0 < size < y1 - y0:
        img = img.resize((cols, size), Image.BICUBIC, box=(0, y0, cols, y1))
        img = img.resize((size, size), Image.BICUBIC, box=(x0, 0, x1, size))
    elif whole:
        img = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x1, y1))
    else:
        img = img.resize((size, rows), Image.BICUBIC, box=(x0, 0, x1, rows))
        img = img.resize((size, size), Image.BICUBIC, box=(0, y0, size, y1))
    return np.asarray(img)


def preprocess_reduction(size: int, resize: str = "crop"):
    """preprocess's max_reduction (Picture.open), size and resize checked: a picture may shrink
    until its shorter side is REDUCED_MARGIN times what the resize needs."""
    size = positive_int(size, "size")
    if size > MAX_IMAGE_SIZE:  # the output alone would be size * size * 12 bytes
        raise MixerError(f"size {size} is more than {MAX_IMAGE_SIZE} pixels a side: a Mixer "
                         f"takes images of a few hundred pixels (224, 448, ...)")
    if resize not in ("crop", "squash"):
        raise MixerError(f"resize must be 'crop' or 'squash', got {resize!r}")
    need = REDUCED_MARGIN * (int(size / 0.875) if resize == "crop" else size)
    return lambda width, height: min(width, height) / need


def preprocess(image, size: int = 224, resize: str = "crop", exact: bool = False) -> np.ndarray:
    """A path or PIL image -> float32 (size, size, 3) in [-1, 1]: decoded as Picture.open at
    preprocess_reduction (exact=True: at full resolution, bit-for-bit the reference
    preprocessing), cropped to evaluation_box, x / 127.5 - 1: Picture.evaluation's pixels."""
    reduction = preprocess_reduction(size, resize)
    img, scale, width, height, _ = _decode(image, None if exact else reduction)
    box = [v / scale for v in evaluation_box(width, height, size, resize)]
    return _resample(img, box, size, resize == "squash").astype(np.float32) / 127.5 - 1.0


def _to_rgb(img):
    """Any PIL mode as RGB: 16-bit and 32-bit integer and float modes scaled to 8 bits first."""
    Image, _ = _import_pil()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():  # float images can hold them; no 8-bit value stands for them
            raise ValueError("it holds NaN or infinite pixel values")
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # as Pillow asks (else it warns); the alpha is then dropped
    return img if img.mode == "RGB" else img.convert("RGB")


def _is_pil_image(x) -> bool:
    """Whether x is a PIL image, without importing Pillow (if it is, Pillow is imported)."""
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(x, pil.Image)


def _import_pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise MixerError(f"reading images needs Pillow: pip install pillow ({e})") from None
    return Image, ImageOps


# Mixer.classify decodes in threads (Pillow releases the GIL), AHEAD_BATCHES batches ahead of
# the model; at most 8, beyond which the model sets the pace and each holds a decoded image.
DECODE_THREADS = min(os.cpu_count() or 1, 8)
AHEAD_BATCHES = 2


def decode_ahead(images, batch_size: int, decode):
    """Batches of [(index, image, decode(image) or the MixerError it raised)] in input order.
    `images` (any iterator) is read in the calling thread as the pool needs them: memory holds
    the batch handed out and AHEAD_BATCHES more. Paths are decoded in the pool, PIL images here
    (an object the caller holds is never used by two threads). Closing the generator (or an
    exception, Ctrl-C) cancels what has not started and waits for the decodes running."""
    from concurrent.futures import Future, ThreadPoolExecutor

    def outcome(image):
        try:
            return decode(image)
        except MixerError as e:
            return e

    def submit(image):
        if isinstance(image, (str, bytes, os.PathLike)):
            return pool.submit(outcome, image)
        future = Future()
        future.set_result(outcome(image))
        return future

    numbered, pending = enumerate(images), []
    pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="mixer-decode")
    try:
        while True:
            while len(pending) <= AHEAD_BATCHES:
                chunk = list(itertools.islice(numbered, batch_size))
                if not chunk:
                    break
                pending.append([(i, image, submit(image)) for i, image in chunk])
            if not pending:
                return
            yield [(i, image, future.result()) for i, image, future in pending.pop(0)]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Pictures: the token-mixing weights, as in the paper's Figure 5.

SHOW_BLOCKS = 2  # the paper shows the first three; two keep a B/16 picture under 1000 x 500 px
SHOW_UNITS = 64  # of D_S (384 for B/16): the first 64 in kernel order, 4 rows of 16
SHOW_COLUMNS = 16  # units per row
SHOW_TILE = 56  # target side of one unit in pixels: 14x14 tokens at 4 px, 7x7 at 8 px
SHOW_PAD = 4  # pixels around the picture and between blocks
SHOW_LABEL = 14  # height of the band above each block holding its label
SHOW_GAP = 1  # pixels between units
SHOW_BACKGROUND = (128, 128, 128)  # grey: white is a weight of 0


def show_weights(model: "Mixer", path, blocks: int = SHOW_BLOCKS, units: int = SHOW_UNITS,
                 cell: int | None = None) -> tuple[int, int]:
    """The paper's Figure 5: the first token-mixing Dense of the first `blocks` blocks drawn to
    the PNG `path` (atomically); returns its (width, height). Its kernel is (S, D_S): unit u
    is drawn as the g x g map (row-major, as patches are) of its weights over the S = g x g
    patch positions, `cell` pixels each (default 56 // g, 1 to 8); blue < 0, white 0, red > 0,
    scaled to the unit's max |w|. The first `units` units (the paper shows all, paired and
    sorted by frequency), SHOW_COLUMNS a row, SHOW_GAP apart; per block a SHOW_LABEL-pixel
    label, its rows, SHOW_PAD pixels."""
    if not isinstance(model, Mixer):
        raise MixerError(f"show_weights() draws a mixer.Mixer, got {type(model).__name__}")
    blocks = min(positive_int(blocks, "blocks"), model.config.num_blocks)
    ds = model.config.tokens_mlp_dim
    units = min(positive_int(units, "units"), ds)
    g = math.isqrt(model.config.num_tokens)
    cell = max(1, min(8, SHOW_TILE // g)) if cell is None else positive_int(cell, "cell")
    tile = g * cell
    columns, rows = min(units, SHOW_COLUMNS), -(-units // SHOW_COLUMNS)
    band = SHOW_LABEL + rows * tile + (rows - 1) * SHOW_GAP + SHOW_PAD
    width = 2 * SHOW_PAD + columns * tile + (columns - 1) * SHOW_GAP
    canvas = np.empty((SHOW_PAD + blocks * band, width, 3), np.uint8)
    canvas[:] = SHOW_BACKGROUND
    for b in range(blocks):
        kernel = model.params[f"MixerBlock_{b}/token_mixing/Dense_0/kernel"]
        kernel = model._host_quantized(kernel).dequantize() if isinstance(kernel, dict) \
            else model._ops.numpy(kernel)  # a quantised kernel is drawn dequantised
        kernel = np.asarray(kernel, np.float64)[:, :units]  # (S, units)
        scale = np.abs(kernel).max(axis=0)
        t = (kernel / np.where(scale > 0, scale, 1)).T.reshape(units, g, g)  # token i*g+j at (i, j)
        rgb = np.stack([1 - np.maximum(-t, 0), 1 - np.abs(t), 1 - np.maximum(t, 0)], axis=-1)
        maps = np.rint(255 * rgb).astype(np.uint8)  # (units, g, g, 3): blue, white, red
        maps = maps.repeat(cell, axis=1).repeat(cell, axis=2)  # nearest-neighbour upscaling
        for u in range(units):
            y = SHOW_PAD + b * band + SHOW_LABEL + (u // SHOW_COLUMNS) * (tile + SHOW_GAP)
            x = SHOW_PAD + (u % SHOW_COLUMNS) * (tile + SHOW_GAP)
            canvas[y:y + tile, x:x + tile] = maps[u]
    Image, _ = _import_pil()
    from PIL import ImageDraw
    img = Image.fromarray(canvas)
    for b in range(blocks):
        ImageDraw.Draw(img).text(
            (SHOW_PAD, SHOW_PAD + b * band + 1), f"block {b}: token-mixing units 0-{units - 1} "
            f"of {ds}, {g}x{g} patches, blue < 0 < red, each unit scaled to its max |w|",
            fill=(0, 0, 0))
    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return img.size


# --------------------------------------------------------------------------------------------
# Command line.


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad argument is one line, status 2, as other bad input is, instead of
    argparse's usage block: "PROG: error: MESSAGE (PROG --help shows the usage)"."""

    def error(self, message):
        _fail(self.prog, f"error: {printable(message)} ({self.prog} --help shows the usage)", 2)
        sys.exit(2)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PROGRESS_MIN_IMAGES = 32  # fewer finish before progress would tell anything


def build_parser() -> argparse.ArgumentParser:
    """The `mixer` command's arguments."""
    parser = ArgumentParser(
        prog="mixer", description="Classify images with an MLP-Mixer (top-k classes per image).")
    add = parser.add_argument
    add("images", nargs="*", metavar="IMAGE",
        help=f"image files, or folders: their image files (by extension: "
             f"{' '.join(e[1:] for e in IMAGE_EXTENSIONS)}), searched recursively, hidden ones "
             f"skipped, in sorted order")
    add("--weights", help="a .safetensors file (from convert.py or train.py)")
    add("--variant", choices=sorted(VARIANTS),
        help="use the official checkpoint of this variant (downloaded once)")
    add("--source", choices=["gsam", "sam", "imagenet1k", "imagenet21k"],
        help="which official training run to use with --variant (default: gsam where released, "
             "else imagenet1k)")
    add("--backend", choices=sorted(BACKENDS), help="default: MIXER_BACKEND, else chosen by the "
                                                    "machine")
    add("--dtype", choices=COMPUTE_DTYPES, default="float32",
        help="compute dtype; float16/bfloat16 need --backend mlx or tinygrad and pay off on GPUs")
    add("--quantize", choices=sorted(QUANTIZED_DTYPES),
        help=f"quantise the weights as they are loaded (groups of {DEFAULT_GROUP_SIZE}): int8 or "
             f"int4 kernels in memory, computed a layer at a time in float32; a file saved "
             f"quantised needs no flag")
    add("--top-k", type=int, default=5)
    add("--resize", choices=["crop", "squash"],
        help="crop: shorter side to size/0.875, centre crop (default); squash: whole image to "
             "size x size")
    add("--exact-decode", action="store_true",
        help="decode every image at full resolution (bit-for-bit reference preprocessing; large "
             "photos are otherwise decoded at reduced scale, ~5x faster)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON document")
    output.add_argument("--jsonl", action="store_true",
                        help="print one JSON object per image and line, as each is ready")
    pictures = parser.add_argument_group("pictures")
    pictures.add_argument("--show-weights", metavar="OUT.png",
                          help="instead of classifying: draw the first token-mixing layer of the "
                               "first blocks, each hidden unit as a map over the patch positions "
                               "(the paper's Figure 5), to this PNG file")
    pictures.add_argument("--blocks", type=int,
                          help=f"with --show-weights: how many blocks (default {SHOW_BLOCKS})")
    pictures.add_argument("--units", type=int,
                          help=f"with --show-weights: units per block (default {SHOW_UNITS})")
    return parser


def run_cli(images, weights=None, variant=None, source=None, backend=None, top_k=5, resize=None,
            json=False, dtype="float32", jsonl=False, exact_decode=False, quantize=None):
    """The CLI as a function: the text it prints on stdout (unreadable files among several are
    reported on stderr and left out, as there)."""
    chunks = []
    _classify_cli(images, weights, variant, source, backend, top_k, resize, json, dtype, jsonl,
                  exact_decode, chunks.append, quantize=quantize)
    return "".join(chunks).rstrip("\n")


_json_dumps = json.dumps  # run_cli's `json` argument shadows the module


def _check_model_args(weights, variant, source):
    """--weights or --variant, one of them; --source only with --variant."""
    if weights is not None and variant is not None:
        raise MixerError("give --weights FILE or --variant NAME, not both")
    if source is not None and variant is None:
        raise MixerError("--source picks an official checkpoint: use it with --variant")
    if weights is None and variant is None:
        raise MixerError("give --weights FILE.safetensors, or --variant (e.g. --variant B/16) to "
                         "download the official checkpoint once")


def _cli_model(weights, variant, source, backend, dtype, quantize=None):
    """The model that --weights or --variant names, with the CLI's notes on stderr (stdout
    stays the result: --json safe)."""
    if weights is not None:
        return load(weights, backend=backend, dtype=dtype, quantize=quantize)
    checkpoint = official_checkpoint(variant, source)
    fresh = not os.path.exists(cache_path(checkpoint))
    bar = _Progress(sys.stderr, name=checkpoint)
    try:
        model = pretrained(variant, source, backend=backend, progress=bar if fresh else None,
                           dtype=dtype, quantize=quantize)
    finally:
        bar.close()
    if fresh:
        print(f"mixer: converted {checkpoint} to {cache_path(checkpoint)}", file=sys.stderr)
    if model.labels is None:
        print(f"mixer: note: label files not found (looked in {' and '.join(labels_dirs())}) "
              f"nor downloadable from {_env_url('MIXER_LABELS_URL', LABELS_URL, 'the label')}: "
              f"printing class indices", file=sys.stderr)
    return model


def _classify_cli(images, weights, variant, source, backend, top_k, resize, json, dtype, jsonl,
                  exact_decode, write, stderr=None, quantize=None) -> int:
    """Each image's result to write() (a str ending in a newline) as soon as it is ready, in
    input order; returns how many inputs were skipped (unreadable files, folders without
    images: a line each on stderr). An unreadable single file, or no image at all, is an error."""
    stderr = stderr or sys.stderr
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise MixerError(f"--top-k must be at least 1, got {top_k}")
    _check_model_args(weights, variant, source)
    paths, problems = _image_paths(images)
    if not paths:
        raise MixerError(problems[0] if len(problems) == 1 else
                         f"no image files in {len(problems)} folders: {'; '.join(problems)}")
    # one file asked for: unreadable, it is an error (nothing printed), as it always was
    single = len(images) == 1 and not os.path.isdir(images[0])
    model = _cli_model(weights, variant, source, backend, dtype, quantize)
    progress = _Progress(stderr, total=len(paths)) if (
        len(paths) > PROGRESS_MIN_IMAGES and stderr.isatty()) else None

    def warn(line):
        if progress:
            progress.clear()
        print(f"mixer: {line}", file=stderr, flush=True)

    for problem in problems:
        warn(f"skipped {problem}")
    skipped, opened, finished = len(problems), False, False
    Image, _ = _import_pil()
    with warnings.catch_warnings(), contextlib.closing(model._classify_each(
            paths, top_k, 32, resize, exact_decode)) as results:
        # Pillow warns (two lines on stderr) about an image of 1-2x its pixel limit and refuses
        # larger ones: here both are the same one-line error (Picture.open). The filter is the
        # process's (the decoding threads' too), so this is done here, not in the library.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            for done, (_, path, top) in enumerate(results, 1):
                if isinstance(top, MixerError):
                    if single:
                        raise top
                    skipped += 1
                    warn(f"skipped {top}")
                if progress:
                    progress.clear()
                if json:
                    # the document streamed as json.dumps(list, indent=2) writes it: "[", the
                    # entries, "]" (below, also when an error or Ctrl-C ends the run early)
                    entry = _json_dumps(_entry(path, top), indent=2, allow_nan=False)
                    write(("[\n" if not opened else ",\n") + "  " + entry.replace("\n", "\n  "))
                    opened = True
                elif jsonl:
                    write(_json_dumps(_entry(path, top), allow_nan=False) + "\n")
                elif not isinstance(top, MixerError):
                    # file and label names come from outside: no escape reaches the terminal
                    write("\n".join([printable(path)] + [
                        f"  {p:7.2%}  {printable(label) if label is not None else f'class {i}'}"
                        for i, label, p in top]) + "\n")
                if progress:
                    progress(done)
            finished = True
        finally:
            if json and (opened or finished):
                write("\n]\n" if opened else "[]\n")
            if progress:
                progress.close()
    return skipped


def _entry(path, top) -> dict:
    """One image in --json and --jsonl (ensure_ascii: control characters escaped)."""
    if isinstance(top, MixerError):
        return {"image": path, "error": str(top)}
    return {"image": path, "top_k": [{"index": i, "label": label, "probability": p}
                                     for i, label, p in top]}


def _image_paths(arguments) -> tuple[list, list]:
    """(paths, problems): file arguments as given; a folder's image files by extension, found
    recursively without following links (no loop), hidden ones skipped, sorted. A problem is a
    line for a folder without images or one that cannot be listed."""
    paths, problems = [], []
    for argument in arguments:
        if not os.path.isdir(argument):
            paths.append(argument)
            continue
        found, folders = [], [argument]
        while folders:  # a stack, not os.walk, which recurses (a folder 1000 deep fails)
            try:
                with os.scandir(folder := folders.pop()) as listing:
                    entries = [e for e in listing if not e.name.startswith(".")]
            except OSError as error:
                problems.append(f"{printable(os.fsdecode(folder))}: cannot list the folder "
                                f"({error.strerror})")
                continue
            folders += [e.path for e in entries if e.is_dir() and not e.is_symlink()]
            found += [e.path for e in entries if not e.is_dir()
                      and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            problems.append(f"{printable(os.fsdecode(argument))}: no image files in this folder "
                            f"or below (looked for {', '.join(IMAGE_EXTENSIONS)}; hidden files "
                            f"and folders are skipped)")
        paths += sorted(found)
    return paths, problems


class _Progress:
    """Progress on stderr, of `total` images (progress(done)) or of a download named `name`
    (progress(done, total)). On a terminal, a line redrawn in place at most 10 times a second
    (clear() while other lines are written); in a log, a download's line at its start, then
    one at most every `interval` seconds: alive, yet short."""

    def __init__(self, stream, total=None, name=None, interval=30.0, clock=time.monotonic):
        self.stream, self.tty, self.total, self.name = stream, stream.isatty(), total, name
        self.interval, self.clock = interval, clock
        self.start = None if name else (clock(), 0)  # (time, amount) that rates are measured from
        self.shown, self.drawn, self.cleared = None, "", False

    def __call__(self, done: int, total: int | None = None):
        now, total = self.clock(), total if self.name else self.total
        if self.start is None or done < self.start[1]:  # a download's start, or a restart at 0
            self.start = (now, done)
        rate = (done - self.start[1]) / (now - self.start[0]) if now > self.start[0] else 0.0
        if self.name is None:
            figures = f"{done}/{total} images, {rate:.1f} images/s"
        else:
            figures = f"{done / 2**20:.1f}" + (f"/{total / 2**20:.1f}" if total else "") + " MiB"
            if rate > 0:
                figures += f", {format_size(rate)}/s"
            if rate > 0 and total and total > done:
                figures += f", {_duration((total - done) / rate)} left"
        if not self.tty:
            if self.name and self.shown is None:
                size = f" ({total / 2**20:.1f} MiB)" if total else ""
                self._line(now, f"mixer: downloading {self.name}{size}")
            elif self.name and now - self.shown >= self.interval:
                self._line(now, f"mixer: downloading {self.name}: {figures}")
        elif self.shown is not None and now - self.shown < 0.1 and (total is None or done < total):
            if self.cleared:
                self._draw(self.drawn)  # what clear() took away, as it was
        else:
            filled = min(30, 30 * done // total) if total else 0
            self._draw(f"{self.name} [{'#' * filled}{'.' * (30 - filled)}] {figures}"
                       if self.name else figures)
            self.shown = now

    def _line(self, now, text):
        print(text, file=self.stream, flush=True)
        self.shown = now

    def _draw(self, line):
        if line != self.drawn or self.cleared:
            # spaces over what a longer previous frame left at the end of the line
            pad = 0 if self.cleared else len(self.drawn) - len(line)
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
        self.drawn, self.cleared = line, False

    def clear(self):
        if self.drawn and not self.cleared:
            self.stream.write("\r" + " " * len(self.drawn) + "\r")
            self.stream.flush()
            self.cleared = True

    def close(self):
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def format_size(n: float) -> str:
    """A byte count (or a rate's) for people: 512 B, 64 KiB, 1.5 MiB."""
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`signum`), raised like Ctrl-C by run_main so that the same clean-up
    runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_main(prog: str, body) -> int:
    """Runs a program's body() -> exit status, never a traceback: a MixerError or OSError is one
    line and 2; Ctrl-C one line and 130; SIGTERM and SIGHUP (handlers installed for the call
    only) the same clean-up and 128 + their number; a closed stdout (`| head`) quietly 141; a
    bug one line and 1 (MIXER_DEBUG=1 shows the traceback)."""
    def terminate(signum, frame):
        raise Terminated(signum)
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (getattr(signal, name, None) for name in ("SIGTERM", "SIGHUP")):
            if sig is not None:
                old[sig] = signal.signal(sig, terminate)
    try:
        with escaping_output():
            return body()
    except MixerError as e:
        return _fail(prog, f"error: {e}", 2)
    except Terminated as e:
        return _fail(prog, f"stopped by {signal.Signals(e.signum).name}", 128 + e.signum)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except BrokenPipeError:  # the reader of stdout went away: nothing left to say to it
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(prog, f"error: {where}{e.strerror or e}", 2)
    except MemoryError:
        return _fail(prog, "error: out of memory (a smaller batch or model may fit)", 2)
    except Exception as e:  # noqa: BLE001 -- a bug: one line, the traceback on request
        if os.environ.get("MIXER_DEBUG"):
            raise
        return _fail(prog, f"internal error: {type(e).__name__}: {e} (please report it; "
                           f"MIXER_DEBUG=1 shows the traceback)", 1)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def escaping_output():
    """sys.stdout and sys.stderr writing what their encoding cannot hold (a label or a file
    name on an ASCII or cp1252 console) as backslash escapes (caf\\xe9) instead of failing,
    for the block; their error handlers restored afterwards."""
    streams = [s for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")]
    before = [s.errors for s in streams]
    for stream in streams:
        stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        for stream, errors in zip(streams, before):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
                stream.reconfigure(errors=errors)


def _fail(prog: str, message: str, status: int) -> int:
    with contextlib.suppress(OSError, ValueError), escaping_output():
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return status


def _show_weights_cli(args, out, blocks, units) -> str:
    """--show-weights: the picture written to `out`; returns the line that says so."""
    if args.quantize:
        raise MixerError("--quantize goes with classifying images, not --show-weights")
    if args.images:
        raise MixerError("--show-weights draws the weights; give no IMAGE with it")
    if args.weights is None and args.variant is None:
        raise MixerError("--show-weights needs --weights FILE.safetensors or --variant NAME")
    _check_model_args(args.weights, args.variant, args.source)
    # validated before a large model is loaded: a mistyped number is a quick error
    blocks = positive_int(SHOW_BLOCKS if blocks is None else blocks, "--blocks")
    units = positive_int(SHOW_UNITS if units is None else units, "--units")
    # the weights are only read: numpy needs no start-up
    model = _cli_model(args.weights, args.variant, args.source, args.backend or "numpy",
                       args.dtype)
    width, height = show_weights(model, out, blocks=blocks, units=units)
    return f"wrote {printable(os.fspath(out))} ({width}x{height})\n"


def main(argv=None) -> int:
    """The `mixer` command: classify images, or draw the weights (--show-weights)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    picture = [args.show_weights, args.blocks, args.units]
    del args.show_weights, args.blocks, args.units
    if picture[0] is None and not args.images:
        parser.error("the following arguments are required: IMAGE (or --show-weights OUT.png)")

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()  # each result as it is ready; flushed here: a closed pipe is caught

    def body():
        if picture[0] is not None:
            write(_show_weights_cli(args, *picture))
            return 0
        if picture[1] is not None or picture[2] is not None:
            raise MixerError("--blocks and --units go with --show-weights")
        return 2 if _classify_cli(**vars(args), write=write) else 0
    return run_main("mixer", body)


if __name__ == "__main__":
    sys.exit(main())
