"""Reliability: each group of tests below is one item of the reliability review. They check
public behaviour only (the command lines, mixer.load, Mixer's methods), so that they hold
whatever the code inside looks like."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mixer
from conftest import REPO
from reference import random_images, random_params

SMALL = mixer.MixerConfig(patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                          channels_mlp_dim=64, num_classes=5, image_size=16)
# every kernel of this one is quantised in groups of 32 (SMALL's 16-wide ones stay float16)
QUANTISED = mixer.MixerConfig(patch_size=4, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
                              channels_mlp_dim=128, num_classes=5, image_size=32)


def small_file(tmp_path, dtype="float32", config=SMALL, seed=70):
    """A weights file of `config` with random weights, saved as `dtype` (int4 in groups of 32)."""
    path = str(tmp_path / f"small-{dtype}.safetensors")
    mixer.Mixer(config, random_params(config, seed=seed), backend="numpy").save(
        path, dtype=dtype, group_size=32)
    return path


def run_py(code, *args, env=None, timeout=120):
    """`python -c code args` in the repository, with the environment's changes `env`."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_cli(program, *args, env=None, timeout=120):
    """`python program args` (mixer.py or convert.py) in the repository."""
    return subprocess.run([sys.executable, os.path.join(REPO, program), *args], cwd=REPO,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------------------------
# 1. A model shared by a thread pool gives every call its own result: distinct inputs per call,
# compared with the serial results, float and int4, with the JITs warm (every shape run once
# on this thread) and cold (first compiled inside the pool).

@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_1_threads_get_their_own_results(backend, dtype, warm, tmp_path):
    config = QUANTISED if dtype == "int4" else SMALL
    path = small_file(tmp_path, dtype, config)
    model, reference = mixer.load(path, backend=backend), mixer.load(path, backend="numpy")
    size = config.image_size
    batches = [random_images(1 + i % 3, size, seed=100 + i) for i in range(24)]
    serial = [reference(x) for x in batches]
    if warm:
        for n in (1, 2, 3):
            model(random_images(n, size, seed=n))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(model, batches))
    tol = 1e-5 if backend == "numpy" else 1e-4
    for out, expected in zip(results, serial):
        np.testing.assert_allclose(out, expected, rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------
# 2. A backend used from threads other than the one that first used it: tinygrad keeps one
# sqlite connection (its cache of compiled kernels) per process, which sqlite refuses outside
# the thread that opened it (MLX: a guard). In a fresh process, so that the connection's owner
# is known.

THREAD_SWITCH = """
import concurrent.futures, json, sys, numpy as np, mixer
sys.path.insert(0, "tests")
from reference import random_images
path, reference = sys.argv[1], mixer.load(sys.argv[1], backend="numpy")
x = {n: random_images(n, 16, seed=n) for n in range(1, 6)}
worker = concurrent.futures.ThreadPoolExecutor(1)
in_worker = lambda f, *a: worker.submit(f, *a).result()
diffs = []
check = lambda out, n: diffs.append(float(np.abs(out - reference(x[n])).max()))
main_model = mixer.load(path, backend=sys.argv[2])
check(main_model(x[1]), 1)                      # the main thread compiles first,
check(in_worker(main_model, x[2]), 2)           # then a worker, with a new shape
worker_model = in_worker(mixer.load, path, sys.argv[2])  # loaded in the worker,
check(worker_model(x[3]), 3)                    # used on the main thread,
check(in_worker(worker_model, x[4]), 4)         # and back in the worker
check(main_model(x[5]), 5)
print(json.dumps(diffs))
"""


@pytest.mark.parametrize("name", ["tinygrad", "mlx"])
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_2_a_backend_from_a_worker_thread(name, dtype, tmp_path):
    """tinygrad on CL, whose compiled kernels it caches on disk (its CPU device caches none)."""
    done = run_py(THREAD_SWITCH, small_file(tmp_path, dtype), name,
                  env={"DEV": "CL", "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-2000:]
    diffs = json.loads(done.stdout.splitlines()[-1])
    assert len(diffs) == 5 and max(diffs) < 1e-4, diffs


# --------------------------------------------------------------------------------------------
# 5. Images whose outputs are not finite are reported one by one; the others are classified.

def bright_overflows(tmp_path) -> str:
    """A weights file whose outputs overflow for uniform images brighter than mid-grey and stay
    finite for darker ones: the stem writes a patch's mean m into channel 0 and -m into channel
    1 (so LayerNorm gives +-4 sign(m) there), the channel-mixing MLPs take channel 0 to 1e30 *
    1e30 (inf) when m > 0 and, through GELU's zero for large negative inputs, to exactly 0 when
    m < 0; token mixing adds exactly 0."""
    p = random_params(SMALL, seed=71)
    for k in p:
        if k.startswith(("stem", "MixerBlock")) and not k.endswith("scale"):
            p[k] = np.zeros_like(p[k])
        elif k.startswith("MixerBlock"):
            p[k] = np.ones_like(p[k])
    p["stem/kernel"][..., 0], p["stem/kernel"][..., 1] = 1 / 48, -1 / 48
    for b in range(SMALL.num_blocks):
        p[f"MixerBlock_{b}/channel_mixing/Dense_0/kernel"][0, 0] = 1e30
        p[f"MixerBlock_{b}/channel_mixing/Dense_1/kernel"][0, :] = 1e30
    path = str(tmp_path / "bright.safetensors")
    mixer.Mixer(SMALL, p, backend="numpy").save(path)
    return path


def grey_images(folder, levels) -> list[str]:
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, level in enumerate(levels):
        paths.append(os.path.join(folder, f"{i:02d}-{level}.png"))
        Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(paths[-1])
    return paths


LEVELS = [100, 200, 110, 120, 210, 90, 60, 140, 30, 20]  # 4 brighter than 127.5


@pytest.mark.parametrize("name", ["numpy", "mlx", "tinygrad"])
def test_5_a_folder_run_reports_each_non_finite_image_and_classifies_the_rest(name, tmp_path):
    paths = grey_images(str(tmp_path / "images"), LEVELS)
    done = run_cli("mixer.py", str(tmp_path / "images"), "--weights", bright_overflows(tmp_path),
                   "--backend", name, "--json", env={"DEV": "CPU"})
    assert done.returncode == 2
    entries = json.loads(done.stdout)
    assert [e["image"] for e in entries] == paths
    bright = [p for p, level in zip(paths, LEVELS) if level > 127]
    assert [e["image"] for e in entries if "error" in e] == bright
    assert all(len(e["top_k"]) == 5 for e in entries if "error" not in e)
    lines = [line for line in done.stderr.decode().splitlines() if "warning generated" not in line]
    assert len(lines) == len(bright), lines  # no RuntimeWarning either
    assert all(line.startswith(f"mixer: skipped {p}: ") and "non-finite" in line
               for line, p in zip(lines, bright))


def test_5_classify_names_the_image_and_numpy_warns_nothing(tmp_path):
    import warnings
    model = mixer.load(bright_overflows(tmp_path), backend="numpy")
    dark, bright = grey_images(str(tmp_path), [60, 200])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(model.classify([dark])[0]) == 5
        with pytest.raises(mixer.MixerError, match=f"^{bright}: .*non-finite"):
            model.classify([dark, bright])
        assert not np.isfinite(model(mixer.preprocess(bright, 16)[None])).any()


# --------------------------------------------------------------------------------------------
# 7. --show-weights draws a quantised file's weights (dequantised).

@pytest.mark.parametrize("name", ["numpy", "mlx", "tinygrad"])
def test_7_show_weights_of_a_quantised_file(name, tmp_path):
    from PIL import Image
    weights = small_file(tmp_path, "int4", QUANTISED)
    out = str(tmp_path / "int4.png")
    done = run_cli("mixer.py", "--show-weights", out, "--weights", weights, "--backend", name,
                   env={"DEV": "CPU"})
    assert done.returncode == 0, done.stderr
    dequantised = mixer.Mixer(QUANTISED, mixer.load(weights, backend="numpy").numpy_params(),
                              backend="numpy")
    mixer.show_weights(dequantised, str(tmp_path / "float.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out)),
                                  np.asarray(Image.open(tmp_path / "float.png")))


# --------------------------------------------------------------------------------------------
# 8. Numbers in metadata and arguments are checked for their type as strictly as for their
# value: an int that is not a bool (numpy integers accepted, as ints), never a float, a
# string or a bool that equals one.

def with_metadata(path, out, **changes):
    """A copy of the safetensors file `path` at `out` with metadata keys replaced (None
    removes one); written here, byte by byte, not by the code under test."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(n)), f.read()
    meta = header.setdefault("__metadata__", {})
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    raw = json.dumps(header).encode()
    with open(out, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    return str(out)


def quantization_of(path):
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return json.loads(header["__metadata__"]["mixer.quantization"])


def assert_one_line_error(done, *fragments):
    """A command that failed with status 2 and one line on stderr holding every fragment."""
    err = done.stderr.decode() if isinstance(done.stderr, bytes) else done.stderr
    assert done.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert all(f in err for f in fragments), err


@pytest.mark.parametrize("key,value", [("bits", 4.0), ("group_size", 32.0), ("bits", True),
                                       ("group_size", "32"), ("bits", 2**70), ("bits", -4)])
def test_8_quantization_metadata_numbers(key, value, tmp_path):
    path = small_file(tmp_path, "int4", QUANTISED)
    q = quantization_of(path)
    q[key] = value
    bad = with_metadata(path, tmp_path / "bad.safetensors", mixer__quantization=q)
    with pytest.raises(mixer.MixerError, match="bits=.*group_size=.*this version reads"):
        mixer.load(bad, backend="numpy")
    done = run_cli("mixer.py", "--show-weights", str(tmp_path / "w.png"), "--weights", bad,
                   "--backend", "numpy")
    assert_one_line_error(done, "this version reads")
    assert not os.path.exists(tmp_path / "w.png")


@pytest.mark.parametrize("key,value", [("patch_size", 4.0), ("num_blocks", True),
                                       ("hidden_dim", "32"), ("num_classes", 5.0),
                                       ("num_blocks", -2), ("image_size", None)])
def test_8_config_metadata_numbers(key, value, tmp_path):
    path = small_file(tmp_path)
    with open(path, "rb") as f:
        config = json.loads(json.loads(f.read(int.from_bytes(f.read(8), "little")))
                            ["__metadata__"]["mixer.config"])
    config[key] = value
    bad = with_metadata(path, tmp_path / "bad.safetensors", mixer__config=config)
    with pytest.raises(mixer.MixerError, match=key):
        mixer.load(bad, backend="numpy")


@pytest.mark.parametrize("group_size", [64.0, 32.5, True, "64", None, [64]])
def test_8_group_size_must_be_an_int(group_size, tmp_path):
    path = small_file(tmp_path, config=QUANTISED)
    with pytest.raises(mixer.MixerError, match="group size .* is not supported: expected one"):
        mixer.load(path, backend="numpy", quantize="int4", group_size=group_size)
    model = mixer.load(path, backend="numpy")
    with pytest.raises(mixer.MixerError, match="group size .* is not supported: expected one"):
        model.save(str(tmp_path / "q.safetensors"), dtype="int4", group_size=group_size)
    assert not os.path.exists(tmp_path / "q.safetensors")


@pytest.mark.parametrize("quantize", [["int4"], 4, b"int4"])
def test_8_quantize_must_be_a_name(quantize, tmp_path):
    with pytest.raises(mixer.MixerError, match="unknown quantisation"):
        mixer.load(small_file(tmp_path), backend="numpy", quantize=quantize)


def test_8_numpy_integers_are_ints(tmp_path):
    """Accepted wherever an int is, and written to files as plain JSON ints."""
    path = small_file(tmp_path, config=QUANTISED)
    model = mixer.load(path, backend="numpy", quantize="int4", group_size=np.int64(32))
    assert model.quantization == {"bits": 4, "group_size": 32}
    out = str(tmp_path / "q.safetensors")
    mixer.load(path, backend="numpy").save(out, dtype="int8", group_size=np.int32(64))
    assert quantization_of(out)["group_size"] == 64 and quantization_of(out)["bits"] == 8
    fields = {k: np.int64(v) for k, v in SMALL.to_dict().items()}
    config = mixer.MixerConfig(**fields)
    assert config == SMALL and all(type(v) is int for v in config.to_dict().values())
    mixer.Mixer(config, random_params(SMALL), backend="numpy").save(out)
    assert mixer.load(out, backend="numpy").config == SMALL


# --------------------------------------------------------------------------------------------
# 9. A folder argument is searched to any depth: a folder 1500 levels deep (made one mkdir at
# a time: os.makedirs recurses too), with a link back to the top on the way down (not
# followed) and a hidden folder (skipped).

def test_9_a_folder_1500_levels_deep(tmp_path):
    from PIL import Image
    top = folder = str(tmp_path / "deep")
    os.mkdir(top)
    for depth in range(1500):
        folder = os.path.join(folder, "d")
        os.mkdir(folder)
        if depth == 700:
            os.symlink(top, os.path.join(folder, "loop"))
            os.mkdir(os.path.join(folder, ".hidden"))
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(
                os.path.join(folder, ".hidden", "x.png"))
    image = os.path.join(folder, "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    done = run_cli("mixer.py", top, "--weights", small_file(tmp_path), "--backend", "numpy",
                   "--json")
    while folder != top:  # removed bottom up here: shutil.rmtree recurses too
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                os.remove(os.path.join(path, "x.png"))
                os.rmdir(path)
            else:
                os.remove(path)
        os.rmdir(folder)
        folder = os.path.dirname(folder)
    assert done.returncode == 0, done.stderr
    assert [e["image"] for e in json.loads(done.stdout)] == [image]


# --------------------------------------------------------------------------------------------
# 11. What the output stream's encoding cannot hold is written as backslash escapes (as control
# characters are): a label and a file name on an ASCII console, a Windows one (cp1252).

LABELS = ["café ünï 猫", "b", "c", "d", "e"]


def labelled(tmp_path):
    path = str(tmp_path / "labelled.safetensors")
    params = random_params(SMALL, seed=72)
    params["head/bias"][:] = [50, 0, 0, 0, 0]  # class 0 first, whatever the image
    mixer.Mixer(SMALL, params, backend="numpy", labels=LABELS).save(path)
    return path


@pytest.mark.parametrize("encoding,label,no", [
    ("ascii", r"caf\xe9 \xfcn\xef \u732b", r"n\xf6"), ("cp1252", r"café ünï \u732b", "nö")])
def test_11_mixer_output_the_console_cannot_encode(encoding, label, no, tmp_path):
    from PIL import Image
    image = str(tmp_path / "猫.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    missing = str(tmp_path / "nö猫.png")
    done = run_cli("mixer.py", image, missing, "--weights", labelled(tmp_path), "--top-k", "1",
                   "--backend", "numpy", env={"PYTHONIOENCODING": encoding})
    assert done.returncode == 2
    name = str(tmp_path).encode(encoding).decode(encoding)
    assert done.stdout.decode(encoding).splitlines()[0] == name + r"/\u732b.png"
    assert done.stdout.decode(encoding).splitlines()[1].endswith(f"%  {label}")
    assert done.stderr.decode(encoding) == \
        f"mixer: skipped {name}/{no}" + r"\u732b.png: no such file" + "\n"


def test_11_convert_output_the_console_cannot_encode(tmp_path):
    """convert.py names its output on stdout; stderr already escapes (Python's own default)."""
    np.savez(tmp_path / "in.npz", **random_params(SMALL, seed=73))
    done = subprocess.run([sys.executable, os.path.join(REPO, "convert.py"), "in.npz",
                           "猫.safetensors"], cwd=tmp_path, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode("ascii").startswith(r"\u732b.safetensors: custom Mixer")
    assert mixer.load(str(tmp_path / "猫.safetensors"), backend="numpy").config == SMALL


# --------------------------------------------------------------------------------------------
# 12. A file's claimed config is checked against what it holds before anything is built from
# it: 10**8 blocks in a 100 KB file is an error at once, not gigabytes of expected shapes.

CLAIMS = """
import resource, sys, mixer
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
try:
    mixer.load(sys.argv[1], backend="numpy")
except mixer.MixerError as e:
    print(e)
"""


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_12_a_config_the_file_cannot_hold(dtype, tmp_path):
    path = small_file(tmp_path, dtype, QUANTISED)
    config = {**QUANTISED.to_dict(), "num_blocks": 10**8}
    bad = with_metadata(path, tmp_path / "bad.safetensors", mixer__config=config)
    done = run_py(CLAIMS, bad, env={"PYTHONPATH": REPO}, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert "damaged" in done.stdout and "bad.safetensors" in done.stdout, done.stdout


# --------------------------------------------------------------------------------------------
# 14. A bad argument is one line on stderr and status 2, not argparse's usage block.

@pytest.mark.parametrize("program,args,fragment", [
    ("mixer.py", ["a.jpg", "--weights", "w.safetensors", "--quantize", "int3"], "--quantize"),
    ("mixer.py", ["a.jpg", "--weights", "w.safetensors", "--top-k", "abc"], "--top-k"),
    ("mixer.py", ["a.jpg", "--no-such-option"], "--no-such-option"),
    ("mixer.py", ["a.jpg", "--weights"], "--weights"),
    ("mixer.py", [], "IMAGE"),
    ("convert.py", ["in.npz", "out.safetensors", "--dtype", "int3"], "--dtype"),
    ("convert.py", ["in.npz", "out.safetensors", "--group-size", "abc"], "--group-size"),
    ("convert.py", ["in.npz", "out.safetensors", "--no-such-option"], "--no-such-option"),
    ("convert.py", ["in.npz"], "required: OUT"),
])
def test_14_a_bad_argument_is_one_line(program, args, fragment, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, program), *args], cwd=tmp_path,
                          capture_output=True, timeout=60)
    assert_one_line_error(done, fragment, "--help shows the usage")
    assert done.stdout == b"" and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 15. A model that no group size can quantise (no kernel axis a multiple of 32) is refused
# where it would be quantised, instead of becoming a "quantised" model of float16 kernels
# (quantization None, and float16 compute allowed on an "int4" file).

ODD = mixer.MixerConfig(patch_size=4, hidden_dim=24, num_blocks=1, tokens_mlp_dim=12,
                        channels_mlp_dim=40, num_classes=5, image_size=12)


def test_15_nothing_to_quantise_is_refused(tmp_path):
    path = small_file(tmp_path, "float32", ODD)
    for group_size in (32, 64, 128):
        with pytest.raises(mixer.MixerError, match=f"none can be quantised in groups of "
                                                   f"{group_size}"):
            mixer.load(path, backend="numpy", quantize="int4", group_size=group_size)
    model = mixer.load(path, backend="numpy")
    out = tmp_path / "q.safetensors"
    with pytest.raises(mixer.MixerError, match="none can be quantised in groups of 64"):
        model.save(str(out), dtype="int8")
    np.savez(tmp_path / "odd.npz", **random_params(ODD, seed=74))
    done = run_cli("convert.py", str(tmp_path / "odd.npz"), str(out), "--dtype", "int4")
    assert_one_line_error(done, "none can be quantised in groups of 64")
    assert not out.exists()


def test_15_an_int4_file_of_float16_kernels_is_refused(tmp_path):
    """Such a file (what the code before this check wrote): its kernels all stored F16."""
    path = small_file(tmp_path, "float16", ODD)
    layout = {k: "float16" for k in mixer.param_shapes(ODD) if k.endswith("/kernel")}
    q = {"bits": 4, "group_size": 32, "mode": "affine", "layout": layout}
    bad = with_metadata(path, tmp_path / "int4.safetensors", mixer__quantization=q)
    for dtype in ("float32", "float16"):
        with pytest.raises(mixer.MixerError, match="none can be quantised in groups of 32"):
            mixer.load(bad, backend="mlx", dtype=dtype)


# --------------------------------------------------------------------------------------------
# 18. A file from a newer version or another tool is named as such: a weights format version
# other than "1", and preprocessing that this code would not do (an unknown key, a known key
# with another value), are refused instead of ignored.

@pytest.mark.parametrize("changes,message", [
    ({"mixer__format_version": "999"}, "weights format version '999'; this mixer.py reads "
                                       "version '1': the file was written by a newer"),
    ({"mixer__format_version": "0"}, "weights format version '0'"),
    ({"mixer__preprocessing": {"resize": "crop", "mean": [0.5, 0.5, 0.5]}},
     "asks for mean \\[0.5, 0.5, 0.5\\], which this version does not do"),
    ({"mixer__preprocessing": {"resize": "crop", "crop_pct": 0.9}}, "asks for crop_pct 0.9"),
    ({"mixer__preprocessing": {"resize": "pad"}}, 'asks for resize "pad"'),
    ({"mixer__preprocessing": {"resize": ["crop"]}}, 'asks for resize \\["crop"\\]'),
    ({"mixer__preprocessing": {"interpolation": "bilinear"}}, 'interpolation "bilinear"'),
])
def test_18_newer_or_foreign_metadata(changes, message, tmp_path):
    bad = with_metadata(small_file(tmp_path), tmp_path / "bad.safetensors", **changes)
    with pytest.raises(mixer.MixerError, match="bad.safetensors: .*" + message):
        mixer.load(bad, backend="numpy")


@pytest.mark.parametrize("changes", [
    {"mixer__format_version": None}, {"mixer__preprocessing": None},
    {"mixer__preprocessing": {}}, {"mixer__preprocessing": {"resize": "squash"}},
    {"mixer__preprocessing": {**mixer.DEFAULT_PREPROCESSING, "resize": "squash"}}])
def test_18_what_this_version_reads(changes, tmp_path):
    good = with_metadata(small_file(tmp_path), tmp_path / "good.safetensors", **changes)
    model = mixer.load(good, backend="numpy")
    preprocessing = changes["mixer__preprocessing"] if "mixer__preprocessing" in changes \
        else mixer.DEFAULT_PREPROCESSING
    assert model.preprocessing.get("resize", "crop") == (preprocessing or {}).get("resize", "crop")


# --------------------------------------------------------------------------------------------
# 19. Every weights file that a README command reads by name is one that the README makes:
# a convert.py output, a file saved in Python, or the cache file of a --variant download.

def test_19_readme_commands_read_files_the_readme_makes():
    import re
    import shlex
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    made = set(re.findall(r"\.save\(\"([^\"]+)\"", readme))
    lines = [line for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
             for line in block.splitlines()]
    lines += re.findall(r"`((?:python )?(?:convert|mixer)\.py [^`]+)`", readme)
    read = []
    for line in lines:
        words = shlex.split(line.split(" #")[0])
        for program in ("convert.py", "mixer.py"):
            if program in words:
                args = words[words.index(program) + 1:]
                if program == "convert.py" and len(args) >= 2:
                    made.add(args[1])
                for flag, value in zip(args, args[1:]):
                    if flag == "--variant" and value in mixer.VARIANTS:
                        checkpoint = mixer.official_checkpoint(value)
                        made.add("weights/" + os.path.basename(mixer.cache_path(checkpoint)))
                    placeholder = "<" in value or value.split("/")[0].split(".")[0].isupper()
                    if flag == "--weights" and value.endswith(".safetensors") \
                            and not placeholder:  # RUN_DIR/..., W.safetensors, runs/<time>/...
                        read.append(value)
    assert "weights/B_16-int4.safetensors" in read  # the parsing finds what it should
    assert [name for name in read if name not in made] == []


# --------------------------------------------------------------------------------------------
# Neighbour of 12 and 18 (stale caches): a quantised file at a --variant's cache path is not
# the released checkpoint, and is refused as another model there is, instead of answering
# for it with rounded weights.

def test_a_quantised_file_in_the_variant_cache_is_refused(tmp_path):
    s32 = mixer.VARIANTS["S/32"]
    path = tmp_path / "gsam-Mixer-S_32.safetensors"
    mixer.Mixer(s32, random_params(s32, seed=75), backend="numpy").save(
        str(path), dtype="int4", source="gsam/Mixer-S_32.npz")
    done = run_cli("mixer.py", os.path.join(REPO, "examples", "chelsea.jpg"), "--variant",
                   "S/32", "--backend", "numpy",
                   env={"MIXER_HOME": str(tmp_path), "MIXER_WEIGHTS_URL": "http://127.0.0.1:9/"})
    assert_one_line_error(done, str(path), "quantised to int4",
                          "delete it to download gsam/Mixer-S_32.npz again")
    assert path.exists()
