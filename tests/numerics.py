"""Float comparisons that hold on every CPU: tolerances relative to the size of what is compared.

Kernels differ between CPUs (AVX2, AVX-512, AMX) in the order they add numbers, so a sum of many float32
terms moves by a few ulps of the sum, not of each term: a log-likelihood sum of -1305.9 may differ by 1.5e-5
between two CPUs while each of its tokens agrees to 1e-8. An absolute tolerance tuned on one CPU fails on the
next; one relative to the value does not.
"""

from __future__ import annotations

import pytest

REL = 2e-6  # float32 has 24 bits (6e-8): room for reductions over thousands of terms in another order


def approx_value(expected, rel: float = REL):
    """pytest.approx relative to the value compared, with a floor of the same size for values near 0
    (a loss or a log-likelihood of a single, near-certain token)."""
    return pytest.approx(expected, rel=rel, abs=rel)


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def per_token(total: float, tokens: int) -> float:
    """A sum over tokens as a per-token value, so its tolerance does not grow with the text's length."""
    return total / max(tokens, 1)
