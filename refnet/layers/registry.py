"""Every layer type the model spec knows, by its ``"type"`` name."""

from __future__ import annotations


def layer_types():
    # Imported here, not at module level: containers (sequential, residual) build their children
    # through this registry, and the layer modules import the containers' base.
    from ..activations import ACTIVATIONS
    from .conv import Conv2d
    from .dense import Dense
    from .dropout import Dropout, Dropout2d
    from .norm import BatchNorm, LayerNorm
    from .pool import AvgPool2d, GlobalAvgPool, MaxPool2d
    from .residual import Residual
    from .shape import Flatten
    return {cls.type: cls for cls in (Dense, Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool,
                                      Flatten, BatchNorm, LayerNorm, Dropout, Dropout2d, Residual,
                                      *ACTIVATIONS.values())}


def build_layer(config, in_shape, where: str, name: str):
    """Build one layer from its JSON object; ``where`` names it in messages."""
    types = layer_types()
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{where}: expected an object with 'type', got {config!r}")
    kind = config["type"]
    if kind not in types:
        raise ValueError(f"{where}: unknown layer type {kind!r}; expected one of {sorted(types)}")
    layer = types[kind](config, in_shape, f"{where} ({kind})")
    layer.name = name
    return layer
