"""MLP-Mixer for MLX, tinygrad and numpy, in one file.

Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021, arXiv:2105.01601.

The model is written once (`forward` below) over a tiny backend shim with three implementations:
  mlx       Apple-silicon GPU (CPU elsewhere); differentiable, used by train.py
  tinygrad  whatever device DEV selects (CUDA, NV, CL, METAL, CPU); differentiable
  numpy     inference anywhere numpy runs; no other dependency

Weights are safetensors files whose tensor names are the official flax checkpoint keys
("stem/kernel", "MixerBlock_0/token_mixing/Dense_0/kernel", ...), in the official layouts
(Dense kernels (in, out), stem kernel HWIO). The file's metadata carries the config, the label
names and the preprocessing, so a weights file is all a user needs.

Copy this file into any project: it needs numpy plus the backend you use (Pillow for images).

    import mixer
    model = mixer.load("weights/Mixer-B_16-gsam.safetensors")
    print(model.classify(["cat.jpg"]))

    python mixer.py cat.jpg --weights weights/Mixer-B_16-gsam.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------------
# Numerics that decide parity with the official (flax) outputs.

LN_EPS = 1e-6  # flax nn.LayerNorm default; MLX and tinygrad default to 1e-5
GELU_C = math.sqrt(2.0 / math.pi)  # flax nn.gelu is the tanh approximation (approximate=True)
FORMAT_VERSION = "1"  # bump when the metadata layout changes


class MixerError(Exception):
    """A user-facing problem (bad file, bad image, bad argument): the message says what to do."""


# --------------------------------------------------------------------------------------------
# Config and variants (paper Table 1). Field names are the official code's.


@dataclass(frozen=True)
class MixerConfig:
    patch_size: int  # P: stem conv kernel = stride
    hidden_dim: int  # C: channels per token
    num_blocks: int  # N: Mixer blocks
    tokens_mlp_dim: int  # D_S: hidden width of the token-mixing MLP
    channels_mlp_dim: int  # D_C: hidden width of the channel-mixing MLP
    num_classes: int | None = 1000  # None: no head, the model returns pre-logits
    image_size: int = 224  # fixes S, the token-mixing input size: (image_size / P) ** 2

    def __post_init__(self):
        for field in ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim",
                      "channels_mlp_dim", "image_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MixerError(f"MixerConfig.{field} must be a positive int, got {value!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            raise MixerError(f"MixerConfig.num_classes must be a positive int or None, "
                             f"got {self.num_classes!r}")
        if self.image_size % self.patch_size:
            raise MixerError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def num_tokens(self) -> int:  # S
        return (self.image_size // self.patch_size) ** 2

    @property
    def variant(self) -> str | None:
        """The paper's name ("B/16") when the architecture is one of VARIANTS, else None."""
        for name, v in VARIANTS.items():
            if dataclasses.replace(v, num_classes=self.num_classes,
                                   image_size=self.image_size) == self:
                return name
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MixerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not names.issuperset(d) or "patch_size" not in d:
            raise MixerError(f"bad Mixer config {d!r}: expected the keys {sorted(names)}")
        return cls(**d)


def _variant(p, c, n, ds, dc):
    return MixerConfig(patch_size=p, hidden_dim=c, num_blocks=n, tokens_mlp_dim=ds,
                       channels_mlp_dim=dc)


VARIANTS = {
    "S/32": _variant(32, 512, 8, 256, 2048),
    "S/16": _variant(16, 512, 8, 256, 2048),
    "S/8": _variant(8, 512, 8, 256, 2048),
    "B/32": _variant(32, 768, 12, 384, 3072),
    "B/16": _variant(16, 768, 12, 384, 3072),
    "L/32": _variant(32, 1024, 24, 512, 4096),
    "L/16": _variant(16, 1024, 24, 512, 4096),
    "H/14": _variant(14, 1280, 32, 640, 5120),
}


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
    """Read the architecture off official-named arrays (MIXER.md §3). Validation is separate."""
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
    return MixerConfig(patch_size=stem[0], hidden_dim=stem[3], num_blocks=num_blocks,
                       tokens_mlp_dim=tok[1], channels_mlp_dim=ch[1],
                       num_classes=None if head is None else head[-1],
                       image_size=side * stem[0])


def check_shapes(config: MixerConfig, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Strict: every expected tensor present with its exact shape, nothing extra."""
    expected = param_shapes(config)
    missing = [k for k in expected if k not in shapes]
    extra = sorted(k for k in shapes if k not in expected)
    if missing:
        raise MixerError(f"{what}: tensor {missing[0]!r} is missing (expected shape "
                         f"{expected[missing[0]]}; {len(missing)} missing in all)")
    if extra:
        raise MixerError(f"{what}: unexpected tensor {extra[0]!r} with shape {shapes[extra[0]]} "
                         f"({len(extra)} extra in all)")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise MixerError(f"{what}: tensor {k!r} has shape {tuple(shapes[k])}, "
                             f"expected {shape}")


# --------------------------------------------------------------------------------------------
# The backend shim: every primitive the model uses, on one screen.
#   asarray(np) -> backend array      numpy(a) -> np.ndarray
#   dense(x, kernel, bias)            x @ kernel + bias over the last axis
#   dense_tokens(x, kernel, bias)     the same Dense over axis 1: (B, S, C) -> (B, D, C)
#   layer_norm(x, scale, bias)        over the last axis, eps LN_EPS
#   gelu(x)                           tanh approximation
#   patchify(x, p)                    (B, H, W, 3) -> (B, H/p * W/p, p * p * 3), row-major
#   compile(fn)                       the backend's compiled version of fn(params, x)
# Arithmetic (+), reshape and mean(axis) are the arrays' own, the same on all three.


def gelu_tanh(x, tanh):
    return 0.5 * x * (1.0 + tanh(GELU_C * (x + 0.044715 * (x * x * x))))


class NumpyOps:
    """Inference with numpy alone: one GEMM per Dense over the whole batch, element-wise work
    in place, token mixing as kernel.T @ x so no activation is ever transposed."""
    name = "numpy"

    def asarray(self, a):
        return np.asarray(a, dtype=np.float32)

    def numpy(self, a):
        return np.asarray(a)

    def dense(self, x, kernel, bias):
        y = x @ kernel
        y += bias
        return y

    def dense_tokens(self, x, kernel, bias):
        y = np.matmul(kernel.T, x)  # (D, S) @ (B, S, C) -> (B, D, C)
        y += bias[:, None]
        return y

    def layer_norm(self, x, scale, bias):
        mean = x.mean(axis=-1, keepdims=True)
        y = x - mean
        var = np.einsum("...c,...c->...", y, y)[..., None]
        var *= 1.0 / x.shape[-1]
        var += LN_EPS
        np.sqrt(var, out=var)
        y /= var
        y *= scale
        y += bias
        return y

    def gelu(self, x):
        t = x * x
        t *= 0.044715
        t += 1.0
        t *= x
        t *= GELU_C
        np.tanh(t, out=t)
        t += 1.0
        t *= 0.5
        t *= x
        return t

    def patchify(self, x, p):
        return _patchify(x, p, lambda a, axes: a.transpose(axes))

    def compile(self, fn):
        return fn


class MlxOps:
    name = "mlx"

    def __init__(self):
        self.mx = _import_mlx()

    def asarray(self, a):
        return self.mx.array(np.asarray(a, dtype=np.float32))

    def numpy(self, a):
        return np.asarray(a if a.dtype == self.mx.float32 else a.astype(self.mx.float32))

    def dense(self, x, kernel, bias):
        return self.mx.addmm(bias, x, kernel) if x.ndim == 2 else x @ kernel + bias

    def dense_tokens(self, x, kernel, bias):
        return self.mx.swapaxes(kernel, 0, 1) @ x + bias[:, None]

    def layer_norm(self, x, scale, bias):
        return self.mx.fast.layer_norm(x, scale, bias, LN_EPS)

    def gelu(self, x):
        return gelu_tanh(x, self.mx.tanh)

    def patchify(self, x, p):
        return _patchify(x, p, self.mx.transpose)

    def compile(self, fn):
        return self.mx.compile(fn)


class TinygradOps:
    name = "tinygrad"

    def __init__(self):
        self.tg = _import_tinygrad()

    def asarray(self, a):
        return self.tg.Tensor(np.ascontiguousarray(a, dtype=np.float32)).realize()

    def numpy(self, a):
        return a.numpy()

    def dense(self, x, kernel, bias):
        return x @ kernel + bias

    def dense_tokens(self, x, kernel, bias):
        return kernel.transpose(0, 1) @ x + bias.reshape(-1, 1)

    def layer_norm(self, x, scale, bias):
        return x.layernorm(axis=-1, eps=LN_EPS) * scale + bias

    def gelu(self, x):
        return gelu_tanh(x, lambda t: t.tanh())

    def patchify(self, x, p):
        return _patchify(x, p, lambda a, axes: a.permute(axes))

    def compile(self, fn):
        # TinyJit replays the captured kernels; it needs fixed input shapes, so one JIT per shape.
        jits = {}

        def run(params, x):
            if x.shape not in jits:
                jits[x.shape] = self.tg.TinyJit(lambda p, t: fn(p, t).realize())
            return jits[x.shape](params, x.realize())
        return run


def _patchify(x, p, transpose):
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c)
    x = transpose(x, (0, 1, 3, 2, 4, 5))  # (B, h, w, row-in-patch, col-in-patch, rgb)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


BACKENDS = {"mlx": MlxOps, "tinygrad": TinygradOps, "numpy": NumpyOps}


def _import_mlx():
    if "mlx.core" not in sys.modules and platform.system() == "Linux":
        _preload_openblas()
    try:
        import mlx.core as mx
    except ImportError as e:
        raise MixerError(f"the mlx backend needs MLX: pip install mlx  (or \"mlx[cpu]\" on "
                         f"Linux, \"mlx[cuda13]\" for NVIDIA GPUs) ({e})") from None
    return mx


def _preload_openblas():
    """MLX's Linux CPU wheel bundles a reference BLAS, ~40x slower than OpenBLAS for float32
    GEMM. Loading the system's OpenBLAS into the global namespace first makes MLX's sgemm calls
    resolve to it. MIXER_NO_OPENBLAS=1 turns this off."""
    if os.environ.get("MIXER_NO_OPENBLAS"):
        return
    import ctypes
    import ctypes.util
    candidates = [ctypes.util.find_library("openblas"), "libopenblas.so.0",
                  "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
                  "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"]
    for path in filter(None, candidates):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def _import_tinygrad():
    try:
        import tinygrad
    except ImportError as e:
        raise MixerError(f"the tinygrad backend needs tinygrad: pip install tinygrad ({e})") \
            from None
    return tinygrad


def default_backend() -> str:
    """The backend that `backend=None` picks.

    MIXER_BACKEND overrides. Otherwise: MLX on Apple silicon (its GPU); tinygrad when DEV names
    an accelerator (CUDA, NV, AMD, METAL, CL, ...); else numpy, which on CPUs is the fastest of
    the three (its wheel ships an optimised multi-threaded BLAS; see bench.py).
    """
    choice = os.environ.get("MIXER_BACKEND")
    if choice:
        if choice not in BACKENDS:
            raise MixerError(f"MIXER_BACKEND={choice!r}: expected one of {sorted(BACKENDS)}")
        return choice
    if sys.platform == "darwin" and platform.machine() == "arm64" and _installed("mlx"):
        return "mlx"
    dev = os.environ.get("DEV", "").split(":")[0].upper()
    if dev and dev not in ("CPU", "CLANG", "LLVM", "PYTHON") and _installed("tinygrad"):
        return "tinygrad"
    return "numpy"


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def get_ops(backend: str | None):
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise MixerError(f"unknown backend {backend!r}: expected one of {sorted(BACKENDS)}")
    return BACKENDS[backend]()


# --------------------------------------------------------------------------------------------
# The model, written once. `params` maps the official names to backend arrays.


def mixer_block(ops, params, prefix, x):
    p = lambda name: params[prefix + name]  # noqa: E731
    # token mixing: an MLP over the S tokens, shared across channels. (B, S, C) -> (B, S, C)
    y = ops.layer_norm(x, p("LayerNorm_0/scale"), p("LayerNorm_0/bias"))
    y = ops.dense_tokens(y, p("token_mixing/Dense_0/kernel"), p("token_mixing/Dense_0/bias"))
    y = ops.dense_tokens(ops.gelu(y), p("token_mixing/Dense_1/kernel"),
                         p("token_mixing/Dense_1/bias"))
    x = x + y
    # channel mixing: an MLP over the C channels, shared across tokens.
    y = ops.layer_norm(x, p("LayerNorm_1/scale"), p("LayerNorm_1/bias"))
    y = ops.dense(y, p("channel_mixing/Dense_0/kernel"), p("channel_mixing/Dense_0/bias"))
    y = ops.dense(ops.gelu(y), p("channel_mixing/Dense_1/kernel"), p("channel_mixing/Dense_1/bias"))
    return x + y


def forward(ops, params, x, num_blocks: int, head: bool = True):
    """x: (B, H, W, 3) in [-1, 1] -> logits (B, num_classes), or pre-logits (B, C) if not head."""
    kernel = params["stem/kernel"]
    p = kernel.shape[0]
    # stem: a P x P conv with stride P == patchify + Dense with the HWIO kernel flattened.
    x = ops.dense(ops.patchify(x, p), kernel.reshape(p * p * 3, kernel.shape[3]),
                  params["stem/bias"])  # (B, S, C)
    for i in range(num_blocks):
        x = mixer_block(ops, params, f"MixerBlock_{i}/", x)
    x = ops.layer_norm(x, params["pre_head_layer_norm/scale"], params["pre_head_layer_norm/bias"])
    x = x.mean(axis=1)  # (B, C) pre-logits
    if head:
        x = ops.dense(x, params["head/kernel"], params["head/bias"])
    return x


# --------------------------------------------------------------------------------------------
# Weights: safetensors, read and written here so that this file needs numpy only.
# Layout: 8-byte little-endian header length, a JSON header, then the raw little-endian data.

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_HEADER = 100 * 2**20


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-maps a safetensors file: returns (name -> read-only array view, metadata).

    BF16 tensors come back as uint16 views of the raw bits; `as_float32` converts them.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, _MAX_HEADER):
                raise MixerError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MixerError(f"{path}: not a safetensors file (header is not JSON)") from None
    except IsADirectoryError:
        raise MixerError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as e:
        raise MixerError(f"cannot read weights {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise MixerError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_size else np.empty(0)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise MixerError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise MixerError(f"{path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16")
        nbytes = _DTYPES[dtype].itemsize * math.prod(shape)
        if not (0 <= begin <= end <= data_size and end - begin == nbytes):
            raise MixerError(f"{path}: tensor {name!r} lies outside the file or has the wrong "
                             f"size: the file is truncated or corrupt")
        tensors[name] = buf[begin:end].view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            tensors[name] = tensors[name].view(_Bfloat16Bits)
    return tensors, metadata


class _Bfloat16Bits(np.ndarray):
    """Marks a uint16 array that holds bfloat16 bit patterns."""


def as_float32(a: np.ndarray) -> np.ndarray:
    """float32 view or copy of a tensor from read_safetensors (F32 stays a zero-copy view)."""
    if isinstance(a, _Bfloat16Bits):
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN kept NaN)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(a), 0x7FC0, rounded).astype(np.uint16)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                      dtype: str = "float32") -> None:
    """Writes atomically: a temporary file in the same folder, renamed into place when complete."""
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype)
    if code is None:
        raise MixerError(f"unsupported dtype {dtype!r}: expected float32, float16 or bfloat16")
    arrays, header, offset = [], {"__metadata__": metadata}, 0
    for name, a in tensors.items():
        if code == "BF16":
            a = to_bfloat16_bits(a)
        else:
            a = np.ascontiguousarray(a, dtype=_DTYPES[code])
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(memoryview(a).cast("B"))


class atomic_write:
    """`with atomic_write(path) as f:` writes to a temporary file beside `path` and renames it
    into place only when the block ends without an exception (Ctrl-C and full disks included)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                                            suffix="-" + os.path.basename(self.path))
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
        except OSError as e:
            kind = type(e)
            raise MixerError(f"cannot write {self.path}: {e.strerror or e}") from None
        finally:
            if kind is not None and os.path.exists(self.tmp):
                os.unlink(self.tmp)
        if isinstance(value, OSError):
            raise MixerError(f"cannot write {self.path}: {value.strerror or value}") from None
        return False


# --------------------------------------------------------------------------------------------
# The user-facing model.

DEFAULT_PREPROCESSING = {"resize": "crop", "crop_pct": 0.875, "interpolation": "bicubic",
                         "scale": "x / 127.5 - 1"}


class Mixer:
    """A Mixer with its weights on one backend. Call it on float32 NHWC numpy images in [-1, 1]."""

    def __init__(self, config: MixerConfig, params: dict, backend: str | None = None,
                 labels: list[str] | None = None, preprocessing: dict | None = None):
        check_shapes(config, {k: tuple(v.shape) for k, v in params.items()}, "weights")
        if labels is not None and (config.num_classes is None or len(labels) != config.num_classes):
            raise MixerError(f"{len(labels)} labels given for a head with "
                             f"{config.num_classes} classes")
        self.config = config
        self.labels = list(labels) if labels is not None else None
        self.preprocessing = dict(preprocessing or DEFAULT_PREPROCESSING)
        self._ops = get_ops(backend)
        self.backend = self._ops.name
        self.params = {k: v if self._is_backend_array(v) else self._ops.asarray(as_float32(v))
                       for k, v in params.items()}
        n = config.num_blocks
        self._logits = self._ops.compile(lambda p, x: forward(self._ops, p, x, n, head=True))
        self._features = self._ops.compile(lambda p, x: forward(self._ops, p, x, n, head=False))

    def _is_backend_array(self, v) -> bool:
        return not isinstance(v, np.ndarray) or self.backend == "numpy" and v.dtype == np.float32

    def _run(self, fn, x):
        x = np.asarray(x)
        if x.ndim == 3:
            raise MixerError(f"expected a batch (B, H, W, 3), got one image of shape {x.shape}: "
                             f"use x[None]")
        size = self.config.image_size
        if x.ndim != 4 or x.shape[3] != 3:
            raise MixerError(f"expected images of shape (B, H, W, 3), got {x.shape}")
        if x.shape[1:3] != (size, size):
            p = self.config.patch_size
            hint = ("" if x.shape[1] % p == 0 and x.shape[2] % p == 0 else
                    f" (and {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p})")
            raise MixerError(f"this model takes {size}x{size} images, got "
                             f"{x.shape[1]}x{x.shape[2]}{hint}; use mixer.preprocess(image, "
                             f"size={size}) or Mixer.at_resolution for a new size")
        return self._ops.numpy(fn(self.params, self._ops.asarray(x)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, num_classes) for float32 images (B, H, W, 3) scaled to [-1, 1]."""
        if self.config.num_classes is None:
            raise MixerError("this model has no head (num_classes=None); use Mixer.features")
        return self._run(self._logits, x)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Pre-logits (B, hidden_dim): the token mean after the pre-head LayerNorm."""
        return self._run(self._features, x)

    def classify(self, images, top_k: int = 5, batch_size: int = 32):
        """For each image (path, PIL image, or an array batch from preprocess) a list of
        (index, label or None, probability), most probable first."""
        if isinstance(images, np.ndarray):
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            images = list(images)
            size, resize = self.config.image_size, self.preprocessing.get("resize", "crop")
            batches = [np.stack([preprocess(im, size=size, resize=resize)
                                 for im in images[i:i + batch_size]])
                       for i in range(0, len(images), batch_size)]
        results = []
        for batch in batches:
            logits = self(batch).astype(np.float64)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            k = min(top_k, probs.shape[1])
            for row in probs:
                top = np.argsort(-row, kind="stable")[:k]
                results.append([(int(i), self.labels[i] if self.labels else None, float(row[i]))
                                for i in top])
        return results

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: self._ops.numpy(v) for k, v in self.params.items()}

    def save(self, path: str, dtype: str = "float32", source: str | None = None) -> None:
        metadata = {"format": "mixer", "mixer.format_version": FORMAT_VERSION,
                    "mixer.config": json.dumps(self.config.to_dict()),
                    "mixer.preprocessing": json.dumps(self.preprocessing)}
        if self.labels is not None:
            metadata["mixer.labels"] = json.dumps(self.labels)
        if source:
            metadata["mixer.source"] = source
        write_safetensors(path, self.numpy_params(), metadata, dtype=dtype)

    def __repr__(self):
        name = self.config.variant or "custom"
        return (f"Mixer({name}, {self.config.image_size}px, classes={self.config.num_classes}, "
                f"backend={self.backend})")


def load(path: str, backend: str | None = None) -> Mixer:
    """Loads a mixer safetensors file onto `backend` (None: `default_backend()`).

    Strict: any missing, extra or misshapen tensor is an error that names it. Files without our
    metadata (e.g. written by another tool with the official names) have their config read off
    the tensor shapes. float32 tensors are memory-mapped by the numpy backend (no copy).
    """
    tensors, metadata = read_safetensors(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if "mixer.config" in metadata:
        try:
            config = MixerConfig.from_dict(json.loads(metadata["mixer.config"]))
        except (json.JSONDecodeError, TypeError) as e:
            raise MixerError(f"{path}: unreadable mixer.config metadata ({e})") from None
    else:
        config = infer_config(shapes)
    check_shapes(config, shapes, str(path))
    labels = _json_metadata(metadata, "mixer.labels", path)
    preprocessing = _json_metadata(metadata, "mixer.preprocessing", path)
    return Mixer(config, tensors, backend=backend, labels=labels, preprocessing=preprocessing)


def _json_metadata(metadata, key, path):
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise MixerError(f"{path}: metadata {key!r} is not valid JSON") from None


def init_params(config: MixerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The official initialisation: lecun-normal kernels (truncated normal, fan-in), zero biases,
    LayerNorm scale 1, and a zero head."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("/scale"):
            params[name] = np.ones(shape, np.float32)
        elif name.endswith("/bias") or name == "head/kernel":
            params[name] = np.zeros(shape, np.float32)
        else:
            fan_in = math.prod(shape[:-1])
            # flax lecun_normal: truncated at 2 std, std corrected for the truncation
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            w = rng.standard_normal(shape)
            while (bad := np.abs(w) > 2).any():
                w[bad] = rng.standard_normal(int(bad.sum()))
            params[name] = (w * std).astype(np.float32)
    return params


def init(config: MixerConfig, seed: int = 0, backend: str | None = None) -> Mixer:
    """A Mixer with freshly initialised weights (as the official code), no file needed."""
    return Mixer(config, init_params(config, seed), backend=backend)


# --------------------------------------------------------------------------------------------
# Images.


def preprocess(image, size: int = 224, resize: str = "crop") -> np.ndarray:
    """A path or PIL image -> float32 (size, size, 3) in [-1, 1].

    Any mode becomes RGB (16-bit and float modes rescaled to 8 bits), after EXIF orientation.
    resize="crop": the paper's evaluation geometry, shorter side to int(size / 0.875) with
    bicubic resampling, then a centre crop. resize="squash": the whole image to size x size.
    """
    Image, ImageOps = _import_pil()
    if resize not in ("crop", "squash"):
        raise MixerError(f"resize must be 'crop' or 'squash', got {resize!r}")
    name = image if isinstance(image, (str, os.PathLike)) else "image"
    try:
        img = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if resize == "squash":
            img = img.resize((size, size), Image.BICUBIC)
        else:
            short = int(size / 0.875)
            w, h = img.size
            if w <= h:
                new = (short, max(short, round(h * short / w)))
            else:
                new = (max(short, round(w * short / h)), short)
            img = img.resize(new, Image.BICUBIC)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
        pixels = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise MixerError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise MixerError(f"{name}: is a directory, not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MixerError(f"{name}: cannot read the image ({e})") from None
    return pixels / 127.5 - 1.0


def _to_rgb(img):
    Image, _ = _import_pil()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _import_pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise MixerError(f"reading images needs Pillow: pip install pillow ({e})") from None
    return Image, ImageOps


# --------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixer", description="Classify images with an MLP-Mixer (top-k classes per image).")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--weights", help="a .safetensors file (from convert.py or train.py)")
    parser.add_argument("--variant", choices=sorted(VARIANTS),
                        help="use the official checkpoint of this variant (downloaded once)")
    parser.add_argument("--source", choices=["gsam", "sam", "imagenet1k", "imagenet21k"],
                        help="which official training run to use with --variant")
    parser.add_argument("--backend", choices=sorted(BACKENDS),
                        help="default: MIXER_BACKEND, else chosen by the machine")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--resize", choices=["crop", "squash"],
                        help="crop: shorter side to size/0.875, centre crop (default); "
                             "squash: whole image to size x size")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def run_cli(images, weights=None, variant=None, source=None, backend=None, top_k=5, resize=None,
            json=False):
    """The CLI as a function: returns the text it prints."""
    if top_k < 1:
        raise MixerError(f"--top-k must be at least 1, got {top_k}")
    if weights is None:
        raise MixerError("give --weights FILE.safetensors (convert an official .npz with "
                         "convert.py)")
    model = load(weights, backend=backend)
    resize = resize or model.preprocessing.get("resize", "crop")
    batch = np.stack([preprocess(path, size=model.config.image_size, resize=resize)
                      for path in images])
    results = model.classify(batch, top_k=top_k)
    if json:
        doc = [{"image": path, "top_k": [{"index": i, "label": label, "probability": p}
                                         for i, label, p in top]}
               for path, top in zip(images, results)]
        return _json_dumps(doc, indent=2)
    lines = []
    for path, top in zip(images, results):
        lines.append(path)
        lines += [f"  {p:7.2%}  {label if label is not None else 'class ' + str(i)}"
                  for i, label, p in top]
    return "\n".join(lines)


_json_dumps = json.dumps  # run_cli's `json` argument shadows the module


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run_cli(**vars(args)))
    except MixerError as e:
        print(f"mixer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
