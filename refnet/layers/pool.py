"""Pooling over (N, C, H, W), as torch's MaxPool2d, AvgPool2d and AdaptiveAvgPool2d(1).

maxpool2d    y[l] = max_k x[window(l, k)]   (padding counts as −inf)
             dx = col2im(dy at the argmax of each window, 0 elsewhere)
             Ties: the whole gradient goes to one element, the *first* maximum in row-major
             window order — what torch's CPU kernel does (it keeps a maximum unless a later
             element is strictly larger, or NaN). A tie is a kink: the verifier reports it.
avgpool2d    y[l] = Σ_k x[window(l, k)] / D,   D = kh·kw (count_include_pad, torch's default) or
             the number of non-padding positions
             dx = col2im(dy / D broadcast over the window)
global_avgpool  y[n, c, 0, 0] = Σ_{h,w} x / (H·W)   (torch AdaptiveAvgPool2d(1): output
             (N, C, 1, 1); follow it with flatten)
             dx = dy / (H·W) at every position

Config: ``kernel_size``, ``stride`` (default: kernel_size), ``padding`` (0; at most half the
kernel, as torch), and for avgpool2d ``count_include_pad`` (true).
"""

from __future__ import annotations

import numpy as np

from .base import Layer
from .windows import Windows, pair


class _Pool2d(Layer):
    defaults = {"kernel_size": None, "stride": None, "padding": 0}

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
        self.windows = Windows(in_shape[1:], kernel, stride, (1, 1), (ph, ph, pw, pw), where)
        return (in_shape[0],) + self.windows.out_hw


class MaxPool2d(_Pool2d):
    type = "maxpool2d"

    def forward(self, bk, params, x, state=None):
        windows = self.windows.gather(bk, x, fill=-np.inf)           # (N, C, K, L)
        argmax = bk.argmax(windows, axis=2)                           # first maximum, as torch
        y = bk.max(windows, axis=2)
        return y.reshape((x.shape[0],) + self.out_shape), argmax

    def backward(self, bk, params, dy, argmax):
        n, c = dy.shape[:2]
        win = self.windows
        chosen = np.arange(win.K)[None, None, :, None] == argmax[:, :, None, :]
        spread = bk.where(chosen, dy.reshape(n, c, 1, win.L), 0)     # (N, C, K, L)
        return win.scatter(bk, spread), {}

    def kink_signature(self, argmax):
        return (argmax,)


class AvgPool2d(_Pool2d):
    type = "avgpool2d"
    defaults = {**_Pool2d.defaults, "count_include_pad": True}

    def output_shape(self, in_shape):
        out = super().output_shape(in_shape)
        if not isinstance(self.config["count_include_pad"], bool):
            raise ValueError(f"{self.where}: count_include_pad must be true or false")
        win = self.windows
        # Divisor per output position (integers, exact in every backend).
        self.divisor = (np.full(win.L, win.K) if self.config["count_include_pad"]
                        else win.valid.sum(axis=0))
        return out

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
