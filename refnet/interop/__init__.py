"""refnet and other frameworks: golden vectors (:mod:`.vectors`), conformance runs of another
framework against them (:mod:`.conformance`), and the PyTorch twin of a refnet model
(:mod:`.torch_twin`, which needs torch; nothing here imports torch at import time).
"""

from .conformance import conformance
from .vectors import check, write

__all__ = ["conformance", "check", "write"]
