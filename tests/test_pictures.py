"""The pictures: --show-weights (the paper's Figure 5) and train.py's curves.png. The pixels are
checked against the weights and the records they draw, with the colour map computed here
independently."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mixer
import train
from conftest import REPO
from reference import random_params

# B/16's token grid (patch 16 at 224 px: 14 x 14) with tiny widths, so that it is quick
CONFIG = mixer.MixerConfig(patch_size=16, hidden_dim=8, num_blocks=3, tokens_mlp_dim=20,
                           channels_mlp_dim=8, num_classes=3, image_size=224)


def colour(w: float, scale: float) -> tuple[int, int, int]:
    """Blue-white-red for w / scale, written out per branch (not the library's formula)."""
    t = w / scale
    if t >= 0:
        return (255, round(255 - 255 * t), round(255 - 255 * t))
    return (round(255 + 255 * t), round(255 + 255 * t), 255)


@pytest.fixture(scope="module")
def model():
    return mixer.Mixer(CONFIG, random_params(CONFIG, seed=3), backend="numpy")


def unit_origin(block, unit, tile, rows):
    """Top-left pixel of a unit, from the layout show_weights documents."""
    band = mixer.SHOW_LABEL + rows * tile + (rows - 1) * mixer.SHOW_GAP + mixer.SHOW_PAD
    y = mixer.SHOW_PAD + block * band + mixer.SHOW_LABEL
    y += (unit // mixer.SHOW_COLUMNS) * (tile + mixer.SHOW_GAP)
    x = mixer.SHOW_PAD + (unit % mixer.SHOW_COLUMNS) * (tile + mixer.SHOW_GAP)
    return y, x


@pytest.mark.parametrize("block,unit", [(0, 0), (1, 17), (1, 19)])
def test_each_unit_is_its_kernel_column_on_a_14x14_grid(model, tmp_path, block, unit):
    out = tmp_path / "w.png"
    width, height = mixer.show_weights(model, out, blocks=2, units=20)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (height, width, 3)
    cell = 4  # 56 // 14: B/16's 14 x 14 grid at 4 px a position
    kernel = model.numpy_params()[f"MixerBlock_{block}/token_mixing/Dense_0/kernel"]
    column = kernel[:, unit].astype(np.float64)
    assert column.shape == (196,)
    scale = max(abs(float(w)) for w in column)
    y0, x0 = unit_origin(block, unit, 14 * cell, rows=2)
    for token, w in enumerate(column):
        i, j = divmod(token, 14)  # tokens are row-major over the patch grid
        square = pixels[y0 + i * cell:y0 + (i + 1) * cell, x0 + j * cell:x0 + (j + 1) * cell]
        assert (square == colour(float(w), scale)).all(), (token, square[0, 0])
    # the 1-px gap after the unit is the grey ground, not a weight
    assert tuple(pixels[y0, x0 + 14 * cell]) == mixer.SHOW_BACKGROUND
    # the extreme weight of the unit is pure red or pure blue
    extreme = int(np.argmax(np.abs(column)))
    i, j = divmod(extreme, 14)
    assert tuple(pixels[y0 + i * cell, x0 + j * cell]) in ((255, 0, 0), (0, 0, 255))


def test_picture_size_follows_the_documented_layout(model, tmp_path):
    # 2 blocks (default) of 20 units (all of D_S, fewer than the default 64): 16 + 4 per row
    width, height = mixer.show_weights(model, tmp_path / "a.png")
    tile = 56
    assert width == 4 + 16 * tile + 15 + 4
    band = 14 + 2 * tile + 1 + 4
    assert height == 4 + 2 * band
    assert Image.open(tmp_path / "a.png").size == (width, height)
    # more blocks than the model has: all of them; 5 units: one row of 5
    width, height = mixer.show_weights(model, tmp_path / "b.png", blocks=9, units=5)
    assert (width, height) == (4 + 5 * tile + 4 + 4, 4 + 3 * (14 + tile + 4))


def test_a_unit_of_zeros_is_white(tmp_path):
    params = random_params(CONFIG, seed=4)
    params["MixerBlock_0/token_mixing/Dense_0/kernel"][:, 0] = 0
    model = mixer.Mixer(CONFIG, params, backend="numpy")
    mixer.show_weights(model, tmp_path / "z.png", blocks=1, units=1)
    pixels = np.asarray(Image.open(tmp_path / "z.png").convert("RGB"))
    y, x = unit_origin(0, 0, 56, rows=1)
    assert (pixels[y:y + 56, x:x + 56] == 255).all()


@pytest.mark.parametrize("kwargs", [{"blocks": 0}, {"units": -1}, {"units": 2.5}])
def test_bad_counts_are_errors(model, tmp_path, kwargs):
    with pytest.raises(mixer.MixerError):
        mixer.show_weights(model, tmp_path / "x.png", **kwargs)
    assert not os.listdir(tmp_path)


def run_mixer(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "mixer.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("pics") / "model.safetensors"
    model.save(str(path))
    return path


def test_cli_writes_the_png(weights, tmp_path):
    out = tmp_path / "out.png"
    done = run_mixer("--show-weights", out, "--weights", weights, "--blocks", "1", "--units", "3")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    width, height = 4 + 3 * 56 + 2 + 4, 4 + 14 + 56 + 4  # 3 units in a row, 1 block
    assert done.stdout == f"wrote {out} ({width}x{height})\n"
    assert Image.open(out).size == (width, height)
    assert Image.open(out).format == "PNG"


@pytest.mark.parametrize("case", ["missing weights", "output is a folder", "image given too",
                                  "units without show", "zero blocks", "no weights"])
def test_cli_bad_input_is_one_line_and_status_2(weights, tmp_path, case):
    out = tmp_path / "out.png"
    args = {"missing weights": ["--show-weights", out, "--weights", tmp_path / "nope"],
            "output is a folder": ["--show-weights", tmp_path, "--weights", weights],
            "image given too": ["--show-weights", out, "--weights", weights, weights],
            "units without show": ["x.jpg", "--weights", weights, "--units", "3"],
            "zero blocks": ["--show-weights", out, "--weights", weights, "--blocks", "0"],
            "no weights": ["--show-weights", out]}[case]
    done = run_mixer(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mixer: error: "), done.stderr
    assert not out.exists()


def test_cli_without_image_or_show_weights_is_a_usage_error():
    done = run_mixer("--weights", "w.safetensors")
    assert done.returncode == 2
    assert "IMAGE" in done.stderr and "Traceback" not in done.stderr


# ---- curves.png

def records(steps=200, every=50):
    out = []
    for step in range(10, steps + 1, 10):
        record = {"step": step, "lr": 0.1 * step / steps, "loss": 3.0 - step / 100,
                  "grad_norm": 1.0, "images_per_s": 10.0}
        if step % every == 0:
            record["val_top1"] = step / (2 * steps)
        out.append(record)
    return out


def rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def colour_mask(png, hex_colour):
    pixels = np.asarray(Image.open(png).convert("RGB"))
    return (pixels == rgb(hex_colour)).all(axis=-1)


@pytest.mark.parametrize("kind", ["with val", "without val", "empty"])
def test_curves_are_drawn(tmp_path, kind):
    recs = records()
    if kind == "without val":
        recs = [{k: v for k, v in r.items() if k != "val_top1"} for r in recs]
    png = tmp_path / "curves.png"
    train.save_figure(train.draw_curves([] if kind == "empty" else recs), str(png))
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (640, 400)
    lines = {name: int(colour_mask(png, colour).sum())
             for name, colour in train.CURVES_COLOURS.items()}
    # a curve is many pixels of its colour; a label alone is a few dozen (anti-aliased text)
    assert (lines["loss"] > 300) == (kind != "empty"), lines
    assert (lines["lr"] > 300) == (kind != "empty"), lines
    assert (lines["val"] > 300) == (kind == "with val"), lines


def test_the_loss_curve_is_where_its_values_are(tmp_path):
    """The loss falls linearly from 2.9 to 1.0 over the steps: its pixels, left to right in the
    top panel, go down, from near the panel's top to near its bottom."""
    figure = train.draw_curves([r | {"lr": 0.01} for r in records()])
    png = tmp_path / "curves.png"
    train.save_figure(figure, str(png))
    box = figure.axes[0].get_window_extent()  # the loss panel, in pixels from the bottom left
    x0, x1 = int(box.x0), int(box.x1)
    y0, y1 = int(400 - box.y1), int(400 - box.y0)
    mask = colour_mask(png, train.CURVES_COLOURS["loss"])[y0:y1, x0:x1]
    ys, xs = np.nonzero(mask)
    left, right = ys[xs < (x1 - x0) * 0.2].mean(), ys[xs > (x1 - x0) * 0.8].mean()
    assert left < 0.2 * (y1 - y0) and right > 0.8 * (y1 - y0), (left, right)


@pytest.mark.parametrize("tail, line", [(b'{"step": 10, "lr": 0.1, "loss": NaN}\n', 2),
                                        (b"not json\n", 2), (b"\xff\n", 2), (b"[1]\n", 2),
                                        (json.dumps(records()[0]).encode() + b"\n", 2),
                                        (b'{"step": 30, "lr": 0.1, "loss": 1.0}', 2)])
def test_metrics_that_are_not_records_are_refused(tmp_path, tail, line):
    """A damaged line (not JSON, not UTF-8, a NaN, a step not above the one before, no newline)
    is named, not passed over: curves.png is then not redrawn, and --resume refuses the run."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(json.dumps(records()[0]).encode() + b"\n" + tail)
    with pytest.raises(mixer.MixerError, match=f"metrics.jsonl: line {line} is not a metrics "
                                               f"record .expected a JSON object with a step "
                                               f"above 10"):
        train.read_metrics(str(metrics))
    metrics.write_bytes(json.dumps(records()[0]).encode() + b"\n")
    assert train.read_metrics(str(metrics)) == records()[:1]


def test_a_picture_is_written_atomically_or_refused(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(mixer.MixerError):
        train.save_figure(train.draw_curves(records()), str(tmp_path / "folder.png"))
    assert os.listdir(tmp_path) == ["folder.png"]  # no temporary file left


def test_without_matplotlib_nothing_is_drawn(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    assert train.draw_curves(records()) is None
    assert train.draw_confusion(np.eye(2), ["a", "b"], "") is None
