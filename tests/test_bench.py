"""bench.py: its FLOP counts match the paper's figures, and it runs and reports on a clean install."""

import json

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
                       "--rounds", "1", "--seconds", "0", "--no-torch", "--no-train",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp32 GEMM ceiling" in printed and "inference" in printed
    doc = json.loads(out.read_text())
    assert doc["machine"]["gemm_gflops"] > 0
    blas = mixer.openblas()
    assert doc["machine"]["numpy_blas"] == (blas.corename() if blas else None)
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
    assert doc["machine"]["mlx_blas"] == (blas.corename() if blas else None)
    rows = {r["backend"]: r for r in doc["inference"]}
    assert "float32 only" in rows["numpy"]["skipped"]
    assert rows["mlx"]["images_per_s"] > 0
