"""2-D convolution in PyTorch layout (NCHW), as ``torch.nn.Conv2d`` (cross-correlation).

    x: (N, C, H, W)   weight: (O, C/G, kh, kw)   bias: (O,)   y: (N, O, OH, OW)

    forward:   y[n, o, oh, ow] = b[o] + Σ_{c in o's group, i, j} W[o, c, i, j] ·
                                 x[n, c, oh·sh + i·dh − top, ow·sw + j·dw − left]   (0 outside)
               written as im2col + GEMM per group g:  Y_g = W_g · cols_g
               with cols (N, G, C/G·kh·kw, OH·OW) the gathered windows and W_g (O/G, C/G·kh·kw)
    backward:  dW_g = Σ_n dY_g · cols_gᵀ          db = Σ_{n, oh, ow} dy
               dcols_g = W_gᵀ · dY_g,  dx = col2im(dcols)   (the adjoint of the gather)

Config (torch names): ``out_channels``, ``kernel_size``, ``stride`` (1), ``padding`` (0: an int,
a pair, "valid" = 0, or "same" = dilation·(k − 1) split as torch does, the odd one on the
bottom/right; stride 1 only), ``dilation`` (1), ``groups`` (1), ``bias`` (true), ``init`` and
``bias_init`` (torch_default: Conv2d's default init).
"""

from __future__ import annotations

from ..init import parse_init
from ..validate import require_number
from .base import WeightedLayer
from .windows import Windows, pair


def conv_padding(padding, kernel, dilation, stride, where):
    """(top, bottom, left, right) from torch's padding argument."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"{where}: padding 'same' needs stride 1 (as torch), got {stride}")
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = pair(padding, where, "padding", 0)
    return ph, ph, pw, pw


class Conv2d(WeightedLayer):
    type = "conv2d"
    autocast = "lowp"
    defaults = {"out_channels": None, "kernel_size": None, "stride": 1, "padding": 0,
                "dilation": 1, "groups": 1, "bias": True, "init": "torch_default",
                "bias_init": "torch_default"}

    def __init__(self, config, in_shape, where):
        for key in ("out_channels", "kernel_size"):
            if key not in config:
                raise ValueError(f"{where}: conv2d needs {key!r}")
        super().__init__(config, in_shape, where)
        parse_init(self.config["init"], f"{where} init")
        parse_init(self.config["bias_init"], f"{where} bias_init")
        if not isinstance(self.config["bias"], bool):
            raise ValueError(f"{where}: bias must be true or false, got {self.config['bias']!r}")

    def output_shape(self, in_shape):
        where, c = self.where, self.config
        if len(in_shape) != 3:
            raise ValueError(f"{where}: conv2d expects input (N, C, H, W), got a sample shape of "
                             f"{tuple(in_shape)}")
        self.in_channels = in_shape[0]
        self.out_channels = require_number(where, "out_channels", c["out_channels"], low=1,
                                           integer=True)
        self.groups = require_number(where, "groups", c["groups"], low=1, integer=True)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{where}: groups = {self.groups} must divide both in_channels "
                             f"({self.in_channels}) and out_channels ({self.out_channels})")
        self.kernel = pair(c["kernel_size"], where, "kernel_size", 1)
        stride = pair(c["stride"], where, "stride", 1)
        dilation = pair(c["dilation"], where, "dilation", 1)
        padding = conv_padding(c["padding"], self.kernel, dilation, stride, where)
        self.windows = Windows(in_shape[1:], self.kernel, stride, dilation, padding, where)
        return (self.out_channels,) + self.windows.out_hw

    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups) + self.kernel

    def _grouped_weight(self, w):
        g = self.groups
        return w.reshape(g, self.out_channels // g, -1)                 # (G, O/G, C/G·K)

    def forward(self, bk, params, x, state=None):
        n, g = x.shape[0], self.groups
        win = self.windows
        cols = win.gather(bk, x)                                         # (N, C, K, L)
        cols = cols.reshape(n, g, (self.in_channels // g) * win.K, win.L)
        y = bk.matmul(self._grouped_weight(params["weight"]), cols)      # (N, G, O/G, L)
        y = y.reshape((n,) + self.out_shape)
        if self.config["bias"]:
            y += params["bias"].reshape(1, -1, 1, 1)    # in place: y is the product's own array
        return y, cols

    def backward(self, bk, params, dy, cols):
        n, g = dy.shape[0], self.groups
        win = self.windows
        dy_g = dy.reshape(n, g, self.out_channels // g, win.L)          # (N, G, O/G, L)
        # dW_g = Σ_n dY_g,n cols_nᵀ: one GEMM per sample on transposed views, then the sum over
        # n — 4-5x faster than gathering all N·L positions into one GEMM, which first copied
        # cols (the largest array of the layer) into a transposed layout.
        per_sample = bk.matmul(dy_g, cols.transpose(0, 1, 3, 2))        # (N, G, O/G, C/G·K)
        grads = {"weight": bk.sum(per_sample, axis=0).reshape(self.param_shapes()["weight"])}
        if self.config["bias"]:
            grads["bias"] = bk.sum(dy, axis=(0, 2, 3))
        w_t = self._grouped_weight(params["weight"]).transpose(0, 2, 1)  # (G, C/G·K, O/G)
        # dx = col2im(dcols), dcols = W_gᵀ·dY_g (N, G, C/G·K, L): for float arrays made and
        # scattered a few samples at a time, never whole (Windows.scatter_product).
        dx = win.scatter_product(bk, w_t, dy_g)
        return dx, grads
