"""Sliding windows over (N, C, H, W): the index arithmetic shared by conv2d and the pools.

For a kernel (kh, kw), stride (sh, sw), dilation (dh, dw) and padding (top, bottom, left, right),
output position (oh, ow) and kernel offset (i, j) read input row and column

    h = oh·sh + i·dh − top,   w = ow·sw + j·dw − left,

and the position is *padding* when h or w falls outside the input. ``gather`` builds the windows
(im2col) and ``scatter`` sends per-window values back to the input positions they came from
(col2im, the adjoint of gather: a sum over every window that read a position). Both are plain
indexing plus ``bk.where`` and ``bk.sum``, so they run in every backend; the integer index
arrays are computed once per layer, in numpy. (For float numpy arrays the mask is applied by
overwriting the few padding positions in place, which gives the same values 2.5× faster.)

    gather(x)   x: (N, C, H, W)        -> (N, C, K, L)   K = kh·kw, L = OH·OW
    scatter(v)  v: (N, C, K, L)        -> (N, C, H, W)   dx[h, w] = Σ_{(k, l) reading (h, w)} v[k, l]
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def pair(value, where: str, key: str, low: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= low."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        a, b = value
    else:
        a = b = value
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{where}: {key} must be an integer >= {low} or a pair of them, "
                             f"got {value!r}")
    return int(a), int(b)


def output_size(size: int, kernel: int, stride: int, dilation: int, pad_total: int) -> int:
    """floor((size + pads − dilation·(kernel − 1) − 1) / stride) + 1, as torch."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


class Windows:
    def __init__(self, in_hw, kernel, stride, dilation, padding, where: str):
        (H, W), (kh, kw), (sh, sw), (dh, dw) = in_hw, kernel, stride, dilation
        top, bottom, left, right = padding
        OH = output_size(H, kh, sh, dh, top + bottom)
        OW = output_size(W, kw, sw, dw, left + right)
        if OH < 1 or OW < 1:
            raise ValueError(f"{where}: the kernel ({kh}x{kw}, dilation {dh}x{dw}, so "
                             f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}) is larger than the padded "
                             f"input ({H + top + bottom}x{W + left + right})")
        self.in_hw, self.out_hw = (H, W), (OH, OW)
        self.K, self.L = kh * kw, OH * OW

        # Input coordinates read by kernel offset k = (i, j) at output position l = (oh, ow).
        i, j = np.divmod(np.arange(self.K), kw)
        oh, ow = np.divmod(np.arange(self.L), OW)
        rows = oh[None, :] * sh + i[:, None] * dh - top            # (K, L)
        cols = ow[None, :] * sw + j[:, None] * dw - left
        self.valid = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        self.flat = np.where(self.valid, rows * W + cols, 0)        # (K, L) into H·W
        self.padding_positions = np.nonzero(~self.valid)            # (k, l) pairs

        # The adjoint: for offset k and input position p, the output position that read p
        # (each offset reads each input position at most once).
        self.back_valid = np.zeros((self.K, H * W), dtype=bool)
        self.back_index = np.zeros((self.K, H * W), dtype=np.int64)
        k_idx, l_idx = np.nonzero(self.valid)
        self.back_valid[k_idx, self.flat[k_idx, l_idx]] = True
        self.back_index[k_idx, self.flat[k_idx, l_idx]] = l_idx
        self.back_k = np.broadcast_to(np.arange(self.K)[:, None], (self.K, H * W))
        self.unread_positions = np.nonzero(~self.back_valid)         # (k, p) pairs

    def gather(self, bk, x, fill=0.0):
        """(N, C, H, W) -> (N, C, K, L); padding positions hold ``fill``."""
        n, c = x.shape[:2]
        # take (not fancy indexing): 4x faster here, and its result is C-contiguous.
        windows = x.reshape(n, c, self.in_hw[0] * self.in_hw[1]).take(self.flat, axis=2)
        if isinstance(windows, np.ndarray) and windows.dtype.kind == "f":
            # float numpy: overwrite the padding positions in place (a few percent of the
            # array) instead of a full masked copy — same values, a third of the time.
            windows[:, :, self.padding_positions[0], self.padding_positions[1]] = fill
            return windows
        return bk.where(self.valid, windows, fill)

    def scatter(self, bk, v):
        """(N, C, K, L) -> (N, C, H, W): the sum of the window values each position fed."""
        n, c = v.shape[:2]
        per_offset = v.reshape(n, c, self.K * self.L).take(self.back_k * self.L + self.back_index,
                                                            axis=2)
        if isinstance(per_offset, np.ndarray) and per_offset.dtype.kind == "f":
            per_offset[:, :, self.unread_positions[0], self.unread_positions[1]] = 0.0
        else:
            per_offset = bk.where(self.back_valid, per_offset, 0)
        return bk.sum(per_offset, axis=2).reshape(n, c, *self.in_hw)
