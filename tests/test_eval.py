"""train.py --eval-only: scoring a weights file on a labelled folder.

The expected figures are computed here, image by image, with Mixer.classify on the loaded file
(what `python mixer.py IMAGE --weights W` prints), never taken from the evaluation itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mixer
import train
from conftest import REPO
from reference import random_params
from test_train import CLASSES, SMALL, make_dataset

# the dataset's four colours and three classes that no folder has: top-5 of 7 means something,
# and predictions of absent classes show up as confusion columns
LABELS = CLASSES + ["cyan", "magenta", "white"]


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_dataset(root / "data", {"val": 6}, seed=3)
    config = mixer.MixerConfig(num_classes=len(LABELS), image_size=32, **SMALL)
    # a random head: predictions spread over the classes, right and wrong
    model = mixer.Mixer(config, random_params(config, seed=5), backend="numpy", labels=LABELS)
    weights = str(root / "w.safetensors")
    model.save(weights)
    return data, weights, root


def _expected(data, weights):
    """Per image: (true class, its top-5) from Mixer.classify one image at a time."""
    model = mixer.load(weights, backend="numpy")
    rows = []
    for c, name in enumerate(CLASSES):
        folder = os.path.join(data, "val", name)
        for f in sorted(os.listdir(folder)):
            top = model.classify(os.path.join(folder, f), top_k=5)[0]
            rows.append((c, [i for i, _, _ in top]))
    return rows


def test_scores_match_image_by_image_classify(setup):
    data, weights, root = setup
    result = train.evaluate_weights(data, weights, backend="numpy", out=str(root / "run"),
                                    quiet=True)
    rows = _expected(data, weights)
    report = _strict_json(root / "run" / "eval.json")
    assert report == json.loads(json.dumps(result.report))
    assert report["images"] == len(rows) == 24
    assert report["top1"] == pytest.approx(np.mean([top[0] == c for c, top in rows]))
    assert report["top5"] == pytest.approx(np.mean([c in top for c, top in rows]))
    assert 0 < report["top1"] < 1 and report["top5"] > report["top1"]  # a test that can fail
    # the confusion matrix, counted here cell by cell over the classes seen
    classes = report["confusion"]["classes"]
    assert classes == sorted({c for c, _ in rows} | {top[0] for _, top in rows})
    matrix = np.array(report["confusion"]["matrix"])
    expected = np.zeros_like(matrix)
    for c, top in rows:
        expected[classes.index(c), classes.index(top[0])] += 1
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(matrix, result.confusion)
    assert matrix.sum() == 24
    assert report["confusion"]["labels"] == [LABELS[c] for c in classes]
    for entry in report["per_class"]:
        mine = [top[0] == c for c, top in rows if c == entry["index"]]
        assert (entry["label"], entry["images"], entry["correct"]) == \
            (LABELS[entry["index"]], 6, sum(mine))
    assert [e["index"] for e in report["per_class"]] == [0, 1, 2, 3]
    assert sorted(os.listdir(root / "run")) == ["confusion.png", "eval.json"]  # no lock left
    with Image.open(root / "run" / "confusion.png") as im:
        figure = train.draw_confusion(matrix, [LABELS[c] for c in classes], "")
        assert im.format == "PNG" and im.size == tuple(round(v * 100)
                                                       for v in figure.get_size_inches())


def test_picture_cells_are_row_normalised_counts(tmp_path):
    """The cells are coloured by their share of their row: full, three quarters, a quarter and
    none of the colour map's range, which gets darker with the share."""
    matrix = np.array([[3, 1], [0, 2]])
    figure = train.draw_confusion(matrix, ["cat", "dog$x$"], "title")
    axes = figure.axes[0]
    np.testing.assert_allclose(axes.images[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])
    assert [t.get_text() for t in axes.get_xticklabels()] == ["cat", "dog$x$"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["cat", "dog$x$"]
    train.save_figure(figure, str(tmp_path / "c.png"))
    pixels = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    height = pixels.shape[0]

    def cell(i, j):  # the pixel at the centre of cell (row i, column j)
        x, y = axes.transData.transform((j, i))
        return pixels[height - int(round(y)), int(round(x))]

    darkness = {ij: 765 - cell(*ij).sum() for ij in ((0, 0), (0, 1), (1, 0), (1, 1))}
    assert darkness[(1, 0)] < 30  # 0: white
    assert darkness[(1, 0)] < darkness[(0, 1)] < darkness[(0, 0)] < darkness[(1, 1)], darkness


def test_wordnet_id_list():
    with open(os.path.join(REPO, "labels", "imagenet1k_wnids.txt"), encoding="utf-8") as f:
        wnids = f.read().splitlines()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert (wnids[0], wnids[-1]) == ("n01440764", "n15075141")
    assert train.imagenet1k_wnids() == wnids


def test_matching_by_name():
    labels = ["golden retriever", "tench", "crane", "crane", "Tabby"]
    matched, unmatched = train.match_classes(
        ["Golden_Retriever", "tench", "crane", "tabby", "TABBY", "zebra"], labels)
    assert matched == {"Golden_Retriever": 0, "tench": 1, "tabby": 4, "TABBY": 4}
    assert set(unmatched) == {"crane", "zebra"} and "ambiguous" in unmatched["crane"]


def test_synset_folders_on_a_1000_class_model(tmp_path):
    config = mixer.MixerConfig(num_classes=1000, image_size=32, **SMALL)
    weights = str(tmp_path / "in1k.safetensors")
    mixer.Mixer(config, random_params(config, seed=1), backend="numpy").save(weights)
    data = tmp_path / "val"
    for i, name in enumerate(["n01440764", "n15075141", "strays"]):
        os.makedirs(data / name)
        Image.new("RGB", (40, 40), (30 * i, 100, 200)).save(data / name / "a.png")
    matched, unmatched = train.match_classes(
        ["n01440764", "n15075141", "strays"], mixer.find_labels("imagenet1k", 1000),
        train.imagenet1k_wnids())
    assert matched == {"n01440764": 0, "n15075141": 999} and list(unmatched) == ["strays"]
    run = subprocess.run([sys.executable, "train.py", str(data), "--weights", weights,
                          "--eval-only", "--out", str(tmp_path / "run")],
                         cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "MIXER_BACKEND": "numpy"})
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [f"train: skipping {data / 'strays'}: matches no class "
                                       f"of the model"]
    report = _strict_json(tmp_path / "run" / "eval.json")
    assert [(e["index"], e["folders"]) for e in report["per_class"]] == \
        [(0, ["n01440764"]), (999, ["n15075141"])]
    assert report["unmatched_folders"] == ["strays"] and report["images"] == 2
    assert "2 images, 2 classes: top-1" in run.stdout


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "MIXER_BACKEND": "numpy"})


def test_bad_input_is_one_line(setup, tmp_path):
    data, weights, _ = setup
    other = tmp_path / "other"
    os.makedirs(other / "zebra")
    Image.new("RGB", (32, 32)).save(other / "zebra" / "a.png")
    for args, says in [((str(other), "--weights", weights, "--eval-only"), "no class folder"),
                       ((data, "--weights", weights, "--eval-only", "--steps", "3"),
                        "--steps does not apply"),
                       ((data, "--eval-only"), "give both")]:
        run = _cli(*args, cwd=tmp_path)
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
        assert says in run.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing claimed for a refused evaluation


def test_default_run_dir_and_unreadable_file(setup, tmp_path):
    data, weights, _ = setup
    copy = shutil.copytree(data, tmp_path / "data")
    with open(copy / "val" / "red" / "broken.jpg", "w") as f:
        f.write("not an image")
    run = _cli(str(copy), "--weights", weights, "--eval-only", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "skipped 1 unreadable file" in run.stderr
    (name,) = os.listdir(tmp_path / "runs")
    assert name.endswith("-eval")
    report = _strict_json(tmp_path / "runs" / name / "eval.json")
    assert report["images"] == 24 and report["skipped_unreadable"] == \
        [str(copy / "val" / "red" / "broken.jpg")]
