"""Low precision as a GPU computes it: the fp16/bf16 emulation (:mod:`.emulation`: storage
formats, autocast and half policies, rounding at kernel boundaries, overflow/underflow accounting
against a float64 shadow), PyTorch's GradScaler (:mod:`.gradscaler`), the per-layer gradient
health report with its value-by-value comparison against a GPU run (:mod:`.diagnose`), and the
per-step accounting of recurrent layers (:mod:`.steps`). Built on the model and the numerics.
"""

from .diagnose import Diagnosis, diagnose
from .emulation import Precision, run
from .gradscaler import GradScaler

__all__ = ["Diagnosis", "diagnose", "Precision", "run", "GradScaler"]
