"""Bring your own model: a PyTorch module (or a program saved with ``torch.export.save``) as a
refnet model, its tensors under the module's own names. Needs torch (an optional extra); this
module imports it only inside its functions, so ``import refnet`` never does.

    model, params = refnet.from_torch(net, x, loss="softmax_cross_entropy")
    grads = model.loss_and_grads(refnet.FLOAT64, params, x.numpy(), y.numpy())
    grads.params["layer1.0.conv1.weight"]            # torch's names in, torch's names out

How (spec/model-format.md, "From PyTorch"): the module is captured as a graph with
``torch.export.export`` — whatever its ``forward`` does in Python, ``nn.Sequential`` (nested)
included — in its current mode, and the graph's ATen operators are read one by one into refnet
layers: ``linear`` → dense, ``conv2d`` → conv2d, ``batch_norm`` → batchnorm (train or eval, as
captured), ``relu``/``gelu``/... → the activation, ``add`` of two branches of one value →
residual (a scalar ``mul`` on one branch is its ``scale``), ``flatten``/``view`` to (N, -1) →
flatten, ``mean`` over H, W → global_avgpool (``OPS`` lists them all). Each layer's
``torch_name`` is the module path its tensors live under (``layer1.0.conv1``), so the model
answers to torch's names. The refnet model's float64 output is then compared with the module's
own (run in float64 on a copy) and must agree within twice refnet's error bound: a conversion
that changed the function stops there, never silently.

Refused, with the op, its module path and what is supported: an op refnet has no layer for, a
graph that is not a chain of residual blocks (a value used by two branches that do not meet at
one add), weights shared between two calls, parameters not named ``<module>.weight``/``.bias``
(a functional ``F.linear(x, self.w)``), modules in different modes, several inputs or outputs.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..io import read_input
from ..model import Model
from ..numerics.backend import FLOAT64
from ..numerics.errorbound import BOUND, LAMBDA

SUPPORTED_MODULES = ("nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d, nn.LayerNorm, nn.GroupNorm, "
                     "nn.InstanceNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, "
                     "nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, "
                     "every activation refnet has (module or functional), residual adds "
                     "(out + identity, a shortcut branch, a scalar scale on one branch), "
                     "nn.RNN/nn.LSTM/nn.GRU (batch_first, zero initial state; their output, "
                     "output[:, -1] or h_n[-1])")

# torch loss -> refnet loss type
LOSS_MODULES = {"MSELoss": "mse", "CrossEntropyLoss": "softmax_cross_entropy",
                "BCEWithLogitsLoss": "bce_with_logits"}
LOSS_FUNCTIONS = {"mse_loss": "mse", "cross_entropy": "softmax_cross_entropy",
                  "binary_cross_entropy_with_logits": "bce_with_logits"}
# A loss module's options that refnet's losses have no counterpart for, and their defaults.
LOSS_DEFAULT_OPTIONS = {"weight": None, "pos_weight": None, "label_smoothing": 0.0,
                        "ignore_index": -100}


class UnsupportedModel(ValueError):
    """A module refnet cannot import (a ValueError: the CLI reports it as bad input)."""


def _fail(message):
    raise UnsupportedModel(f"from_torch: {message}")


# --- the loss -------------------------------------------------------------------------------

def loss_spec(loss) -> dict:
    """A refnet loss spec from a name (``"mse"``), a spec dict, a torch loss module
    (``nn.CrossEntropyLoss(reduction="sum")``) or a torch loss function (``F.mse_loss``)."""
    if isinstance(loss, str):
        return {"type": loss}
    if isinstance(loss, dict):
        return dict(loss)
    name = type(loss).__name__
    if name in LOSS_MODULES:
        reduction = getattr(loss, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            _fail(f"loss {name}(reduction={reduction!r}): refnet reduces by 'mean' or 'sum'")
        for option, default in LOSS_DEFAULT_OPTIONS.items():
            value = getattr(loss, option, default)
            if value is not None and not (option == "ignore_index" or value == default):
                _fail(f"loss {name}({option}={value!r}): refnet's {LOSS_MODULES[name]} has no "
                      f"{option}")
        return {"type": LOSS_MODULES[name], "reduction": reduction}
    fname = getattr(loss, "__name__", None)
    if fname in LOSS_FUNCTIONS:
        return {"type": LOSS_FUNCTIONS[fname]}
    _fail(f"loss must be a refnet loss name ('mse', 'softmax_cross_entropy', 'bce_with_logits'),"
          f" a loss spec dict, or nn.MSELoss / nn.CrossEntropyLoss / nn.BCEWithLogitsLoss or "
          f"their functions; got {loss!r}")


# --- reading the graph ----------------------------------------------------------------------

def _key(node) -> str:
    """``relu.default``, ``add.Tensor``: the op's name with an in-place ``_`` dropped."""
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    if packet is None:
        return getattr(target, "__name__", str(target))
    name = packet.__name__
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    return f"{base}.{target._overloadname}"


def _bind(node) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f"{path or '<root>'} ({kind.rsplit('.', 1)[-1]})"


def _pair(v):
    """A torch int list as refnet's int or pair."""
    if isinstance(v, (list, tuple)):
        v = [int(a) for a in v]
        return v[0] if len(v) == 1 or v[0] == v[1] and len(v) == 2 else v
    return v


class _Graph:
    """An exported program's graph as refnet sees it: the tensors behind the placeholders, the
    data path (input to output), and the structure (chains, residual blocks) on it."""

    def __init__(self, program, state: Dict[str, object]):
        sig = program.graph_signature
        self.fqn = {}                                # placeholder name -> parameter/buffer FQN
        self.fqn.update(sig.inputs_to_parameters)
        self.fqn.update(sig.inputs_to_buffers)
        self.fqn.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}))
        self.state = state
        self.graph = program.graph
        nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(nodes)}
        users = [n for n in nodes if n.op == "placeholder" and n.name not in self.fqn]
        if len(users) != 1:
            _fail(f"the module must take one tensor input, the batch; found {len(users)} "
                  f"({[u.name for u in users]})")
        self.input = users[0]
        outputs = [n for n in nodes if n.op == "output"][0]
        user_outputs = list(sig.user_outputs)
        if len(user_outputs) != 1:
            _fail(f"the module must return one tensor; it returns {len(user_outputs)}")
        self.output = next(a for a in self._flat(outputs.args) if getattr(a, "name", None)
                           == user_outputs[0])
        self.data = self._data_path()
        self.done = set()                            # data nodes converted into layers
        self.consumed: Dict[str, str] = {}           # tensor FQN -> the op that uses it
        self.votes: Dict[str, List[str]] = {"train": [], "eval": []}

    @staticmethod
    def _flat(args):
        for a in args:
            if isinstance(a, (list, tuple)):
                yield from _Graph._flat(a)
            else:
                yield a

    def _data_path(self):
        """Nodes reachable from the input that reach the output."""
        forward, stack = set(), [self.input]
        while stack:
            n = stack.pop()
            if n in forward:
                continue
            forward.add(n)
            stack.extend(n.users)
        backward, stack = set(), [self.output]
        while stack:
            n = stack.pop()
            if n in backward or n not in forward:
                continue
            backward.add(n)
            stack.extend(a for a in n.all_input_nodes)
        data = forward & backward
        for n in forward - data:
            if n.op == "call_function" and not (_key(n) == "getitem" and not n.users):
                # (an unused getitem is the indices of adaptive_max_pool2d: dead, harmless)
                _fail(f"{_key(n)} at {_module_path(n)} uses the input but not for the output "
                      f"(a buffer written from the data, a second result?): refnet follows one "
                      f"path from input to output")
        return data

    def inputs_on_path(self, node):
        return [a for a in node.all_input_nodes if a in self.data]

    def tensor(self, arg, node, role):
        """The FQN of the parameter/buffer placeholder ``arg`` (None stays None)."""
        if arg is None:
            return None
        if getattr(arg, "op", None) != "placeholder" or arg.name not in self.fqn:
            _fail(f"{_key(node)} at {_module_path(node)}: its {role} is computed, not a "
                  f"parameter or buffer of the module")
        fqn = self.fqn[arg.name]
        if fqn in self.consumed:
            _fail(f"{fqn} is used by two ops ({self.consumed[fqn]} and {_key(node)} at "
                  f"{_module_path(node)}): refnet gives every layer its own tensors (no "
                  f"shared weights)")
        self.consumed[fqn] = f"{_key(node)} at {_module_path(node)}"
        return fqn

    def shape(self, node):
        val = node.meta.get("val")
        return tuple(int(s) for s in val.shape) if val is not None else None

    def vote(self, train: bool, node):
        self.votes["train" if train else "eval"].append(_module_path(node))

    def check_inplace(self, node):
        """An in-place op (relu_, add_) on a value that something later still reads would hand
        that reader the changed value: refused (refnet's layers are functions)."""
        name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
        if not name.endswith("_") or name.startswith("_") or not node.args:
            return
        target = node.args[0]
        later = [u for u in target.users if u is not node and self.order[u] > self.order[node]]
        if later:
            _fail(f"{_key(node)} at {_module_path(node)} changes its input in place, and "
                  f"{_key(later[0])} at {_module_path(later[0])} reads it afterwards")

    # --- structure ---------------------------------------------------------------------------
    def ancestors(self, node, memo):
        if node not in memo:
            out = {node}
            for a in self.inputs_on_path(node):
                out |= self.ancestors(a, memo)
            memo[node] = out
        return memo[node]

    def chain(self, value, start, memo) -> List[dict]:
        """The layers that map ``start``'s value to ``value``'s."""
        layers = []
        while value is not start:
            if value is self.input:
                _fail("the graph is not a chain of residual blocks (a branch reaches back past "
                      "the value it starts from)")
            if value in self.done:
                _fail(f"{_key(value)} at {_module_path(value)} feeds two branches that do not "
                      f"meet at one add: refnet's models are chains of residual blocks")
            self.done.add(value)
            self.check_inplace(value)
            if _key(value) in ("add.Tensor",) and len(self.inputs_on_path(value)) == 2:
                block, value = self.residual(value, memo)
                layers.append(block)
                continue
            recurrent = _recurrent(self, value)
            if recurrent is not None:              # nn.RNN/LSTM/GRU: output, its last step
                layer, value = recurrent
                layers.append(layer)
                continue
            if _key(value) == "getitem":           # adaptive_max_pool2d's values
                layers.append(_getitem(self, value, {}))
                source = value.args[0]
                self.done.add(source)
                value = self.inputs_on_path(source)[0]
                continue
            softsign = self.softsign(value)
            if softsign is not None:
                layers.append({"type": "softsign"})
                value = softsign
                continue
            layer, value = self.convert(value)
            if layer is not None:
                layers.append(layer)
        return layers[::-1]

    def residual(self, node, memo):
        """``a + alpha·b`` of two branches from one value h: refnet's y = S(h) + scale·F(h)."""
        args = _bind(node)
        a, b, alpha = args["self"], args["other"], args.get("alpha", 1)
        common = self.ancestors(a, memo) & self.ancestors(b, memo)
        h = max(common, key=lambda n: self.order[n])
        # The body is the branch with a scalar scale, or a, unless a is h itself (x + f(x)).
        if a is h or (alpha != 1 and b is not h):
            body, short, scale = b, a, alpha
        else:
            body, short, scale = a, b, 1
            if alpha != 1:
                _fail(f"add at {_module_path(node)} scales the identity branch (alpha "
                      f"{alpha}): refnet's residual scales the body")
        if body is h:
            _fail(f"add at {_module_path(node)} adds a value to itself: no residual body")
        if _key(body) == "mul.Tensor" and len(body.users) == 1:
            margs = _bind(body)
            factor = [v for v in (margs["self"], margs["other"]) if isinstance(v, (int, float))]
            inner = [v for v in (margs["self"], margs["other"]) if v is not None and
                     not isinstance(v, (int, float))]
            if factor and len(inner) == 1:
                self.done.add(body)
                scale, body = scale * float(factor[0]), inner[0]
        block = {"type": "residual", "body": self.chain(body, h, memo)}
        if not block["body"]:
            _fail(f"add at {_module_path(node)}: its body branch has no layer")
        if short is not h:
            block["shortcut"] = self.chain(short, h, memo)
        if scale != 1:
            block["scale"] = scale
        return block, h

    def softsign(self, node):
        """x / (1 + |x|) (nn.Softsign and F.softsign decompose to abs, add, div): its x."""
        if _key(node) != "div.Tensor":
            return None
        num, den = node.args[0], node.args[1]
        if _key(den) != "add.Tensor" or len(den.users) != 1:
            return None
        dargs = _bind(den)
        absolute = dargs["self"] if dargs["other"] == 1 else None
        if absolute is None or _key(absolute) != "abs.default" or absolute.args[0] is not num \
                or len(absolute.users) != 1:
            return None
        self.done.update({den, absolute})
        return num

    def convert(self, node) -> Tuple[Optional[dict], object]:
        """One op as (refnet layer config or None for an identity, its data input)."""
        key = _key(node)
        handler = OPS.get(key)
        if handler is None or node.op != "call_function":
            _fail(f"unsupported op {key} at {_module_path(node)}; supported: {SUPPORTED_MODULES}")
        args = _bind(node) if hasattr(node.target, "_schema") else {}
        data = self.inputs_on_path(node)
        if len(data) != 1:
            _fail(f"{key} at {_module_path(node)} combines {len(data)} values of the data "
                  f"path; refnet's layers take one (and residual adds two branches of one)")
        layer = handler(self, node, args)
        return layer, data[0]


def _named(g, node, layer, tensors: Dict[str, Optional[str]]):
    """``layer`` with its torch_name: the module path its tensors share (``<path>.weight``)."""
    prefixes = set()
    for local, fqn in tensors.items():
        if fqn is None:
            continue
        if fqn == local:
            prefixes.add("")
        elif fqn.endswith("." + local):
            prefixes.add(fqn[: -len(local) - 1])
        else:
            _fail(f"{_key(node)} at {_module_path(node)} uses {fqn} as its {local}: refnet names "
                  f"a layer's tensors <module>.{local} (use the torch module, nn.Linear etc., "
                  f"rather than a functional call on a bare parameter)")
    if len(prefixes) > 1:
        _fail(f"{_key(node)} at {_module_path(node)} takes tensors of different modules "
              f"{sorted(prefixes)}")
    if prefixes:
        layer["torch_name"] = prefixes.pop()
    return layer


def _linear(g, node, a):
    w = g.tensor(a["weight"], node, "weight")
    b = g.tensor(a["bias"], node, "bias")
    out = g.state[w].shape[0]
    return _named(g, node, {"type": "dense", "out": int(out), "bias": b is not None},
                  {"weight": w, "bias": b})


def _conv(g, node, a):
    if len(g.shape(node.args[0]) or ()) != 4:
        _fail(f"conv at {_module_path(node)}: refnet has conv2d on (N, C, H, W) only")
    w = g.tensor(a["weight"], node, "weight")
    b = g.tensor(a["bias"], node, "bias")
    shape = g.state[w].shape
    padding = a["padding"]
    layer = {"type": "conv2d", "out_channels": int(shape[0]),
             "kernel_size": _pair(list(shape[2:])), "stride": _pair(a["stride"]),
             "padding": padding if isinstance(padding, str) else _pair(padding),
             "dilation": _pair(a["dilation"]), "groups": int(a["groups"]), "bias": b is not None}
    return _named(g, node, layer, {"weight": w, "bias": b})


def _batch_norm(g, node, a):
    tensors = {k: g.tensor(a[k], node, k) for k in ("weight", "bias", "running_mean",
                                                    "running_var")}
    track = tensors["running_mean"] is not None
    if track:
        g.vote(bool(a["training"]), node)
    elif not a["training"]:
        _fail(f"batch_norm at {_module_path(node)}: eval mode without running statistics")
    if a["momentum"] is None:
        _fail(f"batch_norm at {_module_path(node)}: momentum None (a cumulative average) is not "
              f"refnet's; give a number")
    layer = {"type": "batchnorm", "eps": float(a["eps"]), "momentum": float(a["momentum"]),
             "affine": tensors["weight"] is not None, "track_running_stats": track}
    return _consume_count(g, _named(g, node, layer, tensors), track, "batch_norm")


def _consume_count(g, layer, track, op):
    """The layer, with its torch module's ``num_batches_tracked`` buffer marked as read (refnet
    keeps its own count): batch_norm and instance_norm alike."""
    count = f"{layer['torch_name']}.num_batches_tracked" if layer.get("torch_name") else \
        "num_batches_tracked"
    if track and count in g.state:
        g.consumed[count] = op
    return layer


def _instance_norm(g, node, a):
    if len(g.shape(node.args[0]) or ()) != 4:
        _fail(f"instance_norm at {_module_path(node)}: refnet has instancenorm2d only")
    tensors = {k: g.tensor(a[k], node, k) for k in ("weight", "bias", "running_mean",
                                                    "running_var")}
    track = tensors["running_mean"] is not None
    if track:
        g.vote(bool(a["use_input_stats"]), node)
    layer = {"type": "instancenorm2d", "eps": float(a["eps"]), "momentum": float(a["momentum"]),
             "affine": tensors["weight"] is not None, "track_running_stats": track}
    return _consume_count(g, _named(g, node, layer, tensors), track, "instance_norm")


def _layer_norm(g, node, a):
    w = g.tensor(a["weight"], node, "weight")
    b = g.tensor(a["bias"], node, "bias")
    if w is None and b is not None:
        _fail(f"layer_norm at {_module_path(node)}: a bias without a weight")
    layer = {"type": "layernorm", "normalized_shape": [int(s) for s in a["normalized_shape"]],
             "eps": float(a["eps"]), "elementwise_affine": w is not None, "bias": b is not None}
    return _named(g, node, layer, {"weight": w, "bias": b})


def _group_norm(g, node, a):
    w = g.tensor(a["weight"], node, "weight")
    b = g.tensor(a["bias"], node, "bias")
    layer = {"type": "groupnorm", "num_groups": int(a["num_groups"]), "eps": float(a["eps"]),
             "affine": w is not None}
    return _named(g, node, layer, {"weight": w, "bias": b})


def _prelu(g, node, a):
    w = g.tensor(a["weight"], node, "weight")
    return _named(g, node, {"type": "prelu", "num_parameters": int(np.prod(g.state[w].shape))},
                  {"weight": w})


def _elu(g, node, a):
    if a.get("scale", 1) != 1 or a.get("input_scale", 1) != 1:
        _fail(f"elu at {_module_path(node)}: scale/input_scale other than 1")
    return {"type": "elu", "alpha": float(a["alpha"])}


def _hardtanh(g, node, a):
    lo, hi = float(a["min_val"]), float(a["max_val"])
    return {"type": "relu6"} if (lo, hi) == (0.0, 6.0) else \
        {"type": "hardtanh", "min_val": lo, "max_val": hi}


def _max_pool(g, node, a):
    kernel = _pair(a["kernel_size"])
    layer = {"type": "maxpool2d", "kernel_size": kernel,
             "stride": _pair(a["stride"]) if a["stride"] else kernel,
             "padding": _pair(a["padding"]), "dilation": _pair(a["dilation"]),
             "ceil_mode": bool(a["ceil_mode"])}
    return layer


def _avg_pool(g, node, a):
    kernel = _pair(a["kernel_size"])
    return {"type": "avgpool2d", "kernel_size": kernel,
            "stride": _pair(a["stride"]) if a["stride"] else kernel,
            "padding": _pair(a["padding"]), "ceil_mode": bool(a["ceil_mode"]),
            "count_include_pad": bool(a["count_include_pad"]),
            "divisor_override": None if a["divisor_override"] is None
            else int(a["divisor_override"])}


def _adaptive_avg(g, node, a):
    size = [int(s) for s in a["output_size"]]
    if size == [1, 1]:
        return {"type": "global_avgpool"}
    return {"type": "adaptive_avgpool2d", "output_size": _pair(size)}


def _getitem(g, node, a):
    """The values of adaptive_max_pool2d's (values, indices); the indices must be unused."""
    source, index = node.args
    if _key(source) != "adaptive_max_pool2d.default" or index != 0:
        _fail(f"getitem {index} of {_key(source)} at {_module_path(node)}: only the values of "
              f"adaptive_max_pool2d are supported")
    if any(u is not node and u.users for u in source.users):
        _fail(f"adaptive_max_pool2d at {_module_path(node)}: its indices are used")
    sargs = _bind(source)
    return {"type": "adaptive_maxpool2d", "output_size": _pair([int(s) for s in
                                                                 sargs["output_size"]])}


# torch.export's ops of nn.RNN (tanh, relu), nn.LSTM and nn.GRU -> refnet's layer
RECURRENT_OPS = {"rnn_tanh.input": ("rnn", "tanh"), "rnn_relu.input": ("rnn", "relu"),
                 "lstm.input": ("lstm", None), "gru.input": ("gru", None)}
_ZEROS = ("zeros.default", "zeros_like.default", "new_zeros.default")


def _recurrent(g, node):
    """A recurrent module's result as refnet reads it, or None if ``node`` is none: its output
    (``getitem 0``), the output's last step (``select(output, 1, -1)``), or the top layer's
    final state (``select(h_n, 0, -1)``, the same values) -> (layer, the op's data input)."""
    last, item = False, node
    if _key(node) == "select.int" and _key(node.args[0]) == "getitem":
        item, last = node.args[0], True
    if _key(item) != "getitem" or _key(item.args[0]) not in RECURRENT_OPS:
        return None
    op, index = item.args
    kind, nonlinearity = RECURRENT_OPS[_key(op)]
    a = _bind(op)
    where = f"{_key(op)} at {_module_path(op)}"
    layers, T = int(a["num_layers"]), g.shape(a["input"])[1]
    if last:
        dim, at = int(node.args[1]), int(node.args[2])
        size = layers if index == 1 else T
        if (index, dim) not in ((0, 1), (1, 0)) or at % size != size - 1:
            _fail(f"{where}: refnet reads output[:, -1] or h_n[-1] (the top layer's last step); "
                  f"got select(dim {dim}, index {at}) of result {index}")
    elif index != 0:
        _fail(f"{where}: refnet's {kind} returns the output sequence (result 0), not result "
              f"{index} (h_n/c_n) whole; use output[:, -1] or h_n[-1]")
    for other in op.users:
        if other is not item and other.users:
            _fail(f"{where}: its result {other.args[1]} is used too; refnet's {kind} gives "
                  f"one result (the output, or its last step)")
    if a["bidirectional"] or not a["batch_first"]:
        _fail(f"{where}: refnet's recurrent layers are unidirectional with batch_first=True "
              f"(got bidirectional={a['bidirectional']}, batch_first={a['batch_first']})")
    if float(a["dropout"]) > 0 and a["train"] and layers > 1:
        _fail(f"{where}: dropout {a['dropout']} between layers in train mode (refnet has none)")
    hx = a["hx"] if isinstance(a["hx"], (list, tuple)) else [a["hx"]]
    if not all(getattr(h, "op", None) == "call_function" and _key(h) in _ZEROS for h in hx):
        _fail(f"{where}: an initial state other than zeros (refnet starts from h_0 = 0"
              f"{', c_0 = 0' if kind == 'lstm' else ''})")
    names = [f"{w}_l{k}" for k in range(layers)
             for w in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if a["has_biases"]
                                                    else ())]
    if len(a["params"]) != len(names):
        _fail(f"{where}: {len(a['params'])} parameter tensors for {len(names)} expected")
    tensors = {name: g.tensor(t, op, name) for name, t in zip(names, a["params"])}
    hidden = int(g.state[tensors["weight_hh_l0"]].shape[1])
    layer = {"type": kind, "hidden_size": hidden, "num_layers": layers,
             "bias": bool(a["has_biases"]), "output": "last" if last else "sequence"}
    if nonlinearity is not None:
        layer["nonlinearity"] = nonlinearity
    g.done.update({node, item, op})
    return _named(g, op, layer, tensors), a["input"]


def _flatten(g, node, a):
    ndim = len(g.shape(node.args[0]))
    start, end = a["start_dim"] % ndim, a["end_dim"] % ndim
    if (start, end) != (1, ndim - 1):
        _fail(f"flatten({a['start_dim']}, {a['end_dim']}) at {_module_path(node)}: refnet's "
              f"flatten keeps the batch axis and flattens the rest (start_dim 1, end_dim -1)")
    return {"type": "flatten"} if ndim > 2 else None


def _view(g, node, a):
    before, after = g.shape(node.args[0]), g.shape(node)
    if after == before:
        return None
    if len(after) == 2 and after[0] == before[0]:
        return {"type": "flatten"}
    _fail(f"{_key(node)} to {list(after)} at {_module_path(node)}: refnet reshapes only to "
          f"(N, -1) (flatten)")


def _mean(g, node, a):
    ndim = len(g.shape(node.args[0]))
    dims = sorted(d % ndim for d in (a["dim"] or []))
    if ndim != 4 or dims != [2, 3]:
        _fail(f"mean over {a['dim']} at {_module_path(node)}: refnet averages over H, W of "
              f"(N, C, H, W) only (global_avgpool)")
    if a["keepdim"]:
        return {"type": "global_avgpool"}
    _fail(f"mean over (H, W) without keepdim at {_module_path(node)}: use keepdim=True then "
          f"flatten (refnet's global_avgpool keeps (N, C, 1, 1))")


def _dropout(kind):
    def convert(g, node, a):
        p = float(a["p"])
        if p > 0:
            g.vote(bool(a["train"]), node)
        return {"type": kind, "p": p}
    return convert


def _identity(g, node, a):
    return None


def _activation(kind, **options):
    def convert(g, node, a):
        return {"type": kind, **{k: (float(a[v]) if not isinstance(a[v], str) else a[v])
                                 for k, v in options.items()}}
    return convert


OPS = {
    "linear.default": _linear,
    "conv2d.default": _conv, "conv2d.padding": _conv,
    "batch_norm.default": _batch_norm,
    "instance_norm.default": _instance_norm,
    "layer_norm.default": _layer_norm,
    "group_norm.default": _group_norm,
    "max_pool2d.default": _max_pool,
    "avg_pool2d.default": _avg_pool,
    "adaptive_avg_pool2d.default": _adaptive_avg,
    "flatten.using_ints": _flatten,
    "view.default": _view, "reshape.default": _view, "_unsafe_view.default": _view,
    "mean.dim": _mean,
    "dropout.default": _dropout("dropout"), "feature_dropout.default": _dropout("dropout2d"),
    "clone.default": _identity, "contiguous.default": _identity, "alias.default": _identity,
    "relu.default": _activation("relu"), "sigmoid.default": _activation("sigmoid"),
    "tanh.default": _activation("tanh"), "selu.default": _activation("selu"),
    "silu.default": _activation("silu"), "mish.default": _activation("mish"),
    "hardsigmoid.default": _activation("hardsigmoid"),
    "hardswish.default": _activation("hardswish"),
    "log_sigmoid.default": _activation("logsigmoid"),
    "relu6.default": _activation("relu6"),
    "gelu.default": _activation("gelu", approximate="approximate"),
    "leaky_relu.default": _activation("leaky_relu", slope="negative_slope"),
    "celu.default": _activation("celu", alpha="alpha"),
    "softplus.default": _activation("softplus", beta="beta", threshold="threshold"),
    "elu.default": _elu, "hardtanh.default": _hardtanh, "prelu.default": _prelu,
}


# --- the model ------------------------------------------------------------------------------

def _mode(g, default: str) -> str:
    train, evals = g.votes["train"], g.votes["eval"]
    if train and evals:
        _fail(f"modules in both modes: {train[0]} in train mode, {evals[0]} in eval mode; "
              f"refnet runs a model in one mode (call .train() or .eval() on the whole module)")
    return "train" if train else "eval" if evals else default


def from_program(program, loss, *, default_mode: str = "train", name: str = "") \
        -> Tuple[Model, Dict[str, np.ndarray]]:
    """A refnet model and its tensors (torch names, float64) from a ``torch.export``
    ExportedProgram in the default (training) IR."""
    state = {**program.state_dict, **getattr(program, "constants", {})}
    g = _Graph(program, state)
    layers = g.chain(g.output, g.input, {})
    stray = sorted(n.name for n in g.data - g.done - {g.input})
    if stray:
        _fail(f"ops left over after reading the graph: {stray}")
    if not layers:
        _fail("the module computes nothing refnet can differentiate (an identity)")
    shape = g.shape(g.input)
    spec = {"name": name or "imported", "description": "imported from torch by refnet "
            "(refnet.from_torch / refnet import); torch_name: each layer's module path",
            "input_shape": list(shape[1:]), "batch": int(shape[0]), "mode": _mode(g, default_mode),
            "layers": layers, "loss": loss_spec(loss)}
    try:
        model = Model(spec)
    except ValueError as e:
        _fail(f"the refnet model read from the graph is refused: {e}")
    params = {fqn: _numpy(state[fqn]) for fqn in g.consumed if fqn in state}
    return model, params


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if t.is_floating_point() else \
        t.detach().cpu().numpy().astype(np.float64)


def from_torch(module, example_input, loss, *, check: bool = True, unbatched: bool = False) \
        -> Tuple[Model, Dict[str, np.ndarray]]:
    """``(model, params)``: the refnet model of a torch ``module`` and its parameters and buffers
    under the module's own names (float64 numpy), for a batch like ``example_input``
    (N, *sample shape). ``loss``: see :func:`loss_spec`. The module's mode (``.train()`` /
    ``.eval()``) is captured; the module itself is not changed (a copy is exported and run).

    ``check``: compare refnet's float64 output with the module's own on ``example_input`` (a
    float64 copy), within twice refnet's error bound plus 2 ulps — skipped where train-mode
    dropout makes the two draw different masks.

    ``unbatched``: ``example_input`` is one sample without the batch axis, as torch's conv and
    pooling modules accept it ((C, H, W) for Conv2d): refnet's model format always has the batch
    axis, so the model is built for ``example_input[None]`` — a batch of one, whose gradients
    are torch's on the unbatched input with a leading axis of 1 on x's."""
    import torch
    if not isinstance(module, torch.nn.Module):
        _fail(f"expected a torch.nn.Module, got {type(module).__name__}")
    x = torch.as_tensor(example_input)
    if unbatched:
        x = x[None]
    if x.ndim < 2 or not x.is_floating_point():
        _fail(f"example_input must be a floating-point batch (N, *sample shape), got "
              f"{tuple(x.shape)} {x.dtype}")
    work = copy.deepcopy(module)
    try:
        program = torch.export.export(work, (x.to(next(iter(_dtypes(work)), x.dtype)),))
    except Exception as e:               # torch.export's many error types: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(f"torch.export could not capture {type(module).__name__}: {first}")
    model, params = from_program(program, loss, default_mode="train" if module.training
                                 else "eval", name=type(module).__name__)
    if check:
        reference = copy.deepcopy(module).double()
        _check_forward(model, params, x.double(), reference, type(module).__name__)
    return model, params


def _dtypes(module):
    return [p.dtype for p in module.parameters()]


def _check_forward(model: Model, params, x, reference, what: str):
    """The refnet model computes the module's function: refnet's float64 output within its error
    bound B = min(rigorous, 8σ) of the exact one, torch's float64 output within about the same
    (the same roundings in another order), so |torch − refnet| ≤ 2B + 2 ulps."""
    if any(layer.type in ("dropout", "dropout2d") and layer.config["p"] > 0
           for layer in _leaves(model)) and model.mode == "train":
        return                           # torch and refnet draw their own masks
    import torch
    with torch.no_grad():
        want = reference(x).detach().numpy()
    x64 = x.detach().numpy()
    p, x64, y = model.prepare(params, x64, model.loss.default_targets(np.random.default_rng(0),
                                                                      x64.shape[0]))
    state = model.default_state()
    # (The loss needs targets, any: only the output is compared.)
    ours = np.asarray(model.forward(FLOAT64, p, x64, y, state).output)
    bound = model.forward(BOUND, p, x64, y, model.default_state()).output
    allowed = 2 * np.minimum(bound.e, bound.probabilistic_bound(LAMBDA)) + \
        2 * np.spacing(np.abs(ours))
    if want.shape != ours.shape:
        _fail(f"{what}: refnet's model gives shape {ours.shape}, the module {want.shape}")
    bad = np.abs(want - ours) > allowed
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.abs(want - ours) - allowed)), ours.shape)
        _fail(f"{what}: the imported model's output differs from the module's at {tuple(i)}: "
              f"{ours[i]!r} against {want[i]!r} (allowed {allowed[i]:.2g}); a conversion "
              f"refnet got wrong — please report it with the module")


def _leaves(model):
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if layer.type == "residual":
            stack += layer.body.layers + (layer.shortcut.layers if layer.shortcut else [])
        else:
            yield layer


# --- .pt2 files -----------------------------------------------------------------------------

PT2_HINT = ("save the model with torch.export.save(torch.export.export(model, (x,)), "
            "'MODEL.pt2')")


def load_program(path):
    """An ExportedProgram from a ``.pt2`` written by ``torch.export.save``, loaded so that
    nothing is unpickled.

    ``torch.export.load`` reads the program's graph (JSON) and its weights (raw bytes described
    by JSON), and regenerates the graph module's Python code from the graph's nodes, which call
    registered torch operators only. But it unpickles two kinds of entries: a weight or
    constant stored with ``use_pickle`` (a tensor subclass, a script object) goes through
    ``torch.load(weights_only=False)`` or ``pickle.loads``, and the sample inputs (a
    ``torch.save`` pickle) through ``torch.load``, falling back to ``weights_only=False``.
    refnet therefore opens the archive first, refuses one with any pickled weight or constant,
    and hands torch a copy whose sample inputs are empty (refnet takes the input shape from the
    graph). A ``torch.save`` file (``.pt``, a pickle) is refused outright."""
    raw = read_input(path, f"MODEL {path}", "a .pt2 file")
    if raw[:1] == b"\x80":
        raise ValueError(f"MODEL {path}: a pickle (torch.save's legacy format); refnet never "
                         f"unpickles; {PT2_HINT}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile:
        raise ValueError(f"MODEL {path}: not a .pt2 archive (no zip signature, found "
                         f"{raw[:4]!r}); {PT2_HINT}") from None
    names = archive.namelist()
    if any(n.endswith("data.pkl") for n in names):
        raise ValueError(f"MODEL {path}: a torch.save file (it holds data.pkl, a pickle); refnet "
                         f"never unpickles; {PT2_HINT}")
    if not any("/models/" in n and n.endswith(".json") for n in names):
        raise ValueError(f"MODEL {path}: a zip without a torch.export program "
                         f"(no models/*.json); {PT2_HINT}")
    for n in names:
        if n.endswith("_config.json") and ("/data/weights/" in n or "/data/constants/" in n):
            config = json.loads(archive.read(n)).get("config", {})
            pickled = sorted(k for k, v in config.items() if v.get("use_pickle", False))
            if pickled:
                raise ValueError(f"MODEL {path}: {pickled[0]} is stored as a pickle (a tensor "
                                 f"subclass or script object); refnet never unpickles")
        elif "/data/constants/" in n and not n.endswith(".json") and \
                n.rsplit("/", 1)[-1].startswith(("custom_obj", "tensor_pickle")):
            raise ValueError(f"MODEL {path}: {n} is a pickled constant; refnet never unpickles")
    clean = io.BytesIO()
    with zipfile.ZipFile(clean, "w") as out:
        for info in archive.infolist():
            data = b"" if "/data/sample_inputs/" in info.filename else archive.read(info)
            out.writestr(info, data)
    clean.seek(0)
    import torch
    try:
        return torch.export.load(clean)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"MODEL {path}: torch.export.load failed: {first}") from None


def check_program(model: Model, params, program, what: str):
    """``_check_forward`` for a loaded program: its graph module, run in float64 on the model's
    seeded default batch, against the refnet model (registered torch operators only run)."""
    import torch
    reference = program.module().to(torch.float64)
    x, _ = model.default_data()
    _check_forward(model, params, torch.from_numpy(x), reference, what)


# --- back to torch --------------------------------------------------------------------------

def to_torch(model: Model, params, dtype=None, masks=None):
    """The torch module of a refnet ``model`` holding ``params`` (refnet's or torch names):
    ``refnet.interop.torch_twin``. A model with torch names gives a module whose
    ``named_parameters`` and ``state_dict`` use them."""
    import torch

    from .torch_twin import named_twin, torch_twin
    dtype = torch.float64 if dtype is None else dtype
    params = model.refnet_named(params)
    if model.torch_names:
        return named_twin(model, params, dtype, masks)
    return torch_twin(model, params, dtype, masks)
