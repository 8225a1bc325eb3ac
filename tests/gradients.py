"""Comparisons of gradients and trained weights that carry signal on every CPU.

Two correct implementations differ in rounding only, and rounding noise is small relative to a tensor's
gradient norm, not to each of its entries: an entry whose true gradient is zero holds pure noise whose sign
depends on the CPU's kernels. So gradients are compared by the norm of their difference against the norm of
the reference, and weights after adaptive-optimizer steps leave out the entries whose true gradient is zero
(AdamW divides by the gradient's own running scale and turns that noise into steps of up to the learning rate).
"""

from __future__ import annotations

import torch


def assert_gradients_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float
) -> None:
    """Each tensor's ||actual - expected|| is within `rel` of ||expected||; a reference gradient that is zero
    must be matched by an (almost) zero one, measured against the largest gradient norm of the model."""
    assert actual.keys() == expected.keys()
    largest = max(g.norm().item() for g in expected.values())
    assert largest > 0, "every reference gradient is zero; the comparison would be vacuous"
    for name, reference in expected.items():
        error = (actual[name] - reference).norm().item()
        scale = max(reference.norm().item(), 1e-6 * largest)
        assert error <= rel * scale, f"{name}: |difference| {error:.3g} > {rel:g} x |reference| {scale:.3g}"


def zero_gradient_entries(name: str, value: torch.Tensor) -> slice | None:
    """The entries of a parameter whose true gradient is exactly zero, or None.

    An attention block's key bias (the middle third of the packed in_proj_bias) adds the same amount to every
    logit of a query's row, and softmax is invariant to that, so no loss depends on it.
    """
    if name.endswith("attn.in_proj_bias"):
        width = value.shape[0] // 3
        return slice(width, 2 * width)
    return None


def assert_weights_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float, atol: float
):
    """Weights after optimizer steps agree entry by entry, except the entries whose true gradient is zero:
    there AdamW's steps follow the sign of rounding noise, so those entries are left out."""
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        ours = actual[name]
        skip = zero_gradient_entries(name, reference)
        if skip is not None:
            keep = torch.ones(reference.shape[0], dtype=torch.bool)
            keep[skip] = False
            ours, reference = ours[keep], reference[keep]
        torch.testing.assert_close(ours, reference, rtol=rtol, atol=atol, msg=name)
