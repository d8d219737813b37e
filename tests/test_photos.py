"""Real photos: reduced-scale decoding against full decoding, classify's decoding threads against
serial classification, and folders on the command line."""

import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import bench
import mixer
from conftest import REPO
from reference import random_params

CONFIG = mixer.MixerConfig(patch_size=8, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                           channels_mlp_dim=24, num_classes=6, image_size=32)
LABELS = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]
TOLERANCE = 0.01  # mean |fast - exact| in [-1, 1] units: far below what moves a prediction
ORIENTATION = 0x0112


# --- reduced-scale decoding -----------------------------------------------------------------

@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """One 2000x1500 photo-like picture in several files: large enough that the fast path
    decodes at 1/2 scale (JPEG) or reduces by 2 (PNG) for a 224 output."""
    folder = tmp_path_factory.mktemp("large")
    picture = bench.make_photo(2000, 1500, seed=7)
    out = {"picture": picture}

    def save(name, image, **kwargs):
        out[name] = str(folder / name)
        image.save(out[name], **kwargs)

    save("rgb.jpg", picture, quality=90)
    save("gray.jpg", picture.convert("L"), quality=90)
    save("cmyk.jpg", picture.convert("CMYK"), quality=90)
    save("rgb.png", picture, compress_level=1)
    for orientation, turn in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        # stored turned the other way: applying the tag shows `picture` upright, 2000 wide
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        save(f"rotated{orientation}.jpg", picture.transpose(turn), quality=90, exif=exif)
    return out


def mean_difference(a, b):
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("name", ["rgb.jpg", "gray.jpg", "cmyk.jpg", "rgb.png", "rotated6.jpg",
                                  "rotated8.jpg"])
@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_reduced_decoding_is_within_tolerance(large, name, resize):
    fast = mixer.preprocess(large[name], resize=resize)
    exact = mixer.preprocess(large[name], resize=resize, exact=True)
    assert fast.shape == exact.shape == (224, 224, 3) and fast.dtype == np.float32
    assert 0 < mean_difference(fast, exact) <= TOLERANCE  # > 0: the fast path was taken
    if name.startswith("rotated"):  # upright: the stored picture turned by its EXIF tag
        upright = mixer.preprocess(large["rgb.jpg"], resize=resize, exact=True)
        assert mean_difference(fast, upright) <= 2 * TOLERANCE  # two JPEG encodings apart
        assert mean_difference(fast, np.rot90(upright, 2)) > 10 * TOLERANCE


def test_tolerance_sees_a_crop_a_few_pixels_off(large):
    """The tolerance is tight enough to notice wrong geometry: the same picture with 5 of its
    2000 columns cut off is further from the exact output than the fast path is."""
    exact = mixer.preprocess(large["rgb.png"], exact=True)
    shifted = mixer.preprocess(large["picture"].crop((5, 0, 2000, 1500)), exact=True)
    assert mean_difference(shifted, exact) > 2 * TOLERANCE


def test_jpeg_is_decoded_at_reduced_scale(large, monkeypatch):
    """A JPEG path is drafted (libjpeg decodes fewer pixels); a caller's PIL image is never
    changed, only reduced after decoding, and gives what the file gives within tolerance."""
    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafted.append(size) or draft(self, mode, size))
    fast = mixer.preprocess(large["rgb.jpg"])
    assert len(drafted) == 1
    # 1/2 scale keeps the shorter side at 750, at least twice the 256 the crop resizes it to
    picture = mixer.Picture.open(large["rgb.jpg"], mixer.preprocess_reduction(224))
    assert picture.scale == 2 and picture.pixels.shape == (750, 1000, 3)
    assert (picture.width, picture.height) == (2000, 1500)
    image = Image.open(large["rgb.jpg"])
    from_image = mixer.preprocess(image)
    assert len(drafted) == 2 and image.size == (2000, 1500)
    assert mean_difference(from_image, fast) <= TOLERANCE
    np.testing.assert_array_equal(mixer.preprocess(image, exact=True),
                                  mixer.preprocess(large["rgb.jpg"], exact=True))


def test_small_images_are_decoded_exactly(large):
    """Below twice the resize's size nothing is reduced: fast and exact are the same pixels."""
    small = large["picture"].resize((500, 375))
    np.testing.assert_array_equal(mixer.preprocess(small), mixer.preprocess(small, exact=True))


# --- classify: decoding threads ahead of the model --------------------------------------------

@pytest.fixture(scope="module")
def model():
    return mixer.Mixer(CONFIG, random_params(CONFIG, seed=11), backend="numpy", labels=LABELS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """15 small photos of different kinds (more than 3 batches of 4), and their paths."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(15):
        picture = bench.make_photo(120 + 8 * i, 90, seed=i)
        kind = ["jpg", "png", "gray.png"][i % 3]
        path = str(folder / f"{i:02d}.{kind}")
        (picture.convert("L") if kind == "gray.png" else picture).save(path)
        paths.append(path)
    return paths


def serial(model, paths, batch_size):
    """What classify gives, by hand: each image preprocessed in turn, the batches in order."""
    x = np.stack([mixer.preprocess(p, size=32) for p in paths])
    return model.classify(x, top_k=3, batch_size=batch_size)


def test_threads_give_the_serial_results(model, images):
    expected = serial(model, images, 4)
    assert model.classify(images, top_k=3, batch_size=4) == expected
    assert model.classify(iter(images), top_k=3, batch_size=4) == expected  # a generator
    assert model.classify((p for p in images), top_k=3, batch_size=4) == expected
    # PIL images among paths: the same results
    mixed = [Image.open(p) if i % 2 else p for i, p in enumerate(images)]
    assert model.classify(mixed, top_k=3, batch_size=4) == expected


def test_decoding_runs_ahead_and_memory_is_bounded(model, images, monkeypatch):
    """The images are read from the iterable as decoding needs them: when the model runs on
    batch k, at most AHEAD_BATCHES more batches have been taken (never the whole iterable),
    and at least one more (decoding overlaps the forward). Decoding runs in pool threads."""
    taken, seen, threads = [], [], set()

    def counted():
        for p in images:
            taken.append(p)
            yield p
    expected = serial(model, images, 4)
    top_k = model._top_k
    monkeypatch.setattr(model, "_top_k", lambda x, k: seen.append(len(taken)) or top_k(x, k))
    preprocess = mixer.preprocess
    monkeypatch.setattr(mixer, "preprocess", lambda *a, **kw: threads.add(
        threading.current_thread().name) or preprocess(*a, **kw))
    assert model.classify(counted(), top_k=3, batch_size=4) == expected
    assert seen == [12, 15, 15, 15]  # batch k=0 runs with batches 1 and 2 taken, decoding
    assert all(name.startswith("mixer-decode") for name in threads), threads


def test_unreadable_file_raises_and_threads_end(model, images, tmp_path):
    before = set(threading.enumerate())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a picture")
    paths = images[:6] + [str(bad)] + images[6:]
    with pytest.raises(mixer.MixerError, match="bad.jpg: cannot read the image"):
        model.classify(paths, batch_size=4)
    # the internal iterator reports it in its place and goes on
    each = list(model._classify_each(paths, 3, 4, None, False))
    assert [i for i, _, _ in each] == list(range(16))
    assert isinstance(each[6][2], mixer.MixerError) and each[6][1] == str(bad)
    got, expected = [top for _, _, top in each[:6] + each[7:]], serial(model, images, 4)
    assert [[i for i, _, _ in top] for top in got] == [[i for i, _, _ in top] for top in expected]
    np.testing.assert_allclose([[p for _, _, p in top] for top in got],
                               [[p for _, _, p in top] for top in expected], rtol=0, atol=1e-6)
    assert set(threading.enumerate()) == before


def test_stopping_early_ends_the_threads(model, images):
    """Ctrl-C (here raised by the iterable) or closing the iterator early: no thread left."""
    before = set(threading.enumerate())

    def interrupted():
        yield from images[:9]
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        model.classify(interrupted(), batch_size=4)
    each = model._classify_each(images, 3, 4, None, False)
    next(each)
    each.close()
    assert set(threading.enumerate()) == before


# --- folders on the command line ---------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Photos, a text file, a corrupt JPEG, a sub-folder, hidden files and a link loop."""
    root = tmp_path_factory.mktemp("folder")
    weights = str(root / "model.safetensors")
    mixer.Mixer(CONFIG, random_params(CONFIG, seed=12), backend="numpy", labels=LABELS
                ).save(weights)
    photos = root / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    for i, name in enumerate(["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp",
                              ".hidden/e.jpg", ".f.jpg"]):
        bench.make_photo(160, 120, seed=30 + i).save(photos / name)
    (photos / "notes.txt").write_text("not an image, not looked at")
    jpeg = (photos / "b.jpg").read_bytes()
    (photos / "sub" / "corrupt.jpg").write_bytes(jpeg[:200] + b"\0" * 50)
    os.symlink("..", photos / "sub" / "loop")  # a link back up: never followed
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "notes.txt").write_text("no images here")
    readable = [str(photos / n) for n in ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]]
    return {"root": root, "weights": weights, "photos": str(photos), "readable": readable,
            "corrupt": str(photos / "sub" / "corrupt.jpg")}


def mixer_cli(*args):
    result = subprocess.run([sys.executable, "mixer.py", *args, "--backend", "numpy"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def expected_rows(weights, paths, k):
    model = mixer.load(weights, backend="numpy")
    return [[label for _, label, _ in top] for top in model.classify(paths, top_k=k)]


def test_folder_of_mixed_files(folder):
    """Every readable image, recursively, in sorted order; the corrupt JPEG one line on stderr
    and left out (exit 2); the text file, hidden files and the link loop not looked at."""
    result = mixer_cli(folder["photos"], "--weights", folder["weights"], "--top-k", "2")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mixer: skipped {folder['corrupt']}: cannot read the image ("), \
        lines
    lines = result.stdout.splitlines()
    assert lines[::3] == folder["readable"]
    labels = [[line.split("%  ", 1)[1] for line in lines[i + 1:i + 3]]
              for i in range(0, len(lines), 3)]
    assert labels == expected_rows(folder["weights"], folder["readable"], 2)


def test_folder_as_json_and_jsonl(folder):
    expected = folder["readable"][:3] + [folder["corrupt"], folder["readable"][3]]
    result = mixer_cli(folder["photos"], "--weights", folder["weights"], "--json")
    assert result.returncode == 2
    doc = json.loads(result.stdout)
    assert [e["image"] for e in doc] == expected
    assert set(doc[3]) == {"image", "error"} and "cannot read the image" in doc[3]["error"]
    assert result.stdout == json.dumps(doc, indent=2) + "\n"  # streamed, as one dumps writes it
    result = mixer_cli(folder["photos"], "--weights", folder["weights"], "--jsonl")
    assert result.returncode == 2
    assert [json.loads(line) for line in result.stdout.splitlines()] == doc


def test_all_readable_is_exit_0_and_empty_folder_is_one_line(folder):
    result = mixer_cli(*folder["readable"], os.path.join(folder["photos"], "sub", "deeper"),
                       "--weights", folder["weights"], "--top-k", "1")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines()[::2] == folder["readable"] + [folder["readable"][3]]
    empty = str(folder["root"] / "empty")
    result = mixer_cli(empty, "--weights", folder["weights"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"mixer: error: {empty}: no image files in this folder or below (looked for .jpg, "
        f".jpeg, .png, .bmp, .gif, .tif, .tiff, .webp; hidden files and folders are skipped)"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_only(folder, monkeypatch):
    """Over PROGRESS_MIN_IMAGES images and stderr a terminal: count, total and rate, redrawn
    in place; stdout is the same as without."""
    paths = folder["readable"] * 9  # 36 images
    for stderr, shown in ((Terminal(), True), (io.StringIO(), False)):
        out = []
        assert mixer._classify_cli(paths, folder["weights"], None, None, "numpy", 1, None, False,
                                   "float32", False, False, out.append, stderr) == 0
        assert "".join(out) == mixer.run_cli(paths, folder["weights"], backend="numpy",
                                             top_k=1) + "\n"
        text = stderr.getvalue()
        assert ("\r36/36 images, " in text and text.endswith(" images/s\n")) == shown, text
        assert shown or text == ""
