"""Helpers for the PyTorch/transformers reference tests (not a test module)."""

import numpy as np
import torch
from flax import nnx

TOL = 1e-4  # float32 parity bound


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fills every float parameter and buffer with random values, so parity is not trivial.

    Weights N(0, 1 / fan_in) (activations stay O(1), so float32 rounding stays small), norm/BN
    scales ~ 1 + noise, running variances in [0.5, 1.5], biases and the rest N(0, scale).
    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1.0 + scale * torch.randn(t.shape, generator=g))
            elif t.ndim >= 2:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
            else:
                t.copy_(scale * torch.randn(t.shape, generator=g))
    return model.eval()


def nhwc(t: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) torch tensor -> (B, H, W, C) NumPy array."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def images(b: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random images as (B, H, W, 3) NumPy and the same as (B, 3, H, W) torch."""
    x = np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@nnx.jit
def forward_eval(model, x):
    """``model(x, train=False)``, jitted once per model structure."""
    return model(x, train=False)


def assert_close(ours, ref: np.ndarray, tol: float = TOL) -> None:
    """Same shape and max |ours - ref| <= tol."""
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"max abs diff {err} > {tol}"
