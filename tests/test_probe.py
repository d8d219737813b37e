"""train.py --linear-probe: the closed form against numpy.linalg.lstsq, the folded head, the
backbone left bit for bit, an end-to-end run on generated images, the feature cache and the
refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mixer
import train
from conftest import REPO
from test_train import CLASSES, SMALL, make_dataset


def lstsq_ridge(x, y, l2):
    """The ridge solution as the plain least-squares solution of the augmented system
    [X; √λ I] W = [Y; 0]."""
    d = x.shape[1]
    a = np.concatenate([x, np.sqrt(l2) * np.eye(d)])
    b = np.concatenate([y, np.zeros((d, y.shape[1]))])
    return np.linalg.lstsq(a, b, rcond=None)[0]


@pytest.mark.parametrize("n, d", [(40, 9), (7, 30)])  # N >= D and N < D
def test_closed_form_matches_lstsq(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    l2s = [2.0 ** -6, 1.0, 2.0 ** 5]
    for l2, w in zip(l2s, train.ridge_solutions(x, y, l2s)):
        np.testing.assert_allclose(w, lstsq_ridge(x, y, l2), rtol=1e-8, atol=1e-10)


def test_fit_whitens_with_train_statistics_and_picks_on_val():
    rng = np.random.default_rng(1)
    feats = rng.normal(3.0, 2.0, size=(60, 5))
    labels = rng.integers(0, 3, 60)
    val = (rng.normal(3.0, 2.0, size=(20, 5)), rng.integers(0, 3, 20))
    l2s = [2.0 ** k for k in range(-4, 12, 3)]
    fit = train.fit_probe(feats, labels, 3, l2s, val)
    # independently: big_vision's recipe written out
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    x = np.concatenate([z, np.full((60, 1), 100.0)], axis=1)
    y = 2 * np.eye(3)[labels] - 1
    vz = (val[0] - feats.mean(0)) / (feats.std(0) + 1e-5)
    vx = np.concatenate([vz, np.full((20, 1), 100.0)], axis=1)
    top1 = {l2: np.mean((vx @ lstsq_ridge(x, y, l2)).argmax(1) == val[1]) for l2 in l2s}
    best = max(top1.values())
    assert fit.l2 == max(l2 for l2 in l2s if top1[l2] == best)  # ties: the larger λ
    np.testing.assert_allclose(fit.w, lstsq_ridge(x, y, fit.l2), rtol=1e-7, atol=1e-9)
    assert fit.val_top1 == pytest.approx(top1)


def test_folded_head_scores_like_whitening_then_w():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 8)) * rng.uniform(0.1, 5, 8) + rng.normal(size=8)
    fit = train.fit_probe(feats, rng.integers(0, 4, 50), 4, [0.5])
    kernel, bias = train.fold_head(fit)
    new = rng.normal(size=(30, 8)) * 2
    z = (new - fit.mean) / (fit.std + 1e-5)
    direct = np.concatenate([z, np.full((30, 1), 100.0)], axis=1) @ fit.w
    folded = new.astype(np.float32) @ kernel + bias
    np.testing.assert_allclose(folded, direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
    assert (folded.argmax(1) == direct.argmax(1)).all()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = make_dataset(root / "data", {"train": 24, "val": 10})
    weights = str(root / "w.safetensors")
    config = mixer.MixerConfig(**SMALL, num_classes=7, image_size=32)  # a head to be replaced
    mixer.init(config, seed=0).save(weights)
    return root, data, weights


def test_end_to_end_probe_and_feature_cache(setup, monkeypatch):
    root, data, weights = setup
    calls = []
    extract = train.extract_features
    monkeypatch.setattr(train, "extract_features",
                        lambda *a, **k: calls.append(a[4]) or extract(*a, **k))
    out = str(root / "run")
    assert train.main([data, "--weights", weights, "--linear-probe", "--out", out]) == 0
    assert calls == ["train", "val"]
    model = mixer.load(os.path.join(out, "best.safetensors"), backend="numpy")
    assert model.labels == CLASSES
    files = [os.path.join(data, "val", c, f) for c in CLASSES
             for f in sorted(os.listdir(os.path.join(data, "val", c)))]
    truth = [c for c in CLASSES for _ in os.listdir(os.path.join(data, "val", c))]
    predicted = [top[0][1] for top in model.classify(files, top_k=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth)])
    assert accuracy >= 0.6  # chance is 0.25

    # the backbone bit for bit, the head the only change
    before, _ = mixer.read_safetensors(weights)
    after, _ = mixer.read_safetensors(os.path.join(out, "best.safetensors"))
    assert set(before) == set(after)
    for k in before:
        if not k.startswith("head/"):
            assert before[k].tobytes() == after[k].tobytes(), k
    assert after["head/kernel"].shape == (SMALL["hidden_dim"], len(CLASSES))

    # a second fit on the same --out reuses the features: no extraction
    assert train.main([data, "--weights", weights, "--linear-probe", "--out", out,
                       "--shots", "3", "--l2", "8"]) == 0
    assert calls == ["train", "val"]
    again = mixer.load(os.path.join(out, "best.safetensors"), backend="numpy")
    assert again.labels == CLASSES


def test_shots_draw_k_per_class(setup, monkeypatch):
    root, data, weights = setup
    seen = []
    fit = train.fit_probe
    monkeypatch.setattr(train, "fit_probe",
                        lambda f, y, *a, **k: seen.append(np.bincount(y)) or fit(f, y, *a, **k))
    result = train.linear_probe(data, weights, shots=2, seed=4, out=str(root / "shots"),
                                quiet=True)
    assert len(seen) == train.PROBE_SEEDS and all((c == 2).all() for c in seen)
    assert len(result.val_top1) == train.PROBE_SEEDS


@pytest.mark.parametrize("extra, message", [
    (["--shots", "0"], "--shots must be at least 1"),
    (["--shots", "25"], "has only 24 training images"),
    (["--l2", "-1"], "--l2 must be a finite positive number"),
    (["--l2", "nan"], "--l2 must be a finite positive number"),
    (["--steps", "5"], "--steps does not apply"),
    ([], None),  # --l2 without --linear-probe
])
def test_bad_input_is_one_line(setup, tmp_path, extra, message):
    root, data, weights = setup
    if message is None:  # --l2 without --linear-probe
        args, message = [data, "--weights", weights, "--l2", "2"], "go with --linear-probe"
    else:
        args = [data, "--weights", weights, "--linear-probe", *extra]
    run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args,
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert not os.path.exists(tmp_path / "out")  # a refused run leaves nothing


def test_training_run_dir_is_not_taken(setup, tmp_path):
    root, data, weights = setup
    out = tmp_path / "trained"
    out.mkdir()
    (out / train.FEATURES_FILE).write_bytes(b"")
    (out / train.STATE_FILE).write_bytes(b"")  # a training run's: its best is not overwritten
    with pytest.raises(mixer.MixerError, match="already holds a run"):
        train.linear_probe(data, weights, out=str(out), quiet=True)


def _val_accuracy(weights, data):
    model = mixer.load(weights, backend="numpy")
    files = [os.path.join(data, "val", c, f) for c in CLASSES
             for f in sorted(os.listdir(os.path.join(data, "val", c)))]
    truth = [c for c in CLASSES for _ in os.listdir(os.path.join(data, "val", c))]
    return np.mean([top[0][1] == t for top, t in zip(model.classify(files, top_k=1), truth)])


def test_the_feature_cache_follows_the_files(setup, tmp_path, monkeypatch):
    """The cache was keyed by names and labels only: val/ rewritten in place (same names, other
    pixels) was 'features read', a val top-1 of the old images and a head that scored 0 on the
    new ones. Now a rewritten file, a file renamed over another or other weights (same path)
    extract again, and the reported top-1 is best.safetensors' on the images as they are."""
    root, data, weights = setup
    data = shutil.copytree(data, tmp_path / "data")
    weights = shutil.copy(weights, tmp_path / "w.safetensors")
    calls = []
    extract = train.extract_features
    monkeypatch.setattr(train, "extract_features",
                        lambda *a, **k: calls.append(a[4]) or extract(*a, **k))
    out = str(tmp_path / "run")

    def probe():
        result = train.linear_probe(str(data), weights, out=out, quiet=True)
        assert result.val_top1[0] == pytest.approx(
            _val_accuracy(os.path.join(out, "best.safetensors"), data), abs=1e-9)
        return result

    probe()
    assert calls == ["train", "val"]
    probe()
    assert calls == ["train", "val"]  # nothing changed: read back
    # every val image rewritten in place with the pixels of the next class's image
    val = data / "val"
    pixels = {c: {f: (val / c / f).read_bytes() for f in sorted(os.listdir(val / c))}
              for c in CLASSES}
    for c, other in zip(CLASSES, CLASSES[1:] + CLASSES[:1]):
        for (name, _), (_, content) in zip(pixels[c].items(), pixels[other].items()):
            with open(val / c / name, "r+b") as f:  # same inode, same name
                f.truncate(0)
                f.write(content)
    assert probe().val_top1[0] < 0.5 and calls == ["train", "val"] * 2
    # a file renamed over another one's name
    first, second = sorted(os.listdir(data / "train" / "red"))[:2]
    os.replace(data / "train" / "red" / second, data / "train" / "red" / first)
    shutil.copy(data / "train" / "blue" / first, data / "train" / "red" / second)
    probe()
    assert calls == ["train", "val"] * 3
    # other weights at the same path
    config = mixer.MixerConfig(**SMALL, num_classes=7, image_size=32)
    mixer.init(config, seed=1).save(weights)
    probe()
    assert calls == ["train", "val"] * 4


def test_a_quantised_backbone_stays_quantised(setup, tmp_path):
    """The probe of an int4 file wrote a float32 backbone, 5.4x the file: it is int4 again,
    with the file's group size, and the backbone's stored tensors are the file's bit for bit."""
    root, data, weights = setup
    q4 = str(tmp_path / "w4.safetensors")
    mixer.load(weights, backend="numpy").save(q4, dtype="int4", group_size=32)
    result = train.linear_probe(data, q4, out=str(tmp_path / "run"), quiet=True)
    best = os.path.join(result.run_dir, "best.safetensors")
    assert os.path.getsize(best) < 1.2 * os.path.getsize(q4)
    assert mixer.load(best, backend="numpy").quantization == {"bits": 4, "group_size": 32}
    before, _ = mixer.read_safetensors(q4)
    after, _ = mixer.read_safetensors(best)
    assert set(before) == set(after)
    for k in before:
        if not k.startswith("head/"):
            assert before[k].tobytes() == after[k].tobytes(), k
    # the head is stored in float16 (a quantised file's small head): predictions within a
    # rounding of the fit's, here the same
    assert result.val_top1[0] == pytest.approx(_val_accuracy(best, data), abs=1e-9)
