"""Training with PyTorch's update rules: the loop (:mod:`.loop`), SGD/Adam/AdamW
(:mod:`.optim`), gradient clipping by value and by norm (:mod:`.clip`). Training under the fp16/bf16
emulation is built on :mod:`refnet.lowp` (the one arrow between the middle packages, besides
the study's).
"""

from .clip import clip_grad_norm, clip_grad_value
from .loop import TrainResult, train
from .optim import SGD, Adam, AdamW, make_optimizer

__all__ = ["clip_grad_norm", "clip_grad_value", "TrainResult", "train", "SGD", "Adam", "AdamW",
           "make_optimizer"]
