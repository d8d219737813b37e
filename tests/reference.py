"""An independent float64 numpy MLP-Mixer forward, written from the equations (paper §2, official
models_mixer.py).

Nothing here imports or follows mixer.py: the stem is the strided convolution itself (a sum over
the P x P kernel offsets), token mixing is the transposed MLP `x + T(MLP(T(LN(x))))`, and every
step runs in float64 so that the float32 implementations are compared against something exact.

Stable API, used by the other test files (and by convert.py / train.py tests):

    reference_forward(params, x) -> (logits or None, pre_logits)
        params: official flat names ("stem/kernel", "MixerBlock_0/token_mixing/Dense_0/kernel",
                ...; the names of `mixer.param_shapes(config)`) -> float arrays in the official
                layouts (bfloat16 files: convert with mixer.as_float32 first).
        x:      (B, H, W, 3) images in [-1, 1].
        logits is None when there is no "head/kernel" (a feature extractor).

    random_params(config, seed) -> {name: float32 array}
        Non-trivial random weights for every tensor of `mixer.param_shapes(config)` (so a test
        notices a tensor that is ignored, transposed or mixed up), for config a MixerConfig.
"""

from __future__ import annotations

import math

import numpy as np

LN_EPS = 1e-6  # flax nn.LayerNorm default


def gelu_tanh(x):
    """GELU, tanh approximation (flax nn.gelu's default, approximate=True)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x):
    """Exact GELU: the WRONG one for Mixer checkpoints; used to show the tests can fail."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x, scale, bias, eps=LN_EPS):
    """Normalise over the last (channel) axis with the biased variance, then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def conv_stem(x, kernel, bias):
    """VALID conv with kernel = stride = P, HWIO kernel, as the definition of a convolution:
    out[b, i, j, o] = bias[o] + sum_{dy, dx, c} x[b, i*P + dy, j*P + dx, c] * kernel[dy, dx, c, o].
    Returns the tokens row-major over the (H/P, W/P) grid: (B, S, C)."""
    p = kernel.shape[0]
    b, h, w, _ = x.shape
    assert kernel.shape[1] == p and kernel.shape[2] == 3, kernel.shape
    assert h % p == 0 and w % p == 0, (h, w, p)
    out = np.zeros((b, h // p, w // p, kernel.shape[3]))
    for dy in range(p):
        for dx in range(p):
            out += x[:, dy::p, dx::p, :] @ kernel[dy, dx]  # (B, H/P, W/P, 3) @ (3, C)
    out += bias
    return out.reshape(b, (h // p) * (w // p), kernel.shape[3])  # n h w c -> n (h w) c


def mlp(y, prefix, params, gelu):
    """Dense_1(gelu(Dense_0(y))) over the last axis, Dense(y) = y @ kernel + bias."""
    y = y @ params[prefix + "Dense_0/kernel"] + params[prefix + "Dense_0/bias"]
    return gelu(y) @ params[prefix + "Dense_1/kernel"] + params[prefix + "Dense_1/bias"]


def reference_forward(params, x, *, gelu=gelu_tanh, eps=LN_EPS):
    """float64 Mixer forward: (logits (B, num_classes) or None, pre_logits (B, C)).

    `gelu` and `eps` exist only so that tests can show what a wrong implementation would give.
    """
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)

    def ln(t, name):
        return layer_norm(t, params[name + "/scale"], params[name + "/bias"], eps)

    x = conv_stem(x, params["stem/kernel"], params["stem/bias"])  # (B, S, C)
    i = 0
    while f"MixerBlock_{i}/LayerNorm_0/scale" in params:
        b = f"MixerBlock_{i}/"
        y = ln(x, b + "LayerNorm_0").swapaxes(1, 2)  # T: (B, C, S), MLP over the tokens
        x = x + mlp(y, b + "token_mixing/", params, gelu).swapaxes(1, 2)  # back to (B, S, C)
        x = x + mlp(ln(x, b + "LayerNorm_1"), b + "channel_mixing/", params, gelu)
        i += 1
    pre_logits = ln(x, "pre_head_layer_norm").mean(axis=1)  # LN on every token, then the mean
    if "head/kernel" not in params:
        return None, pre_logits
    return pre_logits @ params["head/kernel"] + params["head/bias"], pre_logits


def random_params(config, seed=0):
    """float32 random weights for every tensor of `config` (a mixer.MixerConfig).

    seed: an int or a np.random.Generator. Kernels are N(0, 1/fan_in) so activations stay O(1);
    biases N(0, 0.1²), LayerNorm scales 1 + N(0, 0.1²); the head is random (not the official zero
    init) so that logits are O(1) and every head entry matters.

    The stem is scaled down 30x (stem output std ~0.03, variance ~1e-3): in MixerBlock_0 the
    first LayerNorm then sees a small variance, as early layers of trained checkpoints do, so that
    an implementation with LayerNorm eps 1e-5 instead of 1e-6 gives measurably different outputs.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    p, c, s = config.patch_size, config.hidden_dim, (config.image_size // config.patch_size) ** 2
    ds, dc = config.tokens_mlp_dim, config.channels_mlp_dim

    def kernel(fan_in, fan_out, gain=1.0):
        return rng.standard_normal((fan_in, fan_out)) * (gain / math.sqrt(fan_in))

    def vector(n, mean=0.0, std=0.1):
        return mean + std * rng.standard_normal(n)

    params = {"stem/kernel": kernel(p * p * 3, c, gain=1 / 30).reshape(p, p, 3, c),
              "stem/bias": vector(c, std=0.003)}
    for i in range(config.num_blocks):
        b = f"MixerBlock_{i}/"
        params.update({
            b + "LayerNorm_0/scale": vector(c, 1.0), b + "LayerNorm_0/bias": vector(c),
            b + "token_mixing/Dense_0/kernel": kernel(s, ds),
            b + "token_mixing/Dense_0/bias": vector(ds),
            b + "token_mixing/Dense_1/kernel": kernel(ds, s),
            b + "token_mixing/Dense_1/bias": vector(s),
            b + "LayerNorm_1/scale": vector(c, 1.0), b + "LayerNorm_1/bias": vector(c),
            b + "channel_mixing/Dense_0/kernel": kernel(c, dc),
            b + "channel_mixing/Dense_0/bias": vector(dc),
            b + "channel_mixing/Dense_1/kernel": kernel(dc, c),
            b + "channel_mixing/Dense_1/bias": vector(c),
        })
    params.update({"pre_head_layer_norm/scale": vector(c, 1.0),
                   "pre_head_layer_norm/bias": vector(c)})
    if config.num_classes is not None:
        params.update({"head/kernel": kernel(c, config.num_classes, gain=3.0),
                       "head/bias": vector(config.num_classes)})
    return {k: v.astype(np.float32) for k, v in params.items()}


def random_images(batch, size, seed=0):
    """float32 (batch, size, size, 3) uniform in [-1, 1]."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)
