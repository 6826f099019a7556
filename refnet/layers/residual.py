"""Residual block: y = shortcut(h) + scale · body(h).

              ┌──────── shortcut (identity, or e.g. 1x1 conv + batchnorm) ────────┐
      h ──────┤                                                                   (+)──► y
              └──────── body: layers ──► × scale ─────────────────────────────────┘

    forward:   y = S(h) + s·F(h)
    backward:  dh = S'(h)ᵀ dy + F'(h)ᵀ (s·dy)     (identity shortcut: dh = dy + F'(h)ᵀ(s·dy))

So the gradient reaching h has a term that passes the shortcut untouched, however small the
body's is. Config::

    {"type": "residual", "body": [...layers], "shortcut": "identity" | [...layers], "scale": 1.0}

Post-activation blocks (original ResNet) put the activation *after* the block as the next layer;
pre-activation blocks put BN/activation first *inside* the body. Zero-init of the branch (ReZero,
Fixup) is the ordinary init key on the body's last layer, or scale 0. Names: ``"<i>.body.<j>.w"``,
``"<i>.shortcut.<j>.w"``, as a torch module with ``body`` and ``shortcut`` ``nn.Sequential``s.
"""

from __future__ import annotations

from ..validate import require_number
from .sequential import Container, Sequential


def _sub(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class Residual(Container):
    type = "residual"
    defaults = {"body": None, "shortcut": "identity", "scale": 1.0}

    def __init__(self, config, in_shape, where, *, build):
        if "body" not in config:
            raise ValueError(f"{where}: residual needs 'body' (a list of layers)")
        super().__init__(config, in_shape, where)
        require_number(where, "scale", self.config["scale"])
        self.body = Sequential(self.config["body"], in_shape, f"{where}.body", build=build)
        shortcut = self.config["shortcut"]
        if shortcut == "identity":
            self.shortcut = None
            shortcut_shape = tuple(in_shape)
        elif isinstance(shortcut, list):
            self.shortcut = Sequential(shortcut, in_shape, f"{where}.shortcut", build=build)
            shortcut_shape = self.shortcut.out_shape
        else:
            raise ValueError(f"{where}: shortcut must be 'identity' or a list of layers, "
                             f"got {shortcut!r}")
        if self.body.out_shape != shortcut_shape:
            raise ValueError(f"{where}: the body's output shape {self.body.out_shape} differs "
                             f"from the shortcut's {shortcut_shape}; a projection shortcut "
                             f"(e.g. a 1x1 conv) must make them equal")
        self.out_shape = shortcut_shape

    def output_shape(self, in_shape):
        return tuple(in_shape)       # replaced in __init__ once the branches are built

    @property
    def name(self):
        return self._name

    @name.setter
    def name(self, value):
        # Children's names follow the block's: "3" -> "3.body.0", "3.shortcut.0".
        self._name = value
        for branch, label in ((getattr(self, "body", None), "body"),
                              (getattr(self, "shortcut", None), "shortcut")):
            if branch is not None:
                _rename(branch, f"{value}.{label}" if value else label)

    def children(self):
        yield "body", self.body
        if self.shortcut is not None:
            yield "shortcut", self.shortcut

    def forward(self, bk, params, h, state):
        f, body_cache = self.body.forward(bk, _sub(params, "body."), h, state)
        if self.shortcut is None:
            s, shortcut_cache = h, None
        else:
            s, shortcut_cache = self.shortcut.forward(bk, _sub(params, "shortcut."), h, state)
        return s + self.config["scale"] * f, (body_cache, shortcut_cache)

    def backward(self, bk, params, dy, cache):
        body_cache, shortcut_cache = cache
        dh_body, grads_body = self.body.backward(bk, _sub(params, "body."),
                                                 self.config["scale"] * dy, body_cache)
        grads = {f"body.{k}": g for k, g in grads_body.items()}
        if self.shortcut is None:
            dh_short = dy
        else:
            dh_short, grads_short = self.shortcut.backward(bk, _sub(params, "shortcut."), dy,
                                                           shortcut_cache)
            grads.update({f"shortcut.{k}": g for k, g in grads_short.items()})
        return dh_short + dh_body, grads

    def kink_signature(self, cache):
        body_cache, shortcut_cache = cache
        sig = self.body.kink_signature(body_cache)
        if self.shortcut is not None:
            sig = sig + self.shortcut.kink_signature(shortcut_cache)
        return sig


def _rename(seq: Sequential, prefix: str):
    seq.name = prefix
    for j, layer in enumerate(seq.layers):
        layer.name = f"{prefix}.{j}"
