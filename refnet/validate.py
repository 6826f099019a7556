"""Input validation shared by layers, losses and the model: every message names what is being
checked, what was expected and what was found."""

from __future__ import annotations

import numpy as np


def require_number(where: str, key: str, value, *, low=None, high=None, integer=False):
    """Validate one numeric config value."""
    kind = "an integer" if integer else "a number"
    ok_type = (isinstance(value, (int, np.integer)) if integer
               else isinstance(value, (int, float, np.integer, np.floating)))
    if isinstance(value, bool) or not ok_type or not np.isfinite(value):
        raise ValueError(f"{where}: {key} must be {kind}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{where}: {key} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{where}: {key} must be <= {high}, got {value!r}")
    return value


def finite_float64(a, what: str) -> np.ndarray:
    """``a`` as a float64 array: real numbers only (TypeError), all finite (ValueError)."""
    a = np.asarray(a)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating)
                               or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{what} must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{what} must be finite, got {a[bad]} at index {bad} "
                         f"({int(np.sum(~np.isfinite(a)))} non-finite values)")
    return a
