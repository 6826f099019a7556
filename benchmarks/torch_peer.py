"""The torch twins the benchmarks time (moved into the package: ``refnet.torch_twin``)."""

from refnet.torch_twin import torch_loss, torch_twin  # noqa: F401
