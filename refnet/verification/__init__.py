"""Proving gradients right: the verification triangle (:mod:`.triangle`: float64 against the same
code at 50+ digits in ulps, high-precision analytic against high-precision finite differences,
float64 finite differences), the batched float64 finite-difference sweep (:mod:`.fdsweep`), and
certified gradients in interval arithmetic (:mod:`.certify`). Built on the model and the numerics.
"""

from .certify import Certificate, certify, format_certificate
from .fdsweep import fd_sweep
from .triangle import Report, SpotCheck, TensorReport, spot_check, verify

__all__ = ["Certificate", "certify", "format_certificate", "fd_sweep", "Report", "SpotCheck",
           "TensorReport", "spot_check", "verify"]
