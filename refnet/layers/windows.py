"""Sliding windows over (N, C, H, W): the index arithmetic shared by conv2d and the pools.

For a kernel (kh, kw), stride (sh, sw), dilation (dh, dw) and padding (top, bottom, left, right),
output position (oh, ow) and kernel offset (i, j) read input row and column

    h = oh·sh + i·dh − top,   w = ow·sw + j·dw − left,

and the position is *padding* when h or w falls outside the input. ``gather`` builds the windows
(im2col) and ``scatter`` sends per-window values back to the input positions they came from
(col2im, the adjoint of gather: a sum over every window that read a position). Both are plain
indexing plus ``bk.where`` and ``bk.sum``, so they run in every backend; the integer index
arrays are computed once per layer, in numpy. For float numpy arrays both run as one strided
copy (gather) or add (scatter) per kernel offset on the padded input instead: the same values,
in the same order of additions, about 3× faster.

    gather(x)   x: (N, C, H, W)        -> (N, C, K, L)   K = kh·kw, L = OH·OW
    scatter(v)  v: (N, C, K, L)        -> (N, C, H, W)   dx[h, w] = Σ_{(k, l) reading (h, w)} v[k, l]

Pooling's ``ceil_mode`` (torch's rule, ``pool_output_size``) adds a last window that may run past
the padded input; its positions past the padding are padding too (``fill``), and the strided
paths pad that far (``overhang``). ``AdaptiveWindows`` are torch's uneven adaptive-pooling
windows, window i of n over a length L being [⌊i·L/n⌋, ⌈(i+1)·L/n⌉): K = the largest window,
the offsets past a smaller window's end are padding, and windows may overlap (n > L included).
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


def pool_output_size(size: int, kernel: int, stride: int, dilation: int, pad_l: int, pad_r: int,
                     ceil_mode: bool) -> int:
    """torch's ``pooling_output_shape_pad_lr``: ⌊span/stride⌋ + 1, span = size + pads −
    dilation·(kernel − 1) − 1, or with ``ceil_mode`` ⌈span/stride⌉ + 1 — less one window if the
    last would start past the input and the left padding ((out − 1)·stride ≥ size + pad_l: it
    would read nothing but right padding)."""
    if not ceil_mode:
        return output_size(size, kernel, stride, dilation, pad_l + pad_r)
    span = size + pad_l + pad_r - dilation * (kernel - 1) - 1
    out = (span + stride - 1) // stride + 1              # Python's // is torch's div_rtn
    if (out - 1) * stride >= size + pad_l:
        out -= 1
    return out


class Windows:
    def __init__(self, in_hw, kernel, stride, dilation, padding, where: str,
                 ceil_mode: bool = False):
        (H, W), (kh, kw), (sh, sw), (dh, dw) = in_hw, kernel, stride, dilation
        top, bottom, left, right = padding
        OH = pool_output_size(H, kh, sh, dh, top, bottom, ceil_mode)
        OW = pool_output_size(W, kw, sw, dw, left, right, ceil_mode)
        if OH < 1 or OW < 1:
            raise ValueError(f"{where}: the kernel ({kh}x{kw}, dilation {dh}x{dw}, so "
                             f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}) is larger than the padded "
                             f"input ({H + top + bottom}x{W + left + right})")
        self.in_hw, self.out_hw = (H, W), (OH, OW)
        self.K, self.L = kh * kw, OH * OW
        self.kernel, self.stride, self.dilation = (kh, kw), (sh, sw), (dh, dw)
        self.padding = (top, bottom, left, right)
        # How far a ceil-mode last window runs past the padded input (rows, columns): the
        # strided paths pad that much more (those positions are padding, as in torch, which
        # clips the window there).
        self.overhang = (max(0, (OH - 1) * sh + dh * (kh - 1) + 1 - (H + top + bottom)),
                         max(0, (OW - 1) * sw + dw * (kw - 1) + 1 - (W + left + right)))

        # Input coordinates read by kernel offset k = (i, j) at output position l = (oh, ow).
        i, j = np.divmod(np.arange(self.K), kw)
        oh, ow = np.divmod(np.arange(self.L), OW)
        rows = oh[None, :] * sh + i[:, None] * dh - top            # (K, L)
        cols = ow[None, :] * sw + j[:, None] * dw - left
        self.valid = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        self.flat = np.where(self.valid, rows * W + cols, 0)        # (K, L) into H·W

        # The adjoint: for offset k and input position p, the output position that read p
        # (each offset reads each input position at most once).
        self.back_valid = np.zeros((self.K, H * W), dtype=bool)
        self.back_index = np.zeros((self.K, H * W), dtype=np.int64)
        k_idx, l_idx = np.nonzero(self.valid)
        self.back_valid[k_idx, self.flat[k_idx, l_idx]] = True
        self.back_index[k_idx, self.flat[k_idx, l_idx]] = l_idx
        self.back_k = np.broadcast_to(np.arange(self.K)[:, None], (self.K, H * W))

    def gather(self, bk, x, fill=0.0):
        """(N, C, H, W) -> (N, C, K, L); padding positions hold ``fill``."""
        n, c = x.shape[:2]
        if type(x) is np.ndarray and x.dtype.kind == "f":      # not a subclass: a storage-
            return self._gather_strided(x, fill)                # format array rounds its sums
        # take (not fancy indexing): 4x faster than fancy indexing, and C-contiguous.
        windows = x.reshape(n, c, self.in_hw[0] * self.in_hw[1]).take(self.flat, axis=2)
        return bk.where(self.valid, windows, fill)

    def _gather_strided(self, x, fill):
        """float numpy: pad once with ``fill``, then copy the windows out of one strided view
        of the padded input, (N, C, kh, kw, OH, OW), in a single copy — the same values as the
        indexed gather, 3x faster (and no Python loop over the kernel offsets)."""
        n, c = x.shape[:2]
        (OH, OW), (kh, kw) = self.out_hw, self.kernel
        (sh, sw), (dh, dw) = self.stride, self.dilation
        padded = self._padded(x, fill)
        s_n, s_c, s_h, s_w = padded.strides
        view = np.lib.stride_tricks.as_strided(
            padded, (n, c, kh, kw, OH, OW), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw),
            writeable=False)
        return view.copy().reshape(n, c, kh * kw, OH * OW)

    def _padded(self, x, fill):
        """x inside a border of ``fill`` (the padding, and a ceil-mode window's overhang): np.pad's
        result, as one fill and one copy of the interior (filling only the border strips costs
        more on small images, one short row at a time; np.pad adds its per-call overhead)."""
        top, bottom, left, right = self.padding
        bottom, right = bottom + self.overhang[0], right + self.overhang[1]
        if not any((top, bottom, left, right)):
            return x
        (H, W), (n, c) = self.in_hw, x.shape[:2]
        padded = np.full((n, c, top + H + bottom, left + W + right), fill, dtype=x.dtype)
        padded[:, :, top:top + H, left:left + W] = x
        return padded

    def scatter(self, bk, v):
        """(N, C, K, L) -> (N, C, H, W): the sum of the window values each position fed."""
        n, c = v.shape[:2]
        if type(v) is np.ndarray and v.dtype.kind == "f":
            return self._scatter_strided(v)
        per_offset = v.reshape(n, c, self.K * self.L).take(self.back_k * self.L + self.back_index,
                                                            axis=2)
        per_offset = bk.where(self.back_valid, per_offset, 0)
        return bk.sum(per_offset, axis=2).reshape(n, c, *self.in_hw)

    def _scatter_strided(self, v):
        """float numpy: add each kernel offset's values into a strided view of the padded
        input, offsets in order k = 0..K−1 (the order the generic path sums them in), then
        crop the padding: 3x faster than gathering K candidates per position.

        Each add runs numpy's inner loop over one output row (OW values); below
        ``SCATTER_CHANNELS_LAST_BELOW`` columns that overhead dominates, and the adds run on
        (H, W, N·C) instead — rows of OW·N·C values — at the cost of two transposing copies:
        the same additions in the same order, so the same bits (2-3x faster at 4×4 to 8×8,
        2-3x slower at 32×32, measured)."""
        n, c = v.shape[:2]
        (H, W), (OH, OW) = self.in_hw, self.out_hw
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, bottom, left, right = self.padding
        bottom, right = bottom + self.overhang[0], right + self.overhang[1]
        last = OW < SCATTER_CHANNELS_LAST_BELOW
        padded = (H + top + bottom, W + left + right)
        out = np.zeros(padded + (n * c,) if last else (n, c) + padded, dtype=v.dtype)
        if last:                                          # (K, OH, OW, N·C)
            per_offset = v.reshape(n * c, kh * kw, OH, OW).transpose(1, 2, 3, 0)
        else:
            per_offset = v.reshape(n, c, kh * kw, OH, OW).transpose(2, 0, 1, 3, 4)
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            rows = slice(i * dh, i * dh + sh * (OH - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (OW - 1) + 1, sw)
            if last:
                out[rows, cols] += per_offset[k]
            else:
                out[:, :, rows, cols] += per_offset[k]
        if last:
            return np.ascontiguousarray(
                out[top:top + H, left:left + W].transpose(2, 0, 1)).reshape(n, c, H, W)
        return out[:, :, top:top + H, left:left + W]


# Output widths below this scatter channels-last (Windows._scatter_strided).
SCATTER_CHANNELS_LAST_BELOW = 13


def window_groups(valid):
    """The output positions grouped by which kernel offsets of their window read the input
    (``valid`` (K, L)): [(offsets, outputs, slot, member)] — the group's offsets (row-major) and
    outputs (ascending); ``slot`` (L,): each output's index among the group's outputs (0 for
    the others), ``member`` (L,): whether it is one of them. Max pooling takes each group's
    max over exactly its offsets, the clipped window torch scans. Few groups: corners, edges
    and the interior of a padded input; the two window sizes per axis of adaptive pooling."""
    patterns, inverse = np.unique(valid.T, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = []
    for g, pattern in enumerate(patterns):
        member = inverse == g
        slot = np.where(member, np.cumsum(member) - 1, 0)
        groups.append((np.flatnonzero(pattern), np.flatnonzero(member), slot, member))
    return groups


def adaptive_bounds(size: int, out: int):
    """torch's adaptive pooling windows over one axis: window i of ``out`` over ``size`` is
    [start_i, end_i) = [⌊i·size/out⌋, ⌈(i+1)·size/out⌉) (``start_index``/``end_index`` in
    ATen's AdaptivePooling.h). Uneven; neighbours overlap unless out divides size."""
    i = np.arange(out)
    return (i * size) // out, -((-(i + 1) * size) // out)


class AdaptiveWindows:
    """The windows of ``adaptive_*pool2d`` with output (OH, OW) over (H, W): the same
    ``gather``/``scatter`` (and ``K``, ``L``, ``valid``) as :class:`Windows`, K = the largest
    window (kh_max·kw_max), offset (i, j) of output (oh, ow) reading row start_oh + i and column
    start_ow + j, padding past the window's end. ``count`` (L,): each window's size.

    Windows overlap and, when out > size, several outputs read a position through the same
    offset, so the adjoint is a table of every (k, l) that read each position (R slots, R the
    most readers of any position; ordered by k, then l), summed with ``bk.sum``."""

    def __init__(self, in_hw, out_hw):
        (H, W), (OH, OW) = in_hw, out_hw
        h0, h1 = adaptive_bounds(H, OH)
        w0, w1 = adaptive_bounds(W, OW)
        kh, kw = int(np.max(h1 - h0)), int(np.max(w1 - w0))
        self.in_hw, self.out_hw = (H, W), (OH, OW)
        self.K, self.L = kh * kw, OH * OW
        i, j = np.divmod(np.arange(self.K), kw)
        oh, ow = np.divmod(np.arange(self.L), OW)
        rows = h0[oh][None, :] + i[:, None]                          # (K, L)
        cols = w0[ow][None, :] + j[:, None]
        self.valid = (rows < h1[oh][None, :]) & (cols < w1[ow][None, :])
        self.flat = np.where(self.valid, rows * W + cols, 0)           # (K, L) into H·W
        self.count = self.valid.sum(axis=0)                           # (h1 − h0)·(w1 − w0)

        k_idx, l_idx = np.nonzero(self.valid)                         # k-major, then l
        position = self.flat[k_idx, l_idx]
        order = np.argsort(position, kind="stable")
        position, slot_value = position[order], (k_idx * self.L + l_idx)[order]
        readers = np.bincount(position, minlength=H * W)
        first = np.concatenate([[0], np.cumsum(readers)[:-1]])
        slot = np.arange(position.size) - first[position]             # rank among p's readers
        R = int(readers.max())
        self.back_valid = np.zeros((R, H * W), dtype=bool)
        self.back_index = np.zeros((R, H * W), dtype=np.int64)
        self.back_valid[slot, position] = True
        self.back_index[slot, position] = slot_value

    def gather(self, bk, x, fill=0.0):
        """(N, C, H, W) -> (N, C, K, L); offsets past a window's end hold ``fill``."""
        n, c = x.shape[:2]
        windows = x.reshape(n, c, self.in_hw[0] * self.in_hw[1]).take(self.flat, axis=2)
        return bk.where(self.valid, windows, fill)

    def scatter(self, bk, v):
        """(N, C, K, L) -> (N, C, H, W): the sum of the window values each position fed."""
        n, c = v.shape[:2]
        readers = v.reshape(n, c, self.K * self.L).take(self.back_index, axis=2)  # (N, C, R, HW)
        readers = bk.where(self.back_valid, readers, 0)
        return bk.sum(readers, axis=2).reshape(n, c, *self.in_hw)
