"""Reading parameters and data, writing gradients: ``.npz`` files, never unpickled.

- params ``.npz``: one array per parameter, keyed by torch name (``"0.weight"``), torch layout.
  A torch ``state_dict`` saved with ``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``
  loads as it is.
- data ``.npz``: ``x`` (N, *input_shape) and ``y`` (integer labels or float targets), and for a
  loss with reduction ``"none"`` optionally ``upstream``: the gradient of the loss vector
  (its shape; ones if left out), as torch's ``loss.backward(upstream)``.
- gradients ``.npz`` (written): ``loss`` (0-d), ``grad/x`` and ``grad/<param name>``; written to
  exactly the path given (numpy would append ``.npz`` to a name without it). Under the fp16/bf16
  emulation also ``loss_scale``, ``precision``, ``policy``, ``accumulate``, ``loss_dtype`` and
  ``dtype/<name>`` (0-d: the storage format of each gradient), strings as numpy unicode arrays,
  which load without pickle.

A file of the wrong kind (an ``.npy``, text, a directory) is named as such. ``check_output_file``,
``check_output_dir`` and ``check_input_dir`` check a command's paths before it starts its work.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

# The first bytes of the files numpy writes: an .npz is a zip archive (numpy.savez), an .npy
# a single array (numpy.save). Checked before numpy sees the file, so that a file of the wrong
# kind is named as such rather than reported as whatever numpy's loader trips over (np.load
# returns an .npy as a bare array, and reads anything else as a pickle it then refuses).
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")       # a zip's first entry, or an empty zip
NPY_MAGIC = b"\x93NUMPY"


def read_input(path, what: str, expected: str, size: int = -1) -> bytes:
    """The bytes of an input file (the first ``size``; all by default), or the one-line error
    every reader of refnet gives: ``what`` (the file as the user knows it) with no such file, a
    directory (``expected``: what should have been there) or unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what}: is a directory; expected {expected}") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot be read ({e.strerror})") from None


def _load_npz(path, what) -> Dict[str, np.ndarray]:
    head = read_input(path, f"{what} {path}", "an .npz file", size=6)
    if head.startswith(NPY_MAGIC):
        raise ValueError(f"{what} {path}: a single .npy array (numpy.save); expected an .npz of "
                         f"named arrays (numpy.savez)")
    if head[:4] not in ZIP_MAGIC:
        raise ValueError(f"{what} {path}: not an .npz file (no zip signature; found "
                         f"{head[:4]!r}); expected named arrays saved with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        # allow_pickle=False makes an object array raise ValueError here: never unpickle.
        raise ValueError(f"{what} {path}: not a readable .npz of numeric arrays ({e})") from None


def load_params(path) -> Dict[str, np.ndarray]:
    return _load_npz(path, "params")


def load_data(path, upstream: bool = False):
    """(x, y) of a data file; with ``upstream=True`` (x, y, upstream or None), the file then
    allowed an ``upstream`` array too (checked against the loss by the caller)."""
    arrays = _load_npz(path, "data")
    missing = [k for k in ("x", "y") if k not in arrays]
    optional = {"upstream"} if upstream else set()
    extra = sorted(set(arrays) - {"x", "y"} - optional)
    if missing or extra:
        expected = ("the keys ['x', 'y'] and optionally 'upstream'" if upstream
                    else "exactly the keys ['x', 'y']")
        raise ValueError(f"data {path}: expected {expected}, missing {missing}, "
                         f"unexpected {extra}")
    if upstream:
        return arrays["x"], arrays["y"], arrays.get("upstream")
    return arrays["x"], arrays["y"]


def _savez(path, arrays: Dict[str, np.ndarray]) -> None:
    """Write exactly ``path``: numpy.savez given a name appends ".npz" to one without it (and
    so wrote ``DIR.npz`` beside a directory); given an open file it writes where it is told."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def save_params(path, params: Dict[str, np.ndarray]) -> None:
    _savez(path, {k: np.asarray(v) for k, v in params.items()})


def save_gradients(path, loss, grads: Dict[str, np.ndarray], grad_x, losses=None,
                   extra: Optional[Dict[str, np.ndarray]] = None) -> None:
    """``losses``: the loss vector of a reduction-"none" loss (written as ``losses``; ``loss``
    is then Σ upstream·losses, the function the gradients are of). ``extra``: more named arrays
    (the emulation's settings and each gradient's storage format, ``dtype/<name>``)."""
    arrays = {"loss": np.asarray(loss), "grad/x": np.asarray(grad_x)}
    if losses is not None:
        arrays["losses"] = np.asarray(losses)
    arrays.update({f"grad/{k}": np.asarray(v) for k, v in grads.items()})
    arrays.update({k: np.asarray(v) for k, v in (extra or {}).items()})
    _savez(path, arrays)


def load_gradients(path) -> Dict[str, np.ndarray]:
    """Named gradient arrays (``refnet diagnose --compare``: a GPU run's), read without
    unpickling; the names and shapes are checked by the caller against its model."""
    return _load_npz(path, "--compare")


# Output paths are checked before any work is done (a study takes minutes; finding out at the
# end that its --out is a file loses them), and checking writes nothing. Writability is asked
# of the operating system (os.access), which answers yes for root on any writable file system.

def check_output_file(path, what: str) -> None:
    """``path`` can be written as a file: not a directory, its directory exists and is writable,
    and an existing file there (it is replaced) is writable. ``what`` names the option."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {path}: is a directory; expected a file name to write")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {path}: the file exists and is not writable")
    parent = p.parent
    if not parent.exists():
        raise ValueError(f"{what} {path}: the directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: the directory {str(parent)!r} is not writable")


def check_output_dir(path, what: str) -> None:
    """``path`` is a writable directory, or one that can be created (with its parents) under a
    writable one. ``what`` names the option."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{what} {path}: is a file; expected a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path}: the directory is not writable")
        return
    ancestor = Path(os.path.abspath(p)).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path}: cannot be created, {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot be created, {str(ancestor)!r} is not writable")


def check_input_dir(path, what: str) -> None:
    """``path`` is an existing directory. ``what`` names the option or argument."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {path}: no such directory")
    if not p.is_dir():
        raise ValueError(f"{what} {path}: is a file; expected a directory")
