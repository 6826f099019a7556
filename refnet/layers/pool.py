"""Pooling over (N, C, H, W), as torch's MaxPool2d, AvgPool2d, AdaptiveMaxPool2d,
AdaptiveAvgPool2d and AdaptiveAvgPool2d(1).

maxpool2d    y[l] = max_k x[window(l, k)]   over the window's positions inside the input (torch
             clips the window; a padding position never wins: as if it were −inf)
             dx = col2im(dy at the argmax of each window, 0 elsewhere)
             Ties: the whole gradient goes to one element, the *first* maximum in row-major
             window order — what torch's CPU kernel does (it keeps a maximum unless a later
             element is strictly larger, or NaN). A tie is a kink: the verifier reports it.
avgpool2d    y[l] = Σ_k x[window(l, k)] / D,   D = kh·kw (count_include_pad, torch's default) or
             the number of non-padding positions, or divisor_override
             dx = col2im(dy / D broadcast over the window)
adaptive_maxpool2d, adaptive_avgpool2d
             the same over torch's uneven windows: output i of n over a length L pools
             [⌊i·L/n⌋, ⌈(i+1)·L/n⌉) (windows.adaptive_bounds); D = the window's size
global_avgpool  y[n, c, 0, 0] = Σ_{h,w} x / (H·W)   (torch AdaptiveAvgPool2d(1): output
             (N, C, 1, 1); follow it with flatten)
             dx = dy / (H·W) at every position

Config (torch names): ``kernel_size``, ``stride`` (default: kernel_size), ``padding`` (0; at
most half the kernel, as torch), ``ceil_mode`` (false); maxpool2d ``dilation`` (1); avgpool2d
``count_include_pad`` (true) and ``divisor_override`` (null; a nonzero integer, as torch, which
accepts negative ones); the adaptive pools ``output_size`` (an int or a pair; null in a pair
keeps that input size, as torch's None).

ceil_mode, as torch: the output size rounds up, less a last window that would start past the
input and the left padding (``windows.pool_output_size``); a last window that runs past the
padded input is clipped there. With count_include_pad its divisor counts the padding inside
the clipped window, not the positions past the right padding: D = (min(h0 + kh, H + bottom) −
h0)·(min(w0 + kw, W + right) − w0), h0 = oh·sh − top, w0 = ow·sw − left (torch's CPU kernel).
"""

from __future__ import annotations

import numpy as np

from .base import Layer
from .windows import AdaptiveWindows, Windows, adaptive_bounds, pair, window_groups


def _flag(where, key, value):
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


class _Pool2d(Layer):
    defaults = {"kernel_size": None, "stride": None, "padding": 0, "ceil_mode": False}

    def output_shape(self, in_shape):
        where, c = self.where, self.config
        if c["kernel_size"] is None:
            raise ValueError(f"{where}: needs 'kernel_size'")
        if len(in_shape) != 3:
            raise ValueError(f"{where}: expects input (N, C, H, W), got a sample shape of "
                             f"{tuple(in_shape)}")
        kernel = pair(c["kernel_size"], where, "kernel_size", 1)
        stride = kernel if c["stride"] is None else pair(c["stride"], where, "stride", 1)
        ph, pw = pair(c["padding"], where, "padding", 0)
        if 2 * ph > kernel[0] or 2 * pw > kernel[1]:
            raise ValueError(f"{where}: padding {(ph, pw)} must be at most half the kernel "
                             f"{kernel} (as torch)")
        dilation = pair(c.get("dilation", 1), where, "dilation", 1)
        self.windows = Windows(in_shape[1:], kernel, stride, dilation, (ph, ph, pw, pw), where,
                               ceil_mode=_flag(where, "ceil_mode", c["ceil_mode"]))
        if not self.windows.valid.any(axis=0).all():
            # Only a dilated kernel on a small input can do this (torch returns −inf there,
            # with indices outside the input).
            raise ValueError(f"{where}: a window reads only padding (kernel {kernel}, dilation "
                             f"{dilation}, padding {(ph, pw)} on {tuple(in_shape[1:])})")
        return (in_shape[0],) + self.windows.out_hw


class MaxPool2d(_Pool2d):
    type = "maxpool2d"
    defaults = {**_Pool2d.defaults, "dilation": 1}

    def output_shape(self, in_shape):
        out = super().output_shape(in_shape)
        self.groups = window_groups(self.windows.valid)
        return out

    def forward(self, bk, params, x, state=None):
        """y (N, C, OH, OW) and the cache: the argmax (N, C, L), each window's first maximum as
        a kernel offset — or None on a forward-only stacked batch (``state.groups > 1``, the
        FD sweep's perturbed copies), where no backward and no kink signature reads it:
        forming it took half the layer's time in the small CNN's sweep (measured). There,
        windows inside the input are not gathered either (``_max_of_views``)."""
        n, c = x.shape[:2]
        win = self.windows
        forward_only = state is not None and state.groups > 1
        if forward_only and isinstance(win, Windows) and win.valid.all() and win.K > 1:
            return self._max_of_views(bk, x), None
        if win.valid.all():                             # no window reaches padding: im2col
            windows = win.gather(bk, x)                                   # (N, C, K, L)
            y = bk.max(windows, axis=2)
            argmax = None if forward_only else bk.argmax(windows, axis=2)
            return y.reshape((n,) + self.out_shape), argmax
        # Each group of windows with the same offsets inside the input takes its max over
        # exactly those, the clipped window torch's kernel scans: padding is never compared
        # (no −inf fill, which the interval backend could not order).
        flat = x.reshape(n, c, win.in_hw[0] * win.in_hw[1])
        y, argmax = None, None if forward_only else np.zeros((n, c, win.L), dtype=np.int64)
        for offsets, outputs, slot, member in self.groups:
            values = flat.take(win.flat[np.ix_(offsets, outputs)], axis=2)  # (N, C, k_g, L_g)
            if argmax is not None:
                argmax[:, :, outputs] = offsets[bk.argmax(values, axis=2)]  # first maximum
            group_max = bk.max(values, axis=2).take(slot, axis=2)          # (N, C, L)
            y = group_max if y is None else bk.where(member, group_max, y)
        return y.reshape((n,) + self.out_shape), argmax

    def _max_of_views(self, bk, x):
        """y = max_k x[window(·, k)], for windows that never reach padding (so there is none:
        the first window starts at −top), as K − 1 ``bk.maximum``s of the strided views of x
        that kernel offset k = (i, j) reads, (N, C, OH, OW) each — rows i·dh + oh·sh, columns
        j·dw + ow·sw — instead of the (N, C, K, L) im2col copy and a max over its axis 2: the
        same values (a maximum rounds nothing; NaN propagates through both), 1.06x faster for
        the small CNN's whole FD sweep (measured). Forward only: the argmax is not formed."""
        win = self.windows
        (OH, OW), (kh, kw) = win.out_hw, win.kernel
        (sh, sw), (dh, dw) = win.stride, win.dilation
        y = None
        for i in range(kh):
            for j in range(kw):
                view = x[:, :, i * dh:i * dh + sh * (OH - 1) + 1:sh,
                         j * dw:j * dw + sw * (OW - 1) + 1:sw]
                y = view if y is None else bk.maximum(y, view)
        return y

    def backward(self, bk, params, dy, argmax):
        n, c = dy.shape[:2]
        win = self.windows
        chosen = np.arange(win.K)[None, None, :, None] == argmax[:, :, None, :]
        spread = bk.where(chosen, dy.reshape(n, c, 1, win.L), 0)     # (N, C, K, L)
        return win.scatter(bk, spread), {}

    def kink_signature(self, argmax):
        return (argmax,)


def padded_window_sizes(win):
    """kh·kw per output position, but a ceil-mode window that runs past the padded input counts
    only the part inside it: torch clips it at H + bottom, W + right, and counts the padding
    inside. (L,) integers."""
    (H, W), (_, OW), (kh, kw) = win.in_hw, win.out_hw, win.kernel
    (sh, sw), (top, bottom, left, right) = win.stride, win.padding
    oh, ow = np.divmod(np.arange(win.L), OW)
    h0, w0 = oh * sh - top, ow * sw - left
    return (np.minimum(h0 + kh, H + bottom) - h0) * (np.minimum(w0 + kw, W + right) - w0)


class AvgPool2d(_Pool2d):
    type = "avgpool2d"
    defaults = {**_Pool2d.defaults, "count_include_pad": True, "divisor_override": None}

    def output_shape(self, in_shape):
        out = super().output_shape(in_shape)
        where, override = self.where, self.config["divisor_override"]
        if not isinstance(self.config["count_include_pad"], bool):
            raise ValueError(f"{where}: count_include_pad must be true or false")
        if override is not None and (isinstance(override, bool) or not isinstance(
                override, (int, np.integer)) or override == 0):
            raise ValueError(f"{where}: divisor_override must be null or a nonzero integer (as "
                             f"torch), got {override!r}")
        self.divisor = self.divisors()
        return out

    def divisors(self):
        """D per output position (L,): integers, exact in every backend."""
        win, override = self.windows, self.config["divisor_override"]
        if override is not None:
            return np.full(win.L, int(override))
        if self.config["count_include_pad"]:
            return padded_window_sizes(win)
        return win.valid.sum(axis=0)

    def forward(self, bk, params, x, state=None):
        windows = self.windows.gather(bk, x)
        y = bk.sum(windows, axis=2) / bk.asarray(self.divisor.astype(np.float64))
        return y.reshape((x.shape[0],) + self.out_shape), None

    def backward(self, bk, params, dy, cache):
        n, c = dy.shape[:2]
        win = self.windows
        share = dy.reshape(n, c, 1, win.L) / bk.asarray(self.divisor.astype(np.float64))
        spread = bk.where(np.ones((1, 1, win.K, 1), dtype=bool), share, 0)   # broadcast over K
        return win.scatter(bk, spread), {}


class GlobalAvgPool(Layer):
    type = "global_avgpool"

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ValueError(f"{self.where}: expects input (N, C, H, W), got a sample shape of "
                             f"{tuple(in_shape)}")
        return (in_shape[0], 1, 1)

    def forward(self, bk, params, x, state=None):
        count = x.shape[2] * x.shape[3]
        return bk.sum(x, axis=(2, 3), keepdims=True) / count, x.shape

    def backward(self, bk, params, dy, shape):
        count = shape[2] * shape[3]
        return bk.where(np.ones(shape, dtype=bool), dy / count, 0), {}


def _adaptive_output(layer, in_shape):
    """(OH, OW) from ``output_size``: an int, or a pair whose null entries keep the input size."""
    where, size = layer.where, layer.config["output_size"]
    if len(in_shape) != 3:
        raise ValueError(f"{where}: expects input (N, C, H, W), got a sample shape of "
                         f"{tuple(in_shape)}")
    if size is None:
        raise ValueError(f"{where}: needs 'output_size'")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        size = [in_shape[1 + axis] if s is None else s for axis, s in enumerate(size)]
    return pair(size, where, "output_size", 1)


class AdaptiveMaxPool2d(MaxPool2d):
    type = "adaptive_maxpool2d"
    defaults = {"output_size": None}

    def output_shape(self, in_shape):
        self.windows = AdaptiveWindows(in_shape[1:], _adaptive_output(self, in_shape))
        self.groups = window_groups(self.windows.valid)
        return (in_shape[0],) + self.windows.out_hw


class AdaptiveAvgPool2d(AvgPool2d):
    type = "adaptive_avgpool2d"
    defaults = {"output_size": None}

    def output_shape(self, in_shape):
        self.windows = AdaptiveWindows(in_shape[1:], _adaptive_output(self, in_shape))
        self.divisor = self.divisors()
        return (in_shape[0],) + self.windows.out_hw

    def divisors(self):
        return self.windows.count                          # each window's own size

    def torch_backward(self, bk, dy, cache):
        """dx as torch's CUDA kernel forms it (``AdaptiveAveragePooling.cu``,
        ``atomic_adaptive_average_gradinput``, the NCHW path): each window's share
        ``dy / kW / kH`` — two divisions in the gradient's own type — added into the zeroed dx
        one share at a time (``gpuAtomicAdd`` on the stored type). The fp16/bf16 emulation runs
        it in the storage format's arithmetic, so each division and each addition rounds; the
        shares of one position are added in the order of ``AdaptiveWindows.scatter`` (the
        GPU's atomics add in an order no source fixes: with two shares the order cannot
        matter, with three or more it can). Output 1×1 is torch's ``mean((-1, -2))``
        instead (``AdaptiveAveragePooling.cpp``): one division by H·W."""
        win = self.windows
        n, c = dy.shape[:2]
        if win.out_hw == (1, 1):
            return self.backward(bk, {}, dy, cache)[0]
        (H, W), (OH, OW) = win.in_hw, win.out_hw
        h0, h1 = adaptive_bounds(H, OH)
        w0, w1 = adaptive_bounds(W, OW)
        oh, ow = np.divmod(np.arange(win.L), OW)
        k_h = bk.asarray((h1 - h0)[oh].astype(np.float64))
        k_w = bk.asarray((w1 - w0)[ow].astype(np.float64))
        share = dy.reshape(n, c, 1, win.L) / k_w / k_h
        spread = bk.where(np.ones((1, 1, win.K, 1), dtype=bool), share, 0)
        return win.scatter(bk, spread)
