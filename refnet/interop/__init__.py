"""refnet and other frameworks: golden vectors (:mod:`.vectors`), conformance runs of another
framework against them (:mod:`.conformance`), the PyTorch and JAX twins of a refnet model
(:mod:`.torch_twin`, :mod:`.jax_twin`), and a torch module or ``.pt2`` program as a refnet model
(:mod:`.torch_import`: ``from_torch``, ``to_torch``). Nothing here imports torch or jax at
import time.
"""

from .conformance import conformance
from .vectors import check, write

__all__ = ["conformance", "check", "write"]
