"""common.stats against numbers worked out by hand."""

import math

import numpy as np
import pytest

from common.stats import psi


def test_psi_hand_computed():
    # reference 0..99 in 4 quartile bins: edges 24.75, 49.5, 74.25 -> 25 each (0.25)
    # actual: 50 values in bin 0, 50 in bin 3 -> shares 0.5, 0, 0, 0.5 (0 floored at 1e-4)
    # PSI = 2 * (0.25 * ln 2) + 2 * ((1e-4 - 0.25) * ln(1e-4 / 0.25))
    ref = np.arange(100)
    act = np.r_[np.zeros(50), np.full(50, 99)]
    expected = 2 * 0.25 * math.log(2) + 2 * (1e-4 - 0.25) * math.log(1e-4 / 0.25)
    assert psi(expected=ref, actual=act, bins=4) == pytest.approx(expected)
    assert psi(expected=ref, actual=ref, bins=10) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    base = rng.normal(size=5000)
    assert psi(expected=base, actual=rng.normal(size=5000)) < 0.02  # same distribution
    assert psi(expected=base, actual=rng.normal(1.0, size=5000)) > 0.25  # a major shift
    with pytest.raises(ValueError):
        psi(expected=[], actual=[1.0])
