"""train.py: the recipe against float64 numpy, fine-tuning to high accuracy on MLX and tinygrad,
exact resume, Ctrl-C, data-parallel MLX, the data pipeline and every refusal.

Datasets are generated here: 32x32 images of a coloured disc or square on a noisy background,
the class being the colour, as PNG and JPEG files in class folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

import mixer
import train
from conftest import REPO, tinygrad_device
from reference import random_params, reference_forward

COLOURS = {"blue": (40, 70, 230), "green": (40, 200, 60), "red": (220, 40, 40),
           "yellow": (230, 210, 40)}
CLASSES = sorted(COLOURS)
# Small enough for a 2-core CI machine: 32x32 images, P=8 -> 16 tokens.
SMALL = dict(patch_size=8, hidden_dim=32, num_blocks=2, tokens_mlp_dim=32, channels_mlp_dim=64)


def make_dataset(root, per_class: dict, size=32, seed=0):
    """root/<split>/<colour>/NNN.{png,jpg}: a disc or square of the class colour (jittered), at a
    random place and size, on uniform noise."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, rgb in COLOURS.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(60, 190, (size, size, 3), dtype=np.uint8))
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in rgb)
                draw = ImageDraw.Draw(img)
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape([cx - r, cy - r, cx + r, cy + r], fill=colour)
                img.save(os.path.join(root, split, name, f"{i:03d}.{'png' if i % 2 else 'jpg'}"))
    return str(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """50 train + 15 val images per class, plus files that cannot be read."""
    root = make_dataset(tmp_path_factory.mktemp("colours"), {"train": 50, "val": 15})
    with open(os.path.join(root, "train", "red", "broken.jpg"), "w") as f:
        f.write("not an image")
    open(os.path.join(root, "train", "blue", "empty.png"), "w").close()
    open(os.path.join(root, "train", "blue", ".DS_Store"), "w").close()  # hidden: ignored
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'converted checkpoint' to fine-tune: 32px, a 10-class head with other labels."""
    config = mixer.MixerConfig(**SMALL, num_classes=10, image_size=32)
    path = str(tmp_path_factory.mktemp("weights") / "pretrained.safetensors")
    mixer.Mixer(config, random_params(config, seed=0), backend="numpy",
                labels=[f"thing{i}" for i in range(10)]).save(path)
    return path


def on_device(backend):
    """tinygrad on its CPU device (clang), whatever the machine's default; MLX as it is."""
    return tinygrad_device("CPU") if backend == "tinygrad" else contextlib.nullcontext()


def run(backend, **kwargs):
    """train.train on `backend`, returning (result, what it printed on stderr)."""
    err = io.StringIO()
    with on_device(backend), contextlib.redirect_stderr(err):
        result = train.train(backend=backend, **kwargs)
    return result, err.getvalue()


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# The recipe against an independent float64 computation.


def official_lr(step, base, warmup, total):
    """The official schedule (linear warmup, then cosine decay to 0), written out independently."""
    progress = np.clip((step - warmup) / (total - warmup), 0.0, 1.0)
    lr = base * 0.5 * (1 + np.cos(np.pi * progress))
    return lr * min(1.0, step / warmup)


def test_schedule_is_the_official_formula():
    for warmup, total in [(5, 50), (500, 10000), (1, 3), (2, 3)]:
        for step in range(1, total + 1):
            assert train.get_lr(step, 0.03, warmup, total) == pytest.approx(
                official_lr(step, 0.03, warmup, total), rel=1e-12, abs=1e-15)
    assert train.get_lr(5, 0.03, 5, 50) == pytest.approx(0.03)  # warmup ends at the peak
    assert train.get_lr(50, 0.03, 5, 50) == 0.0  # cosine reaches 0 at the last step
    assert train.get_lr(1, 0.03, 0, 10) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi / 10)))
    assert train.get_lr(3, 0.1, 3, 3) == pytest.approx(0.1)  # all warmup, no decay: no 0/0


def cross_entropy64(params, x, onehot):
    logits = reference_forward(params, x)[0]
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return np.mean(lse - (logits * onehot).sum(axis=1))


def numerical_grads(params, x, onehot, eps=1e-6):
    """Central differences of the float64 reference loss, one coordinate at a time."""
    grads = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            old = value[i]
            value[i] = old + eps
            up = cross_entropy64(params, x, onehot)
            value[i] = old - eps
            down = cross_entropy64(params, x, onehot)
            value[i] = old
            g[i] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


@pytest.mark.parametrize("backend, accum_steps", [("mlx", 1), ("mlx", 3), ("tinygrad", 1)])
def test_steps_match_float64_sgd(tmp_path, backend, accum_steps):
    """Three optimizer steps on the full batch equal float64 numpy: numerical gradients of the
    reference forward + cross-entropy, clipping to norm 1, momentum 0.9, the schedule."""
    config = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                               channels_mlp_dim=8, num_classes=3, image_size=8)
    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(tmp_path / "data" / "train" / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / c / f"{i}.png")
    params = random_params(config, seed=1)
    params["head/kernel"] *= 0.01  # small logits: the first step is clipped, later ones not
    weights = str(tmp_path / "w.safetensors")
    mixer.Mixer(config, params, backend="numpy", labels=classes).save(weights)
    base_lr, warmup, steps = 3.0, 2, 3
    result, _ = run(backend, data_dir=str(tmp_path / "data"), weights=weights, keep_head=True,
                    steps=steps, warmup=warmup, lr=base_lr, batch_size=12,
                    accum_steps=accum_steps, no_augment=True, val_fraction=0, log_every=1,
                    out=str(tmp_path / "run"))

    files = sorted(str(tmp_path / "data" / "train" / c / f"{i}.png")
                   for c in classes for i in range(4))
    x = np.stack([mixer.preprocess(f, size=8) for f in files])  # the evaluation geometry
    onehot = np.eye(3)[[classes.index(os.path.basename(os.path.dirname(f))) for f in files]]
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    norms, losses = [], []
    for step in range(1, steps + 1):
        losses.append(cross_entropy64(p, x, onehot))
        g = numerical_grads(p, x, onehot)
        norm = math.sqrt(sum((v * v).sum() for v in g.values()))
        lr = official_lr(step, base_lr, warmup, steps)
        for k in p:
            m[k] = 0.9 * m[k] + g[k] * min(1.0, 1.0 / norm)
            p[k] = p[k] - lr * m[k]
        norms.append(norm)
    assert norms[0] > 1 > max(norms[1:])  # both sides of the clipping

    got = result.model.numpy_params()
    assert max(np.abs(p[k] - params[k]).max() for k in p) > 0.1  # the steps moved the weights
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=0, atol=5e-6, err_msg=k)
    _, _, momentum = train.load_state(str(tmp_path / "run"))
    for k in m:
        np.testing.assert_allclose(momentum[k], m[k], rtol=0, atol=5e-6, err_msg=k)
    records = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r, norm, loss in zip(records, norms, losses):
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["lr"] == pytest.approx(official_lr(r["step"], base_lr, warmup, steps))


def test_mlx_step_in_parts_equals_whole_batch(mlx_cpu_split, monkeypatch):
    """On a CPU, MLX runs each micro-batch in parts on separate streams, here 4 + 5 images
    weighted 4/9 and 5/9: loss, gradient norm, weights and momentum after two steps must equal
    the whole-batch computation's."""
    config = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                               channels_mlp_dim=8, num_classes=3, image_size=8)
    params = random_params(config, seed=3)
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (9, 8, 8, 3)).astype(np.float32)
    onehot = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 9)]
    xp = train.get_backend("mlx")
    results = []
    for whole in (False, True):
        if whole:
            monkeypatch.setattr(xp.ops, "split_batch", lambda batch, fn: None)
        trainer = train.Trainer(xp, config, params)
        steps = []
        for lr in (0.5, 0.3):
            trainer.accumulate(x, onehot)
            steps.append(trainer.update(lr))
        results.append((steps, trainer.numpy("params"), trainer.numpy("momentum")))
    assert mlx_cpu_split.inside == [1, 1]  # both steps ran split
    (split_steps, split_params, split_m), (whole_steps, whole_params, whole_m) = results
    np.testing.assert_allclose(split_steps, whole_steps, rtol=1e-5)
    assert max(np.abs(whole_params[k] - params[k]).max() for k in params) > 1e-2  # it moved
    for k in params:
        np.testing.assert_allclose(split_params[k], whole_params[k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(split_m[k], whole_m[k], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Fine-tuning end to end.


@pytest.fixture(scope="module", params=["mlx", "tinygrad"])
def finetuned(request, dataset, pretrained, tmp_path_factory):
    """Fine-tune the 10-class checkpoint on the 4 colours: new zero head, augmentation on."""
    out = str(tmp_path_factory.mktemp(f"run-{request.param}"))
    result, log = run(request.param, data_dir=dataset, weights=pretrained, steps=40,
                      batch_size=32, lr=0.1, eval_every=10, log_every=5, out=out)
    return request.param, result, log


def test_finetune_reaches_90_percent(finetuned, dataset):
    backend, result, log = finetuned
    assert result.val_top1 >= 0.9 and result.best_val_top1 >= result.val_top1, log
    assert result.step == result.total_steps == 40 and not result.interrupted
    # scored independently of train.py's evaluation: best.safetensors through mixer.py alone
    model = mixer.load(os.path.join(result.run_dir, "best.safetensors"), backend="numpy")
    images, truth = [], []
    for label in sorted(os.listdir(os.path.join(dataset, "val"))):
        folder = os.path.join(dataset, "val", label)
        for name in sorted(os.listdir(folder)):
            try:
                images.append(mixer.preprocess(os.path.join(folder, name),
                                               size=model.config.image_size,
                                               resize=model.preprocessing["resize"]))
            except mixer.MixerError:
                continue  # the dataset's deliberately broken files
            truth.append(label)
    predicted = [top[0][1] for top in model.classify(np.stack(images), top_k=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth)])
    assert len(images) >= 20 and accuracy >= 0.9
    assert accuracy == pytest.approx(result.best_val_top1, abs=1e-6)


def test_run_dir_outputs(finetuned, dataset):
    _, result, log = finetuned
    assert sorted(os.listdir(result.run_dir)) == ["best.safetensors", "curves.png",
                                                  "last.safetensors", "metrics.jsonl",
                                                  "state.safetensors", "train.lock"]
    # curves.png, redrawn at the last evaluation, shows the validation top-1 curve
    curves = Image.open(os.path.join(result.run_dir, "curves.png"))
    assert curves.format == "PNG" and curves.size == (640, 400)
    val = train.CURVES_COLOURS["val"]
    val_colour = np.asarray(curves.convert("RGB")) == [int(val[i:i + 2], 16) for i in (1, 3, 5)]
    assert val_colour.all(axis=-1).sum() > 100
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    for r in records:
        assert {"step", "lr", "loss", "grad_norm", "images_per_s"} <= set(r)
        assert r["images_per_s"] > 0 and r["grad_norm"] > 0 and math.isfinite(r["loss"])
        assert ("val_top1" in r) == (r["step"] % 10 == 0)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["val_top1"] == result.val_top1
    best = max(r["val_top1"] for r in records if "val_top1" in r)
    assert result.best_val_top1 == best
    # the weights files are mixer.py models with the dataset's classes as labels
    last = mixer.load(os.path.join(result.run_dir, "last.safetensors"), backend="numpy")
    assert last.labels == CLASSES and last.config.num_classes == 4
    for k, v in last.numpy_params().items():
        np.testing.assert_array_equal(v, result.model.params[k])
    # and `python mixer.py IMAGE --weights RUN_DIR/best.safetensors` names the user's classes
    image = os.path.join(dataset, "val", "green", "000.jpg")
    text = mixer.run_cli([image], weights=os.path.join(result.run_dir, "best.safetensors"),
                         backend="numpy", top_k=1)
    assert text.splitlines()[1].split()[-1] == "green"
    # the unreadable files were counted, named and skipped; the hidden file ignored
    assert "skipping 2 unreadable files" in log and "broken.jpg" in log and "empty.png" in log
    assert "DS_Store" not in log


def test_weights_get_a_zero_head_and_a_larger_resolution(dataset, tmp_path):
    """--weights at 16px with --image-size 32: at_resolution, then a new zero head. The zero head
    passes no gradient back, so after one step only the head has moved."""
    config = mixer.MixerConfig(**SMALL, num_classes=10, image_size=16)
    small = mixer.Mixer(config, random_params(config, seed=2), backend="numpy")
    small.save(tmp_path / "w16.safetensors")
    result, _ = run("mlx", data_dir=dataset, weights=str(tmp_path / "w16.safetensors"),
                    image_size=32, steps=1, warmup=1, batch_size=8, val_fraction=None,
                    out=str(tmp_path / "run"))
    model = result.model
    assert model.config == dataclasses.replace(config, image_size=32, tokens_mlp_dim=4 * 32,
                                               num_classes=4)
    assert model.labels == CLASSES
    expanded = small.at_resolution(32).numpy_params()
    for k, v in model.params.items():
        if k.startswith("head/"):
            assert np.abs(v).max() > 0
        else:
            np.testing.assert_array_equal(v, expanded[k], err_msg=k)


def test_keep_head_only_for_the_same_classes(dataset, tmp_path, pretrained):
    config = mixer.MixerConfig(**SMALL, num_classes=4, image_size=32)
    params = random_params(config, seed=3)
    mixer.Mixer(config, params, backend="numpy", labels=CLASSES).save(tmp_path / "same.safetensors")
    result, _ = run("mlx", data_dir=dataset, weights=str(tmp_path / "same.safetensors"),
                    keep_head=True, steps=1, batch_size=8, out=str(tmp_path / "run"))
    assert np.abs(result.model.params["head/kernel"] - params["head/kernel"]).max() < 0.05
    with pytest.raises(mixer.MixerError, match="--keep-head: .* 10 classes"):
        train.train(data_dir=dataset, weights=pretrained, keep_head=True, steps=1,
                    out=str(tmp_path / "run2"), quiet=True)


# --------------------------------------------------------------------------------------------
# Resume and interruption.


@pytest.mark.parametrize("backend", ["mlx", "tinygrad"])
def test_resume_equals_uninterrupted(backend, dataset, tmp_path):
    """Stopped after step 7 of 16 (mid-epoch, with augmentation and evaluations), then resumed:
    the same weights, metrics and best model as one uninterrupted run of 16 steps."""
    settings = dict(data_dir=dataset, **SMALL, image_size=32, steps=16, batch_size=32, lr=0.1,
                    eval_every=5, log_every=2, seed=3)
    full, _ = run(backend, **settings, out=str(tmp_path / "full"))
    part, log = run(backend, **settings, out=str(tmp_path / "part"), stop_after=7)
    assert part.interrupted and part.step == 7
    assert f"--resume {tmp_path / 'part'}" in log
    assert [r["step"] for r in read_metrics(tmp_path / "part")] == [2, 4, 5, 6]
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # logged after the last save
        f.write(json.dumps({"step": 8, "lr": 0.1, "loss": 0.0}) + "\n")
    resumed, log = run(backend, resume=str(tmp_path / "part"))
    assert "resuming at step 7 of 16" in log
    assert resumed.step == 16 and not resumed.interrupted
    for k, v in full.model.params.items():
        np.testing.assert_allclose(resumed.model.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    strip = lambda records: [{k: v for k, v in r.items() if k != "images_per_s"}  # noqa: E731
                             for r in records]
    a, b = strip(read_metrics(tmp_path / "full")), strip(read_metrics(tmp_path / "part"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), (k, ra, rb)
    assert resumed.best_val_top1 == full.best_val_top1
    # a finished run resumes to nothing
    again, _ = run(backend, resume=str(tmp_path / "part"))
    assert again.step == 16


def test_resume_refuses_changes(dataset, tmp_path):
    settings = dict(data_dir=dataset, **SMALL, image_size=32, steps=6, batch_size=16,
                    eval_every=3, out=str(tmp_path / "run"), quiet=True)
    train.train(**settings, stop_after=3)
    with pytest.raises(mixer.MixerError, match="its lr is 0.03, not 0.1"):
        train.train(resume=str(tmp_path / "run"), lr=0.1, quiet=True)
    with pytest.raises(mixer.MixerError, match="its steps is 6, not 8"):
        train.train(resume=str(tmp_path / "run"), steps=8, quiet=True)
    with pytest.raises(mixer.MixerError, match="already holds a run"):
        train.train(**settings)
    changed = tmp_path / "changed"
    shutil.copytree(dataset, changed)
    os.remove(changed / "train" / "red" / "000.jpg")
    with pytest.raises(mixer.MixerError, match="changed since the run started"):
        train.train(resume=str(tmp_path / "run"), data_dir=str(changed), quiet=True)
    with pytest.raises(mixer.MixerError, match="no state.safetensors"):
        train.train(resume=str(tmp_path), quiet=True)


def test_ctrl_c_saves_a_resumable_state(dataset, tmp_path):
    """SIGINT to `python train.py`: the step in progress finishes, the state is saved, exit 130;
    --resume continues from there."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), dataset, "--steps", "100000",
           "--batch-size", "8", "--log-every", "1", "--out", out, "--backend", "mlx",
           *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()), "--image-size", "32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    lines = []
    for line in proc.stderr:  # wait for training to be under way
        lines.append(line)
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert f"continue with: python train.py --resume {out}" in rest
    info, params, momentum = train.load_state(out)
    assert 3 <= info["step"] < 100000 and params.keys() == momentum.keys()
    assert mixer.load(os.path.join(out, "last.safetensors")).labels == CLASSES
    resumed, _ = run("mlx", resume=out, stop_after=info["step"] + 2)
    assert resumed.step == info["step"] + 2 and resumed.interrupted


# --------------------------------------------------------------------------------------------
# Data-parallel MLX.

DISTRIBUTED_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {repo!r})
import mlx.core as mx
import train
result = train.train(**json.loads(sys.argv[1]))
rank = mx.distributed.init().rank()
np.savez(sys.argv[2] + f".rank{{rank}}.npz", **result.model.params)
print(json.dumps({{"rank": rank, "val_top1": result.val_top1}}), flush=True)
"""


def test_two_mlx_processes_match_one(dataset, tmp_path):
    """`mlx.launch -n 2 --backend ring` on 127.0.0.1: each rank takes half of every global batch;
    both end with identical weights, equal to one process on the same global batches."""
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    assert launcher, "mlx.launch is installed with mlx"
    settings = dict(data_dir=dataset, **SMALL, image_size=32, steps=8, batch_size=16, lr=0.1,
                    eval_every=4, seed=1, backend="mlx")
    script = tmp_path / "rank.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(repo=REPO))
    port = random.Random(os.getpid()).randrange(20000, 60000, 2)
    proc = subprocess.run(
        [launcher, "-n", "2", "--backend", "ring", "--starting-port", str(port), "--",
         sys.executable, str(script), json.dumps({**settings, "out": str(tmp_path / "dist")}),
         str(tmp_path / "weights")], capture_output=True, text=True, timeout=300,
        cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    ranks = [np.load(tmp_path / f"weights.rank{r}.npz") for r in (0, 1)]
    # the reference: one process, the same 16 images per step as 2 micro-batches of 8
    single, _ = run("mlx", **{k: v for k, v in settings.items() if k != "backend"},
                    accum_steps=2, out=str(tmp_path / "single"))
    for k, v in single.model.params.items():
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)
        np.testing.assert_allclose(ranks[0][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert reports[0]["val_top1"] == reports[1]["val_top1"] == single.val_top1
    # only rank 0 wrote the run directory, with the usual files
    assert sorted(os.listdir(tmp_path / "dist")) == ["best.safetensors", "curves.png",
                                                      "last.safetensors", "metrics.jsonl",
                                                      "state.safetensors", "train.lock"]


# --------------------------------------------------------------------------------------------
# Data pipeline.


def test_val_fraction_split_is_stratified_and_deterministic(dataset, tmp_path):
    root = tmp_path / "noval"
    shutil.copytree(os.path.join(dataset, "train"), root / "train")
    with train.concurrent.futures.ThreadPoolExecutor(2) as pool:
        split = lambda seed: train.scan(str(root), 0.2, seed, pool, lambda msg: None)  # noqa
        classes, tr, va = split(0)
        assert classes == CLASSES
        assert len(va.files) == 40 and np.bincount(va.labels).tolist() == [10] * 4
        assert not set(tr.files) & set(va.files) and len(tr.files) == 160
        assert split(0)[2].files == va.files and split(1)[2].files != va.files
        _, tr_all, none = train.scan(str(root), 0, 0, pool, lambda msg: None)
        assert none is None and len(tr_all.files) == 200
        with pytest.raises(mixer.MixerError, match="--val-fraction would be ignored"):
            train.scan(dataset, 0.2, 0, pool, lambda msg: None)


def test_batches_depend_only_on_the_step(dataset):
    """The whole loader state is the step number: the batch of step k is the same whether the
    stream starts at step 1 or at k, for any thread count and either rank split."""
    with train.concurrent.futures.ThreadPoolExecutor(2) as pool:
        _, split, _ = train.scan(dataset, None, 0, pool, lambda msg: None)
        loader = train.Loader(split, 4, 32, "crop", True, 5, pool, lambda msg: None)
        stream = loader.batches(1, 24, 0, 1)
        batches = [next(stream) for _ in range(10)]  # 240 samples: crosses an epoch (200)
        later = next(loader.batches(9, 24, 0, 1))
        np.testing.assert_array_equal(later[0], batches[8][0])
        halves = [next(loader.batches(9, 24, r, 2)) for r in (0, 1)]
        np.testing.assert_array_equal(np.concatenate([h[0] for h in halves]), batches[8][0])
        np.testing.assert_array_equal(np.concatenate([h[1] for h in halves]), batches[8][1])
    x, onehot = batches[0]
    assert x.shape == (24, 32, 32, 3) and x.dtype == np.uint8 and x.min() < x.max()
    assert onehot.shape == (24, 4) and (onehot.sum(axis=1) == 1).all()
    # epoch 0 visits every training image once; epoch 1 in another order
    seen = [loader.sample_index(p) for p in range(200)]
    assert sorted(seen) == list(range(200))
    assert [loader.sample_index(p) for p in range(200, 400)] != seen


def test_augmentation(dataset):
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        left, top, right, bottom = train.inception_crop(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    boxes = [train.inception_crop(400, 300, rng) for _ in range(500)]
    areas = [(r - l) * (b - t) / 120000 for l, t, r, b in boxes]
    ratios = [(r - l) / (b - t) for l, t, r, b in boxes]
    assert 0.07 < min(areas) < 0.2 and max(areas) > 0.8
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    with train.concurrent.futures.ThreadPoolExecutor(1) as pool:
        _, split, _ = train.scan(dataset, None, 0, pool, lambda msg: None)
        plain = train.Loader(split, 4, 32, "crop", False, 0, pool, lambda msg: None)
        augmented = train.Loader(split, 4, 32, "crop", True, 0, pool, lambda msg: None)
        path = split.files[0]
        np.testing.assert_array_equal(plain.decode(path, 0), mixer.preprocess(path, size=32))
        a, b = augmented.decode(path, 0), augmented.decode(path, 1)
        assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
        np.testing.assert_array_equal(augmented.decode(path, 0), a)  # seeded by the position


def test_undecodable_image_is_replaced_not_fatal(tmp_path):
    """A file whose header reads but whose data is truncated fails only when decoded: it is
    named once and replaced by another image of its batch."""
    root = make_dataset(tmp_path / "data", {"train": 4})
    data = open(os.path.join(root, "train", "red", "000.jpg"), "rb").read()
    with open(os.path.join(root, "train", "red", "000.jpg"), "wb") as f:
        f.write(data[:len(data) * 9 // 10])
    result, log = run("mlx", data_dir=root, **SMALL, image_size=32, steps=3, batch_size=16,
                      val_fraction=0, out=str(tmp_path / "run"))
    assert result.step == 3
    assert log.count("cannot decode") == 1 and "red/000.jpg" in log


# --------------------------------------------------------------------------------------------
# The command line and its refusals.


@pytest.mark.parametrize("case, message", [
    ("missing", "train not found: expected DATA_DIR/train/<class>/<image>"),
    ("empty", "found no class folders; a classifier needs at least 2"),
    ("one-class", "found only the class 'red'; a classifier needs at least 2"),
    ("empty-class", "green has no readable images"),
    ("unknown-val-class", "val/purple is not a class"),
])
def test_bad_datasets_exit_2(tmp_path, capsys, case, message):
    root = tmp_path / "data"
    if case != "missing":
        os.makedirs(root / "train")
    if case in ("one-class", "empty-class", "unknown-val-class"):
        make_dataset(root, {"train": 2}, size=16)
        for colour in CLASSES:
            if colour != "red" and case == "one-class":
                shutil.rmtree(root / "train" / colour)
    if case == "empty-class":
        for f in os.listdir(root / "train" / "green"):
            os.remove(root / "train" / "green" / f)
    if case == "unknown-val-class":
        os.makedirs(root / "val" / "purple")
    code = train.main([str(root), "--variant", "S/32", "--steps", "1", "--out",
                       str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[-1].startswith("train: error: ") and message in err[-1], err


@pytest.mark.parametrize("argv, message", [
    ([], "give one of --steps N or --epochs N"),
    (["--steps", "2", "--batch-size", "10", "--accum-steps", "3"],
     "--batch-size 10 must be a multiple of --accum-steps 3 x 1 process"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "2", "--lr", "-1"], "--lr must be a finite positive number"),
    (["--steps", "2", "--warmup", "-1"], "--warmup must be at least 0"),
    (["--steps", "2", "--image-size", "48"], "--image-size 48: at_resolution needs an integer"),
    (["--steps", "2", "--variant", "S/32"], "--weights fixes the architecture"),
    (["--steps", "2", "--backend", "numpy"], "invalid choice: 'numpy'"),
])
def test_bad_arguments_exit_2(dataset, pretrained, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if "numpy" in argv else contextlib.nullcontext():
        code = train.main([dataset, "--weights", pretrained, "--out", str(tmp_path / "r"), *argv])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_model_choice_errors(dataset, tmp_path):
    with pytest.raises(mixer.MixerError, match="give --weights FILE.safetensors to fine-tune"):
        train.train(data_dir=dataset, steps=1, quiet=True, out=str(tmp_path / "a"))
    with pytest.raises(mixer.MixerError, match="custom architecture needs --tokens-mlp-dim"):
        train.train(data_dir=dataset, steps=1, patch_size=8, hidden_dim=8, num_blocks=1,
                    channels_mlp_dim=8, quiet=True, out=str(tmp_path / "b"))
    with pytest.raises(mixer.MixerError, match="cannot train on backend 'numpy'"):
        train.train(data_dir=dataset, steps=1, backend="numpy", quiet=True)


def test_train_throughput_times_whole_steps(monkeypatch):
    """bench.py's training figure: two warm-up steps, then `steps` timed steps of a full batch
    (accumulate + update), reported as images over the timed steps' seconds."""
    calls, clock = [], iter(range(100, 1000, 7))  # perf_counter: start, then end of timing
    accumulate, update = train.Trainer.accumulate, train.Trainer.update

    def spy_accumulate(self, x, onehot):
        calls.append(("accumulate", x.shape, onehot.shape))
        accumulate(self, x, onehot)

    def spy_update(self, lr):
        calls.append(("update",))
        return update(self, lr)
    monkeypatch.setattr(train.Trainer, "accumulate", spy_accumulate)
    monkeypatch.setattr(train.Trainer, "update", spy_update)
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    ips = train.train_throughput("mlx", variant="S/32", batch_size=2, steps=3, image_size=32,
                                 num_classes=10)
    step = [("accumulate", (2, 32, 32, 3), (2, 10)), ("update",)]
    assert calls == step * 5  # 2 warm-up + 3 timed
    assert ips == pytest.approx(3 * 2 / 7)  # 6 images in one tick of the fake clock
