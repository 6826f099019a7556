"""Sliding windows over (N, C, H, W): the index arithmetic shared by conv2d and the pools.

For a kernel (kh, kw), stride (sh, sw), dilation (dh, dw) and padding (top, bottom, left, right),
output position (oh, ow) and kernel offset (i, j) read input row and column

    h = oh·sh + i·dh − top,   w = ow·sw + j·dw − left,

and the position is *padding* when h or w falls outside the input. ``gather`` builds the windows
(im2col) and ``scatter`` sends per-window values back to the input positions they came from
(col2im, the adjoint of gather: a sum over every window that read a position). Both are plain
indexing plus ``bk.where`` and ``bk.sum``, so they run in every backend; the integer index
arrays are computed once per layer, in numpy. For float numpy arrays both run on strided views
instead — one strided copy of the padded input (gather), one add per kernel offset into the
input gradient, the padding clipped off (scatter); with stride 1 and as many output columns as
input ones, one copy or add per offset of a run per (n, c) (``runs``) — the same values, in the
same order of additions, about 3× faster. ``scatter_product`` (conv2d's col2im of W_gᵀ·dY_g)
makes the product a few samples at a time and scatters each chunk while it is in cache.

    gather(x)   x: (N, C, H, W)        -> (N, C, K, L)   K = kh·kw, L = OH·OW
    scatter(v)  v: (N, C, K, L)        -> (N, C, H, W)   dx[h, w] = Σ_{(k, l) reading (h, w)} v[k, l]
    scatter_product(a, b)              = scatter(a @ b), the product (N, …, L) read as (N, C, K, L)

Pooling's ``ceil_mode`` (torch's rule, ``pool_output_size``) adds a last window that may run past
the padded input; its positions past the padding are padding too (``fill``), and the strided
gather pads that far (``overhang``; the strided scatter clips every window to the input).
``AdaptiveWindows`` are torch's uneven adaptive-pooling windows, window i of n over a length L
being [⌊i·L/n⌋, ⌈(i+1)·L/n⌉): K = the largest window, the offsets past a smaller window's end
are padding, and windows may overlap (n > L included).
"""

from __future__ import annotations

from contextlib import contextmanager
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

        # The float col2im's slices, per kernel offset k: the input rows and columns it reads
        # (a strided slice of (H, W)) and the output rows and columns that read them, padding
        # left out (the clipped window); None for an offset that reads only padding.
        self.offset_slices = []
        for k in range(self.K):
            i, j = divmod(k, kw)
            rows = _clipped(OH, sh, i * dh - top, H)
            cols = _clipped(OW, sw, j * dw - left, W)
            self.offset_slices.append(None if rows is None or cols is None else rows + cols)
        # With stride 1 and as many output columns as input ones, offset k's values land on
        # the input gradient as one run of consecutive positions per (n, c) — in the flattened
        # (H·W) gradient, output (oh, ow) goes to (oh + i·dh − top)·W + ow + j·dw − left —
        # except the columns that read padding, which would wrap into the row above or below:
        # the float gather fills those afterwards, the float scatter_product zeroes them in its
        # own product first (per k: the source and destination ranges, and those columns).
        self.runs = None
        if (sh, sw) == (1, 1) and OW == W:
            self.runs = [None if where is None else _run(where, OW, W, H)
                         for where in self.offset_slices]

    def gather(self, bk, x, fill=0.0):
        """(N, C, H, W) -> (N, C, K, L); padding positions hold ``fill``."""
        n, c = x.shape[:2]
        if type(x) is np.ndarray and x.dtype.kind == "f":      # not a subclass: a storage-
            if self.runs is not None:                           # format array rounds its sums
                return self._gather_runs(x, fill)
            return self._gather_strided(x, fill)
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

    def _gather_runs(self, x, fill):
        """float numpy, stride 1 and OW = W (``runs``): each offset's windows copied out of the
        flattened input as one run per (n, c), then the positions that read padding — the
        rows before and after the run and the columns that wrapped into the row above or
        below — set to ``fill``: the same values as the strided gather, no padded copy of x,
        long inner loops (1.1-1.2x faster at 16×16 and 32×32, 2x at 8×8, measured). Written a
        few samples at a time (``GATHER_CHUNK_BYTES`` of windows each), so that the K passes
        over the chunk stay in cache."""
        n, c = x.shape[:2]
        (OH, OW), K, L = self.out_hw, self.K, self.L
        cols = np.empty((n, c, K, L), dtype=x.dtype)
        flat = x.reshape(n, c, self.in_hw[0] * self.in_hw[1])
        by_row = cols.reshape(n, c, K, OH, OW)
        chunk = max(1, GATHER_CHUNK_BYTES // (c * K * L * x.itemsize))
        for s in range(0, n, chunk):
            part, source, part_rows = cols[s:s + chunk], flat[s:s + chunk], by_row[s:s + chunk]
            for k, run in enumerate(self.runs):
                if run is None:
                    part[:, :, k] = fill
                    continue
                src, dst, padding_columns = run
                part[:, :, k, src] = source[:, :, dst]
                part[:, :, k, :src.start] = fill
                part[:, :, k, src.stop:] = fill
                for columns in padding_columns:
                    part_rows[:, :, k, :, columns] = fill
        return cols

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

    def scatter_product(self, bk, a, b):
        """col2im of a batched product: ``scatter(a @ b)``, the product (N, …, L) read as
        (N, C, K, L); b's axis 0 is the sample — conv2d's dx = col2im(W_gᵀ·dY_g), a (G, C/G·K,
        O/G), b (N, G, O/G, L).

        For float numpy operands the product is made and added into the gradient a few samples
        at a time (``SCATTER_CHUNK_BYTES`` of product each): each chunk is scattered while it is
        still in cache, and no whole product is ever allocated (conv2d's benchmark makes 38 MB
        of it in float64: above glibc's largest mmap threshold, 32 MB, such an array is mapped
        afresh every step and the kernel zeroes each page). The same bits as the whole product
        scattered: numpy's batched matmul calls BLAS once per sample and group, the same calls
        chunk or not, and each position receives the same additions in the same order."""
        n = b.shape[0]
        whole = lambda: bk.matmul(a, b).reshape(n, -1, self.K, self.L)     # noqa: E731
        if not (type(a) is np.ndarray and type(b) is np.ndarray and a.dtype.kind == "f"
                and b.dtype.kind == "f"):
            return self.scatter(bk, whole())
        if self.out_hw[1] < SCATTER_CHANNELS_LAST_BELOW:    # small images: one scatter
            return self.scatter(bk, whole())
        # The product's bytes per sample: b's other axes (the groups) times a's rows times L.
        per_sample = (b.size // (n * b.shape[-2]) * a.shape[-2]
                      * np.result_type(a.dtype, b.dtype).itemsize)
        chunk = max(1, SCATTER_CHUNK_BYTES // per_sample)
        out = None
        for s in range(0, n, chunk):
            v = bk.matmul(a, b[s:s + chunk])
            if type(v) is not np.ndarray:             # a backend that wraps float products
                return self.scatter(bk, whole())
            v = v.reshape(v.shape[0], -1, self.K, self.L)
            if out is None:
                out = np.zeros((n, v.shape[1]) + self.in_hw, dtype=v.dtype)
            if self.runs is not None:
                self._add_runs(out[s:s + chunk], v)
            else:
                self._add_offsets(out[s:s + chunk], v.transpose(2, 0, 1, 3), last=False)
        return out

    def _add_runs(self, out, v):
        """out (n, c, H, W) += v (n, c, K, L) at the positions each offset read, k = 0..K−1, as
        one run a (n, c) and offset (``runs``: stride 1, OW = W). v is scatter_product's own
        product, and its columns that read padding are zeroed first: in the run they fall on
        the row above or below (or off the ends, cut), where their exact zero changes nothing
        — the sum there starts from +0 and so is never −0, and s + 0 = s for every other s,
        inf and NaN included. The same bits as ``_add_offsets``, with one long inner loop per
        (n, c, k) instead of one per output row."""
        n, c = v.shape[:2]
        (OH, OW), HW = self.out_hw, self.in_hw[0] * self.in_hw[1]
        flat, by_row = out.reshape(n, c, HW), v.reshape(n, c, self.K, OH, OW)
        with _unbuffered():
            for k, run in enumerate(self.runs):
                if run is None:
                    continue
                src, dst, padding_columns = run
                for columns in padding_columns:
                    by_row[:, :, k, :, columns] = 0
                flat[:, :, dst] += v[:, :, k, src]

    def _scatter_strided(self, v):
        """float numpy: add each kernel offset's values into a strided view of the input
        gradient, offsets in order k = 0..K−1 (the order the generic path sums them in), the
        positions that read padding left out (they are dropped anyway): 3x faster than
        gathering K candidates per position.

        Each add runs numpy's inner loop over one output row (OW values); below
        ``SCATTER_CHANNELS_LAST_BELOW`` columns that overhead dominates, and the adds run on
        (H, W, N·C) instead — rows of OW·N·C values — at the cost of two transposing copies:
        the same additions in the same order, so the same bits (2-3x faster at 4×4 to 8×8,
        2-3x slower at 32×32, measured)."""
        n, c = v.shape[:2]
        (H, W), (OH, OW) = self.in_hw, self.out_hw
        last = OW < SCATTER_CHANNELS_LAST_BELOW
        if last:                                          # (K, OH, OW, N·C)
            out = np.zeros((H, W, n * c), dtype=v.dtype)
            self._add_offsets(out, v.reshape(n * c, self.K, OH, OW).transpose(1, 2, 3, 0),
                              last=True)
            return np.ascontiguousarray(out.transpose(2, 0, 1)).reshape(n, c, H, W)
        out = np.zeros((n, c, H, W), dtype=v.dtype)
        self._add_offsets(out, v.transpose(2, 0, 1, 3), last=False)
        return out

    def _add_offsets(self, out, per_offset, last):
        """out += each kernel offset's values at the input positions it read, k = 0..K−1:
        out (n, c, H, W) and per_offset (K, n, c, L), or channels-last (``last``) out (H, W, ·)
        and per_offset (K, OH, OW, ·)."""
        OH, OW = self.out_hw
        if not last:
            per_offset = per_offset.reshape(per_offset.shape[:3] + (OH, OW))
        for k, where in enumerate(self.offset_slices):
            if where is None:
                continue
            rows, src_rows, cols, src_cols = where
            if last:
                out[rows, cols] += per_offset[k, src_rows, src_cols]
            else:
                out[:, :, rows, cols] += per_offset[k, :, :, src_rows, src_cols]


# Output widths below this scatter channels-last (Windows._scatter_strided).
SCATTER_CHANNELS_LAST_BELOW = 13
# The product scattered at a time by the float Windows.scatter_product: about an L2 cache
# (1–2 MB a core on the machines measured; 1 to 4 samples of conv2d's benchmark).
SCATTER_CHUNK_BYTES = 2 << 20
# The windows written at a time by the float Windows._gather_runs (measured: 1 MB and 4 MB
# both beat the whole batch at 32×32, 4 MB by a little more in float32).
GATHER_CHUNK_BYTES = 4 << 20


def _clipped(out_size, stride, start, size):
    """The outputs o in [0, out_size) whose input o·stride + start lies in [0, size), and those
    inputs: (input slice, output slice), or None if there are none."""
    lo = max(0, (-start + stride - 1) // stride)
    hi = min(out_size - 1, (size - 1 - start) // stride)
    if lo > hi:
        return None
    return (slice(lo * stride + start, hi * stride + start + 1, stride), slice(lo, hi + 1))


@contextmanager
def _unbuffered():
    """numpy's ufunc buffer at its smallest (16 elements) inside, the caller's restored after
    (numpy keeps it per thread, per context in numpy 2). A ufunc on an operand that is not
    contiguous as a whole copies it through that buffer whenever its contiguous rows are
    shorter than the buffer (8192 elements by default), to run longer inner loops. For the
    runs of ``_add_runs`` (hundreds to thousands of values) the copies in and out cost more
    than they save — scatter_product 1.2-1.3x faster without them at 14×14 to 32×32, about
    even at 64×64 (numpy 1.26 and 2.4) — while for the rows of ``_add_offsets`` (one output
    row, ≤ 30 values in the cases measured) the buffered loops are faster, so only the runs
    use this. Buffering copies values, it never rounds them: the same bits either way."""
    previous = np.setbufsize(16)
    try:
        yield
    finally:
        np.setbufsize(previous)


def _run(where, OW, W, H):
    """Offset k's run (``Windows.runs``) from its clipped slices (stride 1, OW = W): the source
    range in the flattened (OH·OW) values, the destination range in the flattened (H·W)
    gradient — the output rows that read the input, whole, cut where it would leave the array
    (only columns that read padding are cut) — and the output columns that read padding."""
    rows, src_rows, cols, src_cols = where
    shift = (rows.start - src_rows.start) * W + cols.start - src_cols.start   # dst − src
    start, stop = src_rows.start * OW, src_rows.stop * OW
    start, stop = max(start, -shift), min(stop, H * W - shift)
    padding_columns = [s for s in (slice(0, src_cols.start), slice(src_cols.stop, OW))
                       if s.stop > s.start]
    return slice(start, stop), slice(start + shift, stop + shift), padding_columns


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
