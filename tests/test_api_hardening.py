"""What the library and the CLI do with hostile or careless input: images that cost far more
than their size, files that are not files, bad arguments to the Python API, a model that
produces inf, and names that carry terminal escape sequences."""

import io
import json
import math
import os
import subprocess
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import mixer
from conftest import REPO
from reference import random_params

CONFIG = mixer.MixerConfig(patch_size=8, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                           channels_mlp_dim=24, num_classes=6, image_size=32)
STEP = 1 / 127.5  # one uint8 level in [-1, 1] units


@pytest.fixture(scope="module")
def model():
    return mixer.Mixer(CONFIG, random_params(CONFIG, seed=3), backend="numpy")


def smooth(height, width):
    """An RGB picture without hard edges (uint8): what resampling can be compared on."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([127 + 100 * np.sin(x / 9 + y / 13), 127 + 100 * np.cos(y / 7),
                     127 + 100 * np.sin((x - y) / 11)], axis=-1).astype(np.uint8)


def edged(height, width):
    """A gradient with a saturated red block: hard edges, where bicubic overshoots clip."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    rgb = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    rgb[height // 12: height // 3, width // 16: width // 3] = [250, 20, 20]
    return rgb.astype(np.uint8)


def resize_then_crop(image, size, offset=0):
    """The crop geometry as preprocess computed it before: the whole image resized (shorter
    side to int(size / 0.875)), then the centre size x size cut out (`offset` pixels further
    right and down: a crop off by one, to show that the comparison would notice)."""
    short = int(size / 0.875)
    w, h = image.size
    new = (short, max(short, round(h * short / w))) if w <= h else \
        (max(short, round(w * short / h)), short)
    left, top = (new[0] - size) // 2 + offset, (new[1] - size) // 2 + offset
    out = image.resize(new, Image.BICUBIC).crop((left, top, left + size, top + size))
    return np.asarray(out, np.float32) / 127.5 - 1


SHAPES = [(640, 480), (480, 640), (333, 517), (517, 333), (31, 17), (20, 30), (256, 256),
          (224, 224), (1000, 999), (7, 300), (300, 7), (225, 1000), (1200, 300)]


@pytest.mark.parametrize("picture", [smooth, edged])
def test_crop_equals_resize_then_crop(picture):
    """Resampling only the crop box gives the pixels of the old resize-then-crop. They differ
    by float rounding, and by the order of the two passes: preprocess always goes horizontal
    first (as Pillow did before 13), Pillow 13 sometimes vertical first on the whole image,
    which rounds the intermediate 8-bit image the other way: then up to 2 levels. (exact=True:
    large images are otherwise reduced first, which test_photos.py holds to its tolerance.)"""
    means = []
    for w, h in SHAPES:
        image = Image.fromarray(picture(h, w))
        for size in (32, 100, 224):
            x = mixer.preprocess(image, size=size, exact=True)
            assert x.shape == (size, size, 3)
            d = np.abs(x - resize_then_crop(image, size))
            assert d.max() <= 2 * STEP + 1e-6, (w, h, size, d.max() / STEP)
            means.append(d.mean())
            if picture is smooth and min(w, h) > size / 0.875:
                # shrunk, the smooth picture changes by several levels a pixel everywhere:
                # a crop one pixel off shows
                off = np.abs(x - resize_then_crop(image, size, offset=1)).max()
                assert off > 3 * STEP, (w, h, size, off / STEP)
    assert max(means) < 0.1 * STEP, max(means) / STEP


@pytest.mark.parametrize("picture", [smooth, edged])
def test_squash_equals_one_resize(picture):
    """squash: the whole image to size x size in one resize; except that an image narrower
    than the output and taller is shrunk vertically first, by hand, to bound the memory
    (older Pillow went horizontally first, making an intermediate image `size` times the
    source's; Pillow 13 takes this order itself, so there the pixels are the same). exact=True,
    as above."""
    for w, h in SHAPES + [(5, 2000), (60, 900), (20, 900)]:
        image = Image.fromarray(picture(h, w))
        for size in (32, 224):
            x = mixer.preprocess(image, size=size, resize="squash", exact=True)
            expected = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32)
            d = np.abs(x - (expected / 127.5 - 1))
            if w < size < h:
                assert d.max() <= 2 * STEP + 1e-6 and d.mean() < 0.1 * STEP, (w, h, size)
            else:
                assert d.max() == 0, (w, h, size)


def test_extreme_aspect_ratios_take_little_memory(tmp_path):
    """A 98-byte 1x4000 PNG took 1.1 GB to preprocess, 10000x1 2.7 GB, 1x30000 8 GB: the
    resized image was built whole. Now the work follows the output. Peak memory is measured
    in a fresh process (Pillow's allocations are invisible to tracemalloc)."""
    shapes = [(1, 4000), (10000, 1), (1, 30000), (30000, 1), (3, 20000)]
    for w, h in shapes:
        Image.fromarray(smooth(h, w)).save(tmp_path / f"{w}x{h}.png")
    probe = (
        "import resource, sys\n"
        "import mixer\n"
        "from PIL import Image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for path in sys.argv[1:]:\n"
        "    for resize in ('crop', 'squash'):\n"
        "        assert mixer.preprocess(path, resize=resize).shape == (224, 224, 3)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(peak * (1 if sys.platform == 'darwin' else 1024))\n")
    result = subprocess.run([sys.executable, "-c", probe,
                             *[str(tmp_path / f"{w}x{h}.png") for w, h in shapes]],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 50 * 2**20, int(result.stdout) / 2**20  # MiB


def test_extreme_aspect_ratio_shows_the_right_pixels():
    """A 1-pixel-wide column: the crop shows its middle 0.875 of the width, scaled up, so
    every output row is the column's colour at the middle of the image."""
    column = np.zeros((3000, 1, 3), np.uint8)
    column[:1500], column[1500:] = [200, 0, 0], [0, 0, 200]  # red top half, blue bottom
    x = mixer.preprocess(Image.fromarray(column), size=32)
    # the crop is 32/256 of the width tall: 0.875 source rows at the middle, where red meets
    # blue; the top output rows are red, the bottom ones blue
    assert x.shape == (32, 32, 3)
    assert x[0, :, 0].min() > 0.5 and x[-1, :, 2].min() > 0.5
    np.testing.assert_array_equal(x, np.broadcast_to(x[:, :1], x.shape))  # along the width


# --- files that are not images ----------------------------------------------------------------


def run_guarded(fn, unblock, timeout=10):
    """fn() in a thread; if it is still running after `timeout` s, unblock() it and fail."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            outcome["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        unblock()
        thread.join(timeout)
        pytest.fail(f"still blocked after {timeout} s")
    return outcome


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "photo.jpg")
    os.mkfifo(fifo)

    def unblock():  # a writer that connects and leaves: the reader sees end of file
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    outcome = run_guarded(lambda: mixer.preprocess(fifo), unblock)
    assert isinstance(outcome.get("error"), mixer.MixerError), outcome
    assert str(outcome["error"]) == \
        f"{fifo}: is not a regular file (a pipe or a device), not an image"


@pytest.mark.parametrize("path, message", [
    ("/dev/zero", "is not a regular file"),
    (".", "is a directory"),
])
def test_device_and_directory_are_refused(path, message):
    if not os.path.exists(path):
        pytest.skip(f"no {path} here")
    outcome = run_guarded(lambda: mixer.preprocess(path), lambda: None)
    assert isinstance(outcome.get("error"), mixer.MixerError), outcome
    assert message in str(outcome["error"])


def png_header(width, height):
    """A PNG that declares width x height and holds no pixels: enough for Image.open."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10000, 14000])  # 1x-2x Pillow's limit (a warning), above 2x
def test_decompression_bomb_is_one_error(tmp_path, side):
    """Pillow warns (on stderr) about images of 1-2x its MAX_IMAGE_PIXELS and refuses larger
    ones; both are the same clear error, in the library and on the command line."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    assert side * side > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(mixer.MixerError, match=r"bomb.png: .*raise PIL.Image.MAX_IMAGE_"):
            mixer.preprocess(str(path))
    weights = tmp_path / "model.safetensors"
    mixer.Mixer(CONFIG, random_params(CONFIG), backend="numpy").save(str(weights))
    result = subprocess.run([sys.executable, "mixer.py", str(path), "--weights", str(weights),
                             "--backend", "numpy"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixer: error: "), result.stderr
    assert "MAX_IMAGE_PIXELS" in lines[0]


def test_pillow_limit_is_the_hosts(monkeypatch):
    """The limit is Pillow's own setting, read at each call: a program that lowers (or lifts)
    PIL.Image.MAX_IMAGE_PIXELS gets what it asked for."""
    image = Image.fromarray(smooth(40, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with pytest.raises(mixer.MixerError, match="50x40 is 2000 pixels, more than Pillow's limit"):
        mixer.preprocess(image, size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert mixer.preprocess(image, size=32).shape == (32, 32, 3)


def gif(colours):
    frames = [Image.new("RGB", (40, 30), c) for c in colours]
    f = io.BytesIO()
    frames[0].save(f, "GIF", save_all=True, append_images=frames[1:])
    f.seek(0)
    return Image.open(f)


def closed_image():
    image = Image.new("RGB", (40, 30))
    image.close()
    return image


@pytest.mark.parametrize("make, message", [
    (lambda: Image.new("RGB", (0, 10)), r"image: the image has no pixels \(0x10\)"),
    (lambda: Image.fromarray(np.full((40, 40), np.nan, np.float32)),
     "image: cannot read the image .*NaN or infinite"),
    (lambda: Image.fromarray(np.full((40, 40), np.inf, np.float32)), "NaN or infinite"),
    (closed_image, "cannot read the image"),
])
def test_unusable_pil_images(make, message):
    with pytest.raises(mixer.MixerError, match=message):
        mixer.preprocess(make(), size=32)


def test_first_frame_of_an_animation():
    x = mixer.preprocess(gif([(255, 0, 0), (0, 255, 0)]), size=32)
    np.testing.assert_allclose(x[..., 0], 1.0, atol=STEP)  # red, the first frame
    np.testing.assert_allclose(x[..., 1], -1.0, atol=STEP)


def test_palette_with_transparency_is_quiet():
    """A palette image with per-entry transparency: Pillow warns on stderr when it goes to RGB
    directly; preprocess goes by way of RGBA, which gives the same colours without a word."""
    rgb = Image.fromarray(smooth(30, 40))
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    f = io.BytesIO()
    p.save(f, "PNG", transparency=bytes([0, 128] + [255] * 14))
    f.seek(0)
    image = Image.open(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        x = mixer.preprocess(image, size=32, resize="squash")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = np.asarray(image.convert("RGB").resize((32, 32), Image.BICUBIC), np.float32)
    np.testing.assert_array_equal(x, direct / 127.5 - 1)


# --- the Python API's arguments ---------------------------------------------------------------


def test_empty_batch_gives_empty_results(backend):
    model = mixer.Mixer(CONFIG, random_params(CONFIG), backend=backend)
    empty = np.zeros((0, 32, 32, 3), np.float32)
    assert model(empty).shape == (0, 6) and model(empty).dtype == np.float32
    assert model.features(empty).shape == (0, 16)
    assert model.classify(empty) == [] and model.classify([]) == []


def test_one_image_is_one_image(model, tmp_path):
    """A single path or PIL image is one image (a str used to be iterated character by
    character); the result is still a list with one entry per image."""
    image = Image.fromarray(smooth(30, 40))
    path = tmp_path / "a.png"
    image.save(path)
    expected = model.classify([str(path)], top_k=2)
    assert len(expected) == 1 and len(expected[0]) == 2
    assert model.classify(str(path), top_k=2) == expected
    assert model.classify(path, top_k=2) == expected  # a PathLike
    assert model.classify(image, top_k=2) == expected


@pytest.mark.parametrize("call, message", [
    (lambda m: m(np.zeros((1, 32, 32, 3), object)), "expected float images .* got an array of "
                                                    "object"),
    (lambda m: m(np.full((1, 32, 32, 3), "a")), "got an array of <U1"),
    (lambda m: m(np.zeros((1, 32, 32, 3), np.uint8)), r"scaled to \[-1, 1\] .*mixer.preprocess"),
    (lambda m: m([np.zeros((32, 32, 3)), np.zeros((16, 16, 3))]), "expected images of shape"),
    (lambda m: m(np.full((1, 32, 32, 3), np.nan, np.float32)), "non-finite input"),
    (lambda m: m.features(np.full((1, 32, 32, 3), -np.inf)), "non-finite input"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), batch_size=0), "batch_size must be a "
                                                                   "positive int, got 0"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), batch_size=-3), "got -3"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), batch_size=2.5), "got 2.5"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), top_k=-1), "top_k must be a positive int, "
                                                               "got -1"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), top_k=0), "top_k .* got 0"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), top_k=True), "top_k .* got True"),
    (lambda m: m.classify(np.zeros((1, 32, 32, 3)), resize="stretch"), "resize must be"),
    (lambda m: m.classify(12345), "expected images .* got int"),
    (lambda m: m.classify([12345]), "expected an image file's path or a PIL image, got int"),
    # K = 60: 2 blocks x 2 kernels of (60² x 16 tokens) x (60² x 8) float32 = 24.7 GiB
    (lambda m: m.at_resolution(1920), r"at_resolution\(1920\) would need 24.7 GiB .*limit is "
                                      r"4.0 GiB"),
    (lambda m: m.at_resolution(True), "integer multiple of the current size 32"),
    (lambda m: m.at_resolution(64.0), "got 64.0"),
    (lambda m: m.at_resolution("64"), "got '64'"),
    (lambda m: m.at_resolution(48), "got 48"),
    (lambda m: m.save(None), "save needs a file path, got NoneType"),
    (lambda m: m.save("x.safetensors", dtype="int3"), "unsupported dtype 'int3'"),
    (lambda m: m.save("x.safetensors", source=5), "source must be a string"),
])
def test_bad_arguments_raise_mixer_error(model, call, message):
    with pytest.raises(mixer.MixerError, match=message):
        call(model)


@pytest.mark.parametrize("image, size, message", [
    (12345, 32, "expected an image file's path or a PIL image, got int"),
    (None, 32, "got NoneType"),
    (np.zeros((32, 32, 3)), 32, r"got ndarray \(a preprocessed array goes straight"),
    (b"a.png", 32, "a.png: no such file"),  # a bytes path is a path, as for open()
    ("a.png", 0, "size must be a positive int, got 0"),
    ("a.png", True, "size .* got True"),
    ("a.png", 32.0, "size .* got 32.0"),
])
def test_preprocess_bad_arguments(image, size, message):
    with pytest.raises(mixer.MixerError, match=message):
        mixer.preprocess(image, size=size)


def test_at_resolution_accepts_numpy_ints(model):
    assert model.at_resolution(np.int64(64)).config.image_size == 64


def test_num_params_counts_every_tensor():
    """The closed form that the memory check relies on, against the shapes listed."""
    for config in (CONFIG, mixer.VARIANTS["B/16"],
                   mixer.MixerConfig(patch_size=4, hidden_dim=6, num_blocks=3, tokens_mlp_dim=5,
                                     channels_mlp_dim=7, num_classes=None, image_size=12)):
        shapes = mixer.param_shapes(config).values()
        assert mixer.num_params(config) == sum(math.prod(s) for s in shapes)


@pytest.mark.skipif(mixer._physical_memory() is None, reason="the system does not say its RAM")
def test_huge_config_is_refused_before_allocating():
    huge = mixer.MixerConfig(patch_size=16, hidden_dim=2**20, num_blocks=10**6,
                             tokens_mlp_dim=4096, channels_mlp_dim=2**22)
    for make in (mixer.init_params, mixer.init):
        with pytest.raises(mixer.MixerError, match=r"this config's [\d,]+ weights need "
                                                   r"[\d,.]+ GiB, more than this machine's"):
            make(huge)


@pytest.mark.parametrize("call, message", [
    (lambda: mixer.init_params({"patch_size": 8}), "expected a MixerConfig, got dict"),
    (lambda: mixer.init_params(CONFIG, seed=-1), "seed must be a non-negative int"),
    (lambda: mixer.init_params(CONFIG, seed=1.5), "seed .* got 1.5"),
    (lambda: mixer.MixerConfig(8, 16, 2, 8, 24, num_classes=True), "num_classes must be"),
    (lambda: mixer.MixerConfig(8, 16, 2, 8, True), "channels_mlp_dim must be"),
])
def test_init_and_config_arguments(call, message):
    with pytest.raises(mixer.MixerError, match=message):
        call()


# --- non-finite outputs -----------------------------------------------------------------------


def overflowing_params():
    """Finite weights whose logits overflow float32: every pre-logit is 3e38 (pre-head
    LayerNorm scale 0, bias 3e38) and the head sums 16 of them."""
    params = random_params(CONFIG, seed=4)
    params["pre_head_layer_norm/scale"][:] = 0
    params["pre_head_layer_norm/bias"][:] = 3e38
    params["head/kernel"][:] = 1
    assert all(np.isfinite(v).all() for v in params.values())
    return params


def test_non_finite_logits_are_an_error(tmp_path):
    model = mixer.Mixer(CONFIG, overflowing_params(), backend="numpy")
    x = np.zeros((2, 32, 32, 3), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow note
        assert np.isinf(model(x)).all()  # the raw logits are what they are
        with pytest.raises(mixer.MixerError, match="the model produced non-finite outputs: its "
                                                   "weights are damaged or the input is out"):
            model.classify(x)
        weights = str(tmp_path / "overflow.safetensors")
        model.save(weights)
        image = tmp_path / "a.png"
        Image.fromarray(smooth(30, 40)).save(image)
        for as_json in (False, True):  # neither `nan%` nor the invalid JSON `NaN`
            with pytest.raises(mixer.MixerError, match="non-finite outputs"):
                mixer.run_cli([str(image)], weights=weights, backend="numpy", json=as_json)


def test_save_refuses_weights_a_file_cannot_hold(model, tmp_path):
    path = tmp_path / "m.safetensors"
    params = random_params(CONFIG)
    params["MixerBlock_1/channel_mixing/Dense_0/kernel"][2, 3] = np.nan
    damaged = mixer.Mixer(CONFIG, params, backend="numpy")
    with pytest.raises(mixer.MixerError, match="non-finite values .*Dense_0/kernel'.*nothing "
                                               "written"):
        damaged.save(str(path))
    params = random_params(CONFIG)
    params["stem/bias"][0] = 1e5
    large = mixer.Mixer(CONFIG, params, backend="numpy")
    with pytest.raises(mixer.MixerError, match="'stem/bias' holds values up to 1e\\+05, beyond "
                                               "float16's 65504"):
        large.save(str(path), dtype="float16")
    assert not path.exists()
    large.save(str(path), dtype="bfloat16")  # bfloat16 has float32's range
    assert mixer.load(str(path), backend="numpy").numpy_params()["stem/bias"][0] == 99840.0


# --- what the command line prints -------------------------------------------------------------

HOSTILE_LABELS = ["\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "two\nlines", "chat \u732b \u00e9",
                  "c1 \x9b31m", "sep\u2028arator"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    weights = str(folder / "labels.safetensors")
    mixer.Mixer(CONFIG, random_params(CONFIG, seed=5), backend="numpy",
                labels=HOSTILE_LABELS).save(weights)
    image = str(folder / "new\nline \x1b[31mred.png")
    Image.fromarray(smooth(30, 40)).save(image)
    return weights, image


def test_text_output_escapes_control_characters(hostile):
    weights, image = hostile
    text = mixer.run_cli([image], weights=weights, backend="numpy", top_k=6)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029"
                   for c in text.replace("\n", "")), repr(text)
    lines = text.split("\n")
    assert len(lines) == 7  # the path, then one line per class: nothing broke a line
    assert lines[0] == image.replace("\n", "\\x0a").replace("\x1b", "\\x1b")
    printed = {line.split("%  ", 1)[1] for line in lines[1:]}
    assert printed == {"\\x1b]0;pwned\\x07", "\\x1b[2J\\x1b[H", "two\\x0alines",
                       "chat \u732b \u00e9", "c1 \\x9b31m", "sep\\u2028arator"}


def test_json_output_is_strict_and_exact(hostile):
    """JSON escapes every control character itself (and, with ensure_ascii, everything
    non-ASCII): the document is safe to print and gives back the exact names."""
    weights, image = hostile
    text = mixer.run_cli([image], weights=weights, backend="numpy", top_k=6, json=True)
    assert text.isascii() and all(c == "\n" or " " <= c < "\x7f" for c in text)
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert doc[0]["image"] == image
    assert sorted(t["label"] for t in doc[0]["top_k"]) == sorted(HOSTILE_LABELS)


def test_error_about_a_hostile_file_name_is_one_line(tmp_path):
    missing = str(tmp_path / "gone\n\x1b[2J.png")
    with pytest.raises(mixer.MixerError) as error:
        mixer.preprocess(missing)
    assert "\n" not in str(error.value) and "\x1b" not in str(error.value)
    assert str(error.value).endswith("gone\\x0a\\x1b[2J.png: no such file")
    not_an_image = tmp_path / "text\n.png"
    not_an_image.write_text("hello")
    with pytest.raises(mixer.MixerError, match=r"text\\x0a.png: cannot read the image") as error:
        mixer.preprocess(str(not_an_image))
    assert "\n" not in str(error.value)


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="file names must be bytes")
def test_undecodable_file_name_is_printed(hostile, tmp_path):
    """A file name that is not UTF-8 reaches Python as lone surrogates, which cannot be
    printed; the text output shows the undecodable byte as an escape."""
    weights, _ = hostile
    path = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    Image.fromarray(smooth(30, 40)).save(path)
    text = mixer.run_cli([path], weights=weights, backend="numpy", top_k=1)
    first = text.split("\n")[0]
    assert first.endswith("caf\\xe9.png")
    first.encode("utf-8")  # printable


def test_review_cases(tmp_path):
    """An absurd output size was killed by the OOM killer instead of refused; a bytes path given
    to classify was iterated byte by byte."""
    image = os.path.join(REPO, "examples", "chelsea.jpg")
    with pytest.raises(mixer.MixerError, match="size 1000000 is more than 8192 pixels a side"):
        mixer.preprocess(image, size=10**6)
    config = mixer.MixerConfig(patch_size=4, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                               channels_mlp_dim=8, num_classes=3, image_size=8)
    model = mixer.init(config, backend="numpy")
    assert model.classify(os.fsencode(image)) == model.classify([image])
    with pytest.raises(mixer.MixerError, match="params must be a dict"):
        mixer.Mixer(config, [1, 2], backend="numpy")
