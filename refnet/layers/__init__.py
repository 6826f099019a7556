"""Layers, one file each. The registry of layer types lives in :mod:`refnet.model`."""

from .base import Layer
from .dense import Dense

__all__ = ["Layer", "Dense"]
