"""nonfinite.py: the guard that keeps NaN and Inf weights from being saved."""

from __future__ import annotations

import pytest
import torch

from dirtune.train import nonfinite


def test_check_finite_weights_names_the_step():
    good = [torch.ones(3), torch.full((2, 2), 6e4, dtype=torch.float16)]  # large but finite in fp16
    nonfinite.check_finite_weights(good, 7)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(nonfinite.NonFiniteError, match=r"^step 7: the weights hold NaN or Inf"):
            nonfinite.check_finite_weights([torch.ones(3), torch.tensor([1.0, bad])], 7)
    nonfinite.check_finite_weights([], 0)
