"""Training memory (issue 14): the micro-batch chooser and its budget, the MLX GELU's custom
gradient, and mixed precision (bfloat16, float16 with loss scaling)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest

import mixer
import train
from reference import random_params
from test_train import SMALL, make_dataset

# --------------------------------------------------------------------------------------------
# The chooser: a pure function of the figures it is given.

CASES = [(per_image, fixed, budget, batch, processes)
         for per_image in (1, 7, 1000)
         for fixed in (0, 5000)
         for budget in (5001, 5007, 6000, 13_000, 10**6)
         for batch in (1, 7, 12, 96, 97, 512)
         for processes in (1, 2, 3)
         if batch % processes == 0 and fixed + per_image <= budget]


def test_chooser_fits_the_budget_and_reaches_the_batch_exactly():
    """Over every case: micro x accum x processes == batch, the estimate within the budget, and
    no larger whole micro-batch that would also fit (checked by trying each size)."""
    assert len(CASES) > 250
    for per_image, fixed, budget, batch, processes in CASES:
        micro, accum = train.choose_micro_batch(per_image, fixed, budget, batch, processes)
        case = (per_image, fixed, budget, batch, processes, micro, accum)
        assert micro * accum * processes == batch, case
        assert fixed + micro * per_image <= budget, case
        share = batch // processes
        larger = [m for m in range(micro + 1, share + 1)
                  if share % m == 0 and fixed + m * per_image <= budget]
        assert not larger, case


def test_chooser_takes_the_whole_share_when_it_fits():
    assert train.choose_micro_batch(10, 100, 100 + 10 * 512, 512, 1) == (512, 1)
    assert train.choose_micro_batch(10, 100, 100 + 10 * 511, 512, 1) == (256, 2)
    assert train.choose_micro_batch(10, 100, 100 + 10 * 64, 512, 2) == (64, 4)


def test_chooser_refuses_when_one_image_does_not_fit():
    gib = 2**30
    with pytest.raises(mixer.MixerError) as e:
        train.choose_micro_batch(gib, 3 * gib, 4 * gib - 1, 512, 1)
    assert str(e.value) == (
        "training needs about 4.0 GiB for one image per micro-batch (3.0 GiB fixed + 1024.0 "
        "MiB per image), more than the 4.0 GiB budget: give a larger --memory-budget if the "
        "device has it, a smaller --decode-cache-mib (counted in the fixed part), a smaller "
        "model or --image-size, or --dtype bfloat16")
    with pytest.raises(mixer.MixerError, match="--batch-size 10 must be a multiple of the 3 "
                                               "processes"):
        train.choose_micro_batch(1, 0, 100, 10, 3)


def test_activation_estimate_is_the_measured_s32_figure():
    """S/32 at 224 measured 21.8 MiB per image in float32 (mx.get_peak_memory, MLX CPU): the
    estimate lies above it, by the margin and at most 5% more (the formula fits S/32 to 1.10)."""
    config = mixer.VARIANTS["S/32"]
    per_image = train.activation_bytes(config)
    measured = 21.8 * 2**20
    assert measured < per_image < measured * train.ACTIVATION_MARGIN * 1.05
    assert train.activation_bytes(config, "bfloat16") == pytest.approx(per_image / 2, abs=1)


def test_cpu_budget_is_a_share_of_available_memory(monkeypatch):
    monkeypatch.setattr(train, "_available_memory", lambda: 16 * 2**30)
    budget, source = train.memory_budget(train.get_backend("mlx"))
    assert budget == int(train.CPU_MEMORY_SHARE * 16 * 2**30)
    assert source == f"{train.CPU_MEMORY_SHARE:.0%} of available memory"
    monkeypatch.setattr(train, "_available_memory", lambda: None)
    with pytest.raises(mixer.MixerError, match="give --memory-budget GIB"):
        train.memory_budget(train.get_backend("mlx"))


# --------------------------------------------------------------------------------------------
# The chooser in a run: what it prints, an explicit --accum-steps, a refusal before step 1.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("colours"), {"train": 8, "val": 2})


def budget_for(micro: int, batch: int, dtype="float32", decode_cache_mib=0) -> float:
    """A --memory-budget (GiB) with room for `micro` images and a half more, not micro + 1."""
    config = mixer.MixerConfig(**SMALL, num_classes=4, image_size=32)
    fixed = train.fixed_bytes(config, dtype, batch, decode_cache_mib * 2**20)
    return (fixed + (micro + 0.5) * train.activation_bytes(config, dtype)) / 2**30


def run(dataset, tmp_path, **kwargs):
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        result = train.train(data_dir=dataset, **SMALL, image_size=32, steps=2, val_fraction=0,
                             decode_cache_mib=0, out=str(tmp_path / "run"), **kwargs)
    return result, out.getvalue()


def test_run_prints_the_chosen_micro_batch(dataset, tmp_path):
    budget = budget_for(5, 16)  # 5 images fit; 4 is the largest divisor of 16 up to 5
    result, log = run(dataset, tmp_path, batch_size=16, memory_budget=budget)
    assert result.step == 2
    line = next(x for x in log.splitlines() if x.startswith("train: micro-batch"))
    assert line.startswith("train: micro-batch 4 x 4 accumulation steps = 16 per step (chosen): ~")
    assert line.endswith("GiB budget (--memory-budget)")
    assert "WARNING" not in line


def test_explicit_accum_steps_is_honoured_with_a_warning(dataset, tmp_path):
    budget = budget_for(5, 16)
    result, log = run(dataset, tmp_path, batch_size=16, accum_steps=2, memory_budget=budget)
    assert result.step == 2
    line = next(x for x in log.splitlines() if x.startswith("train: micro-batch"))
    assert line.startswith("train: micro-batch 8 x 2 accumulation steps = 16 per step (--accum-steps)")
    assert "WARNING: more than the budget" in line


def test_a_run_that_cannot_fit_is_refused_before_it_starts(dataset, tmp_path, capsys):
    status = train.main([dataset, "--num-blocks", "2", "--patch-size", "8", "--hidden-dim", "32",
                         "--tokens-mlp-dim", "32", "--channels-mlp-dim", "64", "--image-size",
                         "32", "--steps", "1", "--memory-budget", "0.0001",
                         "--out", str(tmp_path / "run")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "for one image per micro-batch" in err[0], err
    assert not (tmp_path / "run").exists()


def test_resume_may_choose_another_micro_batch(dataset, tmp_path):
    """Stopped after step 1 with micro-batches of 4, resumed with one of 16: the same weights
    as one run of whole batches, to float rounding (the gradient is the same mean)."""
    whole, _ = run(dataset, tmp_path / "a", batch_size=16, accum_steps=1, seed=1)
    part, _ = run(dataset, tmp_path / "b", batch_size=16, memory_budget=budget_for(4, 16),
                  seed=1, stop_after=1)
    assert part.interrupted
    resumed = train.train(resume=str(tmp_path / "b" / "run"), accum_steps=1, quiet=True)
    assert resumed.step == 2
    for k, v in whole.model.params.items():
        np.testing.assert_allclose(resumed.model.params[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# The MLX GELU's custom gradient, against the tanh formula's derivative in float64.


def gelu_grad64(x):
    x = x.astype(np.float64)
    u = mixer.GELU_C * (x + 0.044715 * x ** 3)
    t = np.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * mixer.GELU_C * (1 + 3 * 0.044715 * x * x)


@pytest.mark.parametrize("compiled", [False, True])
def test_mlx_gelu_gradient_matches_the_tanh_formula(compiled):
    mx = mixer.import_mlx()
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10_000) * 3, [-60, -30, -12, -5, 0, 5, 12, 30, 60]])
    x = x.astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)  # a non-trivial cotangent
    gelu = train.MlxTrainingOps.gelu
    grad = mx.grad(lambda a: (gelu(a) * mx.array(w)).sum())
    got = np.array((mx.compile(grad) if compiled else grad)(mx.array(x)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, w * gelu_grad64(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Mixed precision.

CONFIG = mixer.MixerConfig(**SMALL, num_classes=4, image_size=32)


def one_step(dtype, x, onehot, lr=0.1, loss_scale=None):
    """(loss, params after one SGD step) of a Trainer computing in `dtype`."""
    xp = train.get_backend("mlx")
    trainer = train.Trainer(xp, CONFIG, random_params(CONFIG, seed=2), dtype=dtype,
                            loss_scale=loss_scale)
    trainer.accumulate(x, onehot)
    loss, _ = trainer.update(lr)
    return loss, trainer.numpy("params"), trainer


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
            train.one_hot(rng.integers(0, 4, n), 4))


def test_bfloat16_step_equals_the_float32_step():
    """bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) at every op of the
    forward and backward; over two blocks the gradient's error stays within 3% of its norm.
    The loss is a float32 softmax of the bfloat16 logits: within 1%. The weights stay float32."""
    params0 = random_params(CONFIG, seed=2)
    x, onehot = batch()
    loss32, p32, _ = one_step("float32", x, onehot)
    loss16, p16, trainer = one_step("bfloat16", x, onehot)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert all(v.dtype == np.float32 for v in p16.values())
    assert all(v.dtype == trainer.xp.mx.float32 for v in trainer.state["params"].values())
    step32 = np.concatenate([(p32[k] - params0[k]).ravel() for k in params0])
    step16 = np.concatenate([(p16[k] - params0[k]).ravel() for k in params0])
    assert np.linalg.norm(step32) > 0.01
    error = np.linalg.norm(step16 - step32) / np.linalg.norm(step32)
    assert 1e-4 < error < 0.03  # rounded as bfloat16 rounds, not computed in float32


def test_float16_skips_a_step_whose_gradient_overflows(monkeypatch):
    """Inputs of 1e6 overflow float16 (max 65504): the step is skipped (params and momentum
    unchanged), the scale halves; good steps then change the params, and the scale doubles
    after LOSS_SCALE_GROWTH of them. (Scale 256: this model's gradients overflow at 2^14.)"""
    monkeypatch.setattr(train, "LOSS_SCALE_GROWTH", 2)
    xp = train.get_backend("mlx")
    params0 = random_params(CONFIG, seed=2)
    assert train.Trainer(xp, CONFIG, params0, dtype="float16").loss_scale == 2.0 ** 15
    trainer = train.Trainer(xp, CONFIG, params0, dtype="float16", loss_scale=(2.0 ** 8, 0))
    x, onehot = batch()
    trainer.accumulate(x * 1e6, onehot)
    _, norm = trainer.update(0.1)
    assert trainer.skipped and not math.isfinite(norm)
    assert trainer.loss_scale == 2.0 ** 7
    for k, v in trainer.numpy("params").items():
        np.testing.assert_array_equal(v, params0[k], err_msg=k)
    assert all((v == 0).all() for v in trainer.numpy("momentum").values())
    for i in range(2):
        trainer.accumulate(x, onehot)
        loss, norm = trainer.update(0.1)
        assert not trainer.skipped and math.isfinite(loss) and math.isfinite(norm)
    assert trainer.loss_scale == 2.0 ** 8
    assert any(not np.array_equal(v, params0[k]) for k, v in trainer.numpy("params").items())


def test_float16_step_with_loss_scaling_equals_the_float32_step():
    """The scale is divided out exactly (a power of two): a float16 step is the float32 step to
    float16's precision (10 significant bits, 4x finer than bfloat16's): 1%."""
    params0 = random_params(CONFIG, seed=2)
    x, onehot = batch()
    _, p32, _ = one_step("float32", x, onehot)
    _, p16, trainer = one_step("float16", x, onehot, loss_scale=(2.0 ** 8, 0))
    assert not trainer.skipped
    step32 = np.concatenate([(p32[k] - params0[k]).ravel() for k in params0])
    step16 = np.concatenate([(p16[k] - params0[k]).ravel() for k in params0])
    error = np.linalg.norm(step16 - step32) / np.linalg.norm(step32)
    assert 1e-5 < error < 0.01  # rounded as float16 rounds, not computed in float32


def test_dtype_is_a_run_setting(dataset, tmp_path):
    part, _ = run(dataset, tmp_path, batch_size=8, dtype="bfloat16", stop_after=1)
    with pytest.raises(mixer.MixerError, match="its dtype is 'bfloat16', not 'float32'"):
        train.train(resume=part.run_dir, dtype="float32", quiet=True)
    resumed = train.train(resume=part.run_dir, quiet=True)
    assert resumed.step == 2
    assert all(v.dtype == np.float32 for v in resumed.model.params.values())


def test_tinygrad_refuses_a_dtype_its_device_cannot_compute(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(mixer.TinygradOps, "_device_computes", lambda self, dtype: False)
    with pytest.raises(mixer.MixerError, match="cannot compute in bfloat16"):
        run(dataset, tmp_path, batch_size=8, dtype="bfloat16", backend="tinygrad")


@pytest.mark.parametrize("scale", [[0.0, 0], [1.0], "x", [float("nan"), 0], [2.0, -1], [2.0, 1.5]])
def test_a_damaged_loss_scale_is_refused(dataset, tmp_path, scale):
    part, _ = run(dataset, tmp_path, batch_size=8, dtype="float16", stop_after=1)
    path = f"{part.run_dir}/{train.STATE_FILE}"
    tensors, metadata = mixer.read_safetensors(path)
    info = json.loads(metadata["train.state"])
    assert info["loss_scale"] == [train.LOSS_SCALE_START, 1]
    info["loss_scale"] = scale
    mixer.write_safetensors(path, tensors, {**metadata, "train.state": json.dumps(info)})
    with pytest.raises(mixer.MixerError, match="the state's loss_scale is .*damaged"):
        train.train(resume=part.run_dir, quiet=True)


def test_float16_that_cannot_take_a_step_stops_the_run(dataset, tmp_path, capsys):
    """A model whose float16 forward overflows at every step (a stem of 1e5: 65504 is float16's
    largest) skipped every step, halving the loss scale to 3e-5, then said 'done' with status 0
    and a best.safetensors that was the untouched start. The run stops once the scale is below
    LOSS_SCALE_MIN, with one line that says why and what to do, and leaves no folder."""
    config = mixer.MixerConfig(**SMALL, num_classes=4, image_size=32)
    params = mixer.init_params(config, seed=0)
    params["stem/kernel"] = np.full_like(params["stem/kernel"], 1e5)
    weights = str(tmp_path / "huge.safetensors")
    mixer.Mixer(config, params, backend="numpy").save(weights)
    out = tmp_path / "run"
    code = train.main([str(dataset), "--weights", weights, "--dtype", "float16", "--steps",
                       "40", "--batch-size", "4", "--backend", "mlx", "--decode-cache-mib", "0",
                       "--eval-every", "100", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2, err
    assert err[-1].startswith("train: error: float16 cannot train this model: at step 16 its "
                              "gradient still overflowed with the loss scale down to 0.5"), err
    assert "--dtype bfloat16" in err[-1]
    skipped = [line for line in err if "step skipped" in line]
    assert len(skipped) == 15 and skipped[-1].endswith("loss scale now 1"), skipped
    assert not out.exists()
    # the same weights train in float32: the refusal is float16's range, not the model
    assert train.train(data_dir=dataset, weights=weights, steps=2, batch_size=4, backend="mlx",
                       out=str(tmp_path / "f32"), quiet=True).step == 2
