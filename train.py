"""Fine-tune an MLP-Mixer on a folder of images on MLX or tinygrad, fit a linear probe on its
frozen features, or score a weights file (README: Fine-tuning, Linear probe, Evaluating).

The recipe is the paper's (arXiv:2105.01601 §3 and the official vision_transformer configs):
momentum SGD 0.9, gradient clipping at global norm 1, linear warmup then cosine decay, no weight
decay, softmax cross-entropy, a zero-initialised head, random resized crop + horizontal flip.

    python train.py DATA_DIR --weights weights/gsam-Mixer-S_32.safetensors --steps 2000
    python train.py DATA_DIR --variant S/32 --epochs 30 --batch-size 64   # from scratch
    python train.py --resume runs/20250101-120000                          # after Ctrl-C
    python train.py DATA_DIR --weights W.safetensors --linear-probe        # closed-form head
    python train.py DATA_DIR --weights W.safetensors --eval-only           # top-1, confusion
    mlx.launch -n 2 --backend ring -- python train.py DATA_DIR ...         # data-parallel

The data order and the augmentation are pure functions of (seed, position in the sample
stream), so the step number is the whole loader state and a resumed run repeats the
uninterrupted one. The file reads: the recipe, the backend adapters, Trainer, memory planning,
data, the model to start from, the run directory, the training loop, the probe, charts,
evaluation, the command line.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import signal
import stat
import sys
import threading
import time

if __name__ == "__main__":
    def _interrupted_while_starting(kind, value, tb, report=sys.excepthook):
        """Ctrl-C during the imports below: one line and status 130, as at any later moment."""
        if issubclass(kind, KeyboardInterrupt):
            print("train: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        report(kind, value, tb)
    sys.excepthook = _interrupted_while_starting

import numpy as np  # noqa: E402 -- after the start-up handler above

import mixer  # noqa: E402
from mixer import MixerError  # noqa: E402

try:
    import fcntl
except ImportError:  # Windows has no flock: run directories are not locked there (see RunDir)
    fcntl = None

MOMENTUM = 0.9  # official: optax.sgd(momentum=0.9), i.e. m = g + 0.9 m; p -= lr * m
CLIP_NORM = 1.0  # official: optax.clip_by_global_norm(1.0)
STATE_FILE = "state.safetensors"
STATE_VERSION = 1
LOCK_FILE = "train.lock"  # locked by the process that runs in RUN_DIR, for as long as it runs
WEIGHTS_FILES = ("best.safetensors", "last.safetensors")

# Settings of a run; None in train()'s signature means "not given" (so --resume can tell an
# explicit change from a default).
DEFAULTS = {
    "backend": None,  # mlx when installed, else tinygrad
    "image_size": None,  # the checkpoint's, or 224 for random init
    "steps": None,  # the schedule's length: --steps, or from --epochs
    "epochs": None,
    "batch_size": 512,  # official fine-tuning batch
    "accum_steps": None,  # chosen from the memory budget (plan_micro_batches)
    "memory_budget": None,  # GiB; None: the device's (memory_budget)
    "dtype": "float32",  # compute dtype; weights, momentum and the update stay float32
    "lr": 0.03,  # official base lr (grid 0.003-0.06)
    "warmup": None,  # official 500 steps, capped at 5% of a shorter run
    "val_fraction": None,  # 0.1 when DATA_DIR has no val/
    "seed": 0,
    "eval_every": None,  # 10 evaluations per run
    "log_every": 10,
    "workers": None,  # decoding threads: one per core, at most 8
    "decode_cache_mib": 1024,  # decoded images kept in memory between epochs (DecodeCache)
}
# Settings that --resume may change because they do not change the result (the micro-batch only
# by float rounding: the gradient is the mean over the same images).
RESUME_MAY_CHANGE = {"data_dir", "backend", "workers", "log_every", "decode_cache_mib",
                     "accum_steps", "memory_budget"}


# --------------------------------------------------------------------------------------------
# The recipe, written once. `xp` is a backend adapter below (numpy-like functions).


def get_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """The official schedule: linear warmup, then cosine decay to 0. Steps count from 1, so the
    last one has lr 0."""
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def sgd_momentum(xp, params: dict, momentum: dict, grads: dict, lr):
    """One optimizer step: clip to global norm CLIP_NORM, heavy-ball momentum, no weight decay.
    Returns (params, momentum, the gradient's global norm before clipping)."""
    norm = xp.sqrt(sum((g * g).sum() for g in grads.values()))
    scale = CLIP_NORM / xp.maximum(norm, CLIP_NORM)
    momentum = {k: MOMENTUM * momentum[k] + scale * g for k, g in grads.items()}
    params = {k: params[k] - lr * momentum[k] for k in params}
    return params, momentum, norm


def cross_entropy(xp, logits, onehot):
    """Softmax cross-entropy, mean over the batch. Labels come one-hot (B, num_classes), so that
    the loss is the same arithmetic on every backend (no gather)."""
    return (xp.logsumexp(logits) - (logits * onehot).sum(axis=-1)).mean()


# --------------------------------------------------------------------------------------------
# Backend adapters: what the recipe and Trainer need beyond mixer.py's inference shim (`ops`):
#   sqrt, maximum, zeros_like, where, logsumexp (last axis), cast(x, dtype)   math
#   value_and_grad(f)      f(params, *args) -> loss  =>  (loss, grads dict)
#   assign(tree, key, v)   store v as tree[key] inside a compiled function
#   compile(fn, state)     fn compiled; fn reads and assigns the arrays in `state`
#   mean_over_ranks(tree), sum_over_ranks(number)   data-parallel all-reduce (identity on one)
#   scalar(v), sync(tree), start(tree)   a (1,) float32 input; wait for / begin computing arrays
#   images(pixels)         uint8 (B, H, W, 3) -> the model's input, normalised on the device
#   split_batch(n, fn)     [fn(lo, hi) per part] on separate cores, or None: run it whole


@functools.cache
def _mlx_gelu_keeping_input():
    """mixer.MlxOps's GELU with its gradient written out, so that the backward keeps only x
    (autodiff through its exp rewrite keeps more; README, Memory)."""
    mx = mixer.import_mlx()

    @mx.custom_function
    def gelu(x):
        return mixer.MlxOps.gelu(x)

    @gelu.vjp
    def gelu_vjp(x, cotangent, output):
        # d/dx x s(2 GELU_C u) = s + x s (1 - s) 2 GELU_C (1 + 3 0.044715 x^2), s the sigmoid.
        # Other primitives (square, sigmoid) than the forward's: mx.compile merges equal
        # subexpressions, which would keep the forward's x^3 and exp for this backward.
        x2 = mx.square(x)
        s = mx.sigmoid((2.0 * mixer.GELU_C) * x * (1.0 + 0.044715 * x2))
        return cotangent * (s + x * s * (1.0 - s) * (2.0 * mixer.GELU_C)
                            * (1.0 + 3 * 0.044715 * x2))

    return gelu


class MlxTrainingOps(mixer.MlxOps):
    """mixer.MlxOps for training: the same forward, a GELU whose backward keeps only its input.
    Inference keeps MlxOps's own GELU: mx.compile does not fuse across a custom function."""

    @staticmethod
    def gelu(x):
        return _mlx_gelu_keeping_input()(x)


def _device_images(xp, x):
    """Normalised images, in the compute dtype: mixer.preprocess's arithmetic on the device."""
    x = x / 127.5 - 1.0
    return x if xp.ops.dtype == "float32" else xp.cast(x, xp.ops.dtype)


class MlxBackend:
    """The adapter on MLX (the table above), data-parallel under mlx.launch."""
    name = "mlx"
    compiled_keeps_buffers = False  # MLX frees a compiled function's intermediates

    def __init__(self):
        mx = self.mx = mixer.import_mlx()
        self.ops = MlxTrainingOps()
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()
        self.sqrt, self.maximum, self.zeros_like, self.where = (mx.sqrt, mx.maximum,
                                                                mx.zeros_like, mx.where)
        self.value_and_grad, self.sync, self.start = mx.value_and_grad, mx.eval, mx.async_eval

    def logsumexp(self, x):
        return self.mx.logsumexp(x, axis=-1)

    def assign(self, tree, key, value):
        tree[key] = value

    def compile(self, fn, state):
        return self.mx.compile(fn, inputs=state, outputs=state)

    def mean_over_ranks(self, tree):
        if self.size == 1:
            return tree
        import mlx.nn
        return mlx.nn.average_gradients(tree, group=self.group)  # all_sum / size, batched

    def sum_over_ranks(self, value: float) -> float:
        if self.size == 1:
            return value
        return self.mx.distributed.all_sum(self.mx.array(value), group=self.group).item()

    def scalar(self, value):
        return self.mx.array([value], dtype=self.mx.float32)

    def cast(self, x, dtype: str):
        return x.astype(getattr(self.mx, dtype))

    def images(self, pixels: np.ndarray):
        return _device_images(self, self.mx.array(pixels).astype(self.mx.float32))

    def split_batch(self, batch, fn):
        return self.ops.split_batch(batch, fn)


class TinygradBackend:
    """The adapter on tinygrad (the table above), one process."""
    name = "tinygrad"
    rank, size = 0, 1
    compiled_keeps_buffers = True  # a TinyJit holds its intermediates (Trainer.end_evaluation)
    sqrt = staticmethod(lambda x: x.sqrt())
    maximum = staticmethod(lambda x, y: x.maximum(y))
    zeros_like = staticmethod(lambda x: x.zeros_like())
    logsumexp = staticmethod(lambda x: x.logsumexp(axis=-1))
    where = staticmethod(lambda condition, x, y: condition.where(x, y))
    mean_over_ranks = sum_over_ranks = staticmethod(lambda value: value)
    split_batch = staticmethod(lambda batch, fn: None)  # no streams to run parts side by side

    def __init__(self):
        if int(os.environ.get("MLX_RANK", "0")) or "MLX_HOSTFILE" in os.environ:
            raise MixerError("data-parallel training (mlx.launch) needs --backend mlx")
        self.tg = mixer.import_tinygrad()
        self.ops = mixer.TinygradOps()

    def value_and_grad(self, fn):
        def run(params, *args):
            loss = fn(params, *args)
            return loss, dict(zip(params, loss.gradient(*params.values())))
        return run

    def assign(self, tree, key, value):
        tree[key].assign(value)

    def compile(self, fn, state):
        # TinyJit replays the kernels of one call; the assigned state lives in fixed buffers.
        leaves = _leaves(state)

        def run(*args):
            out = fn(*args)
            self.tg.Tensor.realize(*leaves, *_leaves(out))
            return out
        return self.tg.TinyJit(run)

    def scalar(self, value):
        # (1,), not 0-d: TinyJit refuses 0-d inputs made from numpy
        return self.tg.Tensor(np.array([value], np.float32)).realize()

    def cast(self, x, dtype: str):
        return x.cast(getattr(self.tg.dtypes, dtype))

    def sync(self, tree):
        self.tg.Tensor.realize(*_leaves(tree))

    # realize() queues the kernels on a GPU without waiting for them: only reading a value
    # (update's .item()) waits, so the next upload already overlaps the step in flight
    start = sync

    def images(self, pixels: np.ndarray):
        # tinygrad divides by multiplying with the reciprocal: within one ulp (tested)
        x = self.tg.Tensor(np.array(pixels, np.uint8, order="C")).float()
        return _device_images(self, x).realize()


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [] if tree is None else [tree]


TRAIN_BACKENDS = {"mlx": MlxBackend, "tinygrad": TinygradBackend}


def get_backend(name: str | None):
    """The training adapter of backend `name` (None: default_train_backend())."""
    name = default_train_backend() if name is None else name
    if name not in TRAIN_BACKENDS:
        raise MixerError(f"cannot train on backend {name!r} (no autograd): use one of "
                         f"{sorted(TRAIN_BACKENDS)}")
    return TRAIN_BACKENDS[name]()


def default_train_backend() -> str:
    """The backend that --backend's absence picks: MIXER_BACKEND; MLX with a GPU; tinygrad when
    DEV names an accelerator; else MLX on the CPU (faster than tinygrad's), else tinygrad."""
    env = os.environ.get("MIXER_BACKEND")
    if env in TRAIN_BACKENDS:
        return env
    if mixer.mlx_has_gpu():
        return "mlx"
    if mixer.tinygrad_accelerator():
        return "tinygrad"
    for name in ("mlx", "tinygrad"):
        if mixer.installed(name):
            return name
    raise MixerError('training needs MLX or tinygrad, and neither is installed: pip install '
                     '"mlx[cpu]" (Linux) or mlx (macOS), or pip install tinygrad')


# --------------------------------------------------------------------------------------------
# The optimisation state and the two compiled halves of a step, written once.

# float16 loss scaling (the usual dynamic scheme): the first scale, the good steps after which it
# doubles, and the scale below which an overflowing gradient overflows unscaled (Run.train_step
# stops the run then)
LOSS_SCALE_START = 2.0 ** 15
LOSS_SCALE_GROWTH = 1000
LOSS_SCALE_MIN = 1.0


class Trainer:
    """Params, momentum and gradient sums on one backend: accumulate() adds a micro-batch's
    gradient, update() takes one SGD step on their mean. In mixed precision the forward and
    backward run on a bfloat16/float16 copy of the params, the rest stays float32; float16
    scales the loss and skips a step whose gradient is not finite (`skipped`), halving the scale.
    """

    def __init__(self, xp, config: mixer.MixerConfig, params: dict, momentum: dict | None = None,
                 accum_steps: int = 1, dtype: str = "float32", loss_scale: tuple | None = None):
        self.xp, self.config, self.dtype = xp, config, dtype
        scaled = dtype == "float16"
        # (scale, good steps since the last change), saved with the state for an exact resume
        self.loss_scale, self.good_steps = loss_scale or (LOSS_SCALE_START if scaled else 1.0, 0)
        self.skipped = False
        asarray = xp.ops.asarray
        self.state = {
            "params": {k: asarray(v) for k, v in params.items()},
            "momentum": {k: asarray(momentum[k] if momentum else np.zeros_like(v))
                         for k, v in params.items()},
            "grad_sum": {k: asarray(np.zeros_like(v)) for k, v in params.items()},
            "loss_sum": xp.scalar(0.0),
        }
        state, n = self.state, config.num_blocks

        def model(p, x):
            if dtype == "float32":
                return mixer.forward(xp.ops, p, x, n)
            p = {k: xp.cast(v, dtype) for k, v in p.items()}
            return xp.cast(mixer.forward(xp.ops, p, xp.cast(x, dtype), n), "float32")
        # weight: the part's share of the micro-batch, so that the parts' losses sum to the
        # micro-batch's; scale: the loss scale (both 1.0, exact, by default)
        loss_and_grads = xp.value_and_grad(lambda p, x, onehot, weight, scale: (cross_entropy(
            xp, model(p, x), onehot) * weight * scale).sum())

        def accumulate(x, onehot, weight, scale):
            loss, grads = loss_and_grads(state["params"], x, onehot, weight, scale)
            for k, g in grads.items():
                xp.assign(state["grad_sum"], k, state["grad_sum"][k] + g)
            xp.assign(state, "loss_sum", state["loss_sum"] + loss)

        def update(lr, scale):
            sums = xp.mean_over_ranks({**state["grad_sum"], "": state["loss_sum"]})
            loss = sums.pop("") / (accum_steps * scale)
            grads = {k: g / (accum_steps * scale) for k, g in sums.items()}
            params, momentum, norm = sgd_momentum(xp, state["params"], state["momentum"],
                                                  grads, lr)
            if scaled:  # keep the old params and momentum when the gradient overflowed
                finite = norm < float("inf")  # False for inf and NaN
                params = {k: xp.where(finite, v, state["params"][k]) for k, v in params.items()}
                momentum = {k: xp.where(finite, v, state["momentum"][k])
                            for k, v in momentum.items()}
            for k in params:
                xp.assign(state["params"], k, params[k])
                xp.assign(state["momentum"], k, momentum[k])
                xp.assign(state["grad_sum"], k, xp.zeros_like(grads[k]))
            xp.assign(state, "loss_sum", xp.zeros_like(state["loss_sum"]))
            return loss, norm

        self._accumulate = xp.compile(accumulate, state)
        self._update = xp.compile(update, state)
        self._forward = lambda p, x: mixer.forward(xp.ops, p, x, n)
        self._logits = xp.ops.compile(self._forward)
        self._running = None  # the arrays of the micro-batch in flight (accumulate)

    def accumulate(self, x: np.ndarray, onehot: np.ndarray) -> None:
        """Adds the gradient of x (uint8 pixels, or float32 images in [-1, 1]). Returns once x
        is queued and the micro-batch before it has finished: the caller prepares the next one
        while this one computes, and at most two are in memory."""
        xp, n = self.xp, len(x)
        upload = xp.images if x.dtype == np.uint8 else xp.ops.asarray

        def part(lo, hi):
            self._accumulate(upload(x[lo:hi]), xp.ops.asarray(onehot[lo:hi]),
                             xp.scalar((hi - lo) / n), xp.scalar(self.loss_scale))
            return self.state  # what split_batch evaluates: every part's sums
        if xp.split_batch(n, part) is None:
            part(0, n)
        running = _leaves(self.state)
        xp.start(running)
        if self._running is not None:
            xp.sync(self._running)
        self._running = running

    def update(self, lr: float) -> tuple[float, float]:
        """One SGD step on the sums at learning rate lr -> (mean loss, gradient norm)."""
        loss, norm = self._update(self.xp.scalar(lr), self.xp.scalar(self.loss_scale))
        self.xp.sync(self.state)
        self._running = None
        loss, norm = float(loss.item()), float(norm.item())
        if self.dtype == "float16":
            self.skipped = not math.isfinite(norm)
            self.good_steps = 0 if self.skipped else self.good_steps + 1
            if self.skipped:
                self.loss_scale /= 2
            elif self.good_steps == LOSS_SCALE_GROWTH:
                self.loss_scale, self.good_steps = self.loss_scale * 2, 0
        return loss, norm

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The current model's logits of float32 images x, in float32 (the master weights)."""
        return self.xp.ops.numpy(self._logits(self.state["params"], self.xp.ops.asarray(x)))

    def end_evaluation(self) -> None:
        """Frees what the compiled forward holds on backends whose compiled functions keep their
        buffers (TinyJit), so that training does not hold them beside its own on a small GPU."""
        if self.xp.compiled_keeps_buffers:
            self._logits = self.xp.ops.compile(self._forward)

    def numpy(self, part: str) -> dict[str, np.ndarray]:
        """The state's "params" or "momentum" as numpy arrays."""
        return {k: self.xp.ops.numpy(v) for k, v in self.state[part].items()}


# --------------------------------------------------------------------------------------------
# Memory: the micro-batch is chosen from a memory budget, and --batch-size reached by accumulation.

# Activation bytes per image of a training micro-batch: ACTIVATION_FACTOR floats per float of
# what a block's backward must keep (4 (S, C) arrays, each MLP's GELU input and output), for the
# blocks plus one (the backward's temporaries), and one per pixel value; fitted to MLX's peak
# memory, ACTIVATION_MARGIN covering the spread (README, Memory).
ACTIVATION_FACTOR = 1.15
ACTIVATION_MARGIN = 1.25
CPU_MEMORY_SHARE = 0.25  # of available memory: the rest stays with the page cache and others
PROCESS_BYTES = 256 * 2**20  # the process itself, its decoding threads and compiled kernels
MAX_MEMORY_BUDGET = 2**20  # GiB (a pebibyte): more than any device; 1e300 overflowed


def activation_bytes(config: mixer.MixerConfig, dtype: str = "float32") -> int:
    """Estimated bytes each image adds to a training micro-batch's peak, margin included."""
    s, c = config.num_tokens, config.hidden_dim
    block = 4 * s * c + 2 * c * config.tokens_mlp_dim + 2 * s * config.channels_mlp_dim
    floats = ACTIVATION_FACTOR * (config.num_blocks + 1) * block + 3 * config.image_size ** 2
    return math.ceil(floats * np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize
                     * ACTIVATION_MARGIN)


def fixed_bytes(config: mixer.MixerConfig, dtype: str, share: int, decode_cache: int) -> int:
    """Bytes a training process holds whatever its micro-batch: float32 params, momentum,
    gradient sums and gradients (and a half-precision copy), the loader's three batches of this
    process's `share` of uint8 pixels, the decode cache and the process itself."""
    weights = mixer.num_params(config) * (16 + (2 if dtype != "float32" else 0))
    batches = 3 * share * config.image_size ** 2 * 3
    return weights + batches + decode_cache + PROCESS_BYTES


def choose_micro_batch(per_image: int, fixed: int, budget: int, batch_size: int,
                       processes: int = 1) -> tuple[int, int]:
    """-> (micro-batch, accumulation steps): the largest micro-batch whose estimated peak fits
    in budget and divides each process's share of batch_size exactly."""
    if batch_size % processes:
        raise MixerError(f"--batch-size {batch_size} must be a multiple of the {processes} "
                         f"processes")
    share = batch_size // processes
    fits = (budget - fixed) // per_image
    if fits < 1:
        gib = mixer.format_gib
        raise MixerError(f"training needs about {gib(fixed + per_image)} for one image per "
                         f"micro-batch ({gib(fixed)} fixed + {mixer.format_size(per_image)} per "
                         f"image), more than the {gib(budget)} budget: give a larger "
                         f"--memory-budget if the device has it, a smaller --decode-cache-mib "
                         f"(counted in the fixed part), a smaller model or --image-size, or "
                         f"--dtype bfloat16")
    micro = max(m for m in range(1, min(fits, share) + 1) if share % m == 0)
    return micro, share // micro


def memory_budget(xp) -> tuple[int, str]:
    """-> (bytes, where they come from): an Apple GPU's recommended working set, a CUDA GPU's
    free memory (as MLX reports them), else CPU_MEMORY_SHARE of the available memory."""
    if xp.name == "mlx" and xp.mx.default_device() != xp.mx.cpu:
        info = xp.mx.device_info()
        for key, what in (("max_recommended_working_set_size", "the GPU's recommended working "
                           "set"), ("free_memory", "the GPU's free memory")):
            if info.get(key):
                return int(info[key]), what
    available = _available_memory()
    if available is None:
        raise MixerError("cannot tell how much memory this machine has: give --memory-budget GIB")
    return int(CPU_MEMORY_SHARE * available), f"{CPU_MEMORY_SHARE:.0%} of available memory"


def _available_memory() -> int | None:
    """Linux's MemAvailable (which counts the page cache it would drop), else the free pages
    POSIX reports, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def plan_micro_batches(xp, config, s: dict) -> tuple[int, int, str]:
    """-> (micro-batch, accumulation steps, the line that says why): chosen from the budget, or
    --accum-steps as given (warned about when it exceeds the budget: the estimate has a margin)."""
    batch_size, processes = s["batch_size"], xp.size
    per_image = activation_bytes(config, s["dtype"])
    fixed = fixed_bytes(config, s["dtype"], batch_size // processes,
                        s["decode_cache_mib"] * 2**20)
    if s["memory_budget"] is not None:
        budget, source = int(s["memory_budget"] * 2**30), "--memory-budget"
    else:
        budget, source = memory_budget(xp)
    if s["accum_steps"] is None:
        micro, accum = choose_micro_batch(per_image, fixed, budget, batch_size, processes)
        how = "chosen"
    else:
        accum = s["accum_steps"]
        if batch_size % (accum * processes):
            raise MixerError(f"--batch-size {batch_size} must be a multiple of --accum-steps "
                             f"{accum} x {processes} process{'es' * (processes > 1)}")
        micro, how = batch_size // (accum * processes), "--accum-steps"
    peak, gib = fixed + micro * per_image, mixer.format_gib
    line = (f"micro-batch {micro} x {accum} accumulation steps"
            + (f" x {processes} processes" if processes > 1 else "")
            + f" = {batch_size} per step ({how}): ~{gib(peak)} estimated of a {gib(budget)} "
              f"budget ({source})")
    if peak > budget:
        line += ("; WARNING: more than the budget, a smaller micro-batch (leave out "
                 "--accum-steps) would fit")
    return micro, accum, line


# --------------------------------------------------------------------------------------------
# Data: an image-folder dataset, decoded by a thread pool (Pillow releases the GIL).


@dataclasses.dataclass(frozen=True)
class Split:
    """The images of a split and their class indices."""
    files: list[str]
    labels: np.ndarray  # int, index into classes


def scan(data_dir: str, val_fraction: float | None, seed: int, pool, say):
    """-> (classes, train Split, val Split or None). Unreadable files are reported and skipped."""
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    if not os.path.isdir(train_dir):
        raise MixerError(f"{train_dir} not found: expected DATA_DIR/train/<class>/<image> "
                         f"(and optionally DATA_DIR/val/<class>/<image>)")
    classes = _folders(train_dir)
    bad_name = next((name for name in classes if not _is_text(name)), None)
    if bad_name is not None:
        raise MixerError(f"{os.path.join(train_dir, bad_name)!r}: a class folder name that is "
                         f"not valid UTF-8; rename it (folder names become the model's labels)")
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no class folders"
        raise MixerError(f"{train_dir}: found {found}; a classifier needs at least 2 classes, "
                         f"one folder of images each")
    train = _scan_split(train_dir, classes, pool, say, require_all=True)
    if os.path.isdir(val_dir):
        if val_fraction:
            raise MixerError(f"{data_dir} has a val/ folder: --val-fraction would be ignored; "
                             f"drop it or remove val/")
        extra = sorted(set(_folders(val_dir)) - set(classes))
        if extra:
            raise MixerError(f"{val_dir}/{extra[0]} is not a class of {train_dir} "
                             f"({len(extra)} such folders)")
        val = _scan_split(val_dir, classes, pool, say, require_all=False)
        if not val.files:  # found now, not at the first evaluation
            raise MixerError(f"{val_dir} holds no readable images: add some, or remove val/ "
                             f"(then --val-fraction of train/ is held out)")
        return classes, train, val
    fraction = 0.1 if val_fraction is None else val_fraction
    if not 0 <= fraction < 1:
        raise MixerError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return classes, train, None
    # hold out the same fraction of every class, chosen by the seed
    rng = np.random.default_rng([seed, 2])
    is_val = np.zeros(len(train.files), bool)
    for c in range(len(classes)):
        members = np.flatnonzero(train.labels == c)
        take = min(len(members) - 1, round(fraction * len(members)))
        is_val[rng.permutation(members)[:take]] = True
    if not is_val.any():
        say(f"too few images to hold out {fraction:g} of each class: no validation set")
        return classes, train, None
    return classes, _pick(train, ~is_val), _pick(train, is_val)


def _pick(split: Split, mask: np.ndarray) -> Split:
    return Split([f for f, m in zip(split.files, mask) if m], split.labels[mask])


def _scan_split(folder, classes, pool, say, require_all):
    files, labels = _labelled_files(folder, {name: c for c, name in enumerate(classes)})
    chunks = [files[i:i + 256] for i in range(0, len(files), 256)]  # not 1M futures at once
    problems = [p for chunk in pool.map(lambda c: [_probe(f) for f in c], chunks) for p in chunk]
    bad = [(f, p) for f, p in zip(files, problems) if p]
    if bad:
        shown = "; ".join(f"{f}: {p}" for f, p in bad[:3])
        say(f"skipping {len(bad)} unreadable file{'s' * (len(bad) > 1)} in {folder} ({shown}"
            f"{'; ...' if len(bad) > 3 else ''})")
    keep = np.array([not p for p in problems], bool)
    split = _pick(Split(files, np.array(labels, dtype=np.int64)), keep)
    missing = [name for c, name in enumerate(classes) if not (split.labels == c).any()]
    if require_all and missing:
        raise MixerError(f"{os.path.join(folder, missing[0])} has no readable images: add "
                         f"some or remove the folder")
    return split


def _listdir(folder: str) -> list[str]:
    """The sorted names in `folder`; a folder that cannot be listed is a one-line error."""
    try:
        return sorted(os.listdir(folder))
    except OSError as e:
        raise MixerError(f"cannot list {folder}: {e.strerror or e} (fix its permissions, or "
                         f"move it out of DATA_DIR)") from None


def _labelled_files(folder: str, classes: dict) -> tuple[list[str], list[int]]:
    """The files of the class folders {name: class index} in `folder` (sorted, hidden ones left
    out) and their labels."""
    files, labels = [], []
    for name, c in classes.items():
        class_dir = os.path.join(folder, name)
        names = _listdir(class_dir) if os.path.isdir(class_dir) else []
        paths = [os.path.join(class_dir, n) for n in names
                 if not n.startswith(".") and os.path.isfile(os.path.join(class_dir, n))]
        files += paths
        labels += [c] * len(paths)
    return files, labels


def _folders(folder: str) -> list[str]:
    """The sorted sub-folders of `folder`, hidden ones left out."""
    return [d for d in _listdir(folder)
            if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))]


def _is_text(name: str) -> bool:
    """False for a file name that is not valid UTF-8 (os.listdir gives it as lone surrogates)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _probe(path) -> str | None:
    """Why Pillow cannot open `path` (reading the header only), or None."""
    from PIL import Image
    try:
        with mixer.open_regular(path, what="an image") as f, Image.open(f):
            return None
    except MixerError as e:  # not a regular file (a FIFO would block), or gone
        return str(e).removeprefix(f"{path}: ")  # the caller names the file
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or \
            type(e).__name__

CROP_SCALE = (0.08, 1.0)  # inception crops: the share of the image's area they cover
CROP_RATIO = (3 / 4, 4 / 3)  # and their aspect ratio (width / height)


def inception_crop(width: int, height: int, rng, scale=CROP_SCALE, ratio=CROP_RATIO):
    """A random box covering `scale` of the area with aspect ratio in `ratio` (log-uniform),
    as in Inception training; the whole image, cropped to the nearest ratio, if 10 tries fail."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w = min(width, round(height * ratio[1]))
    h = min(height, round(width / ratio[0]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def largest_reduction(width: int, height: int, size: int) -> float:
    """By how much (per side) a width x height image may be shrunk before inception_crop cuts
    it while every crop it can draw keeps at least `size` pixels on each side (below 1: some
    crops have fewer even at full resolution, and the image is not shrunk): mixer.Picture's
    max_reduction for augmented training.

    The narrowest crops: CROP_SCALE[0] of the area at the extreme aspect ratio, that is
    round(sqrt(0.08 * 3/4 * area)) pixels on their short side; or, when inception_crop's ten
    tries fail (very elongated images), its centred fallback, as wide as the image's shorter
    side at least."""
    narrowest = math.sqrt(CROP_SCALE[0] * width * height * min(CROP_RATIO[0], 1 / CROP_RATIO[1]))
    return min(round(narrowest), width, height) / size


class DecodeCache:
    """Decoded images kept in this process's memory, so that later epochs and evaluations do
    not decode the same files again. Nothing is written to disk: the cache lives and dies with
    the run, each process of a data-parallel run has its own, and there is nothing to clean up
    or to invalidate between runs.

    Each entry holds the file's signature (mixer.file_signature: size, modification and change
    times, inode) as it was read: a file changed since is decoded again, and its old entry
    dropped. At most `budget` bytes of arrays are kept; once full, new images are not added
    (the order is shuffled every epoch, so any policy hits about the share that fits; this one
    never throws away what it paid to decode). Thread-safe.
    """

    def __init__(self, budget: int):
        self.budget, self.used, self.refused = budget, 0, 0
        self._entries = {}  # key -> (signature, value, nbytes)
        self._lock = threading.Lock()

    def get(self, key, path: str):
        """The value stored under `key` if `path` is still the file it was read from, else
        None."""
        try:
            signature = mixer.file_signature(path)
        except OSError:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] != signature:
                del self._entries[key]
                self.used -= entry[2]
                return None
            return entry[1]

    def put(self, key, signature: tuple, value, nbytes: int) -> None:
        """Keeps `value` (read from a file with this signature) if it fits in the budget."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old[2]
            if self.used + nbytes <= self.budget:
                self._entries[key] = (signature, value, nbytes)
                self.used += nbytes
            elif self.budget:
                self.refused += 1


class Loader:
    """Global batches from the infinite stream of training samples.

    Stream position p is sample perm_e[p mod N] of epoch e = p // N, where perm_e is a
    permutation seeded by (seed, 0, e); its augmentation draws from a generator seeded by
    (seed, 1, p), in the coordinates of the full-resolution upright image whatever the scale
    it is decoded at. So step k's batch depends only on k: resuming needs no loader state, and
    the result depends neither on which thread decodes what nor on what the cache holds.
    """

    def __init__(self, split: Split, num_classes: int, image_size: int, resize: str,
                 augment: bool, seed: int, pool, say, cache: DecodeCache | None = None):
        self.split, self.num_classes, self.size = split, num_classes, image_size
        self.resize, self.augment, self.seed = resize, augment, seed
        self.pool, self.say, self.failed = pool, say, set()
        self.cache = cache or DecodeCache(0)
        self._told_full = False
        self._epoch, self._perm = None, None  # the permutation of the latest epoch asked for

    def sample_index(self, position: int) -> int:
        n = len(self.split.files)
        epoch = position // n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
        return int(self._perm[position % n])

    def decode(self, path: str, position: int):
        """float32 (size, size, 3) in [-1, 1], or None if the file cannot be decoded: pixels()
        as the model sees it, with mixer.preprocess's arithmetic."""
        pixels = self.pixels(path, position)
        return None if pixels is None else pixels.astype(np.float32) / 127.5 - 1.0

    def pixels(self, path: str, position: int):
        """uint8 RGB (size, size, 3), or None if the file cannot be decoded: what batches()
        hands out, a quarter of float32's bytes to stack and move; the trainer normalises on
        the device (Trainer.accumulate). Augmented: an inception crop of the picture, decoded
        once at the largest reduction that keeps every crop's pixels, and a coin-flip mirror;
        else mixer.preprocess's pixels."""
        if not self.augment:
            return preprocessed(path, self.size, self.resize, self.cache)
        picture = self.cache.get(("augment", path), path)
        if picture is None:
            try:
                picture = mixer.Picture.open(
                    path, lambda width, height: largest_reduction(width, height, self.size))
            except MixerError:
                return None
            self.cache.put(("augment", path), picture.signature, picture, picture.pixels.nbytes)
        rng = np.random.default_rng([self.seed, 1, position])
        pixels = picture.crop(inception_crop(picture.width, picture.height, rng), self.size)
        return pixels[:, ::-1] if rng.random() < 0.5 else pixels

    def batches(self, first_step: int, batch_size: int, rank: int, size: int, depth: int = 2):
        """Yields, from step `first_step` (1-based) on, this rank's share of each global batch:
        (uint8 pixels (n, H, W, 3), onehot (n, classes)), decoding `depth` steps ahead."""
        share = batch_size // size
        pending = collections.deque()
        step = first_step
        while True:
            while len(pending) <= depth:
                start = (step - 1 + len(pending)) * batch_size + rank * share
                positions = range(start, start + share)
                index = [self.sample_index(p) for p in positions]
                pending.append((index, [self.pool.submit(self.pixels, self.split.files[i], p)
                                        for i, p in zip(index, positions)]))
            index, futures = pending.popleft()
            yield self._assemble(index, [f.result() for f in futures])
            step += 1

    def _assemble(self, index, images):
        if self.cache.refused and not self._told_full:
            self._told_full = True
            self.say(f"the decode cache is full ({self.cache.used / 2**20:.0f} MiB): the images "
                     f"that did not fit are decoded again every epoch (--decode-cache-mib sets "
                     f"its size)")
        ok = [j for j, im in enumerate(images) if im is not None]
        if not ok:
            raise MixerError("a whole batch of images could not be decoded: check the dataset")
        for j, im in enumerate(images):
            if im is None:
                path = self.split.files[index[j]]
                if path not in self.failed:
                    self.failed.add(path)
                    self.say(f"cannot decode {path}; it is replaced by another image of its "
                             f"batch ({len(self.failed)} such files so far)")
                index[j], images[j] = index[ok[0]], images[ok[0]]
        return np.stack(images), one_hot(self.split.labels[index], self.num_classes)


def one_hot(labels, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def evaluate(trainer: Trainer, split: Split, image_size: int, resize: str, batch_size: int,
             pool, cache: DecodeCache) -> float:
    """Top-1 accuracy on `split` (mixer.preprocess geometry), each rank taking every size-th
    image. Batches are padded to one fixed shape; images that cannot be decoded are left out.
    The preprocessed images are the same at every evaluation: kept in `cache` while it has room."""
    xp = trainer.xp
    index = list(range(xp.rank, len(split.files), xp.size))
    chunks = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
    decode = lambda i: preprocessed(split.files[i], image_size, resize, cache)  # noqa: E731
    pending = collections.deque()
    correct = seen = 0
    for n in range(len(chunks)):
        while len(pending) < 3 and n + len(pending) < len(chunks):
            pending.append([pool.submit(decode, i) for i in chunks[n + len(pending)]])
        images = [f.result() for f in pending.popleft()]
        good = [j for j, im in enumerate(images) if im is not None]
        if not good:
            continue
        x = np.zeros((batch_size, image_size, image_size, 3), np.float32)
        x[:len(good)] = np.stack([images[j] for j in good]).astype(np.float32) / 127.5 - 1.0
        predicted = trainer.logits(x)[:len(good)].argmax(axis=1)
        correct += int((predicted == split.labels[[chunks[n][j] for j in good]]).sum())
        seen += len(good)
    trainer.end_evaluation()
    correct, seen = xp.sum_over_ranks(correct), xp.sum_over_ranks(seen)
    if seen == 0:
        raise MixerError("no validation image could be decoded")
    return correct / seen


def preprocessed(path, size, resize, cache: DecodeCache):
    """mixer.preprocess(path)'s pixels, uint8 (size, size, 3), kept in `cache`; None if the
    file cannot be decoded."""
    pixels = cache.get(("preprocess", path), path)
    if pixels is None:
        try:
            picture = mixer.Picture.open(path, mixer.preprocess_reduction(size, resize))
        except MixerError:
            return None
        pixels = picture.evaluation(size, resize)
        pixels.flags.writeable = False
        cache.put(("preprocess", path), picture.signature, pixels, pixels.nbytes)
    return pixels


# --------------------------------------------------------------------------------------------
# The model to start from.


def build_model(classes, weights=None, variant=None, image_size=None, keep_head=False, seed=0,
                **dims):
    """-> (config, numpy params, preprocessing, source description) for len(classes) classes."""
    n = len(classes)
    given = {k: v for k, v in dims.items() if v is not None}
    if weights is None and variant is None and not given:
        raise MixerError("give --weights FILE.safetensors to fine-tune, or --variant (e.g. S/32) "
                         "or the architecture options (--hidden-dim, ...) to train from scratch")
    if weights is not None and (variant is not None or given):
        raise MixerError("--weights fixes the architecture: drop --variant and the "
                         "architecture options")
    if weights is None:
        image_size = 224 if image_size is None else image_size
        if variant is None:
            missing = [k for k in ("patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim",
                                   "channels_mlp_dim") if k not in given]
            if missing:
                raise MixerError(f"a custom architecture needs --{missing[0].replace('_', '-')} "
                                 f"(or start from --variant)")
        fields = {**(dataclasses.asdict(mixer.VARIANTS[variant]) if variant else {}), **given,
                  "num_classes": n, "image_size": image_size}
        try:
            config = mixer.MixerConfig(**fields)
        except MixerError as e:
            raise MixerError(f"--image-size {image_size}: {e}") from None
        return config, mixer.init_params(config, seed), None, variant or "random init"
    model = mixer.load(weights, backend="numpy")
    if image_size is not None and image_size != model.config.image_size:
        try:
            model = model.at_resolution(image_size)
        except MixerError as e:
            raise MixerError(f"--image-size {image_size}: {e}") from None
    params = model.numpy_params()
    if keep_head:
        if model.config.num_classes != n or model.labels not in (None, list(classes)):
            raise MixerError(f"--keep-head: {weights} has a head for "
                             f"{model.config.num_classes} classes "
                             f"{(model.labels or [])[:3]}..., the dataset has {n} {classes[:3]}...")
        config = model.config
    else:
        config = dataclasses.replace(model.config, num_classes=n)
        # the official fine-tuning head: zero-initialised, so training starts from uniform logits
        params["head/kernel"] = np.zeros((config.hidden_dim, n), np.float32)
        params["head/bias"] = np.zeros((n,), np.float32)
    source = os.path.basename(weights)
    if model.quantization:  # numpy_params dequantised them: training updates float32 weights
        source += (f" (int{model.quantization['bits']} weights: fine-tuned from their "
                   f"dequantised float32 copy)")
    return config, params, model.preprocessing, source


# --------------------------------------------------------------------------------------------
# Run directory: weights, metrics, resumable state.


def save_state(path, trainer: Trainer, info: dict) -> None:
    """RUN_DIR/state.safetensors: params and momentum as tensors, `info` as JSON metadata."""
    tensors = {f"params/{k}": v for k, v in trainer.numpy("params").items()}
    tensors.update({f"momentum/{k}": v for k, v in trainer.numpy("momentum").items()})
    mixer.write_safetensors(path, tensors, {"format": "mixer-train-state",
                                            "train.state": json.dumps(info, allow_nan=False)})


# What --resume reads from the state's JSON, and the settings _run uses: key -> accepted types
# (int means an int, not a bool; float accepts an int too).
STATE_KEYS = {"version": int, "step": int, "settings": dict, "classes": list, "config": dict,
              "preprocessing": (dict, None), "source": str, "best_val_top1": (float, None),
              "best_step": (int, None), "val_top1": (float, None), "window": dict, "data": dict}
SETTING_KEYS = {"data_dir": str, "backend": str, "steps": int, "batch_size": int,
                "accum_steps": (int, None), "lr": float, "warmup": int, "seed": int, "eval_every": int,
                "log_every": int, "image_size": int, "augment": bool,
                "val_fraction": (float, None), "workers": (int, None), "decode_cache_mib": int,
                "memory_budget": (float, None), "dtype": str}
WINDOW_KEYS = {"loss": float, "grad_norm": float, "n": int}
DATA_KEYS = {"digest": str, "num_train": int}


def _damaged(run_dir: str, problem: str, fix: str | None = None) -> MixerError:
    """The error for a run directory that --resume cannot use."""
    return MixerError(f"{problem}: the run directory is damaged"
                      + (f"; {fix} to resume, or" if fix else " and cannot be resumed;")
                      + f" start a new run from its weights: python train.py DATA_DIR --weights "
                        f"{os.path.join(run_dir, 'last.safetensors')} --steps N")


def _check_keys(what: str, d, types: dict) -> str | None:
    """Why `d` is not a dict holding `types`' keys with values of those types, or None."""
    if not isinstance(d, dict):
        return f"{what} is a {type(d).__name__}, expected a JSON object"
    for key, kinds in types.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = d.get(key, ...)
        if value is ...:
            return f"{what} has no {key!r}"
        ok = any(value is None if kind is None
                 else type(value) is int if kind is int
                 else type(value) in (int, float) and math.isfinite(value) if kind is float
                 else isinstance(value, kind) for kind in kinds)
        if not ok:
            return f"{what}[{key!r}] is {value!r}"
    return None


def load_state(run_dir: str):
    """-> (info dict, params, momentum) from RUN_DIR/state.safetensors, checked (MixerError)."""
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isdir(run_dir):
        raise MixerError(f"--resume {run_dir}: no such run directory")
    if not os.path.exists(path):
        raise MixerError(f"--resume {run_dir}: no {STATE_FILE} there (is it a train.py run "
                         f"directory? one that is still starting has not saved yet)")
    try:
        tensors, metadata = mixer.read_safetensors(path)
    except MixerError as e:
        raise _damaged(run_dir, str(e)) from None
    try:
        info = json.loads(metadata["train.state"])
    except (KeyError, json.JSONDecodeError):
        raise MixerError(f"{path}: not a train.py state file (no train.state metadata)") from None
    if isinstance(info, dict) and info.get("version", STATE_VERSION) != STATE_VERSION:
        raise MixerError(f"{path}: state version {info['version']!r}, this train.py reads "
                         f"{STATE_VERSION}")
    problem = _check_keys("the state", info, STATE_KEYS)
    if problem is None and isinstance(info["settings"], dict):  # saved before the option existed
        for key in ("decode_cache_mib", "memory_budget", "dtype"):
            info["settings"].setdefault(key, DEFAULTS[key])
    problem = (problem
               or _check_keys("the state's settings", info["settings"], SETTING_KEYS)
               or _check_keys("the state's window", info["window"], WINDOW_KEYS)
               or _check_keys("the state's data", info["data"], DATA_KEYS))
    if problem is None and info["step"] < 0:
        problem = f"the state's step is {info['step']}"
    scale = problem is None and info.get("loss_scale", [1.0, 0])  # [scale, good steps]
    if problem is None and not (isinstance(scale, list) and len(scale) == 2
                                and _check_keys("", dict(zip("sg", scale)),
                                                {"s": float, "g": int}) is None
                                and scale[0] > 0 and scale[1] >= 0):
        problem = f"the state's loss_scale is {scale!r}"
    if problem is None and not (len(info["classes"]) >= 2
                                and all(isinstance(c, str) for c in info["classes"])):
        problem = f"the state's classes are {info['classes'][:3]!r}..."
    if problem:
        raise _damaged(run_dir, f"{path}: {problem}")
    try:
        config = mixer.MixerConfig.from_dict(info["config"])
        parts = {}
        for prefix in ("params/", "momentum/"):
            parts[prefix] = {k[len(prefix):]: np.array(mixer.as_float32(v), np.float32)
                             for k, v in tensors.items() if k.startswith(prefix)}
            mixer.check_shapes(config, {k: v.shape for k, v in parts[prefix].items()},
                               f"{path}: {prefix[:-1]}")
            bad = next((k for k, v in parts[prefix].items() if not np.isfinite(v).all()), None)
            if bad is not None:
                raise MixerError(f"{path}: {prefix}{bad} holds NaN or infinity")
    except MixerError as e:
        raise _damaged(run_dir, str(e)) from None
    return info, parts["params/"], parts["momentum/"]


def _digest(data_dir: str, split: Split, signatures: bool = False) -> str:
    """What identifies a split: its files' names and labels (the data order of a resumed run),
    and with `signatures` each file's version too (mixer.file_signature: size, times, inode)."""
    h = hashlib.sha256()
    for f, y in zip(split.files, split.labels):
        # fsencode: a file name that is not valid UTF-8 comes back to its bytes
        h.update(os.fsencode(os.path.relpath(f, data_dir)) + f"\t{y}".encode())
        if signatures:
            try:
                h.update(f"\t{mixer.file_signature(f)}".encode())
            except OSError:  # gone since the scan: the extraction will say it cannot read it
                h.update(b"\tgone")
        h.update(b"\n")
    return h.hexdigest()[:16]


def _append_jsonl(path: str, record: dict) -> None:
    """Appends one record as one line with one write, a failed one undone: never part of a line."""
    line = (json.dumps(record, allow_nan=False) + "\n").encode()
    try:  # non-blocking: opening a FIFO put in its place would wait for a reader for ever
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0),
                     0o666)
    except OSError as e:
        raise MixerError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MixerError(f"cannot write {path}: it is not a regular file")
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):  # a short write: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise MixerError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


METRICS_LINE_MAX = 2**16  # bytes; a record is ~150: a longer line is not one of ours


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one is a MixerError naming it."""
    records = []
    with mixer.open_regular(path, what="a metrics file") as f:
        for number, line in enumerate(iter(lambda: f.readline(METRICS_LINE_MAX + 1), b""), 1):
            last = records[-1]["step"] if records else 0
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:  # not JSON, or not UTF-8
                record = None
            if not (isinstance(record, dict) and type(record.get("step")) is int
                    and record["step"] > last and _finite(record.get("loss"))
                    and _finite(record.get("lr"))):
                raise MixerError(f"{path}: line {number} is not a metrics record (expected a "
                                 f"JSON object with a step above {last}, a finite loss and lr, "
                                 f"on one whole line of at most {METRICS_LINE_MAX} bytes)")
            records.append(record)
    return records


def _finite(value) -> bool:  # json.loads also reads NaN and Infinity
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _truncate_metrics(run_dir: str, path: str, step: int) -> None:
    """On resume, drops the records logged after the saved state (they will be redone)."""
    if not os.path.lexists(path):
        return
    try:
        records = read_metrics(path)
    except MixerError as e:
        raise _damaged(run_dir, str(e), "delete that line") from None
    with mixer.atomic_write(path) as f:
        f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records
                        if r["step"] <= step).encode())


# A new run that saved none of SAVED_FILES leaves nothing behind (RunDir.release).
SAVED_FILES = (STATE_FILE, *WEIGHTS_FILES, "eval.json")
SCRATCH_FILES = ("metrics.jsonl", "curves.png", "confusion.png", "features.safetensors",
                 "probe.json")


class RunDir:
    """A run's directory, made (or an empty --out taken) and locked (flock on RUN_DIR/train.lock,
    which the kernel drops however the process ends) until release()."""

    def __init__(self, path: str, created: bool, new: bool):
        self.path, self.created, self.new = path, created, new
        lock_path = os.path.join(path, LOCK_FILE)
        self.made_lock = not os.path.lexists(lock_path)
        try:
            self.lock = _lock(lock_path, path)
        except BaseException:  # refused, or a full disk: only what this run made goes
            with contextlib.suppress(OSError):
                if self.made_lock:
                    os.remove(lock_path)
                if created:
                    os.rmdir(path)
            raise

    @classmethod
    def claim_new(cls, out: str | None, suffix: str = "") -> "RunDir":
        """A new run's directory: --out (new, or empty), else runs/<timestamp><suffix>."""
        if out is None:
            base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + suffix)
            _make_parent(base)
            for n in itertools.count(1):
                path = base if n == 1 else f"{base}-{n}"
                if _make_dir(path):
                    return cls(path, created=True, new=True)
        path = os.fspath(out)
        _make_parent(path)
        if _make_dir(path):
            return cls(path, created=True, new=True)
        if not os.path.isdir(path):
            raise MixerError(f"--out {path} exists and is not a directory: choose another --out")
        owner = cls(path, created=False, new=True)  # locked first: a live run says so
        others = sorted(set(_listdir(path)) - {LOCK_FILE})
        if not others:
            return owner
        owner.new = False  # not ours: left as it was
        owner.release(keep_lock_file=not owner.made_lock)
        if STATE_FILE in others:
            raise MixerError(f"{path} already holds a run: continue it with --resume {path}, "
                             f"or choose another --out")
        raise MixerError(f"--out {path} is not empty (it holds {others[0]!r}"
                         f"{' and more' if len(others) > 1 else ''}): choose a new or an empty "
                         f"folder")

    @classmethod
    def claim_existing(cls, path: str) -> "RunDir":
        """The directory of a run to continue (--resume, a probe's features)."""
        return cls(os.fspath(path), created=False, new=False)

    def release(self, keep_lock_file: bool = True) -> None:
        """Unlocks; a new run that saved none of SAVED_FILES takes away what it wrote."""
        discard = self.new and not any(os.path.exists(os.path.join(self.path, name))
                                       for name in SAVED_FILES)
        # the lock file goes while still locked: see _flock's inode check
        for name in (*SCRATCH_FILES, LOCK_FILE) if discard else () if keep_lock_file else (
                LOCK_FILE,):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.path, name))
        self.lock.close()
        if discard and self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)


def _lock(path: str, run_dir: str):
    """-> `path` opened, flocked and holding our pid; MixerError naming the process holding it."""
    try:
        f = open(path, "a+")
    except OSError as e:
        raise MixerError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        if fcntl is not None and not _flock(f, path):
            f.seek(0)
            pid = f.read(20).strip()
            raise MixerError(f"{run_dir} is in use by another train.py run"
                             f"{f' (process {pid})' if pid.isdigit() else ''}: wait for it to "
                             f"end, or choose another directory")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")  # for the message above, in the run that is refused
        f.flush()
    except OSError as e:  # a full disk
        f.close()
        raise MixerError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        f.close()
        raise
    return f


def _flock(f, path: str) -> bool:
    """Whether this process now holds the lock on the file `path` (True where there are none)."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True  # a filesystem without locks (some network mounts)
        raise MixerError(f"cannot lock {path}: {e.strerror or e}") from None
    # a run that just ended may have removed the file we opened (release()): a lock on it would
    # keep nobody out
    mine = os.fstat(f.fileno())
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _make_parent(path: str) -> None:
    """Creates the folders above `path` one by one (os.makedirs recurses: RecursionError)."""
    parent, missing = os.path.dirname(os.path.abspath(path)), []
    while not os.path.isdir(parent) and parent != os.path.dirname(parent):
        parent, name = os.path.split(parent)
        missing.append(name)
    try:
        for name in reversed(missing):
            parent = os.path.join(parent, name)
            with contextlib.suppress(FileExistsError):  # made meanwhile by another run
                os.mkdir(parent)
            if not os.path.isdir(parent):  # a file where a folder should be
                raise NotADirectoryError
    except NotADirectoryError:
        raise MixerError(f"cannot create the run directory {path}: {parent} is not a "
                         f"directory") from None
    except OSError as e:
        raise MixerError(f"cannot create the run directory {path}: {e.strerror or e}") from None


def _make_dir(path: str) -> bool:
    """Creates `path` -> True, or False if something is there already."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise MixerError(f"cannot create the run directory {path}: {e.strerror or e}") from None


class _StopRequest:
    """SIGINT, SIGTERM and SIGHUP: before training they stop at once; once it runs, the first
    sets `requested` (the loop saves and stops after its step), a second stops at once."""

    def __enter__(self):
        self.training = self.requested = False
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.training and not self.requested:
            self.requested = True
        elif self.requested or signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise mixer.Terminated(signum)

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


@dataclasses.dataclass
class TrainResult:
    """What train() returns."""
    run_dir: str
    step: int  # optimizer steps done
    total_steps: int
    interrupted: bool  # stopped early; `python train.py --resume run_dir` continues
    val_top1: float | None  # at the last evaluation
    best_val_top1: float | None
    model: mixer.Mixer  # the final weights (numpy backend), labelled with the class names


class Console:
    """What a run prints on stderr: messages, and a progress line."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty, self.open = enabled, enabled and sys.stderr.isatty(), False

    def say(self, message: str) -> None:
        """One message line, escaped (mixer.printable)."""
        if self.enabled:
            print(("\n" if self.open else "") + f"train: {mixer.printable(message)}",
                  file=sys.stderr, flush=True)
            self.open = False

    def progress(self, line: str, keep: bool = False) -> None:
        """The progress line: rewritten in place on a terminal, one line each in a log."""
        if not self.tty:
            return self.say(line)
        print(f"\rtrain: {line}\033[K", end="\n" if keep else "", file=sys.stderr, flush=True)
        self.open = not keep


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------------------------
# The training run.


def train(data_dir=None, weights=None, variant=None, backend=None, image_size=None,
          batch_size=None, accum_steps=None, steps=None, epochs=None, lr=None, warmup=None,
          no_augment=False, out=None, resume=None, keep_head=False, hidden_dim=None,
          num_blocks=None, patch_size=None, tokens_mlp_dim=None, channels_mlp_dim=None,
          val_fraction=None, seed=None, eval_every=None, log_every=None, workers=None,
          decode_cache_mib=None, memory_budget=None, dtype=None, stop_after=None,
          quiet=False) -> TrainResult:
    """Fine-tunes (or trains from scratch) into a run directory. Arguments are the command
    line's, None the default (DEFAULTS); stop_after=k stops after step k as Ctrl-C would."""
    given = {k: v for k, v in locals().items()
             if v is not None and v is not False and k not in ("resume", "out", "stop_after",
                                                                "quiet")}
    given["augment"] = not given.pop("no_augment", False)
    for k in ("data_dir", "weights"):  # absolute, so that --resume works from anywhere
        if k in given:
            given[k] = os.path.abspath(given[k])
    if resume and out:
        raise MixerError("--resume continues the run in its own directory: drop --out")
    if not resume:
        if data_dir is None:
            raise MixerError("give DATA_DIR (holding train/<class>/<image>) or --resume RUN_DIR")
        if (steps is None) == (epochs is None):
            raise MixerError("give one of --steps N or --epochs N")
    _check_values(given)
    with _StopRequest() as stop, contextlib.ExitStack() as cleanup:
        if resume:
            run_dir = os.fspath(resume)
            info, params, momentum = load_state(run_dir)
            settings = info["settings"]
            for k, v in given.items():
                if k not in RESUME_MAY_CHANGE and k != "augment" and v != settings.get(k):
                    raise MixerError(f"--resume continues the saved run: its {k} is "
                                     f"{settings.get(k)!r}, not {v!r} (start a new run with "
                                     f"--weights {os.path.join(run_dir, 'last.safetensors')} "
                                     f"to change it)")
            if given["augment"] is False and settings["augment"]:
                raise MixerError("--resume continues the saved run, which uses augmentation")
            settings.update({k: v for k, v in given.items() if k in RESUME_MAY_CHANGE})
            _check_values(settings)
        else:
            settings = {**DEFAULTS, **given}

        xp = get_backend(settings["backend"])
        settings["backend"] = xp.name
        # Only rank 0 writes, so only rank 0 owns the directory. --resume read the state before
        # the lock (the backend is a saved setting): a complete earlier state (replaced
        # atomically), which resumes to the same result.
        if xp.rank == 0:
            owner = RunDir.claim_existing(run_dir) if resume else RunDir.claim_new(out)
            cleanup.callback(owner.release)
            run_dir = owner.path
        elif not resume:  # the other ranks write nothing; the name is only for messages
            run_dir = os.fspath(out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
        console = Console(enabled=xp.rank == 0 and not quiet)
        pool = concurrent.futures.ThreadPoolExecutor(settings["workers"] or min(8, os.cpu_count()))
        cleanup.callback(pool.shutdown, wait=True, cancel_futures=True)
        return _run(xp, settings, run_dir, info if resume else None,
                    (params, momentum) if resume else None, stop_after, console, pool, stop)


def _check_values(settings: dict) -> None:
    """Refuses settings out of range, in the words of the command line."""
    for k in ("shots", "batch_size", "accum_steps", "steps", "log_every", "eval_every",
              "workers", "image_size", "patch_size", "hidden_dim", "num_blocks", "tokens_mlp_dim",
              "channels_mlp_dim"):
        if settings.get(k) is not None and settings[k] < 1:
            raise MixerError(f"--{k.replace('_', '-')} must be at least 1, got {settings[k]}")
    for k in ("l2", "lr", "epochs", "memory_budget"):
        if settings.get(k) is not None and not (math.isfinite(settings[k]) and settings[k] > 0):
            raise MixerError(f"--{k.replace('_', '-')} must be a finite positive number, got "
                             f"{settings[k]}")
    if (settings.get("memory_budget") or 0) > MAX_MEMORY_BUDGET:
        raise MixerError(f"--memory-budget must be at most {MAX_MEMORY_BUDGET} (GiB), got "
                         f"{settings['memory_budget']}: give the device's memory in GiB")
    for k in ("warmup", "seed"):  # numpy's generators take non-negative seeds only
        if settings.get(k) is not None and settings[k] < 0:
            raise MixerError(f"--{k} must be at least 0, got {settings[k]}")
    if settings.get("decode_cache_mib") is not None and settings["decode_cache_mib"] < 0:
        raise MixerError(f"--decode-cache-mib must be at least 0 (0: no cache), got "
                         f"{settings['decode_cache_mib']}")


def _run(xp, s, run_dir, info, saved_arrays, stop_after, console, pool, stop) -> TrainResult:
    """The training loop: a step per batch, a record every --log-every steps, an evaluation and
    a checkpoint every --eval-every, a checkpoint at a stop request."""
    run = Run(xp, s, run_dir, info, saved_arrays, console, pool)
    steps, interrupted = s["steps"], False
    batches = run.loader.batches(run.step + 1, s["batch_size"], xp.rank, xp.size)
    stop.training = True
    while run.step < steps:
        t0 = time.perf_counter()
        x, onehot = next(batches)
        lr = get_lr(run.step + 1, s["lr"], s["warmup"], steps)
        loss, grad_norm = run.train_step(x, onehot, lr)
        run.tally(loss, grad_norm, time.perf_counter() - t0)
        evaluating = run.step % s["eval_every"] == 0 or run.step == steps
        record = run.record(lr) if run.step % s["log_every"] == 0 or evaluating else None
        if evaluating and run.val_split is not None:
            record["val_top1"] = run.evaluate()
        if record is not None:
            run.log(record, evaluating)
        run.progress(lr, record, evaluating)
        requested = stop.requested or run.step == stop_after
        if xp.size > 1:  # every rank must stop after the same step
            requested = xp.sum_over_ranks(float(requested)) > 0
        if evaluating or requested:
            run.checkpoint()
        if requested and run.step < steps:
            interrupted = True
            break
    stop.training = False
    run.say_end(interrupted)
    return TrainResult(run_dir, run.step, steps, interrupted, run.val_top1, run.best,
                       run.model())


class Run:
    """One training run's state (model, trainer, loader, the sums behind the next record, the
    best val top-1) and the parts of the loop that _run names."""

    def __init__(self, xp, s, run_dir, info, saved_arrays, console, pool):
        self.xp, self.s, self.run_dir, self.say, self.console = xp, s, run_dir, console.say, console
        self.classes, self.train_split, self.val_split = scan(s["data_dir"], s["val_fraction"],
                                                              s["seed"], pool, self.say)
        self.digest = _digest(s["data_dir"], self.train_split)
        params, momentum = (self._new_model() if info is None
                            else self._resumed_model(info, saved_arrays))
        self.micro, self.accum, memory_line = plan_micro_batches(xp, self.config, s)
        mixer.get_ops(xp.name, s["dtype"])  # a device that cannot compute the dtype says so here
        self.resize = (self.preprocessing or mixer.DEFAULT_PREPROCESSING).get("resize", "crop")
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if xp.rank == 0:
            _truncate_metrics(run_dir, self.metrics_path, self.step)
        self.trainer = Trainer(xp, self.config, params, momentum, self.accum, s["dtype"],
                               tuple(info["loss_scale"]) if info and "loss_scale" in info
                               else None)
        self.cache = DecodeCache(s["decode_cache_mib"] * 2**20)
        self.loader = Loader(self.train_split, len(self.classes), self.config.image_size,
                             self.resize, s["augment"], s["seed"], pool, self.say, self.cache)
        self.pool, self.plots = pool, True
        self.val_top1 = info.get("val_top1") if info else None
        # sums since the last record, saved so that a resumed run logs the same records
        self.window = info["window"] if info else {"loss": 0.0, "grad_norm": 0.0, "n": 0}
        self.timed = {"time": 0.0, "n": 0}
        self.start_step = self.step
        self._say_start(memory_line)

    def _new_model(self):
        s = self.s
        self.config, params, self.preprocessing, self.source = build_model(
            self.classes, s.get("weights"), s.get("variant"), s["image_size"], s.get("keep_head"),
            s["seed"], **{k: s.get(k) for k in ("patch_size", "hidden_dim", "num_blocks",
                                                "tokens_mlp_dim", "channels_mlp_dim")})
        self.step, self.best, self.best_step = 0, None, None
        steps = s["steps"] or math.ceil(s["epochs"] * len(self.train_split.files)
                                        / s["batch_size"])
        s.update(steps=steps, image_size=self.config.image_size,
                 warmup=s["warmup"] if s["warmup"] is not None else min(500, round(0.05 * steps)),
                 eval_every=s["eval_every"] or math.ceil(steps / 10))
        return params, None

    def _resumed_model(self, info, saved_arrays):
        if self.classes != info["classes"] or self.digest != info["data"]["digest"]:
            raise MixerError(f"the training set in {self.s['data_dir']} changed since the run "
                             f"started ({info['data']['num_train']} images then, "
                             f"{len(self.train_split.files)} now): resuming needs the same files "
                             f"for the same data order; start a new run from "
                             f"{os.path.join(self.run_dir, 'last.safetensors')} instead")
        self.config = mixer.MixerConfig.from_dict(info["config"])
        self.preprocessing, self.source = info["preprocessing"], info["source"]
        self.step, self.best, self.best_step = info["step"], info["best_val_top1"], \
            info["best_step"]
        return saved_arrays

    def _say_start(self, memory_line: str) -> None:
        s, xp, n = self.s, self.xp, len(self.train_split.files)
        self.say(f"{n} training images in {len(self.classes)} classes, "
                 f"{len(self.val_split.files) if self.val_split else 'no'} validation images; "
                 f"{self.config.variant or 'custom'} Mixer at {self.config.image_size}px from "
                 f"{self.source}, on {xp.name}" + (f" x {xp.size} processes" if xp.size > 1
                                                  else "") + f", device {xp.ops.device()}")
        self.say(f"{'resuming at step ' + str(self.step) + ' of ' if self.step else ''}"
                 f"{s['steps']} steps of {s['batch_size']} images "
                 f"({s['steps'] * s['batch_size'] / n:.1f} epochs), lr {s['lr']}, warmup "
                 f"{s['warmup']}; writing {self.run_dir}")
        self.say(memory_line)
        if self.val_split is None:
            self.say("no validation set: best.safetensors will not be written")

    def train_step(self, x: np.ndarray, onehot: np.ndarray, lr: float) -> tuple[float, float]:
        """One optimizer step on this process's share of the batch, in micro-batches."""
        micro, trainer = self.micro, self.trainer
        for i in range(self.accum):
            trainer.accumulate(x[i * micro:(i + 1) * micro], onehot[i * micro:(i + 1) * micro])
        loss, grad_norm = trainer.update(lr)
        self.step += 1
        if trainer.skipped and trainer.loss_scale < LOSS_SCALE_MIN:
            raise MixerError(f"float16 cannot train this model: at step {self.step} its "
                             f"gradient still overflowed with the loss scale down to "
                             f"{trainer.loss_scale:g}, so the weights have not changed since the "
                             f"last good step; train with --dtype bfloat16 (float32's range) or "
                             f"float32")
        if trainer.skipped:
            self.say(f"step {self.step}: the float16 gradient overflowed, step skipped; loss "
                     f"scale now {trainer.loss_scale:g}")
        # a non-finite gradient norm makes the parameters NaN (clipping divides by it)
        elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise MixerError(f"the training diverged at step {self.step} (loss {loss}, gradient "
                             f"norm {grad_norm}): start again with a lower --lr")
        return loss, grad_norm

    def tally(self, loss: float, grad_norm: float, seconds: float) -> None:
        """Adds a step to the sums behind the next record (unless skipped) and to the timing."""
        w = self.window
        if not self.trainer.skipped:
            self.window = {"loss": w["loss"] + loss, "grad_norm": w["grad_norm"] + grad_norm,
                           "n": w["n"] + 1}
        self.timed = {"time": self.timed["time"] + seconds, "n": self.timed["n"] + 1}

    def shown(self) -> tuple[float, float, float]:
        """(mean loss, images/s, seconds per step) since the last record."""
        per_step = max(self.timed["time"] / self.timed["n"], 1e-9)
        return (self.window["loss"] / max(self.window["n"], 1),
                self.s["batch_size"] / per_step, per_step)

    def record(self, lr: float) -> dict:
        """The metrics record of this step, from the sums, which start again."""
        loss, images_per_s, _ = self.shown()
        record = {"step": self.step, "lr": lr, "loss": loss,
                  "grad_norm": self.window["grad_norm"] / max(self.window["n"], 1),
                  "images_per_s": images_per_s}
        if self.s["dtype"] == "float16":
            record["loss_scale"] = self.trainer.loss_scale
        self.window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
        self.timed = {"time": 0.0, "n": 0}
        return record

    def evaluate(self) -> float:
        """Val top-1 now; a new best is saved as best.safetensors."""
        self.val_top1 = evaluate(self.trainer, self.val_split, self.config.image_size,
                                 self.resize, self.micro, self.pool, self.cache)
        if self.best is None or self.val_top1 > self.best:
            self.best, self.best_step = self.val_top1, self.step
            if self.xp.rank == 0:
                self._save("best.safetensors", f", val top-1 {self.val_top1:.4f}")
        return self.val_top1

    def log(self, record: dict, evaluating: bool) -> None:
        """Appends the record to metrics.jsonl and, at an evaluation, redraws curves.png."""
        if self.xp.rank != 0:
            return
        _append_jsonl(self.metrics_path, record)
        if not (evaluating and self.plots):
            return
        try:
            figure = draw_curves(read_metrics(self.metrics_path))
            if figure is not None:
                save_figure(figure, os.path.join(self.run_dir, "curves.png"))
        except MixerError as e:
            self.say(f"curves.png not refreshed: {e}")
            return
        if figure is None:  # said once
            self.plots = False
            self.say(NO_PLOTS.format("curves.png"))

    def progress(self, lr: float, record: dict | None, evaluating: bool) -> None:
        """The progress line: after the first step (a CPU may take minutes), then at records."""
        if record is None and self.step != self.start_step + 1:
            return
        if record is not None:
            loss, images_per_s, per_step = record["loss"], record["images_per_s"], \
                self.s["batch_size"] / record["images_per_s"]
        else:
            loss, images_per_s, per_step = self.shown()
        val = evaluating and self.val_split is not None
        self.console.progress(
            f"step {self.step}/{self.s['steps']}  loss {loss:.4f}  lr {lr:.4g}  "
            f"{images_per_s:.1f} img/s  ETA {_format_time(per_step * (self.s['steps'] - self.step))}"
            + (f"  val top-1 {self.val_top1:.2%}" if val else ""), keep=val)

    def model(self) -> mixer.Mixer:
        """The weights now, labelled with the class names (numpy backend)."""
        return mixer.Mixer(self.config, self.trainer.numpy("params"), backend="numpy",
                           labels=self.classes, preprocessing=self.preprocessing)

    def _save(self, name: str, note: str = "") -> None:
        self.model().save(os.path.join(self.run_dir, name), source=f"train.py: {self.source} "
                          f"trained on {self.s['data_dir']}, step {self.step}{note}")

    def checkpoint(self) -> None:
        """last.safetensors and the state that --resume continues from (rank 0 writes)."""
        if self.xp.rank != 0:
            return
        s, step, n = self.s, self.step, len(self.train_split.files)
        self._save("last.safetensors")
        position = step * s["batch_size"]
        save_state(os.path.join(self.run_dir, STATE_FILE), self.trainer, {
            "version": STATE_VERSION, "step": step, "settings": s, "classes": self.classes,
            "config": self.config.to_dict(), "preprocessing": self.preprocessing,
            "source": self.source, "best_val_top1": self.best, "best_step": self.best_step,
            "val_top1": self.val_top1, "window": self.window,
            "loss_scale": [self.trainer.loss_scale, self.trainer.good_steps],
            "data": {"num_train": n, "digest": self.digest, "samples_seen": position,
                     "epoch": position // n, "position_in_epoch": position % n,
                     "order": "permutation of epoch e seeded by (seed, 0, e); augmentation of "
                              "stream position p by (seed, 1, p) (numpy default_rng)"}})

    def say_end(self, interrupted: bool) -> None:
        """The last line: the weights file to use, and how to continue a stopped run."""
        last = os.path.join(self.run_dir, "last.safetensors")
        best_file = os.path.join(self.run_dir, "best.safetensors")
        if interrupted:
            self.say(f"stopped after step {self.step}: python mixer.py IMAGE --weights {last}"
                     + (f" (or {best_file}: val top-1 {self.best:.2%} at step {self.best_step})"
                        if self.best is not None else "")
                     + f"; continue with: python train.py --resume {self.run_dir}")
        elif self.best is not None:
            self.say(f"done: {self.step} steps, val top-1 {self.val_top1:.2%} (best "
                     f"{self.best:.2%} at step {self.best_step}): python mixer.py IMAGE "
                     f"--weights {best_file}")
        else:
            self.say(f"done: {self.step} steps: python mixer.py IMAGE --weights {last}")


# --------------------------------------------------------------------------------------------
# Linear probe: the paper's few-shot / linear evaluation (big_vision evaluators/fewshot_lsr.py),
# a closed-form L2-regularised least-squares fit of frozen pre-logits, folded into a Mixer head.

PROBE_L2_GRID = tuple(2.0 ** k for k in range(-10, 21))  # 2^-10 .. 2^20, picked on val/
PROBE_L2_DEFAULT = 2.0 ** 10  # big_vision's fixed λ, used when there is no validation split
PROBE_SEEDS = 5  # --shots K: this many draws of K images per class (seeds --seed, --seed + 1...)
PROBE_BATCH = 64  # images per forward pass while extracting features (default of --batch-size)
WHITEN_EPS = 1e-5  # fewshot_lsr: (x - mean) / (std + 1e-5)
BIAS_FEATURE = 100.0  # fewshot_lsr's constant feature: large, so the bias is barely regularised
FEATURES_FILE = "features.safetensors"
PROBE_FILE = "probe.json"


def whiten(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / (std + 1e-5) with the constant feature 100 appended, in float64."""
    z = (np.asarray(x, np.float64) - mean) / (std + WHITEN_EPS)
    return np.concatenate([z, np.full((len(z), 1), BIAS_FEATURE)], axis=1)


def ridge_solutions(x: np.ndarray, y: np.ndarray, l2s) -> list[np.ndarray]:
    """argmin_W |XW - Y|² + λ|W|² for each λ in l2s, from one eigendecomposition (of XᵀX, or of
    XXᵀ when N < D): W = lhs · diag(1 / (eigs + λ)) · rhs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        lhs, rhs = q, q.T @ (x.T @ y)
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ q, q.T @ y
    return [lhs @ (rhs / (eigs + l2)[:, None]) for l2 in l2s]


@dataclasses.dataclass
class ProbeFit:
    """One closed-form fit (fit_probe)."""
    l2: float  # the chosen λ
    w: np.ndarray  # (D + 1, C) on whitened features, the last row for the constant feature
    mean: np.ndarray  # (D,) the training features' statistics
    std: np.ndarray
    val_top1: dict | None  # λ -> val top-1 for every λ tried; None without a validation split


def fit_probe(features, labels, num_classes: int, l2s, val=None) -> ProbeFit:
    """The fit of features (N, D) to targets 2·onehot - 1 at the λ of l2s with the best top-1 on
    val = (features, labels) (ties: the larger), or l2s[0] without val."""
    features = np.asarray(features, np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0)
    ws = ridge_solutions(whiten(features, mean, std), 2 * one_hot(labels, num_classes) - 1, l2s)
    if val is None:
        return ProbeFit(l2s[0], ws[0], mean, std, None)
    x = whiten(val[0], mean, std)
    top1 = {l2: float(((x @ w).argmax(axis=1) == val[1]).mean()) for l2, w in zip(l2s, ws)}
    best = max(range(len(l2s)), key=lambda i: (top1[l2s[i]], l2s[i]))
    return ProbeFit(l2s[best], ws[best], mean, std, top1)


def fold_head(fit: ProbeFit) -> tuple[np.ndarray, np.ndarray]:
    """(head/kernel, head/bias) such that f @ kernel + bias == whiten(f) @ W, exactly."""
    s = fit.std + WHITEN_EPS
    kernel = fit.w[:-1] / s[:, None]
    bias = BIAS_FEATURE * fit.w[-1] - (fit.mean / s) @ fit.w[:-1]
    return kernel.astype(np.float32), bias.astype(np.float32)


def preprocessed_batches(model: mixer.Mixer, files: list[str], batch_size: int):
    """Yields (indices of the files that decoded, their images stacked or None, indices of those
    that did not), decoded ahead in threads as Mixer.classify does, batch_size files at a time."""
    size, resize = model.config.image_size, model.preprocessing.get("resize", "crop")
    decode = functools.partial(mixer.preprocess, size=size, resize=resize)
    with contextlib.closing(mixer.decode_ahead(files, batch_size, decode)) as batches:
        for batch in batches:
            good = [(i, im) for i, _, im in batch if not isinstance(im, MixerError)]
            yield ([i for i, _ in good], np.stack([im for _, im in good]) if good else None,
                   [i for i, _, im in batch if isinstance(im, MixerError)])


def extract_features(model: mixer.Mixer, files: list[str], batch_size: int, progress,
                     what: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (pre-logits (N, D) float32, ok (N,) bool: False where a file could not be decoded)."""
    n = len(files)
    features = np.zeros((n, model.config.hidden_dim), np.float32)
    ok = np.zeros(n, bool)
    start, done = time.perf_counter(), 0
    for good, x, bad in preprocessed_batches(model, files, batch_size):
        if good:
            features[good] = model.features(x)
            ok[good] = True
        done += len(good) + len(bad)
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress(f"{what} features: {done}/{n} images ({rate:.0f}/s)", keep=done == n)
    return features, ok


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with mixer.open_regular(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def _probe_features(run_dir, key, model, splits, batch_size, console) -> dict:
    """{split name: (features, ok)}, from RUN_DIR/features.safetensors if made under `key`, else
    extracted and saved there."""
    path = os.path.join(run_dir, FEATURES_FILE)
    if os.path.exists(path):
        try:
            tensors, metadata = mixer.read_safetensors(path)
            if metadata.get("probe.key") == json.dumps(key, sort_keys=True):
                found = {name: (mixer.as_float32(tensors[f"{name}/features"]),
                                mixer.as_float32(tensors[f"{name}/ok"]) > 0.5)
                         for name in splits}
                if all(f.shape == (len(splits[name].files), model.config.hidden_dim)
                       and np.isfinite(f).all() for name, (f, _) in found.items()):
                    console.say(f"features read from {path}")
                    return found
        except (MixerError, KeyError):  # damaged or foreign: made again below
            pass
    found = {name: extract_features(model, split.files, batch_size, console.progress, name)
             for name, split in splits.items()}
    tensors = {f"{name}/{part}": a.astype(np.float32) for name, (f, ok) in found.items()
               for part, a in (("features", f), ("ok", ok))}
    mixer.write_safetensors(path, tensors, {"format": "mixer-probe-features",
                                            "probe.key": json.dumps(key, sort_keys=True)})
    return found


@dataclasses.dataclass
class ProbeResult:
    """What linear_probe() returns."""
    run_dir: str
    l2: float  # λ of the written head
    val_top1: list[float] | None  # one per seed (one without --shots); None without val/
    model: mixer.Mixer  # best.safetensors: the backbone with the fitted head, numpy backend


def linear_probe(data_dir=None, weights=None, l2=None, shots=None, seed=None,
                 val_fraction=None, out=None, backend=None, workers=None, batch_size=None,
                 quiet=False) -> ProbeResult:
    """Fits the paper's linear probe on the frozen pre-logits of `weights` and writes
    RUN_DIR/best.safetensors (the backbone with the fitted head) and probe.json (README)."""
    if data_dir is None or weights is None:
        raise MixerError("--linear-probe needs DATA_DIR and --weights FILE (the frozen model)")
    _check_values({"l2": l2, "shots": shots, "seed": seed, "workers": workers,
                   "batch_size": batch_size})
    seed = 0 if seed is None else seed
    with _StopRequest(), contextlib.ExitStack() as cleanup:
        owner = _claim_probe_dir(out)
        cleanup.callback(owner.release)
        console = Console(enabled=not quiet)
        pool = concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count()))
        cleanup.callback(pool.shutdown, wait=True, cancel_futures=True)
        classes, train_split, val_split = scan(data_dir, val_fraction, seed, pool, console.say)
        if shots is not None:
            if val_split is None:
                raise MixerError("--shots scores each draw on the validation split, and there "
                                 "is none: add DATA_DIR/val/ or give --val-fraction above 0")
            _check_shots(shots, train_split.labels, classes)
        model = mixer.load(weights, backend=backend)
        splits = {"train": train_split, **({"val": val_split} if val_split else {})}
        # everything the features depend on, each image's signature included
        key = {"weights": _file_digest(weights), "image_size": model.config.image_size,
               "resize": model.preprocessing.get("resize", "crop"), "backend": model.backend,
               **{name: _digest(data_dir, split, signatures=True)
                  for name, split in splits.items()}}
        console.say(f"{len(train_split.files)} training images in {len(classes)} classes, "
                    f"{len(val_split.files) if val_split else 'no'} validation images; "
                    f"features of {os.path.basename(weights)} at {model.config.image_size}px "
                    f"on {model.backend}; writing {owner.path}")
        found = _probe_features(owner.path, key, model, splits, batch_size or PROBE_BATCH,
                                console)
        fits, labels, val = _fit_draws(found, train_split, val_split, classes, l2, shots, seed)
        probe = _save_probe(model, weights, fits[0], classes, owner.path)
        top1 = [f.val_top1[f.l2] for f in fits] if val else None
        record = {"weights": os.path.abspath(weights), "data_dir": os.path.abspath(data_dir),
                  "classes": classes, "num_train": int(len(labels)),
                  "num_val": int(len(val[1])) if val else 0, "shots": shots,
                  "seeds": [seed + d for d in range(len(fits))], "l2": [f.l2 for f in fits],
                  "val_top1": top1,
                  "val_top1_by_l2": [{str(k): v for k, v in f.val_top1.items()} if val else None
                                     for f in fits]}
        with mixer.atomic_write(os.path.join(owner.path, PROBE_FILE)) as f:
            f.write((json.dumps(record, indent=1, allow_nan=False) + "\n").encode())
        _say_probe(console, top1, fits[0].l2, l2, shots, seed, val is not None)
        console.say(f"wrote {os.path.join(owner.path, 'best.safetensors')}")
        return ProbeResult(owner.path, fits[0].l2, top1, probe)


def _fit_draws(found, train_split, val_split, classes, l2, shots, seed):
    """-> (a fit per draw, the labels of the training images that decoded, val or None)."""
    keep = found["train"][1]
    features, labels = found["train"][0][keep], train_split.labels[keep]
    val = None
    if val_split is not None:
        val = (found["val"][0][found["val"][1]], val_split.labels[found["val"][1]])
    if shots:  # again: an image that failed to decode is not there to draw
        _check_shots(shots, labels, classes)
    l2s = [l2] if l2 is not None else list(PROBE_L2_GRID) if val else [PROBE_L2_DEFAULT]
    fits = []
    for draw in range(PROBE_SEEDS if shots else 1):
        pick = np.arange(len(labels))
        if shots:
            rng = np.random.default_rng([seed + draw, 3])
            pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), shots,
                                                      replace=False)
                                           for c in range(len(classes))]))
        fits.append(fit_probe(features[pick], labels[pick], len(classes), l2s, val))
    return fits, labels, val


def _save_probe(model, weights, fit, classes, run_dir) -> mixer.Mixer:
    """RUN_DIR/best.safetensors: the backbone bit for bit (a quantised file's kernels as it
    stores them, saved again with its bits and group size) with the folded head."""
    q = model.quantization
    if q is None:
        params = model.numpy_params()
    else:
        tensors, metadata = mixer.read_safetensors(weights)
        layout = json.loads(metadata["mixer.quantization"])["layout"]
        params = {k: mixer.QuantizedTensor(tensors[k], tensors[f"{k}.scales"],
                                           tensors[f"{k}.biases"], q["bits"], q["group_size"],
                                           layout[k], shape)
                  if layout.get(k, "float16") != "float16" else mixer.as_float32(tensors[k])
                  for k, shape in mixer.param_shapes(model.config).items()}
    params["head/kernel"], params["head/bias"] = fold_head(fit)
    config = dataclasses.replace(model.config, num_classes=len(classes))
    probe = mixer.Mixer(config, params, backend="numpy", labels=classes,
                        preprocessing=model.preprocessing)
    probe.save(os.path.join(run_dir, "best.safetensors"),
               source=f"linear probe on {os.path.basename(weights)}",
               **({"dtype": f"int{q['bits']}", "group_size": q["group_size"]} if q else {}))
    return probe


def _say_probe(console, top1, chosen, l2, shots, seed, has_val) -> None:
    """The probe's result line: the val top-1 (over the draws with --shots) and how λ was set."""
    how = "λ fixed by --l2" if l2 is not None else "λ picked on val/ from 2^-10..2^20" \
        if has_val else "λ = 2^10 (big_vision's; no validation split to pick one on)"
    if top1 is None:
        console.say(f"no validation split: nothing to score; {how}")
    elif shots:
        console.say(f"{shots}-shot val top-1 over {len(top1)} seeds: mean "
                    f"{np.mean(top1):.4f}, std {np.std(top1):.4f} "
                    f"({', '.join(f'{t:.4f}' for t in top1)}); {how}; best.safetensors "
                    f"is seed {seed}'s (λ = {chosen:g})")
    else:
        console.say(f"val top-1 {top1[0]:.4f} at λ = {chosen:g} ({how})")


def _check_shots(shots: int, labels: np.ndarray, classes: list[str]) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    if counts.min() < shots:
        raise MixerError(f"--shots {shots}: the class {classes[counts.argmin()]!r} has only "
                         f"{counts.min()} training images")


def _claim_probe_dir(out) -> RunDir:
    """An earlier probe's RUN_DIR (features, no training state) again, else a new one."""
    if out is not None and os.path.isdir(out):
        names = set(os.listdir(out))
        if FEATURES_FILE in names and STATE_FILE not in names:
            return RunDir.claim_existing(out)
    return RunDir.claim_new(out)


# --------------------------------------------------------------------------------------------
# Charts, by matplotlib where it is installed: a Figure on its own Agg canvas, not pyplot, so
# that nothing process-wide (the backend, rcParams, open figures) is touched.

NO_PLOTS = 'matplotlib is not installed: no {} (pip install "mlp-mixer-edge[plots]" draws it)'
CURVES_COLOURS = {"loss": "#1f77b4", "lr": "#ff7f0e", "val": "#2ca02c"}
CURVES_INCHES = (6.4, 4.0)  # at 100 dpi: 640 x 400 pixels
CONFUSION_MAX = 40  # classes drawn in confusion.png; with more, the most confused ones
NAME_CHARS = 28  # longer class names are shortened on the picture (eval.json has them whole)


def new_figure(inches: tuple[float, float]):
    """An empty matplotlib Figure at 100 dpi on an Agg canvas, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=inches, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str) -> None:
    """Writes the figure as a PNG, atomically."""
    with mixer.atomic_write(path) as f:
        figure.savefig(f, format="png")


def draw_curves(records: list[dict]):
    """metrics.jsonl's records as a Figure (None without matplotlib): loss and lr above, the
    val top-1 below, against steps."""
    figure = new_figure(CURVES_INCHES)
    if figure is None:
        return None
    colours, steps = CURVES_COLOURS, [r["step"] for r in records]
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    lr_axis = top.twinx()
    val = [r for r in records if "val_top1" in r]
    # solid lines (no anti-aliasing): each curve's pixels are its colour exactly
    line = {"linewidth": 2, "antialiased": False}
    top.plot(steps, [r["loss"] for r in records], color=colours["loss"], **line)
    lr_axis.plot(steps, [r["lr"] for r in records], color=colours["lr"], **line)
    bottom.plot([r["step"] for r in val], [100 * r["val_top1"] for r in val],
                color=colours["val"], marker="o" if len(val) < 40 else None, **line)
    top.set_ylabel("training loss", color=colours["loss"])
    lr_axis.set_ylabel("learning rate", color=colours["lr"])
    bottom.set_ylabel("val top-1 (%)", color=colours["val"])
    bottom.set_xlabel("step")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    return figure


def draw_confusion(matrix: np.ndarray, names: list[str], title: str):
    """The confusion matrix as a Figure (None without matplotlib), cells by their row share."""
    n = len(names)
    figure = new_figure((max(4.0, 2.5 + 0.2 * n), max(3.5, 2.0 + 0.2 * n)))
    if figure is None:
        return None
    axes = figure.subplots()
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    names = [x if len(x) <= NAME_CHARS else x[:NAME_CHARS - 1] + "…" for x in names]
    # parse_math=False: a class name with '$' in it is text, not a formula
    axes.set_xticks(range(n), names, rotation=90, parse_math=False)
    axes.set_yticks(range(n), names, parse_math=False)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, parse_math=False)
    return figure


# --------------------------------------------------------------------------------------------
# Throughput, for bench.py.


def train_throughput(backend: str, variant: str = "S/32", batch_size: int = 32, steps: int = 10,
                     image_size: int = 224, num_classes: int = 1000) -> float:
    """Images/s of full training steps on random data in memory, after compiling ones."""
    xp = get_backend(backend)
    config = dataclasses.replace(mixer.VARIANTS[variant], num_classes=num_classes,
                                 image_size=image_size)
    trainer = Trainer(xp, config, mixer.init_params(config))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32)
    onehot = one_hot(rng.integers(0, num_classes, batch_size), num_classes)
    for _ in range(2):  # compile; TinyJit captures on the second call, replays from the third
        trainer.accumulate(x, onehot)
        trainer.update(0.01)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.accumulate(x, onehot)
        trainer.update(0.01)
    return steps * batch_size / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Evaluation of any weights file on a labelled folder (--eval-only).

EVAL_JSON, CONFUSION_PNG = "eval.json", "confusion.png"
EVAL_BATCH = 32  # images per forward (Mixer.classify's default)


def eval_folder(data_dir: str) -> str:
    """The folder of class folders that is scored: DATA_DIR/val, else /train, else DATA_DIR."""
    if not os.path.isdir(data_dir):
        raise MixerError(f"{data_dir} is not a directory: give a folder of class folders")
    for split in ("val", "train"):
        if os.path.isdir(os.path.join(data_dir, split)):
            return os.path.join(data_dir, split)
    return data_dir


def _loose(name: str) -> str:
    """A class name without case, underscores or repeated spaces."""
    return " ".join(name.replace("_", " ").split()).casefold()


def imagenet1k_wnids() -> list[str] | None:
    """The 1000 ILSVRC-2012 WordNet ids in class order (sorted), or None without labels/."""
    for folder in mixer.labels_dirs():
        path = os.path.join(folder, "imagenet1k_wnids.txt")
        if os.path.isfile(path):
            return mixer.read_labels(path)
    return None


def match_classes(folders: list[str], labels: list[str], wnids: list[str] | None = None):
    """Class folders -> ({folder: class index}, {folder: why not}): by name, else loosely (_loose),
    else as a WordNet id among `wnids`; a name that several classes share matches none."""
    tables = [{}, {}]
    for i, label in enumerate(labels):
        tables[0].setdefault(label, []).append(i)
        tables[1].setdefault(_loose(label), []).append(i)
    by_wnid = {w: i for i, w in enumerate(wnids or [])}
    matched, unmatched = {}, {}
    for folder in folders:
        for table, key in zip(tables, (folder, _loose(folder))):
            hits = table.get(key, [])
            if len(hits) == 1:
                matched[folder] = hits[0]
                break
            if hits:
                unmatched[folder] = f"names {len(hits)} classes of the model (ambiguous)"
                break
        else:
            if folder in by_wnid:
                matched[folder] = by_wnid[folder]
            else:
                unmatched[folder] = "matches no class of the model"
    return matched, unmatched


@dataclasses.dataclass
class EvalResult:
    """What evaluate_weights() returns."""
    run_dir: str
    report: dict  # what eval.json holds
    confusion: np.ndarray  # (K, K) counts, true class x predicted class
    classes: list[int]  # the model's class index of each row and column


def evaluate_weights(data_dir, weights, backend=None, out=None, batch_size=None,
                     quiet=False) -> EvalResult:
    """Scores a weights file on DATA_DIR's labelled images; writes eval.json and confusion.png."""
    if data_dir is None or weights is None:
        raise MixerError("--eval-only scores --weights FILE on DATA_DIR: give both")
    batch_size = mixer.positive_int(EVAL_BATCH if batch_size is None else batch_size,
                                     "--batch-size")
    console = Console(enabled=not quiet)
    folder = eval_folder(data_dir)
    if os.path.basename(folder) == "train" and folder != data_dir:
        console.say(f"{data_dir} has no val/: scoring the training images in {folder}")
    model = mixer.load(weights, backend=backend)
    n = model.config.num_classes
    if n is None:
        raise MixerError(f"{weights} has no head: nothing to evaluate")
    # a file without names: its 1000 or 21843 ImageNet names, else the class indices as names
    labels = model.labels or mixer.find_labels("auto", n) or [str(i) for i in range(n)]
    folders = _folders(folder)
    matched, unmatched = match_classes(folders, labels, imagenet1k_wnids() if n == 1000 else None)
    if not matched:  # one line, not one per folder
        raise MixerError(f"no class folder of {folder} matches a class of {weights} "
                         f"({len(folders)} folders; the model's classes are e.g. "
                         f"{', '.join(repr(x) for x in labels[:3])})")
    for name, why in unmatched.items():
        console.say(f"skipping {os.path.join(folder, name)}: {why}")
    files, truth = _labelled_files(folder, matched)
    if not files:
        raise MixerError(f"the matched class folders of {folder} hold no files")

    owner = RunDir.claim_new(out, suffix="-eval")
    try:
        result = _score(model, files, np.array(truth), labels, matched, batch_size, console,
                        owner.path)
        result.report.update(weights=os.path.abspath(weights), data=os.path.abspath(folder),
                             unmatched_folders=sorted(unmatched))
        drawn = _write_eval(result, labels)
    finally:  # a run that wrote nothing whole leaves nothing; a whole one, no lock file
        owner.release(keep_lock_file=False)
    if not drawn:
        console.say(NO_PLOTS.format(CONFUSION_PNG))
    _print_summary(result, drawn)
    return result


def _score(model, files, truth, labels, matched, batch_size, console, run_dir) -> EvalResult:
    """Classifies every file as Mixer.classify does and counts; unreadable ones are left out."""
    k = min(5, model.config.num_classes)
    start = time.perf_counter()
    top, bad, done = np.zeros((len(files), k), np.int64), [], 0
    for good, x, failed in preprocessed_batches(model, files, batch_size):
        bad += failed
        if good:
            logits = model(x).astype(np.float64)
            if not np.isfinite(logits).all():
                raise MixerError(f"{model!r} produced non-finite outputs: its weights are damaged")
            top[good] = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        done, before = done + len(good) + len(failed), done
        if done // (16 * batch_size) > before // (16 * batch_size):  # every 16 batches
            console.progress(f"{done}/{len(files)} images")
    if bad:
        shown = "; ".join(files[i] for i in bad[:3])
        console.say(f"skipped {len(bad)} unreadable file{'s' * (len(bad) > 1)} ({shown}"
                    f"{'; ...' if len(bad) > 3 else ''})")
    good = np.setdiff1d(np.arange(len(files)), bad)
    if not len(good):
        raise MixerError("no image could be decoded")
    top, truth = top[good], truth[good]
    hit1, hitk = top[:, 0] == truth, (top == truth[:, None]).any(axis=1)
    classes = sorted(set(truth.tolist()) | set(top[:, 0].tolist()))
    row = {c: j for j, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(confusion, ([row[c] for c in truth], [row[c] for c in top[:, 0]]), 1)
    per_class = [{"index": c, "label": labels[c],
                  "folders": [name for name, m in matched.items() if m == c],
                  "images": int((truth == c).sum()), "correct": int(hit1[truth == c].sum()),
                  "top1": float(hit1[truth == c].mean())}
                 for c in sorted(set(truth.tolist()))]
    report = {"images": int(len(good)), "skipped_unreadable": [files[i] for i in bad],
              "top1": float(hit1.mean()), f"top{k}": float(hitk.mean()), "top_k": k,
              "per_class": per_class,
              "confusion": {"classes": classes, "labels": [labels[c] for c in classes],
                            "rows": "true class", "columns": "predicted class",
                            "matrix": confusion.tolist()},
              "backend": model.backend, "seconds": round(time.perf_counter() - start, 3)}
    return EvalResult(run_dir, report, confusion, classes)


def _write_eval(result: EvalResult, labels) -> bool:
    """Writes confusion.png (-> False without matplotlib), then eval.json (the saved file)."""
    matrix, names, note = result.confusion, [labels[c] for c in result.classes], ""
    if len(names) > CONFUSION_MAX:
        # the classes with the most errors, as true or as predicted class, in class order
        errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)
        keep = np.sort(np.argsort(-errors, kind="stable")[:CONFUSION_MAX])
        matrix, names = matrix[np.ix_(keep, keep)], [names[j] for j in keep]
        note = f" (the {CONFUSION_MAX} most confused of {len(result.classes)} classes)"
    figure = draw_confusion(matrix, names, f"top-1 {result.report['top1']:.1%}{note}")
    if figure is not None:
        save_figure(figure, os.path.join(result.run_dir, CONFUSION_PNG))
    with mixer.atomic_write(os.path.join(result.run_dir, EVAL_JSON)) as f:
        f.write((json.dumps(result.report, allow_nan=False) + "\n").encode("utf-8"))
    return figure is not None


def _print_summary(result: EvalResult, drawn: bool) -> None:
    r = result.report
    k = r["top_k"]
    print(f"{r['images']} images, {len(r['per_class'])} classes: top-1 {r['top1']:.2%}, "
          f"top-{k} {r[f'top{k}']:.2%}")
    worst = sorted((c for c in r["per_class"] if c["top1"] < 1),
                   key=lambda c: (c["top1"], -c["images"]))[:5]
    for c in worst:
        print(f"  {c['top1']:7.2%}  {c['correct']}/{c['images']}  "
              f"{mixer.printable(c['label'])}")
    print(f"wrote {mixer.printable(os.path.join(result.run_dir, EVAL_JSON))}"
          + (f" and {CONFUSION_PNG}" if drawn else ""))


# --------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """train.py's options (a bad one is one line: mixer.ArgumentParser)."""
    parser = mixer.ArgumentParser(
        prog="train", description="Fine-tune an MLP-Mixer on DATA_DIR/train/<class>/<image> "
        "(recipe of the paper: momentum SGD, clipping, warmup + cosine).")
    parser.add_argument("data_dir", nargs="?", metavar="DATA_DIR",
                        help="holds train/<class>/* and optionally val/<class>/*")
    model = parser.add_argument_group("model (one of --weights, --variant, or all five sizes)")
    model.add_argument("--weights", help="a mixer .safetensors file to fine-tune")
    model.add_argument("--variant", choices=sorted(mixer.VARIANTS),
                       help="train this architecture from random init")
    model.add_argument("--keep-head", action="store_true",
                       help="keep the checkpoint's head (its labels must be the dataset's classes)")
    model.add_argument("--image-size", type=int, help="default: the checkpoint's (224 from "
                       "scratch); K times the checkpoint's expands it (Mixer.at_resolution)")
    for name, what in (("patch-size", "P"), ("hidden-dim", "C"), ("num-blocks", "N"),
                       ("tokens-mlp-dim", "D_S"), ("channels-mlp-dim", "D_C")):
        model.add_argument(f"--{name}", type=int, metavar=what,
                           help="custom architecture (all five), or override --variant")
    recipe = parser.add_argument_group("recipe (the paper's fine-tuning)")
    length = recipe.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (the schedule's length)")
    length.add_argument("--epochs", type=float, help="passes over the training set")
    recipe.add_argument("--batch-size", type=int, help="images per optimizer step, over all "
                        "processes (default 512)")
    recipe.add_argument("--accum-steps", type=int,
                        help="split each batch into this many micro-batches (default: the "
                             "fewest that fit --memory-budget)")
    recipe.add_argument("--dtype", choices=mixer.COMPUTE_DTYPES,
                        help="compute dtype of the forward and backward (default float32; "
                             "weights, momentum and the update stay float32; float16 scales "
                             "the loss)")
    recipe.add_argument("--lr", type=float, help="base learning rate (default 0.03)")
    recipe.add_argument("--warmup", type=int, help="linear warmup steps (default min(500, 5%% "
                        "of the steps))")
    recipe.add_argument("--no-augment", action="store_true",
                        help="no random resized crop or flip: train on evaluation crops")
    recipe.add_argument("--seed", type=int, help="init, split, data order, augmentation (0)")
    run = parser.add_argument_group("run")
    run.add_argument("--val-fraction", type=float,
                     help="held-out share of train when DATA_DIR has no val/ (default 0.1)")
    run.add_argument("--out", metavar="RUN_DIR", help="default runs/<timestamp>")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--eval-only", action="store_true",
                     help="train nothing: score --weights on DATA_DIR's labelled images (val/, "
                          "else train/, else DATA_DIR itself) and write RUN_DIR/eval.json and "
                          "confusion.png (default RUN_DIR runs/<timestamp>-eval)")
    run.add_argument("--backend", choices=sorted(TRAIN_BACKENDS),
                     help="default: MIXER_BACKEND, else mlx if installed, else tinygrad")
    run.add_argument("--eval-every", type=int,
                     help="evaluate and checkpoint every N steps (default: 10 times a run)")
    run.add_argument("--log-every", type=int, help="steps per metrics record (default 10)")
    run.add_argument("--memory-budget", type=float, metavar="GIB",
                     help="memory a process may use, for choosing the micro-batch (default: an "
                          "Apple GPU's recommended working set, a CUDA GPU's free memory, else "
                          f"{CPU_MEMORY_SHARE * 100:.0f}%% of available RAM)")
    run.add_argument("--workers", type=int, help="image decoding threads (default: cores, <= 8)")
    run.add_argument("--decode-cache-mib", type=int, metavar="MIB",
                     help="memory for decoded images kept between epochs, per process "
                          "(default 1024; 0: none)")
    probe = parser.add_argument_group("linear probe (the paper's few-shot / linear evaluation)")
    probe.add_argument("--linear-probe", action="store_true",
                       help="fit only a head, in closed form, on the frozen features of --weights")
    probe.add_argument("--l2", type=float, metavar="LAMBDA",
                       help="the ridge penalty (default: the best of 2^-10..2^20 on val/)")
    probe.add_argument("--shots", type=int, metavar="K",
                       help=f"K training images per class, {PROBE_SEEDS} draws (seeds --seed...)")
    return parser


# The options that mean something to --linear-probe and to --eval-only; any other is refused.
PROBE_OPTIONS = {"data_dir", "weights", "l2", "shots", "seed", "val_fraction", "out", "backend",
                 "workers", "batch_size"}
EVAL_OPTIONS = {"data_dir", "weights", "out", "backend", "batch_size"}


def _only(options: dict, applies: set, refusal: str) -> dict:
    """The options in `applies`; one given besides is refused (refusal names it at {})."""
    for k, v in options.items():
        if k not in applies and v is not None and v is not False:
            raise MixerError(refusal.format(f"--{k.replace('_', '-')}"))
    return {k: v for k, v in options.items() if k in applies}


def main(argv=None) -> int:
    """The command line: train, --linear-probe or --eval-only; the exit status."""
    options = vars(build_parser().parse_args(argv))
    probe = {k: options.pop(k) for k in ("linear_probe", "l2", "shots")}
    eval_only = options.pop("eval_only")

    def body():
        if eval_only:
            if any(v is not None and v is not False for v in probe.values()):
                raise MixerError("--eval-only scores a weights file as it is: drop --linear-probe, "
                                 "--l2 and --shots (or run the probe, then evaluate its result)")
            evaluate_weights(**_only(options, EVAL_OPTIONS, "{} does not apply to --eval-only "
                                     "(which takes DATA_DIR, --weights, --out, --backend and "
                                     "--batch-size)"))
            return 0
        if probe.pop("linear_probe"):
            linear_probe(**_only({**options, **probe}, PROBE_OPTIONS, "--linear-probe fits a "
                                 "head on frozen features: {} does not apply to it"))
            return 0
        if any(v is not None for v in probe.values()):
            raise MixerError("--l2 and --shots go with --linear-probe")
        return 130 if train(**options).interrupted else 0
    return mixer.run_main("train", body)


if __name__ == "__main__":
    sys.exit(main())
