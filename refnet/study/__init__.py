"""The gradient-health study (:mod:`.grid`: the grid of networks, the verdicts, the outputs), the
named presets (:mod:`.presets`) and the figures (:mod:`.plots`, which needs matplotlib and is
imported only when a figure is drawn). The top floor below the CLI: it uses the verification,
low-precision and training packages.
"""

from .grid import Config, Result, run_study
from .presets import PRESETS, preset

__all__ = ["Config", "Result", "run_study", "PRESETS", "preset"]
