"""`python mixer.py` end to end on real image files, the copy-alone promise, and preprocess."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

import mixer
from conftest import REPO
from reference import random_params, reference_forward

CONFIG = mixer.MixerConfig(patch_size=8, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                           channels_mlp_dim=24, num_classes=6, image_size=32)
LABELS = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "électrique"]
ORIENTATION = 0x0112  # the EXIF tag


def photo(height=60, width=80):
    """A smooth, asymmetric RGB test picture (uint8), different in every corner."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    rgb = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    rgb[5:20, 5:25] = [250, 20, 20]  # a red block near the top left
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The weights file and one image per kind, by name."""
    folder = tmp_path_factory.mktemp("cli")
    params = random_params(CONFIG, seed=20)
    weights = str(folder / "model.safetensors")
    mixer.Mixer(CONFIG, params, backend="numpy", labels=LABELS).save(weights)
    rgb = Image.fromarray(photo())
    out = {"weights": weights, "params": params}

    def save(name, image, **kwargs):
        out[name] = str(folder / name)
        image.save(out[name], **kwargs)

    save("rgb.jpg", rgb, quality=95)
    save("rgb.png", rgb)
    alpha = Image.fromarray(np.linspace(0, 255, 80 * 60).reshape(60, 80).astype(np.uint8))
    save("rgba.png", Image.merge("RGBA", (*rgb.split(), alpha)))
    save("gray.png", rgb.convert("L"))
    gray16 = (np.asarray(rgb.convert("L"), np.uint16) * 257)  # 8-bit grey scaled to 16 bits
    save("gray16.png", Image.fromarray(gray16))
    save("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("cmyk.jpg", rgb.convert("CMYK"), quality=95)
    for orientation, k in ((6, 1), (8, -1)):
        # stored rotated the other way, so that applying the tag shows the original picture
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        stored = Image.fromarray(np.ascontiguousarray(np.rot90(photo(), k=k)))
        save(f"rotated{orientation}.jpg", stored, quality=95, exif=exif)
    return out


IMAGE_NAMES = ["rgb.jpg", "rgb.png", "rgba.png", "gray.png", "gray16.png", "palette.png",
               "cmyk.jpg", "rotated6.jpg", "rotated8.jpg"]


def clean_env():
    env = dict(os.environ)
    for name in ("DEV", "MIXER_BACKEND", "PYTHONPATH"):
        env.pop(name, None)  # no backend choice leaks in (tinygrad itself sets DEV when it runs)
    return env


def run(args, cwd=REPO, isolated=False):
    command = [sys.executable] + (["-I"] if isolated else []) + args
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=clean_env(),
                            timeout=300)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def expected_top(files, names, k, resize="crop"):
    """Top-k indices and probabilities from the float64 reference on mixer.preprocess."""
    batch = np.stack([mixer.preprocess(files[n], size=32, resize=resize) for n in names])
    logits, _ = reference_forward(files["params"], batch)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-logits, axis=1)[:, :k]
    return top, np.take_along_axis(probs, top, axis=1)


def test_text_output(files):
    paths = [files[n] for n in IMAGE_NAMES]
    result = run(["mixer.py", *paths, "--weights", files["weights"], "--backend", "numpy"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths) * 6  # the path, then 5 classes
    top, probs = expected_top(files, IMAGE_NAMES, 5)
    for i, path in enumerate(paths):
        block = lines[6 * i:6 * i + 6]
        assert block[0] == path
        for line, index, p in zip(block[1:], top[i], probs[i]):
            match = re.fullmatch(r"  +(\d+\.\d\d)%  (.+)", line)
            assert match, line
            assert match[2] == LABELS[index]
            assert abs(float(match[1]) - 100 * p) <= 0.0051


def check_json(stdout, paths, k):
    doc = json.loads(stdout)
    assert isinstance(doc, list) and len(doc) == len(paths)
    for entry, path in zip(doc, paths):
        assert set(entry) == {"image", "top_k"} and entry["image"] == path
        assert len(entry["top_k"]) == k
        for item in entry["top_k"]:
            assert set(item) == {"index", "label", "probability"}
            assert type(item["index"]) is int and type(item["probability"]) is float
            assert item["label"] == LABELS[item["index"]]
        probs = [item["probability"] for item in entry["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    return doc


def indices_and_probs(doc):
    return (np.array([[t["index"] for t in e["top_k"]] for e in doc]),
            np.array([[t["probability"] for t in e["top_k"]] for e in doc]))


def test_json_output_top_3(files):
    paths = [files[n] for n in IMAGE_NAMES]
    result = run(["mixer.py", *paths, "--weights", files["weights"], "--backend", "numpy",
                  "--json", "--top-k", "3"])
    assert result.returncode == 0, result.stderr
    indices, probs = indices_and_probs(check_json(result.stdout, paths, 3))
    top, expected = expected_top(files, IMAGE_NAMES, 3)
    np.testing.assert_array_equal(indices, top)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)


def test_resize_squash(files):
    names = ["rgb.png", "rotated6.jpg"]
    paths = [files[n] for n in names]
    result = run(["mixer.py", *paths, "--weights", files["weights"], "--backend", "numpy",
                  "--json", "--top-k", "6", "--resize", "squash"])
    assert result.returncode == 0, result.stderr
    indices, probs = indices_and_probs(check_json(result.stdout, paths, 6))
    top, expected = expected_top(files, names, 6, resize="squash")
    np.testing.assert_array_equal(indices, top)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    _, crop = expected_top(files, names, 6, resize="crop")
    assert np.abs(np.sort(probs) - np.sort(crop)).max() > 1e-3  # the option changed something


def test_backends_agree(files):
    paths = [files["rgb.jpg"], files["cmyk.jpg"]]
    docs = {}
    for backend in ("numpy", "mlx", "tinygrad"):
        result = run(["mixer.py", *paths, "--weights", files["weights"], "--backend", backend,
                      "--json", "--top-k", "6"])
        assert result.returncode == 0, (backend, result.stderr)
        docs[backend] = check_json(result.stdout, paths, 6)
    top, expected = expected_top(files, ["rgb.jpg", "cmyk.jpg"], 6)
    for backend, doc in docs.items():
        indices, probs = indices_and_probs(doc)
        np.testing.assert_array_equal(indices[:, 0], top[:, 0], err_msg=backend)
        # compare probabilities class by class (the order of near-ties may differ)
        for row, idx, p in zip(range(len(paths)), indices, probs):
            order = np.argsort(idx)
            np.testing.assert_allclose(p[order], expected[row][np.argsort(top[row])], rtol=0,
                                       atol=1e-4, err_msg=backend)


def test_half_precision_dtype(files):
    """--dtype float16 on MLX gives the float32 answer to half precision; numpy refuses it with
    one line that says which backends can."""
    paths = [files["rgb.jpg"], files["cmyk.jpg"]]
    result = run(["mixer.py", *paths, "--weights", files["weights"], "--backend", "mlx",
                  "--dtype", "float16", "--json", "--top-k", "6"])
    assert result.returncode == 0, result.stderr
    indices, probs = indices_and_probs(check_json(result.stdout, paths, 6))
    top, expected = expected_top(files, ["rgb.jpg", "cmyk.jpg"], 6)
    for row, idx, p in zip(range(len(paths)), indices, probs):
        np.testing.assert_allclose(p[np.argsort(idx)], expected[row][np.argsort(top[row])],
                                   rtol=0, atol=5e-3)
    result = run(["mixer.py", *paths, "--weights", files["weights"], "--backend", "numpy",
                  "--dtype", "bfloat16"])
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "mixer: error: the numpy backend computes in float32 only (numpy has no fast bfloat16 "
        "matmul): use backend \"mlx\" or \"tinygrad\" (--backend) for bfloat16"]


@pytest.fixture(scope="module")
def bad_files(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    out = {}

    def write(name, content):
        out[name] = str(folder / name)
        with open(out[name], "wb") as f:
            f.write(content)

    write("text.jpg", b"this is not a picture\n" * 20)
    jpeg = open(files["rgb.jpg"], "rb").read()
    write("truncated.jpg", jpeg[:len(jpeg) // 2])
    write("empty.jpg", b"")
    write("corrupt.safetensors", np.random.default_rng(1).bytes(3000))
    valid = open(files["weights"], "rb").read()
    write("truncated.safetensors", valid[:-64])
    out["missing.jpg"] = str(folder / "missing.jpg")
    out["directory"] = str(folder)
    return out


@pytest.mark.parametrize("weights, message", [
    ("corrupt.safetensors", "not a safetensors file"),
    ("truncated.safetensors", "truncated or corrupt"),
    ("missing.jpg", "no such file"),
    ("directory", "is a directory"),
])
def test_bad_weights_are_one_line_exit_2(files, bad_files, weights, message):
    result = run(["mixer.py", files["rgb.png"], files["rgb.jpg"], "--weights",
                  bad_files[weights], "--backend", "numpy"])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mixer: error: ") and message in lines[0], lines[0]


BAD_IMAGES = [("text.jpg", "cannot read the image"), ("truncated.jpg", "cannot read the image"),
              ("empty.jpg", "cannot read the image"), ("missing.jpg", "no such file")]


@pytest.mark.parametrize("image, message", BAD_IMAGES)
def test_one_bad_image_is_one_line_exit_2(files, bad_files, image, message):
    """The only image asked for cannot be read: one line, exit 2, nothing on stdout."""
    result = run(["mixer.py", bad_files[image], "--weights", files["weights"], "--backend",
                  "numpy"])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mixer: error: {bad_files[image]}: {message}"), lines[0]


@pytest.mark.parametrize("image, message", BAD_IMAGES)
def test_a_bad_image_among_several_is_skipped(files, bad_files, image, message):
    """Among several images, one that cannot be read is one line on stderr and left out; the
    others are classified, in order, and the exit status is 2."""
    good = [files["rgb.png"], files["cmyk.jpg"]]
    result = run(["mixer.py", good[0], bad_files[image], good[1], "--weights", files["weights"],
                  "--backend", "numpy", "--top-k", "2"])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mixer: skipped {bad_files[image]}: {message}"), lines[0]
    top, _ = expected_top(files, ["rgb.png", "cmyk.jpg"], 2)
    out = result.stdout.splitlines()
    assert [out[0], out[3]] == good and len(out) == 6
    assert [[LABELS.index(line.split("%  ", 1)[1]) for line in block]
            for block in (out[1:3], out[4:6])] == top.tolist()


def test_bad_arguments(files):
    result = run(["mixer.py", files["rgb.png"], "--weights", files["weights"], "--top-k", "0"])
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "mixer: error: --top-k must be at least 1, got 0"]
    result = run(["mixer.py", files["rgb.png"], "--backend", "numpy"])  # no weights
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def test_copied_alone(files, tmp_path):
    """mixer.py works copied into an empty folder: no package, no repo on sys.path."""
    shutil.copy(os.path.join(REPO, "mixer.py"), tmp_path / "mixer.py")
    result = run(["mixer.py", files["rgb.jpg"], "--weights", files["weights"], "--top-k", "2"],
                 cwd=tmp_path, isolated=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == files["rgb.jpg"] and len(lines) == 3
    assert all(line.split("%  ", 1)[1] in LABELS for line in lines[1:])

    probe = ("import sys, json\n"
             "sys.path.insert(0, '.')  # -I leaves the current folder off sys.path\n"
             "import mixer\n"
             "heavy = ('mlx', 'tinygrad', 'PIL', 'safetensors')\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
             "model = mixer.load(sys.argv[1], backend='numpy')\n"
             "model(mixer.np.zeros((1, 32, 32, 3), 'float32'))\n"
             "after = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
             "print(json.dumps([mixer.__file__, loaded, after]))\n")
    result = run(["-c", probe, files["weights"]], cwd=tmp_path, isolated=True)
    assert result.returncode == 0, result.stderr
    where, on_import, after_numpy_inference = json.loads(result.stdout)
    assert os.path.samefile(where, tmp_path / "mixer.py")
    assert on_import == [] and after_numpy_inference == []


# --- preprocess -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_preprocess_files(files, name):
    for size in (32, 224):
        x = mixer.preprocess(files[name], size=size)
        assert x.shape == (size, size, 3) and x.dtype == np.float32
        assert x.min() >= -1 and x.max() <= 1 and x.max() - x.min() > 0.5
    # every kind of file shows the same picture as the plain PNG (up to JPEG, palette and
    # grey-level losses): nothing inverted, channel-swapped, rotated or scaled wrongly
    reference = mixer.preprocess(files["rgb.png"], size=32)
    x = mixer.preprocess(files[name], size=32)
    if name.startswith("gray"):  # PIL's L is ITU-R 601 luma
        reference = np.repeat(reference @ [[0.299], [0.587], [0.114]], 3, axis=-1)
    assert np.abs(x - reference).mean() < 0.05, name


@pytest.mark.parametrize("orientation, clockwise", [(6, True), (8, False)])
def test_exif_orientation(files, orientation, clockwise):
    path = files[f"rotated{orientation}.jpg"]
    stored = np.asarray(Image.open(path).convert("RGB"))  # the pixels as stored, not rotated
    assert stored.shape == (80, 60, 3)
    by_hand = Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1 if clockwise else 1)))
    for resize in ("crop", "squash"):
        np.testing.assert_array_equal(mixer.preprocess(path, size=32, resize=resize),
                                      mixer.preprocess(by_hand, size=32, resize=resize))
        assert np.abs(mixer.preprocess(path, size=32, resize=resize)
                      - mixer.preprocess(Image.fromarray(stored), size=32, resize=resize)
                      ).mean() > 0.1  # without the tag it would be a different picture


def thirds(width, height, vertical=False):
    """Red, green and blue thirds along the long side, as a PIL image."""
    n = max(width, height)
    band = np.zeros((n, 3), np.uint8)
    band[: n // 3, 0] = band[n // 3: 2 * n // 3, 1] = band[2 * n // 3:, 2] = 255
    a = np.broadcast_to(band[:, None, :] if vertical else band[None, :, :], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(a))


@pytest.mark.parametrize("vertical", [False, True])
def test_crop_and_squash_geometry(vertical):
    image = thirds(200, 300, vertical=True) if vertical else thirds(300, 200)
    size = 32
    counts = {}
    for resize in ("crop", "squash"):
        x = mixer.preprocess(image, size=size, resize=resize)
        line = x[:, size // 2] if vertical else x[size // 2]  # along the long side
        across = x[size // 2] if vertical else x[:, size // 2]
        assert np.ptp(across, axis=0).max() < 1e-6  # uniform across the short side
        counts[resize] = np.bincount(line.argmax(-1), minlength=3)
    # crop: shorter side to int(32 / 0.875) = 36, the longer to 54, then the centre 32 of the 54
    # columns; they show 300 * 32/54 = 178 of the 300 pixels: 39 of the first third, 100 of the
    # middle, 39 of the last -> 7, 18, 7 output pixels. A centred crop: the outer thirds equal.
    red, green, blue = counts["crop"]
    assert abs(red - blue) <= 1 and 6 <= red <= 8 and 17 <= green <= 19, counts
    # squash: the whole width, each third ~32/3 pixels
    assert all(10 <= c <= 12 for c in counts["squash"]), counts


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr",
                                  "I", "F", "I;16"])
def test_preprocess_modes(mode):
    rgb = Image.fromarray(photo())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    elif mode in ("I", "F"):
        image = rgb.convert("L").convert(mode)  # values 0..255
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    x = mixer.preprocess(image, size=32)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32 and np.isfinite(x).all()
    assert -1 <= x.min() and x.max() <= 1
    if mode in ("L", "LA", "I", "F", "I;16"):  # grey levels kept, as 8 bits
        grey = mixer.preprocess(rgb.convert("L"), size=32)
        np.testing.assert_allclose(x, grey, rtol=0, atol=1.01 / 127.5)


def test_sixteen_bit_is_scaled():
    for value, expected in ((32768, 0.0), (65535, 1.0), (0, -1.0), (16384, -0.5)):
        image = Image.fromarray(np.full((40, 40), value, np.uint16))
        assert image.mode == "I;16"
        x = mixer.preprocess(image, size=32)
        np.testing.assert_allclose(x, expected, rtol=0, atol=1.01 / 127.5)  # one 8-bit step


def test_sixteen_bit_file(files):
    x = mixer.preprocess(files["gray16.png"], size=32)
    assert Image.open(files["gray16.png"]).mode.startswith("I")
    np.testing.assert_allclose(x, mixer.preprocess(files["gray.png"], size=32), rtol=0,
                               atol=1.01 / 127.5)


def test_preprocess_errors(files, tmp_path):
    with pytest.raises(mixer.MixerError, match="resize must be 'crop' or 'squash'"):
        mixer.preprocess(files["rgb.png"], resize="stretch")
    with pytest.raises(mixer.MixerError, match="no such file"):
        mixer.preprocess(str(tmp_path / "none.png"))
    with pytest.raises(mixer.MixerError, match="is a directory"):
        mixer.preprocess(str(tmp_path))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(mixer.MixerError, match="text.png: cannot read the image"):
        mixer.preprocess(str(tmp_path / "text.png"))


def test_classify_paths_uses_the_files_preprocessing(files):
    """Mixer.classify on paths: preprocess with the model's resize, then the top-k."""
    model = mixer.load(files["weights"], backend="numpy")
    names = ["rgb.jpg", "palette.png", "rotated8.jpg"]
    results = model.classify([files[n] for n in names], top_k=2)
    top, probs = expected_top(files, names, 2)
    assert [[i for i, _, _ in row] for row in results] == top.tolist()
    assert [[label for _, label, _ in row] for row in results] == \
        [[LABELS[i] for i in row] for row in top]
    np.testing.assert_allclose([[p for _, _, p in row] for row in results], probs, atol=1e-5)
    # a PIL image works as well as a path
    pil = ImageOps.exif_transpose(Image.open(files["rotated8.jpg"]))
    (row,) = model.classify([pil], top_k=2)
    assert [i for i, _, _ in row] == [i for i, _, _ in results[2]]
    np.testing.assert_allclose([p for _, _, p in row], [p for _, _, p in results[2]], atol=1e-6)
