"""Reading parameters and data, writing gradients: ``.npz`` files, never unpickled.

- params ``.npz``: one array per parameter, keyed by torch name (``"0.weight"``), torch layout.
  A torch ``state_dict`` saved with ``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``
  loads as it is.
- data ``.npz``: ``x`` (N, *input_shape) and ``y`` (integer labels or float targets).
- gradients ``.npz`` (written): ``loss`` (0-d), ``grad/x`` and ``grad/<param name>``.
"""

from __future__ import annotations

import zipfile
from typing import Dict, Tuple

import numpy as np


def _load_npz(path, what) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        # allow_pickle=False makes an object array raise ValueError here: never unpickle.
        raise ValueError(f"{what} {path}: not a readable .npz of numeric arrays ({e})") from None


def load_params(path) -> Dict[str, np.ndarray]:
    return _load_npz(path, "params")


def load_data(path) -> Tuple[np.ndarray, np.ndarray]:
    arrays = _load_npz(path, "data")
    missing = [k for k in ("x", "y") if k not in arrays]
    extra = sorted(set(arrays) - {"x", "y"})
    if missing or extra:
        raise ValueError(f"data {path}: expected exactly the keys ['x', 'y'], missing {missing}, "
                         f"unexpected {extra}")
    return arrays["x"], arrays["y"]


def save_params(path, params: Dict[str, np.ndarray]) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in params.items()})


def save_gradients(path, loss, grads: Dict[str, np.ndarray], grad_x) -> None:
    arrays = {"loss": np.asarray(loss), "grad/x": np.asarray(grad_x)}
    arrays.update({f"grad/{k}": np.asarray(v) for k, v in grads.items()})
    np.savez(path, **arrays)
