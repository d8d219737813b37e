"""convert.py's ONNX export: the graph run by three runtimes (onnxruntime, tinygrad's OnnxRunner
on DEV=CPU, onnx's ReferenceEvaluator) gives our numpy backend's logits and pre-logits (and, for
an official-format .npz, the float64 reference's); quantised files stay packed and small; every
bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx  # the [test] extra installs onnx and onnxruntime: without them these tests fail
import onnxruntime as ort
import pytest

import bench
import convert
import mixer
from conftest import REPO, tinygrad_device
from reference import random_images, random_params, reference_forward

TOL = 1e-4  # float32, every runtime against our numpy backend (and the float64 reference)
SMALL = {  # several patch sizes, hidden sizes and depths, with and without a head
    "P4-C16": mixer.MixerConfig(4, 16, 2, 8, 24, num_classes=10, image_size=16),
    "P8-C32-headless": mixer.MixerConfig(8, 32, 1, 16, 64, num_classes=None, image_size=32),
    "P2-C24": mixer.MixerConfig(2, 24, 3, 12, 40, num_classes=7, image_size=12),
}
# quantised in groups of 32 (the group size files are saved with here), all three layouts:
# stem and token Dense_0 grouped along their outputs, the other kernels along their inputs, the
# small head kept float16
QUANTISED = mixer.MixerConfig(4, 64, 1, 32, 128, num_classes=10, image_size=16)
CONFIGS = {**SMALL, "P4-C64": QUANTISED, "S/32": mixer.VARIANTS["S/32"],
           "B/16": mixer.VARIANTS["B/16"]}
GROUP_SIZE = 32


def run_onnxruntime(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": x})))


def run_reference_evaluator(path, x):
    from onnx.reference import ReferenceEvaluator
    evaluator = ReferenceEvaluator(path)
    return dict(zip(evaluator.output_names, evaluator.run(None, {"images": x})))


def run_tinygrad(path, x):
    from tinygrad import Tensor
    from tinygrad.nn.onnx import OnnxRunner
    with tinygrad_device("CPU"):  # a runner binds the named batch dimension at its first call
        return {k: v.numpy() for k, v in OnnxRunner(path)({"images": Tensor(x)}).items()}


RUNTIMES = {"onnxruntime": run_onnxruntime, "tinygrad": run_tinygrad,
            "reference_evaluator": run_reference_evaluator}


class Files:
    """Random models of CONFIGS saved as mixer safetensors and exported, each made once."""

    def __init__(self, folder):
        self.folder, self.made = folder, {}

    def weights(self, name: str, dtype: str = "float32") -> str:
        """CONFIGS[name] with random weights, saved by Mixer.save in dtype (int8 and int4 in
        groups of GROUP_SIZE)."""
        path = os.path.join(self.folder, f"{name.replace('/', '_')}-{dtype}.safetensors")
        if path not in self.made:
            config = CONFIGS[name]
            mixer.Mixer(config, random_params(config, seed=0)).save(path, dtype=dtype,
                                                                    group_size=GROUP_SIZE)
            self.made[path] = path
        return path

    def onnx(self, name: str, dtype: str = "float32", opset: int = convert.ONNX_OPSET) -> str:
        """weights(name) exported: dtype "int8"/"int4" from that quantised file, "float16" from
        the float32 one with --dtype float16."""
        path = self.weights(name, dtype if dtype in mixer.QUANTIZED_DTYPES else "float32")
        out = path.replace(".safetensors", f"-{dtype}-{opset}.onnx")
        if out not in self.made:
            convert.export_onnx(path, out, dtype="float16" if dtype == "float16" else "float32",
                                opset=opset)
            self.made[out] = out
        return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(str(tmp_path_factory.mktemp("onnx")))


def ours(path: str, x) -> dict:
    """Our numpy backend's outputs for the weights file at path."""
    model = mixer.load(path, backend="numpy")
    out = {"pre_logits": model.features(x)}
    if model.config.num_classes is not None:
        out["logits"] = model(x)
    return out


def assert_outputs_close(found: dict, expected: dict, tol: float):
    assert sorted(found) == sorted(expected)
    for k, v in expected.items():
        assert found[k].shape == v.shape and found[k].dtype == np.float32, (k, found[k].shape)
        assert np.abs(found[k] - v).max() <= tol, (k, np.abs(found[k] - v).max())


# --------------------------------------------------------------------------------------------
# Three runtimes reproduce our numpy backend, at batch 1 and 3, on every shape.

@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
@pytest.mark.parametrize("name", [*SMALL, "S/32"])
def test_runtimes_match_numpy_backend(files, name, runtime):
    size = CONFIGS[name].image_size
    for batch in (1, 3):
        x = random_images(batch, size, seed=batch)
        found = RUNTIMES[runtime](files.onnx(name), x)
        assert_outputs_close(found, ours(files.weights(name), x), TOL)


@pytest.mark.parametrize("runtime, batches", [("onnxruntime", (1, 3)),
                                             ("reference_evaluator", (1,))])
def test_b16_matches_numpy_backend(files, runtime, batches):
    """Full-size B/16 on the runtimes that take seconds (the pure-Python ReferenceEvaluator at
    batch 1 only); tinygrad's OnnxRunner needs ~30 s to compile B/16 at two batch sizes, so it
    runs every other shape above."""
    for batch in batches:
        x = random_images(batch, 224, seed=batch)
        found = RUNTIMES[runtime](files.onnx("B/16"), x)
        assert_outputs_close(found, ours(files.weights("B/16"), x), TOL)


@pytest.mark.parametrize("opset", [convert.ONNX_OPSET, 18, convert.GELU_OPSET])
def test_official_npz_matches_float64_reference(tmp_path, opset):
    """The export of an official-format .npz, against the float64 official equations (not our
    code): the tanh formula (opset 17, 18: ReduceMean's axes an input) and the Gelu op (20)."""
    config = SMALL["P4-C16"]
    params = random_params(config, seed=3)
    npz, out = tmp_path / "Mixer-tiny.npz", tmp_path / "tiny.onnx"
    np.savez(npz, **params)
    convert.export_onnx(str(npz), str(out), opset=opset)
    x = random_images(3, config.image_size, seed=4)
    logits, pre_logits = reference_forward(params, x)
    for runtime in RUNTIMES.values():
        found = runtime(str(out), x)
        assert np.abs(found["logits"] - logits).max() <= TOL
        assert np.abs(found["pre_logits"] - pre_logits).max() <= TOL
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert ("Gelu" in ops) == (opset >= convert.GELU_OPSET) and "LayerNormalization" in ops


def test_onnxruntime_fuses_the_gelu_formula(files, tmp_path):
    """At opset 17 the tanh GELU is written out in the arrangement onnxruntime fuses into its
    FastGelu kernel: no Tanh is left in the graph it runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(files.onnx("P4-C16"), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("FastGelu") == 2 * SMALL["P4-C16"].num_blocks and "Tanh" not in ops


@pytest.mark.parametrize("name, opset, dtype", [("P4-C16", 17, "float32"), ("S/32", 17, "float32"),
                                                ("P8-C32-headless", 20, "float32"),
                                                ("P4-C16", 17, "float16"), ("S/32", 17, "int4"),
                                                ("S/32", 20, "int8")])
def test_checker_passes(files, name, opset, dtype):
    onnx.checker.check_model(onnx.load(files.onnx(name, dtype, opset)), full_check=True)


# --------------------------------------------------------------------------------------------
# The file: named batch dimension, outputs, metadata, IR version.

def test_interface_and_metadata(files):
    model = onnx.load(files.onnx("S/32"))
    [images] = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [224, 224, 3]
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
               for o in model.graph.output}
    assert outputs == {"logits": ["batch", 1000], "pre_logits": ["batch", 512]}
    assert model.opset_import[0].version == 17 and model.ir_version == 8  # what opset 17 needs
    meta = {p.key: p.value for p in model.metadata_props}
    source = mixer.load(files.weights("S/32"), backend="numpy")
    assert mixer.MixerConfig.from_dict(json.loads(meta["mixer.config"])) == source.config
    assert json.loads(meta["mixer.preprocessing"]) == mixer.DEFAULT_PREPROCESSING
    assert meta["mixer.dtype"] == "float32" and "mixer.quantization" not in meta


def labelled_export(tmp_path):
    """(an official-format .npz of a small model, a label file for it, its export with those
    labels)."""
    labels = tmp_path / "names.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)))
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **random_params(SMALL["P4-C16"], seed=0))
    out = tmp_path / "tiny.onnx"
    convert.export_onnx(str(npz), str(out), labels=str(labels))
    return npz, labels, out


def test_labels_and_no_head(tmp_path):
    npz, labels, out = labelled_export(tmp_path)
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["mixer.labels"]) == [f"class {i}" for i in range(10)]
    convert.export_onnx(str(npz), str(out), head=False)  # a feature extractor
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert [o.name for o in model.graph.output] == ["pre_logits"] and "mixer.labels" not in meta
    assert json.loads(meta["mixer.config"])["num_classes"] is None
    x = random_images(2, 16, seed=0)
    assert_outputs_close(run_onnxruntime(str(out), x),
                         {"pre_logits": mixer.load(str(npz), backend="numpy").features(x)}, TOL)


# --------------------------------------------------------------------------------------------
# Quantised files export packed: about the size of the safetensors file, our quantised logits.

@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantised_export_is_small_and_exact(files, dtype):
    path, out = files.weights("S/32", dtype), files.onnx("S/32", dtype)
    assert abs(os.path.getsize(out) / os.path.getsize(path) - 1) <= 0.10
    x = random_images(3, 224, seed=5)
    expected = ours(path, x)
    for runtime in (run_onnxruntime, run_reference_evaluator):
        assert_outputs_close(runtime(out, x), expected, TOL)
    initializers = {t.name: t for t in onnx.load(out).graph.initializer}
    kernel = initializers["MixerBlock_0/channel_mixing/Dense_0/kernel"]
    assert kernel.data_type == onnx.TensorProto.UINT8  # packed, not float
    assert initializers["head/kernel"].data_type == onnx.TensorProto.FLOAT16  # kept float16


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantised_small_models_on_every_runtime(files, dtype):
    """All three layouts (out_in, in_out, float16-kept) in one small model."""
    path, out = files.weights("P4-C64", dtype), files.onnx("P4-C64", dtype)
    layouts = json.loads(mixer.read_safetensors(path)[1]["mixer.quantization"])["layout"]
    assert set(layouts.values()) == {"out_in", "in_out", "float16"}
    x = random_images(3, 16, seed=6)
    for runtime in RUNTIMES.values():
        assert_outputs_close(runtime(out, x), ours(path, x), TOL)


def test_float16_export(files):
    """Half weights and compute, LayerNorm statistics in float32; float32 in and out. Its error
    against the float32 model, on random S/32 weights (logits of magnitude ~3), stays below
    0.5% of the logits' range."""
    out = files.onnx("S/32", "float16")
    model = onnx.load(out)
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("/kernel")} == \
        {onnx.TensorProto.FLOAT16}
    assert os.path.getsize(out) < 0.55 * os.path.getsize(files.onnx("S/32"))
    x = random_images(3, 224, seed=7)
    found, expected = run_onnxruntime(out, x), ours(files.weights("S/32"), x)
    spread = np.ptp(expected["logits"])
    assert found["logits"].dtype == np.float32
    assert np.abs(found["logits"] - expected["logits"]).max() < 0.005 * spread


# --------------------------------------------------------------------------------------------
# The command line, the example, and every refusal.

def convert_command(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "convert.py"), *map(str, args)],
                          capture_output=True, text=True, env=env)


def test_command_line_exports(files, tmp_path):
    out = tmp_path / "model.onnx"
    result = convert_command(files.weights("P4-C64", "int4"), out, "--opset", "20")
    assert result.returncode == 0, result.stderr
    assert "ONNX opset 20, float32 with int4 weights in groups of 32" in result.stdout
    x = random_images(1, 16, seed=8)
    assert_outputs_close(run_onnxruntime(str(out), x), ours(files.weights("P4-C64", "int4"), x),
                         TOL)


def test_example_classifies_with_onnxruntime_alone(tmp_path):
    """examples/onnx_classify.py, run isolated (-I: no PYTHONPATH, so no mixer to import), names
    the classes that Mixer.classify names, with its probabilities."""
    npz, labels, out = labelled_export(tmp_path)
    image = os.path.join(REPO, "examples", "chelsea.jpg")
    example = os.path.join(REPO, "examples", "onnx_classify.py")
    result = subprocess.run([sys.executable, "-I", example, str(out), image],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line.split(None, 1) for line in result.stdout.splitlines()]
    model = mixer.load_npz(str(npz), backend="numpy", labels=str(labels))
    [top] = model.classify(image, exact=True)
    assert [name for _, name in lines] == [name for _, name, _ in top]
    assert np.allclose([float(p) for p, _ in lines], [p for _, _, p in top], atol=2e-3)


FAKE_ONNX = "raise ImportError('No module named onnx (this test hides it)')\n"


def test_missing_onnx_is_one_line_and_npz_still_converts(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "onnx.py").write_text(FAKE_ONNX)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), REPO])}
    npz = tmp_path / "tiny.npz"
    np.savez(npz, **random_params(SMALL["P4-C16"], seed=0))
    result = convert_command(npz, tmp_path / "out.onnx", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "pip install onnx" in result.stderr
    assert not (tmp_path / "out.onnx").exists()
    result = convert_command(npz, tmp_path / "out.safetensors", env=env)
    assert result.returncode == 0, result.stderr


REFUSALS = {
    "OUT is a folder": (lambda t, f: [f.weights("P4-C16"), t / "folder.onnx"], "is a folder"),
    "OUT under a file": (lambda t, f: [f.weights("P4-C16"), t / "file" / "out.onnx"],
                         "cannot write"),
    "truncated IN": (lambda t, f: [t / "file", t / "out.onnx"], "truncated or corrupt"),
    "opset 16": (lambda t, f: [f.weights("P4-C16"), t / "out.onnx", "--opset", "16"], "from 17"),
    "--opset to safetensors": (lambda t, f: [t / "x.npz", t / "out.safetensors", "--opset", "20"],
                               "goes with an ONNX output"),
    "--dtype int8 to onnx": (lambda t, f: [f.weights("P4-C16"), t / "out.onnx", "--dtype", "int8"],
                             "an int8/int4 .safetensors file exports quantised"),
    "--group-size to onnx": (lambda t, f: [f.weights("P4-C16"), t / "out.onnx", "--group-size",
                                           "32"],
                             "--group-size goes with"),
    "float16 of int8": (lambda t, f: [f.weights("P4-C64", "int8"), t / "out.onnx", "--dtype",
                                   "float16"], "drop --dtype float16"),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refusals(files, tmp_path, capsys, kind):
    (tmp_path / "folder.onnx").mkdir()
    with open(files.weights("P4-C16"), "rb") as f:
        data = f.read()
    (tmp_path / "file").write_bytes(data[:len(data) // 2])  # truncated
    before = sorted(os.listdir(tmp_path))
    args, says = REFUSALS[kind]
    assert convert.main([str(a) for a in args(tmp_path, files)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("convert: error: ") and says in captured.err, captured.err
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "folder.onnx") == []


SLOW_WRITE = """
import contextlib, sys, time
sys.path.insert(0, sys.argv[1])
import convert, mixer

real_atomic_write = mixer.atomic_write


@contextlib.contextmanager
def slow_atomic_write(path):
    with real_atomic_write(path) as f:
        print("writing", flush=True)  # the temporary file beside OUT exists now
        time.sleep(60)
        yield f


mixer.atomic_write = slow_atomic_write
sys.exit(convert.main(sys.argv[2:]))
"""


def test_ctrl_c_while_writing_leaves_nothing(files, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "slow_convert.py"
    script.write_text(SLOW_WRITE)
    process = subprocess.Popen([sys.executable, str(script), REPO, files.weights("P4-C16"),
                                str(work / "out.onnx")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "writing\n"
        assert os.listdir(work)  # the temporary file
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and err == "convert: interrupted\n"
    assert os.listdir(work) == []


def test_bench_runs_onnxruntime_beside_the_backends(tmp_path):
    """bench.py's onnxruntime row: the same weights exported, timed in the same rounds (the run
    stops if its logits disagree with numpy's)."""
    out = tmp_path / "bench.json"
    assert bench.main(["--variants", "S/32", "--backends", "numpy", "--batch-sizes", "1",
                       "--rounds", "1", "--seconds", "0", "--no-torch", "--no-train", "--no-cli",
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["onnxruntime"] is True
    rows = {r["backend"]: r for r in doc["inference"]}
    assert sorted(rows) == ["numpy", "onnxruntime"] and rows["onnxruntime"]["images_per_s"] > 0
