"""Every layer type the model spec knows, by its ``"type"`` name.

The registry sits on top of the layers: it imports every layer module, and no layer module
imports it. Containers (sequential, residual) build their children with the ``build`` function
the registry hands them, which is this module's ``build_layer``.
"""

from __future__ import annotations

from .activations import ACTIVATIONS
from .conv import Conv2d
from .dense import Dense
from .dropout import Dropout, Dropout2d
from .norm import BatchNorm, GroupNorm, InstanceNorm2d, LayerNorm
from .pool import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, GlobalAvgPool, MaxPool2d
from .recurrent import RECURRENT
from .residual import Residual
from .sequential import Container
from .shape import Flatten

LAYER_TYPES = {cls.type: cls for cls in (Dense, Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool,
                                         Flatten, BatchNorm, LayerNorm, Dropout, Dropout2d,
                                         Residual, *ACTIVATIONS.values())}
# Per-sample normalization (issue 18).
LAYER_TYPES.update({cls.type: cls for cls in (GroupNorm, InstanceNorm2d)})

# torch's adaptive pools (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), any output size.
LAYER_TYPES.update({cls.type: cls for cls in (AdaptiveAvgPool2d, AdaptiveMaxPool2d)})

# torch's recurrent layers (nn.RNN, nn.LSTM, nn.GRU, batch first; issue 16).
LAYER_TYPES.update(RECURRENT)


def layer_types():
    """``{"type" name: layer class}`` for every layer the model spec knows."""
    return dict(LAYER_TYPES)


def build_layer(config, in_shape, where: str, name: str):
    """Build one layer from its JSON object; ``where`` names it in messages."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{where}: expected an object with 'type', got {config!r}")
    kind = config["type"]
    if kind not in LAYER_TYPES:
        raise ValueError(f"{where}: unknown layer type {kind!r}; expected one of "
                         f"{sorted(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    where = f"{where} ({kind})"
    layer = (cls(config, in_shape, where, build=build_layer) if issubclass(cls, Container)
             else cls(config, in_shape, where))
    layer.name = name
    return layer
