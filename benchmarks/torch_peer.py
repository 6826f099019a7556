"""The torch twins the benchmarks time (moved into the package: ``refnet.interop.torch_twin``)."""

from refnet.interop.torch_twin import torch_loss, torch_twin  # noqa: F401
