"""fp16/bf16 emulation: run a model as PyTorch on an NVIDIA GPU runs it in half precision.

The model and its layers are unchanged. A precision policy (:class:`Precision`) chooses

- ``storage``: the format tensors are stored in between kernels — ``fp16``, ``bf16``,
  ``fp8_e5m2``, ``fp8_e4m3fn`` — or ``float32``/``float64``, which run the plain backends;
- ``policy``: ``"autocast"`` (``torch.autocast``: parameters stay float32 *master weights*; dense,
  conv and prelu cast their input and parameters to the storage format and return it; softplus
  and layernorm compute and return float32; every other layer returns its input's format; the
  loss is float32) or ``"half"`` (``model.half()``: parameters, buffers, input and every
  activation in the storage format, the loss too);
- ``accumulate``: ``"float32"`` (tensor cores: each kernel computes in float32 from its
  storage-format operands — products, sums, statistics — and rounds its result once) or
  ``"storage"`` (every operation, each product and each partial sum, rounded to the storage
  format, no fused multiply-add: what hardware avoids, and why);
- ``derivatives``: ``"torch"`` (sigmoid' and tanh' as torch's ``sigmoid_backward`` and
  ``tanh_backward`` compute them on the GPU: dy·(1 − s)·s and dy·(1 − t·t) from the *stored*
  output, in the storage type's own arithmetic, a rounding after every operation; σ'(10) is 0
  in fp16 because s rounds to 1) or ``"accurate"`` (refnet's forms, from the input, in float32,
  rounded once);
- ``loss_dtype``: ``"policy"`` (the loss as the policy computes it: autocast's float32
  cross-entropy; under half the loss in the storage format, log-softmax's output stored there)
  or ``"float32"`` (``loss_fn(output.float(), y)``: the loss and its backward in float32, the
  logits gradient rounded once to the output's format by the cast's backward — the GradScaler
  pattern on a ``model.half()`` net).

Where rounding happens (the kernel audit in ``spec/precision.md``, read from ATen's CUDA sources;
measured on an H100, ``shared/PRECISION.md``): **a leaf layer is one kernel.** It reads
storage-format values, computes in float32 (ATen's ``opmath_t``), and its output is rounded once
to its output format; the same for its backward (dx rounded once; parameter gradients rounded to
the format the parameter had inside the kernel: the storage format for cast or half parameters,
float32 for batchnorm/layernorm's float32 master weights under autocast). The exceptions are the
kernels ATen writes in the storage type itself (``scalar_t`` arithmetic on ``c10::Half`` or
``c10::BFloat16``, whose every operator computes in float and converts back): sigmoid's and
tanh's backward (``backward_from_output``), PReLU's kernels and avg-pool's backward
(``SCALAR_T_KERNELS``) run in :class:`StorageTypeKernel`, a rounding after every elementwise
operation, reductions in float32; adaptive avg-pool's backward, which adds into a tensor of the
storage type (``STORED_ACCUMULATION_KERNELS``), runs its ``torch_backward`` in the storage
format's arithmetic, every addition rounded; under half the losses mse, l1, smooth_l1, huber and
bce_with_logits run ATen's own expressions one operation at a time (:func:`_torch_half_loss`).
Containers (sequential, residual) are not kernels: the residual's ``s + scale·f`` runs as
elementwise operations on storage-format tensors, each rounded once, as torch's elementwise
kernels do. A leaf layer that torch composes from elementwise kernels (``composite``: softsign,
torch's ``input / (input.abs() + 1)``) runs the same way, each operation rounded once to the
storage format, and its backward as autograd composes it (``torch_backward``, with
``derivatives="torch"``).

A storage-format tensor is held as a float32 array tagged with its format (:class:`StoredArray`):
every fp16/bf16/fp8 value is a float32 value, so kernels compute on it without conversion, and
the tag carries autocast's dtype rules from layer to layer. Every rounding is once, to nearest
even, subnormals kept: float64 → format directly (never via float32, which would round twice;
``refnet.numerics.formats``), float32 → format by :func:`round_float32`.

Loss scaling multiplies the loss by S (float32 under autocast or with ``loss_dtype="float32"``,
the storage format under half, where S = 2¹⁶ is itself inf) and so the upstream gradient of the
loss; the cross-entropy backward then runs torch's composition (log-softmax's backward
g − exp(log p)·Σg of nll's upstream −S/N): under autocast that upstream is held in the logits'
format, so an overflowing S/N gives +inf off the label and NaN on it, as measured on the GPU;
with a float32 loss it is float32 and only the final cast overflows (−inf on the label, finite
elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..layers.activations import stable_sigmoid
from ..layers.base import ForwardState
from ..layers.sequential import Container
from ..losses import SoftmaxCrossEntropy, split_targets
from ..numerics.backend import FLOAT32, FLOAT64, NumpyBackend, float_constant
from ..numerics.formats import round_to

STORAGES = ("fp16", "bf16", "fp8_e5m2", "fp8_e4m3fn", "float32", "float64")
POLICIES = ("autocast", "half")
ACCUMULATIONS = ("float32", "storage")
DERIVATIVES = ("torch", "accurate")
LOSS_DTYPES = ("policy", "float32")


@dataclass(frozen=True)
class Precision:
    storage: str = "fp16"
    policy: str = "autocast"
    accumulate: str = "float32"
    derivatives: str = "torch"
    loss_dtype: str = "policy"

    def __post_init__(self):
        for key, allowed in (("storage", STORAGES), ("policy", POLICIES),
                             ("accumulate", ACCUMULATIONS), ("derivatives", DERIVATIVES),
                             ("loss_dtype", LOSS_DTYPES)):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"precision: unknown {key} {value!r}; expected one of "
                                 f"{list(allowed)}")

    @property
    def emulated(self) -> bool:
        """False for float32/float64: those run the plain numpy backend, adding nothing."""
        return self.storage not in ("float32", "float64")

    def __str__(self):
        if not self.emulated:
            return self.storage
        extra = "" if self.accumulate == "float32" else ", storage accumulation"
        extra += "" if self.loss_dtype == "policy" else ", float32 loss"
        return f"{self.storage} ({self.policy}{extra})"

    @property
    def loss_format(self) -> str:
        """The format the loss is computed and held in: float32 (autocast's float32 list, or
        an explicit ``.float()``), or the storage format (``model.half()``'s own loss)."""
        if self.loss_dtype == "float32" or self.policy == "autocast":
            return "float32"
        return self.storage


# --- storage-format values, held in float32 ---------------------------------------------------
# Every fp16/bf16/fp8 value is a float32 value, so a tensor in a storage format is held as a
# float32 array tagged with its format: the layers compute on it directly, with no conversion.
# (numpy's float32 → float16 cast costs 25 ns per element once values turn subnormal — the very
# values this module is about — and half that back; the rounding below is value-independent.)

DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp8_e5m2": "float8_e5m2",
               "fp8_e4m3fn": "float8_e4m3fn", "float32": "float32", "float64": "float64"}
_FP16_OVERFLOW = np.float32(65520.0)       # |x| ≥ 65520 rounds to inf (65520 is a tie → 2¹⁶)


def round_float32(x, fmt: str) -> np.ndarray:
    """float32 ``x`` rounded once, to nearest even, to ``fmt``'s values; returned as float32.

    fp16: with q the fp16 spacing at |x| (2^(e − 10), at least 2⁻²⁴) and M = 1.5·2²³·q, the
    float32 sum x + M is rounded by the hardware to a multiple of q, ties to even (M/q is even),
    and (x + M) − M is exact. bf16: the same on the bit pattern (add 0x7FFF plus the parity of
    bit 16, clear the low 16 bits; a carry into the exponent is the correct rounding up, inf
    included). Both are checked against ``refnet.numerics.formats.round_to`` in the tests."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:                        # 0-d arithmetic returns scalars: work on a 1-vector
        return round_float32(x.reshape(1), fmt).reshape(())
    with np.errstate(all="ignore"):
        if fmt == "fp16":
            # 2^e, x's exponent alone (0 for ±0 and subnormals, inf for inf and NaN), then
            # M = 1.5·2²³·max(2^e·2⁻¹⁰, 2⁻²⁴) = max(2^e·12288, 0.75): every product exact, so
            # one multiply for the two. Its largest element says whether any |x| ≥ 2¹⁵ (the
            # only values that may overflow) or inf or NaN is present at all: one reduction
            # instead of a mask of the whole array, in the common case where none is (the
            # fp16-autocast MLP's step 1.17x faster: the median of 7 interleaved pairs).
            m = (x.view(np.uint32) & np.uint32(0x7F800000)).view(np.float32)
            large = m.size > 0 and not (m.max() < np.float32(2.0 ** 15))    # (empty: no max)
            np.multiply(m, np.float32(12288.0), out=m)
            np.maximum(m, np.float32(0.75), out=m)
            r = x + m
            r -= m
            np.copysign(r, x, out=r)           # −0 and negatives that round to 0 keep the sign
            if large:
                over = ~(np.abs(x) < _FP16_OVERFLOW)               # also true for NaN
                r[over] = np.where(np.isnan(x[over]), x[over],
                                   np.copysign(np.float32(np.inf), x[over]))
            return r
        if fmt == "bf16":
            bits = x.view(np.uint32)
            r = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
                 & np.uint32(0xFFFF0000)).view(np.float32)
            nan = np.isnan(x)
            if nan.any():
                r[nan] = x[nan]
            return r
        return round_to(x.astype(np.float64), fmt).astype(np.float32)


class StoredArray(np.ndarray):
    """A float32 array whose values belong to the storage format ``fmt`` (``"fp16"``, ...).

    Arithmetic on it behaves as torch's elementwise kernels on half tensors: each numpy ufunc
    computes in float32 and rounds its result once to the result's format — the storage format,
    unless a float32 array takes part (then float32, as torch promotes half + float). Python
    scalars do not promote. ``np.matmul``/``sum`` likewise: float32 accumulation, one rounding."""

    def __new__(cls, values, fmt: str):
        obj = np.asarray(values, dtype=np.float32).view(cls)
        obj.fmt = fmt
        return obj

    def __array_finalize__(self, obj):
        self.fmt = getattr(obj, "fmt", None)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = tuple(plain(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*(plain(a) for a in inputs), **kwargs)
        if not isinstance(result, (np.ndarray, np.floating)) or np.asarray(result).dtype.kind != "f":
            return result
        fmts = {a.fmt for a in inputs if isinstance(a, StoredArray)}
        widened = any(isinstance(a, np.ndarray) and not isinstance(a, StoredArray)
                      and a.dtype.kind == "f" for a in inputs)
        if widened or len(fmts) != 1:
            return np.asarray(result, dtype=np.float32)
        fmt = fmts.pop()
        return StoredArray(round_float32(result, fmt), fmt)


def plain(a):
    """The float32 (or other) values of ``a`` as a plain ndarray (a view: no copy)."""
    return a.view(np.ndarray) if isinstance(a, StoredArray) else a


def format_of(a) -> str:
    """``"fp16"``/``"bf16"``/... for a StoredArray, else the dtype's name (float32, float64)."""
    return a.fmt if isinstance(a, StoredArray) else np.asarray(a).dtype.name


def dtype_name(a) -> str:
    """The torch-style dtype name of the values: float16, bfloat16, float32, ..."""
    return DTYPE_NAMES.get(format_of(a), format_of(a))


def store(a, fmt: str):
    """``a`` rounded once to ``fmt``: a StoredArray, or a plain float32/float64 array.

    float64 input is rounded directly (``refnet.numerics.formats.round_to``), never through float32,
    which would round twice; values already in ``fmt`` (or a narrower format when ``fmt`` is
    float32) pass unchanged."""
    if fmt in ("float32", "float64"):
        return np.asarray(plain(a), dtype=fmt)
    if isinstance(a, StoredArray) and a.fmt == fmt:
        return a
    a = np.asarray(plain(a))
    if a.dtype == np.float64:
        return StoredArray(round_to(a, fmt), fmt)
    return StoredArray(round_float32(a, fmt), fmt)


def check_format(storage: str) -> str:
    """fp16 and bf16 are built in; the fp8 formats follow refnet.numerics.formats (slower, exact)."""
    if storage not in STORAGES:
        raise ValueError(f"precision: unknown storage {storage!r}; expected one of "
                         f"{list(STORAGES)}")
    return storage


class StorageArithmetic(NumpyBackend):
    """Every operation in the storage format, rounded once per operation; matmul and sum
    accumulate sequentially with the partial sum rounded after each product is added (each
    product rounded too: no fused multiply-add). ``accumulate="storage"``."""

    def __init__(self, fmt: str):
        self.fmt = check_format(fmt)
        self.dtype = np.dtype(np.float32)
        self.name = f"{fmt} arithmetic"
        self._erf = np.vectorize(math.erf, otypes=[np.float64])
        self._erfc = np.vectorize(math.erfc, otypes=[np.float64])

    def asarray(self, a):
        return store(a, self.fmt)

    def const(self, value):
        return self.asarray(np.float64(float_constant(value)))

    def zeros(self, shape):
        return StoredArray(np.zeros(shape, dtype=np.float32), self.fmt)

    def erf(self, x):
        return store(self._erf(plain(x)), self.fmt)

    def erfc(self, x):
        return store(self._erfc(plain(x)), self.fmt)

    def maximum(self, a, b):
        return self.asarray(np.maximum(a, b))

    def minimum(self, a, b):
        return self.asarray(np.minimum(a, b))

    def where(self, cond, a, b):
        return self.asarray(np.where(plain(cond), plain(self.asarray(a)), plain(self.asarray(b))))

    def matmul(self, a, b):
        a, b = plain(self.asarray(a)), plain(self.asarray(b))
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        acc = StoredArray(np.zeros(shape, dtype=np.float32), self.fmt)
        for k in range(a.shape[-1]):
            acc = acc + (StoredArray(a[..., :, k:k + 1], self.fmt)
                         * StoredArray(b[..., k:k + 1, :], self.fmt))
        return acc

    def sum(self, a, axis=None, keepdims=False):
        a = plain(self.asarray(a))
        axes = tuple(range(a.ndim)) if axis is None else (
            (axis,) if isinstance(axis, int) else tuple(axis))
        axes = tuple(ax % a.ndim for ax in axes)
        rest = [ax for ax in range(a.ndim) if ax not in axes]
        moved = np.transpose(a, list(axes) + rest).reshape((-1,) + tuple(a.shape[ax] for ax in rest))
        acc = StoredArray(np.zeros(moved.shape[1:], dtype=np.float32), self.fmt)
        for row in moved:
            acc = acc + StoredArray(row, self.fmt)
        if keepdims:
            acc = acc.reshape(tuple(1 if ax in axes else a.shape[ax] for ax in range(a.ndim)))
        return acc


class StorageTypeKernel(StorageArithmetic):
    """An ATen kernel written in the storage type's own arithmetic (``scalar_t`` on ``c10::Half``
    or ``c10::BFloat16``, whose operators compute in float and convert back): every elementwise
    operation rounds to ``fmt`` — the order of the operations is the kernel's — while a
    reduction (autograd's sum of a broadcast gradient, a GEMM) accumulates in float32 and rounds
    once, as torch's reduction kernels do. (A float32 result rounded to fp16 or bf16 is the
    correctly rounded one for + − × ÷: float32 has more than twice their precision plus two.)"""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self.name = f"{fmt} scalar_t kernel"

    def matmul(self, a, b):
        return self.asarray(np.matmul(np.asarray(plain(a), dtype=np.float32),
                                      np.asarray(plain(b), dtype=np.float32)))

    def sum(self, a, axis=None, keepdims=False):
        return self.asarray(np.sum(np.asarray(plain(a), dtype=np.float32), axis=axis,
                                   keepdims=keepdims, dtype=np.float32))


# The layers whose CUDA kernels ATen writes in scalar_t arithmetic (the rest compute in opmath_t,
# float32, and round once), with the directions that do so: spec/precision.md's audit gives the
# source of each. Sigmoid's and tanh's backward are two more such kernels: the layers'
# backward_from_output, run so with derivatives="torch".
SCALAR_T_KERNELS = {
    # ActivationPreluKernel.cu: weight * input; grad_input = weight * grad, and the weight
    # gradient's elements input * grad, each rounded before autograd sums them (in float).
    "prelu": ("forward", "backward"),
    # AveragePool2d.cu backward: gradient += top_diff / divide_factor — scalar_t / int is
    # scalar_t, so each window's share rounds before the float sum (the forward sums in float
    # and divides once: opmath).
    "avgpool2d": ("backward",),
}


# The kernels that accumulate into a tensor of the storage type itself (so every addition
# rounds, not only every elementwise operation), run by the layer's ``torch_backward`` in the
# storage format's arithmetic (StorageArithmetic: sums sequential, each addition rounded).
STORED_ACCUMULATION_KERNELS = {
    # AdaptiveAveragePooling.cu, atomic_adaptive_average_gradinput: T grad_delta =
    # gradOutput / kW / kH (Half / int is a Half: two roundings), then gpuAtomicAdd into the
    # Half gradient: a rounding per share where windows overlap.
    "adaptive_avgpool2d": ("backward",),
}


class StepKernel:
    """A recurrent layer's kernel: float32 arithmetic (or, with ``accumulate="storage"``, the
    storage format's), and at every step boundary (``store_step``, called by the layer for h_t,
    c_t, ∂L/∂h_t, ∂L/∂c_t and the gate gradients) the value stored in the kernel's format and
    recorded in the trace — cuDNN keeps the states and the gate gradients in its data type
    between steps (a model, not yet checked against hardware: spec/precision.md)."""

    def __init__(self, fmt: str, accumulate: str, layer, trace: "Trace"):
        self.arithmetic = FLOAT32 if accumulate == "float32" else StorageArithmetic(fmt)
        self.dtype, self.name = self.arithmetic.dtype, f"{fmt} recurrent kernel"
        self.step_format, self.layer, self.trace = fmt, layer, trace

    def __getattr__(self, name):          # every operation: the arithmetic's
        if name == "arithmetic":
            raise AttributeError(name)
        return getattr(self.arithmetic, name)

    def asarray(self, a):
        return self.arithmetic.asarray(a)

    def store_step(self, a, kind, k, t):
        stored = store(a, self.step_format)
        self.trace.steps.append((self.layer.name, self.layer.type, kind, k, t, stored))
        return self.asarray(plain(stored))


@dataclass
class Trace:
    """What a low-precision pass stored, in order: forward outputs (``state.outputs``) and, per
    leaf layer, the input gradient its backward produced; per recurrent layer, every per-step
    value its kernel stored (``steps``: see :class:`StepKernel`)."""
    backward: List[tuple] = field(default_factory=list)    # (layer name, layer type, dx)
    steps: List[tuple] = field(default_factory=list)   # (layer name, type, kind, k, t, value)


class EmulatedBackend:
    """Runs each leaf layer as one GPU kernel under a :class:`Precision` (see the module doc).

    Only containers see this object as their backend; leaf layers run in ``self.compute``
    (float32, or the storage format's own arithmetic with ``accumulate="storage"``)."""

    def __init__(self, precision: Precision, trace: Optional[Trace] = None):
        if not precision.emulated:
            raise ValueError(f"precision: {precision.storage} runs the plain numpy backend, "
                             f"not the emulation")
        self.precision = precision
        self.storage = precision.storage
        self.compute = (FLOAT32 if precision.accumulate == "float32"
                        else StorageArithmetic(self.storage))
        self.name = f"emulated {precision}"
        self.trace = Trace() if trace is None else trace

    def __repr__(self):
        return f"<refnet backend {self.name}>"

    # the format rules --------------------------------------------------------------------
    def _casts_params(self, layer) -> bool:
        """Does the kernel see its parameters in the storage format? (Under half they are.)"""
        return self.precision.policy == "half" or layer.autocast == "lowp"

    def _lowp_format(self, layer):
        """The format a lowp kernel's input and parameters are cast to: the storage format, or
        under autocast the one torch hardcodes for the layer (``layer.autocast_format``: cuDNN's
        RNNs are cast to fp16 whatever autocast's dtype, ATen's AutocastRNN.cpp)."""
        if self.precision.policy == "autocast":
            return getattr(layer, "autocast_format", None) or self.storage
        return self.storage

    def _output_format(self, layer, in_fmt):
        if self.precision.policy == "autocast":
            if layer.autocast == "lowp":
                return self._lowp_format(layer)
            if layer.autocast == "float32":
                return "float32"
        return in_fmt

    def _input_format(self, layer, in_fmt):
        """The format the kernel reads its input in (autocast casts a float32 input down)."""
        if self.precision.policy == "autocast" and layer.autocast == "lowp":
            return self._lowp_format(layer)
        return in_fmt

    def _compute_view(self, a, compute=None):
        """What the kernel computes on: plain float32 values (or storage-format arithmetic)."""
        compute = self.compute if compute is None else compute
        compute = getattr(compute, "arithmetic", compute)      # a StepKernel's arithmetic
        if isinstance(compute, StorageArithmetic):
            return compute.asarray(a)
        return np.asarray(plain(a), dtype=np.float32)

    def _kernel(self, layer, fmt):
        """The backend a leaf layer computes in: ``self.compute`` (one kernel), except for a
        layer torch builds from elementwise kernels (``layer.composite``: softsign is abs, add
        and div) reading a storage-format input — then each of its operations rounds once to
        that format (as each of torch's kernels does: float opmath, one rounding) — and for a
        layer whose kernels ATen writes in scalar_t (``SCALAR_T_KERNELS``)."""
        if getattr(layer, "composite", False) and fmt not in ("float32", "float64"):
            return StorageArithmetic(fmt)
        if getattr(layer, "stores_steps", False):      # a recurrent kernel (layers/recurrent.py)
            return StepKernel(fmt, self.precision.accumulate, layer, self.trace)
        if "forward" in SCALAR_T_KERNELS.get(layer.type, ()):
            return self._scalar_t(fmt)
        return self.compute

    def _scalar_t(self, fmt):
        """The arithmetic of an ATen kernel written in scalar_t on tensors of format ``fmt``:
        the storage type's, a rounding per operation (``StorageTypeKernel``); float32's own for
        float32 tensors; with ``accumulate="storage"`` every operation in the storage format."""
        if isinstance(self.compute, StorageArithmetic):
            return self.compute
        if fmt in ("float32", "float64"):
            return FLOAT32
        return StorageTypeKernel(fmt)

    # the hooks Sequential calls ----------------------------------------------------------
    def forward_layer(self, layer, params, x, state: ForwardState):
        if isinstance(layer, Container):
            return layer.forward(self, params, x, state)
        in_fmt = format_of(x)
        seen = {k: (store(v, self._lowp_format(layer)) if self._casts_params(layer) else v)
                for k, v in params.items()}
        compute = self._kernel(layer, self._input_format(layer, in_fmt))
        compute_params = {k: self._compute_view(v, compute) for k, v in seen.items()}
        x_read = store(x, self._input_format(layer, in_fmt))
        with np.errstate(all="ignore"):
            y, cache = layer.forward(compute, compute_params, self._compute_view(x_read, compute),
                                     state)
            y = store(y, self._output_format(layer, in_fmt))
            for name in list(state.updates):      # running statistics, stored as the buffer is
                local = name[len(layer.name) + 1:]
                if name.startswith(layer.name + ".") and local in params:
                    state.updates[name] = np.asarray(
                        plain(store(np.asarray(state.updates[name], dtype=np.float64),
                                    format_of(params[local]))), dtype=np.float64)
        return y, (cache, in_fmt, compute_params, seen, y, compute)

    def backward_layer(self, layer, params, dy, ecache):
        if isinstance(layer, Container):
            return layer.backward(self, params, dy, ecache)
        cache, in_fmt, compute_params, seen, y, compute = ecache
        with np.errstate(all="ignore"):
            from_output = getattr(layer, "backward_from_output", None)    # sigmoid, tanh
            torch_form = getattr(layer, "torch_backward", None)     # autograd's composition
            if self.precision.derivatives == "torch" and from_output is not None:
                # ATen's sigmoid_backward/tanh_backward: scalar_t arithmetic on the stored
                # output and the incoming gradient (both in the output's format).
                kernel = self._scalar_t(format_of(y))
                dx, grads = from_output(kernel, kernel.asarray(dy), kernel.asarray(y)), {}
            elif self.precision.derivatives == "torch" and torch_form is not None:
                kernel = compute
                if ("backward" in STORED_ACCUMULATION_KERNELS.get(layer.type, ())
                        and not isinstance(compute, StorageArithmetic)):
                    fmt = self._input_format(layer, in_fmt)
                    kernel = FLOAT32 if fmt in ("float32", "float64") else StorageArithmetic(fmt)
                dx, grads = torch_form(kernel, self._compute_view(dy, kernel), cache), {}
            elif "backward" in SCALAR_T_KERNELS.get(layer.type, ()):
                kernel = self._scalar_t(self._input_format(layer, in_fmt))
                dx, grads = layer.backward(kernel, {k: kernel.asarray(v) for k, v in
                                                    compute_params.items()},
                                           kernel.asarray(dy), cache)
            else:
                dx, grads = layer.backward(compute, compute_params,
                                           self._compute_view(dy, compute), cache)
            dx = store(store(dx, self._input_format(layer, in_fmt)), in_fmt)
            # In the format the kernel saw the parameter in (fp16 for a cast float32 master
            # weight: its .grad is float32 but holds fp16 values; unscaling makes it float32).
            grads = {k: store(g, format_of(seen[k])) for k, g in grads.items()}
        self.trace.backward.append((layer.name, layer.type, dx))
        return dx, grads


# ------------------------------------------------------------------------------------------
@dataclass
class LowPrecisionRun:
    """One forward and backward pass under a precision policy.

    ``loss``: the unscaled loss (float); ``scaled_grads``: parameter gradients of S·L as stored
    (storage format, or float32 for float32 master parameters); ``grads``: those unscaled, each
    multiplied in float32 by the float32 inverse scale as ``GradScaler.unscale_`` does;
    ``x_grad``: dL/dx unscaled likewise; ``outputs``: (layer name, type, stored output) in
    forward order; ``trace``: the input gradients of the backward pass, in backward order."""
    precision: Precision
    loss: float
    loss_scale: float
    scaled_grads: Dict[str, np.ndarray]
    grads: Dict[str, np.ndarray]
    x_grad: np.ndarray
    outputs: list
    trace: Trace
    params: Dict[str, np.ndarray]          # the parameters as the run holds them
    updates: Dict[str, np.ndarray]         # running statistics, stored as the buffers are
    loss_grad: object = None               # S·∂L/∂(network output), as stored
    x_grad_stored: object = None           # S·∂L/∂x, as stored

    def first_nonfinite(self) -> Optional[str]:
        """Where inf or NaN first appears: a forward output, the loss, then backward in order."""
        for name, kind, out in self.outputs:
            what = _nonfinite_kind(out)
            if what:
                return f"forward: layer {name} ({kind}) output holds {what}"
        if not math.isfinite(self.loss):
            return f"the loss ({self.loss})"
        what = _nonfinite_kind(self.loss_grad) if self.loss_grad is not None else ""
        if what:
            return f"backward: the loss gradient (w.r.t. the network output) holds {what}"
        for name, kind, dx in self.trace.backward:
            what = _nonfinite_kind(dx)
            if what:
                return f"backward: layer {name} ({kind}) input gradient holds {what}"
        for name, g in self.scaled_grads.items():
            what = _nonfinite_kind(g)
            if what:
                return f"backward: gradient of {name} holds {what}"
        return None


def _nonfinite_kind(a) -> str:
    a = np.asarray(a, dtype=np.float64)
    if np.all(np.isfinite(a)):
        return ""
    return "NaN" if np.any(np.isnan(a)) else "inf"


def check_loss_scale(scale) -> float:
    if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating))
            or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"loss scale: must be a positive finite number, got {scale!r}")
    return float(scale)


def cast_params(params: Dict[str, np.ndarray], precision: Precision) -> Dict[str, np.ndarray]:
    """The parameters and buffers as the policy holds them: float32 master copies under
    autocast, the storage format under half (``num_batches_tracked`` stays a count)."""
    if precision.policy == "autocast":
        return {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    return {k: (np.asarray(v) if k.endswith("num_batches_tracked") else store(v, precision.storage))
            for k, v in params.items()}


def run(model, precision: Precision, params, x, y, state: Optional[ForwardState] = None,
        loss_scale: float = 1.0, *, cast: bool = True) -> LowPrecisionRun:
    """Forward and backward of ``model`` under ``precision`` (params, x, y already prepared,
    float64). With ``cast=False`` the parameters are taken as given (a training loop passes its
    master or storage-format parameters)."""
    loss_scale = check_loss_scale(loss_scale)
    if precision.emulated and (model.l1 or model.l2):
        raise ValueError("precision: the fp16/bf16 emulation does not model the L1/L2 penalty "
                         "terms; diagnose the model without 'regularization'")
    state = model.default_state() if state is None else state
    state.outputs = [] if state.outputs is None else state.outputs
    if not precision.emulated:
        return _run_plain(model, precision, params, x, y, state, loss_scale)
    trace = Trace()
    bk = EmulatedBackend(precision, trace)
    held = cast_params(params, precision) if cast else params
    x_held = store(x, bk.storage if precision.policy == "half" else "float32")
    h, caches = model.net.forward(bk, held, x_held, state)
    with np.errstate(all="ignore"):
        loss, dh = _loss_and_gradient(model.loss, precision, h, y, loss_scale)
    dx, scaled = model.net.backward(bk, held, dh, caches)
    inv_scale = np.float32(1.0 / np.float64(np.float32(loss_scale)))   # GradScaler's inverse
    with np.errstate(all="ignore"):
        unscaled = {k: np.asarray(plain(g), dtype=np.float32) * inv_scale
                    for k, g in scaled.items()}
        x_grad = np.asarray(plain(dx), dtype=np.float32) * inv_scale
    order = list(model.param_shapes())
    return LowPrecisionRun(precision, float(loss), loss_scale, {k: scaled[k] for k in order},
                           {k: unscaled[k] for k in order}, x_grad, state.outputs, trace, held,
                           dict(state.updates), dh, dx)


def _loss_and_gradient(loss, precision: Precision, h, y, loss_scale):
    """(the loss in its format, S·∂L/∂h in the logits' format) as torch computes them.

    The loss reads the stored logits exactly in float32 and is held in ``precision.loss_format``
    (float32: autocast's float32 list, or an explicit ``.float()``; the storage format under
    half), and the upstream gradient S with it (S = 2¹⁶ is inf in fp16). Torch's half
    cross-entropy (``loss_dtype="policy"`` under half) is log_softmax, whose output is *stored* in
    the storage format, then nll_loss on that stored tensor: the loss is the mean of the stored
    log-probabilities at the labels, and log_softmax's backward exponentiates the stored values
    (``SoftMax.cu``: grad − exp(output)·Σgrad, in float). Under half, mse, l1, smooth_l1,
    huber and bce_with_logits run their ATen compositions in the storage type
    (:func:`_torch_half_loss`); nll, and every loss in float32, is computed in float32 and its
    gradient rounded once."""
    logits_fmt = format_of(h)
    loss_fmt = precision.loss_format
    loss32, cache = loss.forward(FLOAT32, FLOAT32.asarray(plain(h)), y)
    upstream = np.float32(plain(store(np.asarray(loss_scale, dtype=np.float64), loss_fmt)))
    if loss_fmt != "float32" and loss.type in TORCH_HALF_LOSSES:
        return _torch_half_loss(loss, loss_fmt, h, y, loss_scale)
    if not isinstance(loss, SoftmaxCrossEntropy):
        grad = loss.backward(FLOAT32, cache) * upstream
        return store(np.asarray(loss32, dtype=np.float32), loss_fmt), store(grad, logits_fmt)
    inner = cache[0]
    logp = inner.rows                                   # float32 log-probabilities
    if loss_fmt != "float32":                            # half: log_softmax's output stored
        logp = np.asarray(plain(store(logp, loss_fmt)), dtype=np.float32)
        if loss.is_plain(cache):                        # nll_loss of the stored tensor
            picked = logp[np.arange(inner.labels.size), inner.labels]
            loss32 = -np.sum(picked, dtype=np.float32) / np.float32(cache[1])
    # Where nll's gradient −S/N is held before log_softmax's backward: in the logits' format
    # under autocast's own loss (measured: an overflow there gives +inf off the label and NaN
    # on it), in the loss's format otherwise (float32 after an explicit .float()).
    nll_fmt = logits_fmt if (precision.policy == "autocast"
                             and precision.loss_dtype == "policy") else loss_fmt
    grad = _cross_entropy_backward(loss, cache, logp, upstream, nll_fmt)
    return store(np.asarray(loss32, dtype=np.float32), loss_fmt), store(grad, logits_fmt)


# The losses whose half kernels are modelled operation by operation (spec/precision.md, the
# audit): ATen's own mse/smooth_l1/huber kernels and their backward (BinaryMiscOpsKernels.cu,
# PointwiseOpsKernel.cu) compute in scalar_t; l1 (Loss.cpp: (input − target).abs()) and
# bce_with_logits (Loss.cpp; backward FunctionsManual.cpp) are compositions of elementwise
# kernels, each rounding once.
TORCH_HALF_LOSSES = ("mse", "l1", "smooth_l1", "huber", "bce_with_logits")


def _scalar_t(value, fmt):
    """A double option as ATen makes it a scalar_t (``Scalar::to<c10::Half>()``, ``scalar_t
    beta_val(beta)``): c10::Half and c10::BFloat16 are built from a float, so double → float →
    format, two roundings. 0-d, in ``fmt``."""
    return store(np.asarray(np.float32(value)), fmt)


def _times_reciprocal(a, n: int, fmt):
    """``a / n`` for an integer n as torch's CUDA division by a CPU scalar computes it
    (BinaryDivTrueKernel.cu: a · (1/n), the reciprocal in opmath float): one rounding."""
    inv = np.float32(1.0) / np.float32(n)
    return store(np.asarray(plain(a), dtype=np.float32) * inv, fmt)


def _reduce(ell, loss, u, fmt):
    """The loss value from the stored loss vector ℓ: Σ in float (``ReduceSumProdKernel.cu``),
    the mean as Σ·float(1/N) (``ReduceMomentKernel.cu``, MeanOps' factor), rounded once to
    ``fmt``; reduction "none": refnet's scalar Σ u·ℓ, likewise in float."""
    values = np.asarray(plain(ell), dtype=np.float32)
    if loss.reduction == "none":
        values = values * np.asarray(plain(u), dtype=np.float32)
    total = np.sum(values, dtype=np.float32)
    if loss.reduction == "mean":
        total = total * (np.float32(1.0) / np.float32(values.size))
    return store(np.asarray(total, dtype=np.float32), fmt)


def _torch_half_loss(loss, fmt, h, y, loss_scale):
    """(the loss in ``fmt``, S·∂L/∂h in ``fmt``) of a regression or BCE loss on a model.half()
    net, as ATen's CUDA kernels compute them: every operand a ``fmt`` tensor — the output h,
    the targets y and the upstream vector u (held as the input is: ``y.half()``), BCE's weight
    and pos_weight (buffers of the loss module, halved with it) — and every elementwise
    operation rounded to ``fmt``, in the kernel's order (a StoredArray rounds each ufunc's
    result once; spec/precision.md gives each expression's source file). The upstream
    gradient gO is S held in ``fmt`` (the scaled loss's backward), for reduction "none" S·u
    rounded once (the mul's backward). ``norm`` is the kernel's scalar_t 1/N (mean) or 1."""
    target, u = split_targets(y)
    a = store(plain(h), fmt)
    b = store(np.asarray(target, dtype=np.float64), fmt)
    n = a.size
    scale = store(np.asarray(float(loss_scale), dtype=np.float64), fmt)
    if loss.reduction == "none":
        u = store(np.asarray(u, dtype=np.float64), fmt)
        g_out = scale * u                               # mul's backward: S·u, one rounding
    else:
        g_out = StoredArray(np.broadcast_to(plain(scale), a.shape), fmt)   # gO expanded
    mean = loss.reduction == "mean"
    kind = loss.type
    if kind == "smooth_l1" and loss.beta == 0:
        kind = "l1"                                     # torch's smooth_l1 with β = 0 is l1_loss
    d = a - b                                           # input − target, rounded
    if kind == "mse":
        # mse_kernel_cuda: diff * diff; mse_backward_cuda_kernel: alpha * (a − b) * c with
        # alpha = scalar_t(2/N) (mean) or scalar_t(2): three roundings.
        ell = d * d
        dx = _scalar_t(2.0 / n if mean else 2.0, fmt) * d * g_out
    elif kind == "l1":
        # (input − target).abs(), then mean/sum; autograd: mean's backward gO·(1/N) (one
        # rounding, a float reciprocal), abs's grad·sgn(d) and sub's identity (exact).
        ell = np.abs(d)
        g = _times_reciprocal(g_out, n, fmt) if mean else g_out
        dx = g * store(np.sign(plain(d)), fmt)
    elif kind == "smooth_l1":
        # smooth_l1_kernel_cuda: z = |a − b|; z < β ? 0.5·z·z/β : z − 0.5·β (scalar_t);
        # SmoothL1BackwardFunctor: x < −β: −norm·gO; x > β: norm·gO; else norm·x·gO/β.
        beta = _scalar_t(loss.beta, fmt)
        z = np.abs(d)
        ell = store(np.where(plain(z) < plain(beta), plain(0.5 * z * z / beta),
                             plain(z - 0.5 * beta)), fmt)
        norm = _scalar_t(1.0 / n if mean else 1.0, fmt)
        dx = store(np.where(plain(d) < -plain(beta), plain(-norm * g_out),
                            np.where(plain(d) > plain(beta), plain(norm * g_out),
                                     plain(norm * d * g_out / beta))), fmt)
    elif kind == "huber":
        # huber_kernel_cuda: z < δ ? 0.5·z·z : δ·(z − 0.5·δ); HuberBackwardFunctor:
        # x < −δ: −norm·gO·δ; x > δ: norm·gO·δ; else norm·x·gO (scalar_t).
        delta = _scalar_t(loss.delta, fmt)
        z = np.abs(d)
        ell = store(np.where(plain(z) < plain(delta), plain(0.5 * z * z),
                             plain(delta * (z - 0.5 * delta))), fmt)
        norm = _scalar_t(1.0 / n if mean else 1.0, fmt)
        dx = store(np.where(plain(d) < -plain(delta), plain(-norm * g_out * delta),
                            np.where(plain(d) > plain(delta), plain(norm * g_out * delta),
                                     plain(norm * d * g_out))), fmt)
    else:
        dx, ell = _bce_with_logits_half(loss, fmt, a, b, g_out, mean)
    return _reduce(ell, loss, u, fmt), dx


def _bce_with_logits_half(loss, fmt, a, b, g_out, mean):
    """bce_with_logits on ``fmt`` tensors, each kernel rounding once (Loss.cpp; the backward
    binary_cross_entropy_with_logits_backward, FunctionsManual.cpp):
    forward   ℓ = (1 − y)·z − log_sigmoid(z)  [log_sigmoid(z)·((p − 1)·y + 1) with pos_weight p],
              ·w with a weight;
    backward  (σ(z) − y)·gO  [(((p·y + 1) − y)·σ(z) − p·y)·gO], ·w, then ·(1/N) for the mean.
    σ and log σ are one opmath kernel each (refnet's float32 forms, rounded once)."""
    z32 = np.asarray(plain(a), dtype=np.float32)
    with np.errstate(all="ignore"):
        s = store(stable_sigmoid(FLOAT32, z32)[0], fmt)
        log_sig = store(np.minimum(z32, np.float32(0))
                        - np.log1p(np.exp(-np.abs(z32))), fmt)
    pos = None if loss.pos_weight is None else store(loss.pos_weight, fmt)
    if pos is None:
        g = s - b
    else:
        t = pos * b
        g = (t + 1 - b) * s - t
        log_sig = log_sig * ((pos - 1) * b + 1)
    ell = (1 - b) * a - log_sig
    g = g * g_out
    if loss.weight is not None:
        w = store(loss.weight, fmt)
        ell, g = ell * w, g * w
    if mean:
        g = _times_reciprocal(g, g.size, fmt)
    return g, ell


def _cross_entropy_backward(loss, cache, logp, upstream, nll_fmt):
    """S·∂L/∂logits in float32, as torch composes cross-entropy's backward: nll_loss's gradient
    of the log-probabilities, −S/N on the label (−S·q·scale with class weights, label smoothing
    or probabilities: q the loss's per-class weights, scale 1/divisor or the upstream vector),
    held in ``nll_fmt``; then log_softmax's backward g − p·Σ_k g_k with p = exp(``logp``) (the
    log-probabilities as stored), in float32. For hard labels that is p·g − g on the label and
    p·g elsewhere (g = S/N), the same two roundings as torch's g − p·g."""
    inner, scale = cache
    p = np.exp(logp)
    if loss.is_plain(cache):
        onehot = np.zeros(logp.shape, dtype=bool)
        onehot[np.arange(logp.shape[0]), inner.labels] = True
        g = np.float32(plain(store(np.asarray([upstream / np.float32(scale)]), nll_fmt))[0])
        return loss._unrows(np.where(onehot, p * g - g, p * g), inner.shape)
    q = loss.logp_weights(cache).astype(np.float32)
    if loss.reduction == "none":                      # u (N, d…): one value per row
        g_logp = -q * (upstream * np.asarray(scale, dtype=np.float32).reshape(-1, 1))
    else:
        g_logp = -q * (upstream / np.asarray(scale, dtype=np.float32))
    g_logp = np.asarray(plain(store(g_logp, nll_fmt)), dtype=np.float32)
    return loss._unrows(g_logp - p * np.sum(g_logp, axis=1, keepdims=True, dtype=np.float32),
                        inner.shape)


def _run_plain(model, precision, params, x, y, state, loss_scale):
    """float64 or float32: the plain backend (bit for bit what ``loss_and_grads`` gives)."""
    bk = FLOAT64 if precision.storage == "float64" else FLOAT32
    with np.errstate(all="ignore"):
        g = model.loss_and_grads(bk, params, x, y, state)
        grads = {k: np.asarray(v) for k, v in g.params.items()}
        scaled = {k: v * bk.dtype.type(loss_scale) for k, v in grads.items()}   # reported only
    return LowPrecisionRun(precision, float(g.loss), loss_scale, scaled, grads, np.asarray(g.x),
                           state.outputs, Trace(), {k: bk.asarray(v) for k, v in params.items()},
                           dict(state.updates))
