"""lora_penalty.py's precomputed base norms (the value against the plain formula is in
test_penalty.py). Importing this module before penalty.py also checks that the two import in
either order."""

from __future__ import annotations

import pytest
import torch

from dirtune.method.lora_penalty import base_row_norms, lora_direction_penalty


def test_given_base_norms_are_used_and_checked():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(16, 8, generator=g)
    A, B = torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g)
    n0 = base_row_norms(base)
    torch.testing.assert_close(n0, (base.double() ** 2).sum(1).float())
    assert lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[n0]).item() == pytest.approx(
        lora_direction_penalty(base, A, B, 1.0).item(), rel=1e-6)
    # the given norms are what the penalty reads: doubling them changes the value
    assert lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[4 * n0]).item() != pytest.approx(
        lora_direction_penalty(base, A, B, 1.0).item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"base_sq_norms\[0\] has shape \(15,\); the base has 16 rows"):
        lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[n0[:15]])
    with pytest.raises(ValueError, match="got 2 base_sq_norms for 1 layers"):
        lora_direction_penalty(base, A, B, 1.0, base_sq_norms=[n0, n0])


def test_factored_angle_and_drift_equal_the_dense_ones():
    """lora_angle_and_drift never forms B·A; it matches angle_and_drift of W = W0 + s·B·A."""
    from dirtune.method.lora_penalty import lora_angle_and_drift
    from dirtune.method.penalty import angle_and_drift

    g = torch.Generator().manual_seed(8)
    shapes = [(16, 8), (16, 8), (8, 24)]
    bases = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    As = [torch.randn(3, s[1], generator=g, dtype=torch.float64) for s in shapes]
    Bs = [0.05 * torch.randn(s[0], 3, generator=g, dtype=torch.float64) for s in shapes]
    Bs[1].zero_()                                     # B = 0: the pretrained weight, angle 0
    angle, drift = lora_angle_and_drift(bases, As, Bs, [0.5, 0.5, 2.0])
    for i, (w, a, b, s) in enumerate(zip(bases, As, Bs, [0.5, 0.5, 2.0])):
        want_angle, want_drift = angle_and_drift(w + s * b @ a, w)
        assert float(angle[i]) == pytest.approx(float(want_angle), rel=1e-9, abs=1e-12)
        assert float(drift[i]) == pytest.approx(float(want_drift), rel=1e-9, abs=1e-15)
    assert float(angle[1]) == 0.0 and float(drift[1]) == 0.0
