"""refnet: the ground-truth reference for neural-network backpropagation.

A readable numpy implementation of forward and backward passes whose every gradient is proven
right three ways (see :mod:`refnet.verify`). Runtime dependencies: numpy and mpmath only.

    from refnet import Model, verify, FLOAT64, MPBackend
    model = Model.load("spec/examples/sigmoid-deep-20.json")
    params, x, y = model.prepare()                      # spec's inits and seeded batch
    grads = model.loss_and_grads(FLOAT64, params, x, y) # .loss, .params["0.weight"], .x
    report = verify(model)                              # the verification triangle
"""

__version__ = "0.1.0"

from .backend import FLOAT32, FLOAT64, MPBackend, NumpyBackend, get_backend
from .errorbound import BOUND, BoundArray, BoundBackend
from .init import calculate_gain, initialize
from .model import Model
from .verify import Report, TensorReport, verify

__all__ = ["FLOAT32", "FLOAT64", "MPBackend", "NumpyBackend", "get_backend", "BOUND",
           "BoundArray", "BoundBackend", "calculate_gain", "initialize", "Model", "Report",
           "TensorReport", "verify", "__version__"]
