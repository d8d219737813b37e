"""Benchmark: inference speed and memory of every backend, side by side with PyTorch eager.

    python bench.py                          # S/32 and B/16 at 224, every installed backend
    python bench.py --variants B/16 --backends numpy mlx --json bench.json

Figures are measured in one run, with the backends interleaved round by round, so that a noisy,
shared machine slows them all alike; compare them as ratios. Measured:
  - the machine's float32 GEMM ceiling (a large numpy matmul) in GFLOP/s;
  - steady-state throughput (images/s) at each batch size, and its GFLOP/s as a share of that
    ceiling (FLOPs per image counted from the config, a multiply-add being 2 FLOPs);
  - single-image latency (median);
  - `python mixer.py IMG --weights F` wall time, first and second run, and its peak RSS beside the
    weights file's size;
  - training throughput for S/32, batch 32 (train.train_throughput; PyTorch doing the same step).
PyTorch, when importable, runs the same forward (same weights, tanh GELU, eps 1e-6) as a
reference; it is never a dependency of the library. onnxruntime, when onnx and onnxruntime are
importable, runs the same weights exported by `convert.py IN OUT.onnx`, as one more row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import mixer

HERE = os.path.dirname(os.path.abspath(__file__))


def flops_per_image(config: mixer.MixerConfig) -> int:
    """Forward FLOPs (multiply-add = 2) of the GEMMs; element-wise work is not counted."""
    s, c, p = config.num_tokens, config.hidden_dim, config.patch_size
    ds, dc = config.tokens_mlp_dim, config.channels_mlp_dim
    macs = s * p * p * 3 * c  # stem
    macs += config.num_blocks * (2 * c * s * ds + 2 * s * c * dc)  # token + channel MLPs
    macs += c * (config.num_classes or 0)  # head
    return 2 * macs


def blas_corename(blas: mixer.OpenBLAS | None) -> str | None:
    """The kernels an OpenBLAS (mixer.openblas(), mixer.mlx_openblas()) picked for this CPU
    ("Haswell", "SkylakeX", ...): they decide its GEMM speed. None without one."""
    if blas is None:
        return None
    import ctypes
    corename = getattr(blas.lib, blas.symbol.format("get_corename"))
    corename.restype, corename.argtypes = ctypes.c_char_p, []
    return corename().decode(errors="replace")


def gemm_ceiling(n: int = 2048, seconds: float = 3.0) -> float:
    """Best GFLOP/s of an n x n float32 numpy matmul."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


class TorchMixer:
    """The same forward in PyTorch eager (NCHW conv stem, as timm does), for comparison only."""

    def __init__(self, config, params, requires_grad=False, device="cpu", dtype="float32"):
        import torch
        self.torch, self.config = torch, config
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.p = {}
        for k, v in params.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            if k == "stem/kernel":
                t = t.permute(3, 2, 0, 1)  # HWIO -> OIHW for conv2d
            elif k.endswith("/kernel"):
                t = t.t()  # (in, out) -> (out, in) for F.linear
            t = t.to(self.device, self.dtype).contiguous()
            self.p[k] = t.requires_grad_(requires_grad)
        self.backend = "torch"

    def forward(self, x):
        """x: (B, 3, H, W) torch tensor -> logits."""
        F, p, c = self.torch.nn.functional, self.p, self.config.hidden_dim
        ln = lambda t, n: F.layer_norm(t, (c,), p[n + "/scale"], p[n + "/bias"],  # noqa: E731
                                       mixer.LN_EPS)
        mlp = lambda t, n: F.linear(  # noqa: E731
            F.gelu(F.linear(t, p[n + "/Dense_0/kernel"], p[n + "/Dense_0/bias"]),
                   approximate="tanh"), p[n + "/Dense_1/kernel"], p[n + "/Dense_1/bias"])
        x = F.conv2d(x, p["stem/kernel"], p["stem/bias"], stride=self.config.patch_size)
        x = x.flatten(2).transpose(1, 2)  # (B, S, C)
        for i in range(self.config.num_blocks):
            b = f"MixerBlock_{i}/"
            x = x + mlp(ln(x, b + "LayerNorm_0").transpose(1, 2), b + "token_mixing").transpose(1, 2)
            x = x + mlp(ln(x, b + "LayerNorm_1"), b + "channel_mixing")
        x = ln(x, "pre_head_layer_norm").mean(dim=1)
        return F.linear(x, p["head/kernel"], p["head/bias"])

    def __call__(self, x):
        """Like a Mixer: float32 numpy in and out (on a GPU, the copies are part of the call)."""
        with self.torch.inference_mode():
            x = self.torch.from_numpy(x).to(self.device, self.dtype).permute(0, 3, 1, 2)
            return self.forward(x).float().cpu().numpy()


def torch_train_throughput(variant="S/32", batch_size=32, steps=3) -> float:
    """train.train_throughput's step as a PyTorch user writes it: forward, backward, clipping at
    norm 1, momentum SGD; random data already in memory, after two warm-up steps."""
    import torch
    config = mixer.VARIANTS[variant]
    model = TorchMixer(config, mixer.init_params(config), requires_grad=True)
    optimizer = torch.optim.SGD(model.p.values(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (batch_size, config.image_size, config.image_size, 3)
                                     ).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, config.num_classes, batch_size))

    def step():
        loss = torch.nn.functional.cross_entropy(model.forward(x.permute(0, 3, 1, 2)), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.p.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def build_model(config, backend, dtype="float32", torch_device="cpu"):
    params = mixer.init_params(config, seed=0)
    rng = np.random.default_rng(1)  # a non-zero head, so the head's GEMM is real work
    params["head/kernel"] = rng.standard_normal(params["head/kernel"].shape,
                                                dtype=np.float32) * 0.02
    if backend == "torch":
        return TorchMixer(config, params, device=torch_device, dtype=dtype)
    return mixer.Mixer(config, params, backend=backend, dtype=dtype)


# How far each backend's logits may be from the first's (a sanity check, not a parity test)
AGREEMENT = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}


def time_call(model, x, min_seconds, min_runs=3):
    """Seconds per call: the median of at least `min_runs` calls, or as many as `min_seconds` allows."""
    times, end = [], time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < end:
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
        if len(times) >= min_runs and sum(times) > 4 * min_seconds:
            break
    return statistics.median(times)


def worker(backend, variant, options):
    """One backend in its own process (threads of different BLAS/OpenMP runtimes in one process
    spin against each other). Reads {"batch", "seconds"} lines, answers {"seconds", "logits"},
    or {"skipped"} when a first call takes longer than max_call_seconds or the backend cannot
    run the dtype."""
    config = mixer.VARIANTS[variant]
    max_call_seconds = options["max_call_seconds"]
    inputs, skipped, unusable = {}, {}, None
    try:
        if backend == "onnxruntime":
            model = onnxruntime_model(config, options)
        elif options.get("weights"):
            model = mixer.load(options["weights"], backend=backend)
        else:
            model = build_model(config, backend, options["dtype"], options["torch_device"])
    except mixer.MixerError as e:
        unusable = str(e)
    for line in sys.stdin:
        cmd = json.loads(line)
        bs = cmd["batch"]
        if unusable:
            skipped[bs] = unusable
        elif bs not in inputs:
            rng = np.random.default_rng(2)
            inputs[bs] = rng.uniform(-1, 1, (bs, config.image_size, config.image_size, 3)
                                     ).astype(np.float32)
            t = time.perf_counter()
            model(inputs[bs])
            first = time.perf_counter() - t
            if first > max_call_seconds:
                skipped[bs] = f"first call took {first:.1f} s > --max-call-seconds"
            else:
                for _ in range(2):  # warm-up: compilation, JIT capture, page-in of the weights
                    model(inputs[bs])
        if bs in skipped:
            answer = {"skipped": skipped[bs]}
        else:
            x = inputs[bs]
            answer = {"seconds": time_call(model, x, cmd["seconds"]),
                      "logits": model(x[:1])[0].tolist() if bs == 1 else None}
        print(json.dumps(answer), flush=True)


def onnxruntime_model(config, options):
    """The worker's weights (options["weights"], else build_model's) exported by
    convert.export_onnx and run by onnxruntime with its default, all graph optimisations: a
    callable images -> logits."""
    import onnxruntime

    import convert
    with tempfile.TemporaryDirectory() as tmp:
        weights = options.get("weights")
        if not weights:
            weights = os.path.join(tmp, "model.safetensors")
            build_model(config, "numpy").save(weights)
        path = os.path.join(tmp, "model.onnx")
        convert.export_onnx(weights, path, dtype=options["dtype"])
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x})[0]


class Worker:
    def __init__(self, backend, variant, options):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                      backend, variant, json.dumps(options)],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker {self.proc.args[-2:]} died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def interleaved_rounds(workers: dict, batch: int, rounds: int, seconds: float):
    """Times every worker once per round, in turn, at one batch size; -> (best seconds, batch-1
    logits, why skipped), each a dict by the workers' keys."""
    best, logits, skipped = {k: float("inf") for k in workers}, {}, {}
    for _ in range(rounds):
        for k, w in workers.items():
            if k in skipped:
                continue
            answer = w.ask(batch=batch, seconds=seconds)
            if "skipped" in answer:
                skipped[k] = answer["skipped"]
                continue
            best[k] = min(best[k], answer["seconds"])
            if answer["logits"] is not None:
                logits[k] = np.array(answer["logits"])
    return best, logits, skipped


def bench_inference(variant, backends, batch_sizes, rounds, seconds, options):
    """Interleaved rounds: each round times every backend once; each backend's best round counts.
    Only one worker computes at a time; the others wait on their pipe."""
    config = mixer.VARIANTS[variant]
    workers = {b: Worker(b, variant, options) for b in backends}
    rows = []
    try:
        for bs in batch_sizes:
            best, logits, skipped = interleaved_rounds(workers, bs, rounds, seconds)
            first = next(iter(logits), None)
            for b, out in logits.items():  # same weights and input: the outputs must agree
                if np.abs(out - logits[first]).max() > AGREEMENT[options["dtype"]]:
                    raise SystemExit(f"{b} disagrees with {first} on {variant}: max |diff| "
                                     f"{np.abs(out - logits[first]).max():.2e}")
            for b, t in best.items():
                if b in skipped:
                    rows.append({"variant": variant, "backend": b, "batch": bs,
                                 "skipped": skipped[b]})
                    continue
                rows.append({"variant": variant, "backend": b, "batch": bs, "seconds": t,
                             "images_per_s": bs / t,
                             "gflops": flops_per_image(config) * bs / t / 1e9})
    finally:
        for w in workers.values():
            w.close()
    return rows


# Prints the process's peak RSS in bytes on stderr. Linux: VmHWM of the process image itself
# (ru_maxrss would also count the benchmark's own pages that the child held between fork and
# exec). Without /proc (macOS): ru_maxrss, which macOS counts in bytes, Linux and BSD in KiB.
PEAK_RSS = ("import resource, sys\n"
            "try:\n"
            "    with open('/proc/self/status') as f:\n"
            "        peak = [int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM')][0]\n"
            "except OSError:\n"
            "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "    peak *= 1 if sys.platform == 'darwin' else 1024\n"
            "print(peak, file=sys.stderr)\n")


def bench_cli(variant, backend, tmp, weights=None):
    """Wall time of `python mixer.py IMG --weights F` (first and second run) and its peak RSS;
    F: `weights`, or a random float32 file of the variant."""
    config = mixer.VARIANTS[variant]
    if weights is None:
        weights = os.path.join(tmp, variant.replace("/", "_") + ".safetensors")
    if not os.path.exists(weights):
        mixer.init(config, backend="numpy").save(weights)
    image = os.path.join(tmp, "image.png")
    if not os.path.exists(image):
        from PIL import Image
        pixels = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
    command = [os.path.join(HERE, "mixer.py"), image, "--weights", weights, "--backend", backend]
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        subprocess.run([sys.executable] + command, check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
    probe = ("import runpy, sys\n"
             f"sys.argv = {command!r}\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n" + PEAK_RSS)
    proc = subprocess.run([sys.executable, "-c", probe], check=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    rss = [int(proc.stderr.strip().splitlines()[-1])] * 2
    size = os.path.getsize(weights)
    return {"variant": variant, "backend": backend, "first_s": walls[0], "second_s": walls[1],
            "peak_rss_mib": rss[1] / 2**20, "weights_mib": size / 2**20,
            "rss_over_weights": rss[1] / size}


def train_worker(backend, steps):
    if backend == "torch":
        ips = torch_train_throughput(steps=steps)
    else:
        import train
        ips = train.train_throughput(backend, variant="S/32", batch_size=32, steps=steps)
    print(json.dumps({"train_images_per_s": ips}), flush=True)


def bench_train(backends, steps, timeout):
    """Training step throughput, S/32 at 224, batch 32: each backend in its own process, in turn."""
    rows = []
    for b in backends:
        row = {"variant": "S/32", "backend": b, "batch": 32}
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--train-worker",
                                   b, str(steps)], capture_output=True, text=True,
                                  timeout=timeout)
            if done.returncode == 0:
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                row["skipped"] = (done.stderr.strip().splitlines() or ["failed"])[-1]
        except subprocess.TimeoutExpired:
            row["skipped"] = f"over --train-timeout {timeout} s"
        rows.append(row)
    ref = next((r for r in rows if r["backend"] == "torch" and "train_images_per_s" in r), None)
    for r in rows:
        if ref and "train_images_per_s" in r:
            r["vs_torch"] = r["train_images_per_s"] / ref["train_images_per_s"]
    return rows


# --- training memory: what a micro-batch keeps per image ---------------------------------------

def train_memory_worker(variant, dtype, batch, split):
    """Activation bytes per image of one training micro-batch (forward and backward, gradients
    summed) on MLX's CPU device: (peak at 2B - peak at B) / B, peaks from MLX's allocator
    (mx.get_peak_memory after mx.reset_peak_memory, each size warmed up first), beside
    train.activation_bytes's estimate, which has a margin on top."""
    mixer.DATA_PARALLEL = split == "split"
    import dataclasses
    import train
    config = dataclasses.replace(mixer.VARIANTS[variant], num_classes=10)
    xp = train.get_backend("mlx")
    mx = xp.mx
    rng = np.random.default_rng(0)
    params = {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32)
              for k, v in mixer.init_params(config, 0).items()}
    trainer = train.Trainer(xp, config, params, None, 1, dtype=dtype)
    peaks = {}
    for b in (batch, 2 * batch):
        size = config.image_size
        x = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
        onehot = train.one_hot(rng.integers(0, 10, b), 10)
        trainer.accumulate(x, onehot)  # compiles
        trainer.update(0.0)
        mx.clear_cache()
        mx.reset_peak_memory()
        trainer.accumulate(x, onehot)
        xp.sync(trainer.state)  # the micro-batch alone: the update's peak does not grow with B
        peaks[b] = mx.get_peak_memory()
        trainer.update(0.0)
    per_image = (peaks[2 * batch] - peaks[batch]) / batch
    print(json.dumps({"variant": variant, "dtype": dtype, "split": split, "batch": batch,
                      "per_image_mib": per_image / 2**20,
                      "estimate_mib": train.activation_bytes(config, dtype) / 2**20,
                      "peak_mib": peaks[2 * batch] / 2**20}), flush=True)


def bench_train_memory(variants, dtypes, batch, timeout):
    rows = []
    for variant in variants:
        for dtype in dtypes:
            for split in ("split", "whole"):
                row = {"variant": variant, "dtype": dtype, "split": split}
                try:
                    done = subprocess.run([sys.executable, os.path.abspath(__file__),
                                           "--train-memory-worker", variant, dtype,
                                           str(batch), split],
                                          capture_output=True, text=True, timeout=timeout)
                    if done.returncode == 0:
                        row = json.loads(done.stdout.strip().splitlines()[-1])
                    else:
                        row["skipped"] = (done.stderr.strip().splitlines() or ["failed"])[-1]
                except subprocess.TimeoutExpired:
                    row["skipped"] = f"over --train-timeout {timeout} s"
                rows.append(row)
    return rows


# --- quantised weights: size, peak RSS, speed and logit error beside float32 ----------------

QUANT_DTYPES = ("float32", "int8", "int4")


def quant_files(variant: str, tmp: str) -> dict:
    """The variant's random weights (official init, a non-zero head) as float32, int8 and int4
    files (groups of mixer.DEFAULT_GROUP_SIZE): {dtype: path}."""
    model = build_model(mixer.VARIANTS[variant], "numpy")
    files = {}
    for dtype in QUANT_DTYPES:
        files[dtype] = os.path.join(tmp, f"{variant.replace('/', '_')}-{dtype}.safetensors")
        model.save(files[dtype], dtype=dtype)
    return files


def bench_quant(variant, backends, batch_sizes, rounds, seconds, max_call_seconds, tmp):
    """Each backend with each of the three files, every one in its own worker process, timed in
    interleaved rounds (best round counts); speed as a ratio to the same backend's float32, the
    logits' relative error ||q - f|| / ||f|| against float32 at batch 1, the file size, and the
    CLI's peak RSS (numpy: the default backend on a CPU)."""
    files = quant_files(variant, tmp)
    rows = []
    for b in backends:
        workers = {d: Worker(b, variant, {"weights": files[d], "dtype": "float32",
                                          "torch_device": "cpu",
                                          "max_call_seconds": max_call_seconds})
                   for d in QUANT_DTYPES}
        try:
            for bs in batch_sizes:
                best, logits, skipped = interleaved_rounds(workers, bs, rounds, seconds)
                for d in QUANT_DTYPES:
                    row = {"variant": variant, "backend": b, "weights": d, "batch": bs}
                    if d in skipped:
                        rows.append({**row, "skipped": skipped[d]})
                        continue
                    row.update(seconds=best[d], images_per_s=bs / best[d])
                    if "float32" not in skipped:
                        row["time_vs_float32"] = best[d] / best["float32"]
                    if d in logits and "float32" in logits:
                        f = logits["float32"]
                        row["logit_rel_error"] = float(np.linalg.norm(logits[d] - f)
                                                       / np.linalg.norm(f))
                    rows.append(row)
        finally:
            for w in workers.values():
                w.close()
    sizes = {d: os.path.getsize(path) for d, path in files.items()}
    cli = {d: bench_cli(variant, "numpy", tmp, weights=files[d]) for d in QUANT_DTYPES}
    files_rows = [{"variant": variant, "weights": d, "file_mib": sizes[d] / 2**20,
                   "size_vs_float32": sizes[d] / sizes["float32"],
                   "cli_peak_rss_mib": cli[d]["peak_rss_mib"],
                   "rss_vs_float32": cli[d]["peak_rss_mib"] / cli["float32"]["peak_rss_mib"],
                   "cli_second_s": cli[d]["second_s"]} for d in QUANT_DTYPES]
    return rows, files_rows


# --- photos: end to end, from camera-sized JPEG files -----------------------------------------

PHOTO_SIZE = (4032, 3024)  # what a phone camera writes: 12 megapixels
SMALL_PHOTO_SIZE = (320, 240)  # the same photos stored small, for the fine-tuning comparison
PHOTOS_PER_CLASS = 16  # two classes: 32 photos
TRAIN_EPOCHS, TRAIN_BATCH = 4, 16


def make_photo(width: int, height: int, seed: int = 0):
    """A photo-like PIL image: a smooth colour field, shapes with sharp edges softened by a
    lens-like blur, thin lines, a band of fine texture, and sensor noise. What JPEG files and
    reduced-scale decoding can be compared on (random pixels would be all texture)."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(30, 225, (3, 4, 3), dtype=np.uint8))
    image = field.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w = int(rng.integers(width // 40, width // 4))
        h = int(rng.integers(height // 40, height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=colour)
    for _ in range(30):
        ends = [int(v) for v in rng.integers(0, [width, height, width, height])]
        draw.line(ends, fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=max(1, int(rng.integers(1, 6)) * width // 2000))
    image = image.filter(ImageFilter.GaussianBlur(width / 3000))
    a = np.asarray(image, dtype=np.int16)
    y, x = np.mgrid[0:height, 0:width]
    band = (y > 0.6 * height) & (y < 0.8 * height)  # fabric or foliage: a few pixels a period
    a = a + (band * 25 * np.sin(x * 0.9 + y * 0.4)).astype(np.int16)[..., None]
    a = a + rng.normal(0, 4, a.shape).astype(np.int16)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def photo_data(root: str) -> dict:
    """The benchmark's photos, generated once under `root` (a minute) and reused: a train.py
    data folder of 2 x PHOTOS_PER_CLASS JPEGs (quality 90, ~2 MB each) at PHOTO_SIZE, val/
    holding two of each class, and the same layout with the photos stored at SMALL_PHOTO_SIZE.
    Returns {"full": folder, "small": folder}; each has train/ (the 32 photos) and val/."""
    folders = {"full": os.path.join(root, "%dx%d" % PHOTO_SIZE),
               "small": os.path.join(root, "%dx%d" % SMALL_PHOTO_SIZE)}
    if all(os.path.isdir(f) for f in folders.values()):
        return folders
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=root, prefix=".making-")
    for kind, size in (("full", PHOTO_SIZE), ("small", SMALL_PHOTO_SIZE)):
        for split, count in (("train", PHOTOS_PER_CLASS), ("val", 2)):
            for label in ("a", "b"):
                os.makedirs(os.path.join(scratch, kind, split, label))
    for i in range(2 * PHOTOS_PER_CLASS):
        photo = make_photo(*PHOTO_SIZE, seed=i)
        small = photo.resize(SMALL_PHOTO_SIZE, reducing_gap=3.0)
        label, n = "ab"[i % 2], i // 2
        splits = ["train"] + (["val"] if n < 2 else [])
        for split in splits:
            name = os.path.join(split, label, f"photo-{n:02d}.jpg")
            photo.save(os.path.join(scratch, "full", name), quality=90)
            small.save(os.path.join(scratch, "small", name), quality=90)
    for kind, folder in folders.items():
        if not os.path.isdir(folder):
            os.rename(os.path.join(scratch, kind), folder)
    shutil.rmtree(scratch)
    return folders


def photo_files(folder: str) -> list:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def photos_worker(backend, variant, folder, rounds):
    """Mixer.classify on the photos' paths against the model alone on the same images,
    preprocessed, at the same batch (all of them), interleaved round by round; best of each."""
    config = mixer.VARIANTS[variant]
    model = build_model(config, backend)
    paths = photo_files(folder)
    x = np.stack([mixer.preprocess(p, size=config.image_size) for p in paths])
    model(x)  # warm-up: compilation, page-in of the weights
    model.classify(paths[:4], batch_size=len(paths))
    best = {"model": float("inf"), "classify": float("inf"), "classify_exact": float("inf")}
    for _ in range(rounds):
        for key, call in (("model", lambda: model(x)),
                          ("classify", lambda: model.classify(paths, batch_size=len(paths))),
                          ("classify_exact", lambda: model.classify(paths, batch_size=len(paths),
                                                                    exact=True))):
            t = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - t)
    print(json.dumps({f"{k}_images_per_s": len(paths) / t for k, t in best.items()}), flush=True)


def photos_train_worker(data_dir, out):
    """train.train on one data folder (S/32 from scratch on MLX, TRAIN_EPOCHS epochs); prints
    the images_per_s of each step, as metrics.jsonl records them."""
    import train
    steps = TRAIN_EPOCHS * 2 * PHOTOS_PER_CLASS // TRAIN_BATCH
    train.train(data_dir, variant="S/32", backend="mlx", batch_size=TRAIN_BATCH, steps=steps,
                eval_every=10**6, log_every=1, out=out, quiet=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    print(json.dumps([r["images_per_s"] for r in records if "images_per_s" in r]), flush=True)


def bench_photos(variants, backends, rounds, root, timeout):
    """The end-to-end rows: classify and the CLI on a folder of 12-megapixel JPEGs beside the
    model alone; preprocess fast and exact; fine-tuning on the photos and on them stored small."""
    folders = photo_data(root)
    photos = os.path.join(folders["full"], "train")
    paths = photo_files(photos)
    rows = {"photos": len(paths), "photo_size": "%dx%d" % PHOTO_SIZE}
    # (c) one photo through preprocess on one core (median of 5), and how far apart the two are
    for exact in (False, True):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            mixer.preprocess(paths[0], exact=exact)
            times.append(time.perf_counter() - t)
        rows["preprocess_exact_ms" if exact else "preprocess_ms"] = statistics.median(times) * 1e3
    diffs = [np.abs(mixer.preprocess(p) - mixer.preprocess(p, exact=True)) for p in paths]
    rows["fast_vs_exact_mean"] = float(np.mean([d.mean() for d in diffs]))
    rows["fast_vs_exact_worst_mean"] = float(max(d.mean() for d in diffs))
    rows["fast_vs_exact_max"] = float(max(d.max() for d in diffs))
    # (a) and (b), each backend in its own process
    classify, cli = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, b in ((v, b) for v in variants for b in backends):
            weights = os.path.join(tmp, variant.replace("/", "_") + ".safetensors")
            if not os.path.exists(weights):
                mixer.init(mixer.VARIANTS[variant], backend="numpy").save(weights)
            row = {"variant": variant, "backend": b, "batch": len(paths)}
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--photos-worker",
                                   b, variant, photos, str(rounds)],
                                  capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                row["ratio"] = row["classify_images_per_s"] / row["model_images_per_s"]
            else:
                row["skipped"] = (done.stderr.strip().splitlines() or ["failed"])[-1]
            classify.append(row)
            command = [sys.executable, os.path.join(HERE, "mixer.py"), photos,
                       "--weights", weights, "--backend", b]
            t = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            wall = time.perf_counter() - t
            cli.append({"variant": variant, "backend": b, "wall_s": wall,
                        "images_per_s": len(paths) / wall} if done.returncode == 0 else
                       {"variant": variant, "backend": b,
                        "skipped": (done.stderr.strip().splitlines() or ["failed"])[-1]})
        # (d) fine-tuning on MLX, the photos and the same photos stored small, in turn
        training = {}
        for kind, folder in folders.items():
            done = subprocess.run([sys.executable, os.path.abspath(__file__),
                                   "--photos-train-worker", folder,
                                   os.path.join(tmp, "run-" + kind)],
                                  capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                per_step = json.loads(done.stdout.strip().splitlines()[-1])
                # all the run's images over all its time; and without the first step, which
                # also compiles the training step (the same work in both runs)
                training[kind] = {"per_step": per_step,
                                  "images_per_s": len(per_step) / sum(1 / r for r in per_step),
                                  "after_first_step": (len(per_step) - 1)
                                  / sum(1 / r for r in per_step[1:])}
            else:
                training[kind] = {"skipped": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    rows.update(classify=classify, cli=cli, train=training)
    if all("images_per_s" in t for t in training.values()):
        full, small = training["full"], training["small"]
        training["ratio"] = full["images_per_s"] / small["images_per_s"]
        training["ratio_after_first_step"] = full["after_first_step"] / small["after_first_step"]
    return rows


def print_photos(photos):
    n, size = photos["photos"], photos["photo_size"]
    print(f"\nphotos: {n} JPEGs of {size}")
    print(f"  preprocess, one photo, one core: {photos['preprocess_ms']:.1f} ms (exact: "
          f"{photos['preprocess_exact_ms']:.1f} ms); fast vs exact: mean |difference| "
          f"{photos['fast_vs_exact_mean']:.4f} (worst photo "
          f"{photos['fast_vs_exact_worst_mean']:.4f}, largest single value {photos['fast_vs_exact_max']:.3f})")
    print_table(f"Mixer.classify({n} paths) beside the model alone on the same batch "
                f"(ratio = classify / model)", photos["classify"],
                [("variant", ""), ("backend", ""), ("batch", "d"), ("model_images_per_s", ".1f"),
                 ("classify_images_per_s", ".1f"), ("ratio", ".2f"),
                 ("classify_exact_images_per_s", ".1f"), ("skipped", "")])
    print_table(f"python mixer.py FOLDER --weights F ({n} photos; wall time, start-up included)",
                photos["cli"], [("variant", ""), ("backend", ""), ("wall_s", ".2f"),
                                ("images_per_s", ".1f"), ("skipped", "")])
    train = photos["train"]
    rows = [dict(kind=k, **v) for k, v in train.items() if isinstance(v, dict)]
    print_table(f"fine-tuning S/32 on MLX, batch {TRAIN_BATCH}, {TRAIN_EPOCHS} epochs "
                f"(images_per_s from metrics.jsonl)", rows,
                [("kind", ""), ("images_per_s", ".1f"), ("after_first_step", ".1f"),
                 ("skipped", "")])
    if "ratio" in train:
        print(f"  photos / stored small: {train['ratio']:.2f} (after the first step: "
              f"{train['ratio_after_first_step']:.2f})")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(title, rows, columns):
    """columns: (key, format spec) pairs; a row without a key shows a blank cell."""
    cells = [[c for c, _ in columns]]
    for row in rows:
        cells.append([format(row[c], fmt) if isinstance(row.get(c), (int, float)) else
                      str(row.get(c, "")) for c, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["S/32", "B/16"],
                        choices=sorted(mixer.VARIANTS))
    parser.add_argument("--backends", nargs="+", default=None, choices=sorted(mixer.BACKENDS),
                        help="default: every installed backend")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per backend per round")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-onnxruntime", action="store_true",
                        help="skip onnxruntime on the ONNX export (run when onnx and onnxruntime "
                             "are installed)")
    parser.add_argument("--dtype", choices=mixer.COMPUTE_DTYPES, default="float32",
                        help="compute dtype of the inference runs, PyTorch's too (numpy: float32 "
                             "only, so skipped otherwise)")
    parser.add_argument("--torch-device", default="cpu",
                        help="PyTorch's device, e.g. cuda to compare with DEV=CUDA tinygrad")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI wall-time/RSS runs")
    parser.add_argument("--no-train", action="store_true", help="skip training throughput")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--train-timeout", type=float, default=900,
                        help="seconds allowed per backend for the training measurement")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--max-call-seconds", type=float, default=30.0,
                        help="skip a backend/batch whose first call takes longer (e.g. tinygrad "
                             "on a CPU without BEAM at B/16, batch 32)")
    parser.add_argument("--train-memory", action="store_true",
                        help="also measure the training activations per image (MLX CPU, float32 "
                             "and bfloat16, CPU streams split and whole as on a GPU)")
    parser.add_argument("--train-memory-batch", type=int, default=8,
                        help="B of the (peak at 2B - peak at B) / B measurement")
    parser.add_argument("--train-memory-worker", nargs=4,
                        metavar=("VARIANT", "DTYPE", "B", "SPLIT"), help=argparse.SUPPRESS)
    parser.add_argument("--quant", action="store_true",
                        help="also compare int8 and int4 weights files with float32: size, the "
                             "CLI's peak RSS, speed per backend, logit error")
    parser.add_argument("--photos", action="store_true",
                        help="also the end-to-end rows on 32 generated 12-megapixel JPEGs "
                             "(made once under --photos-dir, ~1 min): Mixer.classify and "
                             "`python mixer.py FOLDER` beside the model alone, for --variants "
                             "and --backends; preprocess fast and exact; fine-tuning S/32 on "
                             "MLX on the photos and on them stored at 320x240")
    parser.add_argument("--photos-dir", default=os.path.join(tempfile.gettempdir(),
                                                             "mixer-bench-photos"),
                        help="where the generated photos are kept (default: %(default)s)")
    parser.add_argument("--train-worker", nargs=2, metavar=("BACKEND", "STEPS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--photos-worker", nargs=4,
                        metavar=("BACKEND", "VARIANT", "FOLDER", "ROUNDS"), help=argparse.SUPPRESS)
    parser.add_argument("--photos-train-worker", nargs=2, metavar=("DATA_DIR", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("BACKEND", "VARIANT", "OPTIONS"),
                        help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], json.loads(args.worker[2]))
    if args.train_worker:
        return train_worker(args.train_worker[0], int(args.train_worker[1]))
    if args.photos_worker:
        backend, variant, folder, rounds = args.photos_worker
        return photos_worker(backend, variant, folder, int(rounds))
    if args.train_memory_worker:
        variant, dtype, batch, split = args.train_memory_worker
        return train_memory_worker(variant, dtype, int(batch), split)
    if args.photos_train_worker:
        return photos_train_worker(*args.photos_train_worker)

    backends = args.backends or [b for b in mixer.BACKENDS
                                 if b == "numpy" or mixer.installed(b)]
    use_torch = not args.no_torch and torch_available()
    use_onnxruntime = not args.no_onnxruntime and mixer.installed("onnx") \
        and mixer.installed("onnxruntime")
    import platform
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "python": platform.python_version(),
               "numpy": np.__version__, "backends": backends, "torch": use_torch,
               "onnxruntime": use_onnxruntime,
               "default_backend": mixer.default_backend(), "DEV": os.environ.get("DEV"),
               "dtype": args.dtype, "torch_device": args.torch_device if use_torch else None}
    # OpenBLAS's kernels decide the GEMM speed of numpy (and of MLX on Linux); an environment
    # may force them (OPENBLAS_CORETYPE=Haswell runs an AVX-512 CPU at half speed)
    machine["numpy_blas"] = blas_corename(mixer.openblas())
    try:  # an MLX that will not import is reported by its worker, as skipped
        mlx_blas = mixer.mlx_openblas() if "mlx" in backends else None
    except mixer.MixerError:
        mlx_blas = None
    machine["mlx_blas"] = blas_corename(mlx_blas)
    forced = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")}
    machine.update(forced)
    ceiling = gemm_ceiling()
    machine["gemm_gflops"] = ceiling
    kernels = f"numpy's OpenBLAS kernels: {machine['numpy_blas']}"
    if machine["mlx_blas"]:
        kernels += f", MLX's: {machine['mlx_blas']}"
    print(f"machine: {machine['platform']}, {machine['cpus']} CPUs; {kernels}"
          f"{' ' + str(forced) if forced else ''}; fp32 GEMM ceiling {ceiling:.0f} GFLOP/s; "
          f"default backend: {machine['default_backend']}")

    inference = []
    for variant in args.variants:
        inference += bench_inference(variant, backends + ["onnxruntime"] * use_onnxruntime
                                     + ["torch"] * use_torch,
                                     args.batch_sizes, args.rounds, args.seconds,
                                     {"max_call_seconds": args.max_call_seconds,
                                      "dtype": args.dtype, "torch_device": args.torch_device})
    for row in inference:
        if "skipped" in row:
            continue
        row["of_ceiling"] = row["gflops"] / ceiling
        ref = next((r for r in inference if r["backend"] == "torch" and "seconds" in r
                    and r["variant"] == row["variant"] and r["batch"] == row["batch"]), None)
        if ref:
            row["vs_torch"] = ref["seconds"] / row["seconds"]  # > 1: faster than PyTorch
        if row["batch"] == 1:
            row["latency_ms"] = row["seconds"] * 1000
    print_table("inference (vs_torch > 1 means faster than PyTorch eager)", inference,
                [("variant", ""), ("backend", ""), ("batch", "d"), ("images_per_s", ".1f"),
                 ("latency_ms", ".1f"), ("gflops", ".1f"), ("of_ceiling", ".0%"),
                 ("vs_torch", ".2f"), ("skipped", "")])

    cli = []
    if not args.no_cli:
        with tempfile.TemporaryDirectory() as tmp:
            cli = [bench_cli(v, b, tmp) for v in args.variants for b in backends]
        print_table("python mixer.py IMG --weights F (float32 weights)", cli,
                    [("variant", ""), ("backend", ""), ("first_s", ".2f"), ("second_s", ".2f"),
                     ("peak_rss_mib", ".0f"), ("weights_mib", ".0f"), ("rss_over_weights", ".2f")])

    training = [] if args.no_train else bench_train(
        [b for b in backends if b != "numpy"] + ["torch"] * use_torch, args.train_steps,
        args.train_timeout)
    if training:
        print_table("training step (forward, backward, clipped momentum SGD), S/32 at 224",
                    training, [("variant", ""), ("backend", ""), ("batch", "d"),
                               ("train_images_per_s", ".1f"), ("vs_torch", ".2f"),
                               ("skipped", "")])

    memory = None
    if args.train_memory:
        memory = bench_train_memory(args.variants, ("float32", "bfloat16"),
                                    args.train_memory_batch, args.train_timeout)
        print_table("training activations per image, MLX CPU (split: one CPU stream per core; "
                    "whole: as on a GPU); estimate: what train.py plans with (margin included)",
                    memory, [("variant", ""), ("dtype", ""), ("split", ""),
                             ("per_image_mib", ".2f"), ("estimate_mib", ".2f"),
                             ("skipped", "")])

    quant = None
    if args.quant:
        quant = {"speed": [], "files": []}
        with tempfile.TemporaryDirectory() as tmp:
            for variant in args.variants:
                speed, files = bench_quant(variant, backends, args.batch_sizes, args.rounds,
                                           args.seconds, args.max_call_seconds, tmp)
                quant["speed"] += speed
                quant["files"] += files
        print_table("quantised weights: files and `python mixer.py IMG --weights F` (numpy)",
                    quant["files"], [("variant", ""), ("weights", ""), ("file_mib", ".1f"),
                                     ("size_vs_float32", ".3f"), ("cli_peak_rss_mib", ".0f"),
                                     ("rss_vs_float32", ".2f"), ("cli_second_s", ".2f")])
        print_table("quantised weights: forward speed (time_vs_float32 < 1: faster than the "
                    "same backend's float32) and logits against float32", quant["speed"],
                    [("variant", ""), ("backend", ""), ("weights", ""), ("batch", "d"),
                     ("images_per_s", ".1f"), ("time_vs_float32", ".3f"),
                     ("logit_rel_error", ".4f"), ("skipped", "")])

    photos = None
    if args.photos:
        photos = bench_photos(args.variants, backends, args.rounds, args.photos_dir,
                              args.train_timeout)
        print_photos(photos)

    if args.json:
        doc = {"machine": machine, "inference": inference, "cli": cli, "training": training,
               "quant": quant, "train_memory": memory, "photos": photos}
        with mixer.atomic_write(args.json) as f:
            f.write(json.dumps(doc, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
