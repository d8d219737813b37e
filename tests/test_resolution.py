"""Mixer.at_resolution: the paper's higher-resolution expansion (Appendix C)."""

import dataclasses

import numpy as np
import pytest

import mixer
from reference import random_images, random_params, reference_forward

# 12x12 images, P=4: a 3x3 token grid (S=9), so tiles, rows and columns are all distinguishable.
BASE = mixer.MixerConfig(patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=6,
                         channels_mlp_dim=24, num_classes=5, image_size=12)


def tiles(x, size, k):
    """The K x K tiles of a (B, K*size, K*size, 3) batch, row by row."""
    return [x[:, i * size:(i + 1) * size, j * size:(j + 1) * size]
            for i in range(k) for j in range(k)]


@pytest.mark.parametrize("k", [2, 3])
def test_logits_are_the_mean_over_tiles(backend, tol, k):
    """Exact at expansion: each tile is processed as the original model would, and the head is
    linear after the token mean (the pre-head LayerNorm is per token), so the logits on a K x
    larger image are the mean of the original logits on its K² tiles."""
    params = random_params(BASE, seed=k)
    big = mixer.Mixer(BASE, params, backend=backend).at_resolution(12 * k)
    assert big.backend == mixer.get_ops(backend).name
    assert big.config == dataclasses.replace(BASE, image_size=12 * k, tokens_mlp_dim=6 * k * k)
    x = random_images(2, 12 * k, seed=10 + k)
    per_tile = [reference_forward(params, t) for t in tiles(x, 12, k)]
    logits = np.mean([logit for logit, _ in per_tile], axis=0)
    pre_logits = np.mean([pre for _, pre in per_tile], axis=0)
    assert np.abs(logits).max() > 0.5
    # the expanded weights, in float64: exact up to rounding
    expanded_logits, expanded_pre = reference_forward(big.numpy_params(), x)
    np.testing.assert_allclose(expanded_logits, logits, rtol=0, atol=1e-9)
    np.testing.assert_allclose(expanded_pre, pre_logits, rtol=0, atol=1e-9)
    # and the expanded model on the backend
    np.testing.assert_allclose(big(x), logits, rtol=0, atol=tol)
    np.testing.assert_allclose(big.features(x), pre_logits, rtol=0, atol=tol)
    # the tiles are really independent: changing one tile moves only its share of the logits
    y = x.copy()
    y[:, :12, :12] = random_images(2, 12, seed=99)
    changed = reference_forward(params, y[:, :12, :12])[0] - per_tile[0][0]
    np.testing.assert_allclose(big(y) - big(x), changed / k**2, rtol=0, atol=2 * tol)


def test_layout_is_the_appendix_c_formula():
    """Entry by entry, as the paper's Appendix C implies: token t at grid (y, x), old side g,
    tile q = (y // g) K + x // g, local index s = (y % g) g + x % g."""
    k, g, d = 2, 3, BASE.tokens_mlp_dim
    params = random_params(BASE, seed=0)
    new = mixer.Mixer(BASE, params, backend="numpy").at_resolution(12 * k).numpy_params()
    for i in range(BASE.num_blocks):
        b = f"MixerBlock_{i}/token_mixing/"
        k0, b0, k1, b1 = (params[b + n] for n in ("Dense_0/kernel", "Dense_0/bias",
                                                  "Dense_1/kernel", "Dense_1/bias"))
        expect0 = np.zeros((k * k * g * g, k * k * d), np.float32)
        expect1 = np.zeros((k * k * d, k * k * g * g), np.float32)
        expect_b1 = np.zeros(k * k * g * g, np.float32)
        for t in range(k * k * g * g):
            y, x = divmod(t, k * g)
            q, s = (y // g) * k + x // g, (y % g) * g + x % g
            expect0[t, q * d:(q + 1) * d] = k0[s, :]
            expect1[q * d:(q + 1) * d, t] = k1[:, s]
            expect_b1[t] = b1[s]
        np.testing.assert_array_equal(new[b + "Dense_0/kernel"], expect0)
        np.testing.assert_array_equal(new[b + "Dense_1/kernel"], expect1)
        np.testing.assert_array_equal(new[b + "Dense_0/bias"], np.tile(b0, k * k))
        np.testing.assert_array_equal(new[b + "Dense_1/bias"], expect_b1)
    unchanged = [n for n in params if "token_mixing" not in n]
    assert len(unchanged) == len(params) - 4 * BASE.num_blocks
    for n in unchanged:
        np.testing.assert_array_equal(new[n], params[n])


def test_expanded_model_saves_and_loads(tmp_path):
    model = mixer.Mixer(BASE, random_params(BASE, seed=3), backend="numpy",
                        labels=list("abcde"))
    big = model.at_resolution(24)
    big.save(tmp_path / "big.safetensors")
    loaded = mixer.load(tmp_path / "big.safetensors", backend="numpy")
    assert loaded.config == big.config and loaded.labels == list("abcde")
    x = random_images(1, 24, seed=4)
    np.testing.assert_array_equal(loaded(x), big(x))


def test_same_size_is_a_copy():
    model = mixer.Mixer(BASE, random_params(BASE, seed=5), backend="numpy")
    same = model.at_resolution(12)
    assert same is not model and same.config == model.config
    x = random_images(1, 12, seed=6)
    np.testing.assert_array_equal(same(x), model(x))


@pytest.mark.parametrize("size", [18, 30, 6, 0, 24.0, "24"])
def test_only_integer_factors(size):
    model = mixer.Mixer(BASE, random_params(BASE, seed=7), backend="numpy")
    with pytest.raises(mixer.MixerError, match="integer multiple of the current size 12"):
        model.at_resolution(size)


def test_wrong_size_error_points_to_at_resolution():
    model = mixer.Mixer(BASE, random_params(BASE, seed=8), backend="numpy")
    with pytest.raises(mixer.MixerError, match="at_resolution"):
        model(random_images(1, 24, seed=9))
