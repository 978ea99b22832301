"""Fixtures and helpers shared by the vision tests: random variables drawn from shapes alone, timm counts
from shapes only, and eval-mode timm models with every weight (including BatchNorm affine and
running statistics) randomised, so a converter or layout error cannot hide behind timm's zero /
identity initialisations."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest



def _torch():
    """torch, or skip the calling test when it is not installed."""
    return pytest.importorskip("torch")


def _timm():
    return pytest.importorskip("timm")


@contextlib.contextmanager
def _one_thread():
    """torch on one thread for the duration: with the machine's cores shared by other jobs,
    2 OpenMP threads made a timm forward/backward ~7x slower than 1 (spin-waiting)."""
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timm_param_count(name: str, **kwargs) -> int:
    """Trainable parameters of timm model `name`, built on the meta device (no memory, no init)."""
    torch, timm = _torch(), _timm()
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized_timm_model(name: str, seed: int = 0, calibration_images: np.ndarray | None = None,
                          **kwargs):
    """timm model `name` in eval mode with random BatchNorm affine parameters and statistics.

    Conv/linear weights keep timm's (fan-scaled) init; BN scales are drawn from U(0.5, 1.5) and
    BN/linear biases from N(0, 0.1), so zero-init scales cannot hide a layout error.

    Running statistics: without `calibration_images`, mean N(0, 0.1) and var U(0.5, 1.5). With
    `calibration_images` (NHWC; pass the batch the test evaluates), those of one training-mode
    pass over them: still different per channel and layer, but activations stay O(1) through
    deep residual stacks. Random statistics (or those of another small batch) blow
    EfficientNetV2-S's activations up geometrically (~1e4..1e6 at 64×64, where its last stages
    are 4×4 and 2×2), and float32 rounding then dominates any comparison.
    """
    torch, timm = _torch(), _timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen)
                                          * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen)
                                         + 0.5)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        if calibration_images is not None:
            momenta = [bn.momentum for bn in bns]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average: one batch -> its statistics
            model.train()
            with _one_thread():
                model(torch.from_numpy(np.ascontiguousarray(
                    np.transpose(calibration_images, (0, 3, 1, 2)))))
            for bn, momentum in zip(bns, momenta):
                bn.momentum = momentum
    return model.eval()


def timm_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    """Eval-mode logits of a timm model for NHWC float32 images."""
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2))))
    with torch.no_grad(), _one_thread():
        return model(x).numpy()


def numpy_variables(model, *inputs, seed: int = 0) -> dict:
    """Random variables for a Flax model from its shapes alone (`jax.eval_shape`), drawn with
    numpy: `model.init` compiles one random-number program per parameter shape, which costs
    seconds each on a loaded CPU. Kernels ~ N(0, 1/fan_in) (fan_in = all but the last axis),
    other biases N(0, 0.1); BN scale and var U(0.5, 1.5), BN bias and mean N(0, 0.1) — so no
    residual branch is silenced by a zero-init scale."""
    import jax
    from flax import traverse_util

    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    flat = traverse_util.flatten_dict(shapes)
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flat.items():
        name, shape = path[-1], leaf.shape
        if name == "kernel":
            v = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean, relative-position tables etc.
            v = rng.normal(0, 0.1, shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def random_variables(module, x, seed=0):
    """Variables of `module` for input x drawn with numpy, N(0, 1) (BN statistics: mean 0, var 1;
    all biases 0, so zero inputs stay zero). Skips compiling Flax's RNG-based init."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name in ("mean", "bias"):
            return jnp.zeros(s.shape, s.dtype)
        if name == "var":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def assert_logits_match(logits, ref, rel_tol: float = 1e-4) -> None:
    """Our logits equal timm's `ref` within `rel_tol` of its largest magnitude, and the batch's
    two examples differ by far more than that tolerance, so the check is per example."""
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=rel_tol * scale, rtol=0)
    assert np.abs(ref[0] - ref[1]).max() > 100 * rel_tol * scale
