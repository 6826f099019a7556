"""refnet: the ground-truth reference for neural-network backpropagation.

A readable numpy implementation of forward and backward passes whose every gradient is proven
right three ways (see :mod:`refnet.verification`). Runtime dependencies: numpy and mpmath only.

    from refnet import Model, verify, FLOAT64, MPBackend
    model = Model.load("spec/examples/sigmoid-deep-20.json")
    params, x, y = model.prepare()                      # spec's inits and seeded batch
    grads = model.loss_and_grads(FLOAT64, params, x, y) # .loss, .params["0.weight"], .x
    report = verify(model)                              # the verification triangle

The package is grouped by concept, one floor importing only the floors below it
(spec/architecture.md): ``numerics`` (backends, error bounds, intervals, formats) → ``layers`` →
``losses``/``regularize`` → ``model`` → ``lowp`` (fp16/bf16 emulation) → ``verification``,
``interop``, ``training`` → ``study`` → ``cli``. The names below are the public API;
``from_torch``/``to_torch`` need torch (imported when called), and ``refnet.testing`` holds the
assertions for other projects' test suites.
"""

__version__ = "0.1.0"

from .init import calculate_gain, initialize
from .interop.torch_import import from_torch, to_torch
from .lowp import Diagnosis, GradScaler, Precision, diagnose
from .model import Model
from .numerics import (
                       BOUND,
                       FLOAT32,
                       FLOAT64,
                       BoundArray,
                       BoundBackend,
                       ExpansionBackend,
                       IntervalBackend,
                       MPBackend,
                       NumpyBackend,
                       get_backend,
                       round_to,
)
from .study import run_study
from .training import clip_grad_norm, clip_grad_value, make_optimizer, train
from .verification import Certificate, Report, TensorReport, certify, spot_check, verify

__all__ = ["FLOAT32", "FLOAT64", "MPBackend", "ExpansionBackend", "NumpyBackend", "get_backend", "BOUND",
           "BoundArray", "BoundBackend", "IntervalBackend", "round_to", "calculate_gain",
           "initialize", "Model", "Diagnosis", "GradScaler", "Precision", "diagnose",
           "Report", "TensorReport", "verify", "spot_check", "Certificate", "certify",
           "clip_grad_norm", "clip_grad_value", "make_optimizer", "train", "run_study",
           "from_torch", "to_torch", "__version__"]
