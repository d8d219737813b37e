"""train.py's training input: mixer.Picture's reduced-scale decoding for augmented crops, and
the cache of decoded images (bounded, invalidated by a changed file, invisible in the results).

The images are generated here: photo-like 1600x1200 pictures (smooth gradients, shapes, mild
noise), small enough for a quick test and large enough for libjpeg's 1/2 to 1/8 scales.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

import mixer
import train

# Mean |difference| allowed between a crop of the reduced image and the same crop of the
# full-resolution one, in [-1, 1] units: per image the bound for preprocessing, and on
# average over the crops of one image. Measured on these photos at 1/8 scale (or reduce(10)):
# at most 0.0037 per image, 0.0012-0.0018 on average. The average bound catches a crop placed
# 2 full-resolution pixels (a quarter of a reduced one) off: measured 0.0053. A crop drawn for
# another position differs by 0.19 or more.
TOLERANCE = 0.01
TOLERANCE_MEAN = 0.003


def photo(seed: int, width=1600, height=1200) -> Image.Image:
    """A photo-like RGB picture: smooth colour gradients, a few blurred shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [(np.sin(x / width * rng.uniform(1, 6) + rng.uniform(0, 6))
               * np.cos(y / height * rng.uniform(1, 6)) + 1) * 127 for _ in range(3)]
    img = Image.fromarray(np.stack(planes, -1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        cx, cy, r = int(rng.integers(0, width)), int(rng.integers(0, height)), \
            int(rng.integers(height // 30, height // 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - r, cy - r, cx + r, cy + r], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(img, np.int16) + rng.normal(0, 4, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# EXIF orientation -> the transpose that shows the stored image upright (the EXIF standard)
UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
           6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def save(img: Image.Image, path, orientation: int = 1) -> str:
    """Saves `img` so that it shows upright: stored turned by the inverse of `orientation`,
    with that EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if orientation in UPRIGHT:
        # each of the 8 orientations is its own inverse, except the two quarter turns
        inverse = {"ROTATE_90": "ROTATE_270", "ROTATE_270": "ROTATE_90"}
        name = UPRIGHT[orientation]
        img = img.transpose(Image.Transpose[inverse.get(name, name)])
    path = str(path)
    img.save(path, **({"quality": 90} if path.endswith(".jpg") else {}), exif=exif.tobytes())
    return path


def upright(path) -> Image.Image:
    """The file's image at full resolution, upright, RGB: what augmentation is defined on."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "I;16":  # 16 bits to 8, rounded
            a = np.asarray(img, np.float64) / 65535 * 255 + 0.5
            return Image.fromarray(a.astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


def reference(img, size, seed, position):
    """The augmentation as defined, at full resolution: on the upright RGB image, an inception
    crop seeded by (seed, 1, position), bicubic to size x size, a coin-flip mirror."""
    rng = np.random.default_rng([seed, 1, position])
    img = img.resize((size, size), Image.BICUBIC, box=train.inception_crop(*img.size, rng))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 JPEGs of 1600x1200 in two classes: DATA/train/{a,b}/N.jpg."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(8):
        os.makedirs(root / "train" / "ab"[i % 2], exist_ok=True)
        save(photo(i), root / "train" / "ab"[i % 2] / f"{i}.jpg")
    return str(root)


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        yield pool


def loader(split, size, cache=None, augment=True, pool=None):
    return train.Loader(split, 2, size, "crop", augment, 7, pool, lambda msg: None, cache)


def decode(path, size) -> mixer.Picture:
    """The picture as augmented training decodes it for crops of `size`."""
    return mixer.Picture.open(path, lambda w, h: train.largest_reduction(w, h, size))


# --------------------------------------------------------------------------------------------
# Reduced-scale decoding.


def test_the_reduction_keeps_the_narrowest_crop_at_the_input_size():
    """largest_reduction(W, H, size) * size is the short side of the narrowest crop that
    inception_crop draws: 20000 draws never go below it, and come within 3% of it."""
    rng = np.random.default_rng(0)
    for width, height, size in [(1600, 1200, 32), (4032, 3024, 224), (3024, 4032, 224),
                                (100, 3000, 32)]:  # elongated: inception_crop's fallback
        narrowest = train.largest_reduction(width, height, size) * size
        sides = [min(r - l, b - t) for l, t, r, b in
                 (train.inception_crop(width, height, rng) for _ in range(20000))]
        assert narrowest <= min(sides) <= 1.03 * narrowest, (width, height)
    assert train.largest_reduction(4032, 3024, 224) == pytest.approx(855 / 224)
    assert train.largest_reduction(100, 3000, 32) == 100 / 32


@pytest.mark.parametrize("size, factor", [(32, 8), (64, 4), (96, 2), (224, 1)])
def test_jpegs_are_decoded_at_the_largest_scale_that_keeps_enough_pixels(photos, size, factor):
    """A 1600x1200 JPEG's narrowest crop has 339 pixels a side: libjpeg's 1/8 leaves 42 of
    them (enough for 32), 1/4 leaves 85 (64), 1/2 leaves 170 (96), none for 224."""
    path = os.path.join(photos, "train", "a", "0.jpg")
    image = decode(path, size)
    assert image.scale == factor
    assert image.pixels.shape == (1200 // factor, 1600 // factor, 3)
    assert (image.width, image.height) == (1600, 1200)


CASES = [f"jpeg-orientation-{o}" for o in range(1, 9)] + ["jpeg-L", "jpeg-CMYK", "png",
                                                          "png-orientation-6", "png-I;16"]


@pytest.mark.parametrize("case", CASES)
def test_reduced_crops_match_full_resolution_crops(tmp_path, case):
    """For every EXIF orientation and image mode: the crop of the reduced image is the crop of
    the full-resolution upright image drawn for (seed, position), within TOLERANCE; a crop drawn
    for another position is far outside it."""
    kind, _, rest = case.partition("-")
    img = photo(1)
    orientation = int(rest.rpartition("-")[2]) if "orientation" in rest else 1
    if rest in ("L", "CMYK"):
        img = img.convert(rest)
    if rest == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    path = save(img, tmp_path / f"image.{'jpg' if kind == 'jpeg' else 'png'}", orientation)
    size = 32
    image = decode(path, size)
    assert image.scale == (8 if kind == "jpeg" else 10)  # PNG: Image.reduce(10)
    assert (image.width, image.height) == (1600, 1200)  # upright
    assert image.pixels.shape == (1200 // image.scale, 1600 // image.scale, 3)
    augment, full = loader(None, size), upright(path)
    errors, others = [], []
    for position in range(12):
        x = augment.decode(path, position)
        assert x.shape == (size, size, 3) and x.dtype == np.float32
        errors.append(np.abs(x - reference(full, size, 7, position)).mean())
        others.append(np.abs(x - reference(full, size, 7, position + 1)).mean())
    assert max(errors) <= TOLERANCE and np.mean(errors) <= TOLERANCE_MEAN, errors
    assert min(others) > 10 * TOLERANCE, others


def test_small_images_are_decoded_whole(tmp_path):
    """An image whose narrowest crop is already under the input size is not reduced, and its
    crops are exactly the full-resolution ones."""
    path = save(photo(2, 320, 240), tmp_path / "small.jpg", orientation=6)
    image = decode(path, 64)
    assert image.scale == 1 and image.pixels.shape == (240, 320, 3)  # upright
    augment, full = loader(None, 64), upright(path)
    for position in range(6):
        np.testing.assert_allclose(augment.decode(path, position),
                                   reference(full, 64, 7, position), atol=2 / 127.5)


# --------------------------------------------------------------------------------------------
# The cache of decoded images.


def scan(root, pool):
    return train.scan(root, 0, 0, pool, lambda msg: None)[1]


def count_decodes(monkeypatch):
    """Counts mixer.Picture.open calls (the file reads)."""
    calls = []
    decode = mixer.Picture.open

    def counted(path, max_reduction=None):
        calls.append(path)
        return decode(path, max_reduction)
    monkeypatch.setattr(mixer.Picture, "open", staticmethod(counted))
    return calls


def test_the_cache_returns_what_a_fresh_decode_returns(photos, pool, monkeypatch):
    split = scan(photos, pool)
    cache = train.DecodeCache(2**30)
    cached, fresh = loader(split, 32, cache), loader(split, 32)
    calls = count_decodes(monkeypatch)
    first = [cached.decode(f, p) for p, f in enumerate(split.files)]
    assert len(calls) == 8 and cache.used == 8 * 150 * 200 * 3
    for p, f in enumerate(split.files * 2):  # the second epoch's crops, from the cache
        np.testing.assert_array_equal(cached.decode(f, p), fresh.decode(f, p))
    assert len(calls) == 8 + 16  # only `fresh` decoded
    np.testing.assert_array_equal(cached.decode(split.files[0], 0), first[0])
    # --no-augment and evaluation: mixer.preprocess's pixels, kept as uint8, decoded once
    plain = loader(split, 32, cache, augment=False)
    for f in split.files[:3]:
        for _ in range(2):
            np.testing.assert_array_equal(plain.decode(f, 0), mixer.preprocess(f, size=32))
    assert len(calls) == 24 + 3  # once each: the second time from the cache
    assert cache.used == 8 * 150 * 200 * 3 + 3 * 32 * 32 * 3


@pytest.mark.parametrize("change", ["rewritten", "replaced"])
def test_a_changed_file_is_decoded_again(photos, tmp_path, pool, change):
    """A file rewritten in place (new content, new modification time) or replaced by another
    (renamed over it) gives the new pixels, augmented and preprocessed, and the stale entry's
    memory is given back."""
    path = str(tmp_path / "image.jpg")
    save(photo(3), path)
    cache = train.DecodeCache(2**30)
    augment, plain = loader(None, 32, cache), loader(None, 32, cache, augment=False)
    old = augment.decode(path, 0), plain.decode(path, 0)
    used = cache.used
    if change == "rewritten":
        save(photo(4), path)
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        save(photo(4), tmp_path / "new.jpg")
        os.replace(tmp_path / "new.jpg", path)
    new = augment.decode(path, 0), plain.decode(path, 0)
    np.testing.assert_array_equal(new[0], loader(None, 32).decode(path, 0))
    np.testing.assert_array_equal(new[1], mixer.preprocess(path, size=32))
    assert np.abs(new[0] - old[0]).mean() > 0.05 and np.abs(new[1] - old[1]).mean() > 0.05
    assert cache.used == used  # the new versions took the old ones' places


def test_the_cache_stays_within_its_budget(photos, pool, monkeypatch):
    """A budget of 2.5 images keeps 2 of them and decodes the other 6 again every epoch; the
    run is told once; a budget of 0 keeps nothing."""
    split = scan(photos, pool)
    one = 150 * 200 * 3  # a 1600x1200 photo at 1/8 scale, uint8 RGB
    cache = train.DecodeCache(int(2.5 * one))
    said = []
    small = train.Loader(split, 2, 32, "crop", True, 7, pool, said.append, cache)
    calls = count_decodes(monkeypatch)
    batches = small.batches(1, 8, 0, 1, depth=0)  # no decoding ahead: one epoch per batch
    for _ in range(3):  # three epochs
        next(batches)
    assert cache.used == 2 * one <= cache.budget
    assert len(calls) == 8 + 6 + 6
    assert sum("decode cache is full" in s for s in said) == 1, said
    nothing = train.DecodeCache(0)
    off = loader(split, 32, nothing)
    for p, f in enumerate(split.files * 2):
        off.decode(f, p)
    assert nothing.used == 0 and len(calls) == 20 + 16


def test_batches_do_not_depend_on_the_cache(photos, pool):
    """The stream from step 1 with the cache filling and hitting equals streams started later,
    from a cold cache and with no cache: what a resumed run sees."""
    split = scan(photos, pool)
    warm = loader(split, 32, train.DecodeCache(2**30), pool=pool).batches(1, 4, 0, 1)
    steps = [next(warm) for _ in range(6)]  # three epochs of 8
    for first in (3, 5):
        for cache in (train.DecodeCache(2**30), None):
            later = loader(split, 32, cache, pool=pool).batches(first, 4, 0, 1)
            for k in range(first, 7):
                x, onehot = next(later)
                np.testing.assert_array_equal(x, steps[k - 1][0])
                np.testing.assert_array_equal(onehot, steps[k - 1][1])


def test_a_cached_image_cannot_be_changed_by_its_users(photos, pool):
    split = scan(photos, pool)
    cache = train.DecodeCache(2**30)
    loader(split, 32, cache).decode(split.files[0], 0)
    loader(split, 32, cache, augment=False).decode(split.files[0], 0)
    image = cache.get(("augment", split.files[0]), split.files[0])
    plain = cache.get(("preprocess", split.files[0]), split.files[0])
    for array in (image.pixels, plain):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 0


def test_decode_cache_option(tmp_path, capsys):
    """--decode-cache-mib: refused below 0 (one line, exit 2); 0 trains without a cache."""
    root = str(tmp_path / "data")
    for i in range(4):
        os.makedirs(os.path.join(root, "train", "ab"[i % 2]), exist_ok=True)
        save(photo(i, 64, 48), os.path.join(root, "train", "ab"[i % 2], f"{i}.jpg"))
    tiny = ["--patch-size=8", "--hidden-dim=16", "--num-blocks=1", "--tokens-mlp-dim=8",
            "--channels-mlp-dim=16", "--image-size=16", "--batch-size=4", "--backend=mlx",
            "--steps=2", "--val-fraction=0"]
    assert train.main([root, *tiny, "--decode-cache-mib", "-1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["train: error: --decode-cache-mib must be at least 0 (0: no cache), got -1"]
    assert not os.path.exists(tmp_path / "a")
    assert train.main([root, *tiny, "--decode-cache-mib", "0", "--out", str(tmp_path / "b")]) == 0
    info, _, _ = train.load_state(str(tmp_path / "b"))
    assert info["settings"]["decode_cache_mib"] == 0


def test_images_over_pillows_limit_are_skipped(tmp_path, monkeypatch):
    """Between 1x and 2x its limit Pillow only warns (two lines on stderr) and decodes: the
    loader refuses such an image like an unreadable one, as mixer.preprocess does."""
    path = str(tmp_path / "big.png")
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40000)  # 60000 pixels: 1.5x the limit
    for augment in (True, False):
        with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own, at open
            assert loader(None, 16, augment=augment).decode(path, 0) is None
    with pytest.raises(mixer.MixerError, match="300x200 is 60000 pixels, more than Pillow's"), \
            pytest.warns(Image.DecompressionBombWarning):
        decode(path, 16)
