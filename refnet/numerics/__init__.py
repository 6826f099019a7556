"""The arithmetic the layers run on (the lowest floor: imports nothing else of refnet).

- :mod:`.backend`: the numeric backend namespace — float64/float32 numpy (``NumpyBackend``) and
  mpmath object arrays at any precision (``MPBackend``), plus exact constants and conversions;
- :mod:`.errorbound`: float64 with a running error bound (``BOUND``), the error analysis the ulp
  leg of the verification triangle is held to;
- :mod:`.interval`: outward-rounded intervals, for certified gradients;
- :mod:`.formats`: correctly rounded fp16/bf16/fp8 storage formats;
- :mod:`.exactgemm`: error-free products and sums of mpf arrays on float64 BLAS;
- :mod:`.expansion`: the fast exact engine (``ExpansionBackend``), float64 expansions.
"""

from .backend import FLOAT32, FLOAT64, MPBackend, NumpyBackend, get_backend
from .errorbound import BOUND, LAMBDA, BoundArray, BoundBackend
from .expansion import ExpansionBackend, ExpansionRangeError
from .formats import FORMATS, get_format, round_to
from .interval import IntervalBackend

__all__ = ["FLOAT32", "FLOAT64", "MPBackend", "NumpyBackend", "get_backend", "BOUND", "LAMBDA",
           "BoundArray", "BoundBackend", "ExpansionBackend", "ExpansionRangeError", "FORMATS",
           "get_format", "round_to", "IntervalBackend"]
