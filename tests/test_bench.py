"""bench.py: its FLOP counts match the paper's figures, and it runs and reports on a clean install."""

import json

import numpy as np
import pytest

import bench
import mixer


@pytest.mark.parametrize("variant, gflops", [("S/32", 2.0), ("B/16", 25.2)])
def test_flops_per_image(variant, gflops):
    # from the shapes: about 2.0 GFLOP/image for S/32 and 25.2 for B/16 at 224 (multiply-add = 2)
    assert bench.flops_per_image(mixer.VARIANTS[variant]) / 1e9 == pytest.approx(gflops, abs=0.05)


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--variants", "S/32", "--backends", "numpy", "--batch-sizes", "1", "2",
                       "--rounds", "1", "--seconds", "0", "--no-torch", "--no-onnxruntime",
                       "--no-train", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp32 GEMM ceiling" in printed and "inference" in printed
    doc = json.loads(out.read_text())
    assert doc["machine"]["gemm_gflops"] > 0
    blas = mixer.openblas()
    assert doc["machine"]["numpy_blas"] == bench.blas_corename(blas)
    assert bool(doc["machine"]["numpy_blas"]) == (blas is not None)  # the kernels OpenBLAS picked
    assert doc["machine"]["mlx_blas"] is None  # MLX not benchmarked
    rows = doc["inference"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("numpy", 1), ("numpy", 2)]
    for r in rows:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["gflops"] == pytest.approx(2.0 * r["images_per_s"], rel=0.01)
        assert 0 < r["of_ceiling"]
    [cli] = doc["cli"]
    assert cli["second_s"] > 0 and cli["peak_rss_mib"] > cli["weights_mib"] > 0


def test_bench_half_precision(tmp_path):
    """--dtype float16: MLX runs it (and PyTorch, when installed, in float16 too); numpy, which
    computes in float32 only, is reported as skipped rather than failing the run."""
    out = tmp_path / "bench.json"
    assert bench.main(["--variants", "S/32", "--backends", "numpy", "mlx", "--batch-sizes", "1",
                       "--rounds", "1", "--seconds", "0", "--no-cli", "--no-train",
                       "--dtype", "float16", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["dtype"] == "float16"
    blas = mixer.mlx_openblas()  # the kernels of MLX's OpenBLAS are reported too, on Linux
    assert doc["machine"]["mlx_blas"] == bench.blas_corename(blas)
    rows = {r["backend"]: r for r in doc["inference"]}
    assert "float32 only" in rows["numpy"]["skipped"]
    assert rows["mlx"]["images_per_s"] > 0


def test_bench_quant(tmp_path):
    """--quant: the three files of one variant, each loaded by its own worker; sizes and RSS
    from the files and the CLI, speed ratios against the same backend's float32, and the logit
    error against float32 recomputed here from the files themselves."""
    out = tmp_path / "bench.json"
    assert bench.main(["--variants", "S/32", "--backends", "numpy", "--batch-sizes", "1",
                       "--rounds", "1", "--seconds", "0", "--no-torch", "--no-train", "--no-cli",
                       "--quant", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["quant"]
    files = {r["weights"]: r for r in doc["files"]}
    assert set(files) == {"float32", "int8", "int4"}
    f32 = mixer.num_params(mixer.VARIANTS["S/32"]) * 4 / 2**20
    assert files["float32"]["file_mib"] == pytest.approx(f32, rel=0.01)
    for d, most in (("int8", 0.28), ("int4", 0.16)):
        assert 0.1 < files[d]["size_vs_float32"] <= most
        assert files[d]["cli_peak_rss_mib"] > files[d]["file_mib"]
    speed = {r["weights"]: r for r in doc["speed"]}
    assert speed["float32"]["time_vs_float32"] == 1.0
    assert speed["float32"]["logit_rel_error"] == 0.0
    # the quantised logits differ from float32 by what the format's rounding allows: int4 more
    assert 0 < speed["int8"]["logit_rel_error"] < speed["int4"]["logit_rel_error"] < 0.5
    # the same weights and input as the workers: build_model's seeds and worker's input seed
    x = np.random.default_rng(2).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    model = bench.build_model(mixer.VARIANTS["S/32"], "numpy")
    model.save(str(tmp_path / "q.safetensors"), dtype="int8")
    f, g = model(x)[0], mixer.load(str(tmp_path / "q.safetensors"), backend="numpy")(x)[0]
    assert speed["int8"]["logit_rel_error"] == pytest.approx(
        np.linalg.norm(g - f) / np.linalg.norm(f), rel=1e-3)


def test_bench_train_memory_worker(capsys, monkeypatch):
    """--train-memory's measurement: a real S/32 micro-batch on MLX's CPU keeps less per image
    than the estimate train.py plans with (which has a margin), and more than nothing."""
    monkeypatch.setattr(mixer, "DATA_PARALLEL", mixer.DATA_PARALLEL)  # the worker sets it
    bench.train_memory_worker("S/32", "float32", 2, "whole")
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 10 < row["per_image_mib"] < row["estimate_mib"]
