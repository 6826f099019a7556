"""Every layer, one file each, activations included; forward beside backward, shapes in the
docstrings. Layers compute through a numeric backend (:mod:`refnet.numerics`) and take their
initial values from :mod:`refnet.init`. :mod:`.registry` builds layers from their JSON objects:
it imports every layer module, and none of them imports it.
"""

from .base import ForwardState, Layer
from .registry import build_layer, layer_types

__all__ = ["ForwardState", "Layer", "build_layer", "layer_types"]
