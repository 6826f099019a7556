"""Named model specs, so that ``refnet diagnose --preset NAME`` needs no JSON (``refnet presets``).

=============  ==================================================================================
sigmoid-deep   12 sigmoid layers of width 128, N(0, 0.01) weights: gradients vanish (fp16:
               they underflow to 0 without loss scaling; claim 13(b))
relu-normal1   8 ReLU layers of width 128 on 64 inputs, N(0, 1) weights: activations grow ~8×
               per layer and overflow fp16 at the 5th Linear (claim 13(a))
resnet-mlp     8 residual blocks [dense → relu] of width 64, kaiming init scaled by 1/√8 in the
               block (``std`` 0.0625): the identity path keeps gradients flowing
cnn-bn         conv → batchnorm → relu twice, max-pool, global average pool, dense: a small CNN
rnn-vanish     a tanh RNN (hidden 16, torch's default init) over 40 steps, its last output to a
               dense: ∂L/∂h_t shrinks geometrically back in time (fp16: the first steps' gradients
               underflow to 0)
lstm-seq       an LSTM (hidden 16, 2 layers) over 20 steps, a dense on every step's output
               (N, T, 4) and mse on the whole sequence
=============  ==================================================================================
"""

from __future__ import annotations

import copy


def _mlp(depth, width, in_dim, activation, init, batch=64):
    layers = []
    for _ in range(depth):
        layers += [{"type": "dense", "out": width, "init": init, "bias_init": "zeros"},
                   {"type": activation}]
    layers.append({"type": "dense", "out": 10, "init": init, "bias_init": "zeros"})
    return {"input_shape": [in_dim], "seed": 0, "batch": batch, "layers": layers,
            "loss": {"type": "softmax_cross_entropy"}}


PRESETS = {
    "sigmoid-deep": {**_mlp(12, 128, 128, "sigmoid", {"name": "normal", "std": 0.01}),
                     "description": "12 sigmoid layers, N(0, 0.01): vanishing gradients"},
    "relu-normal1": {**_mlp(8, 128, 64, "relu", {"name": "normal", "std": 1.0}),
                     "description": "8 ReLU layers, N(0, 1): exploding activations"},
    "resnet-mlp": {
        "input_shape": [64], "seed": 0, "batch": 64,
        "description": "8 residual blocks [dense -> relu] of width 64, small body init",
        "layers": [{"type": "residual", "body": [
            {"type": "dense", "out": 64, "init": {"name": "normal", "std": 0.0625},
             "bias_init": "zeros"}, {"type": "relu"}]} for _ in range(8)]
        + [{"type": "dense", "out": 10}],
        "loss": {"type": "softmax_cross_entropy"}},
    "cnn-bn": {
        "input_shape": [3, 16, 16], "seed": 0, "batch": 16,
        "description": "conv-bn-relu x2, max-pool, global average pool, dense",
        "layers": [
            {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1,
             "init": {"name": "kaiming_normal", "nonlinearity": "relu"}},
            {"type": "batchnorm"}, {"type": "relu"},
            {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1,
             "init": {"name": "kaiming_normal", "nonlinearity": "relu"}},
            {"type": "batchnorm"}, {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "global_avgpool"}, {"type": "flatten"},
            {"type": "dense", "out": 10}],
        "loss": {"type": "softmax_cross_entropy"}},
    "rnn-vanish": {
        "input_shape": [40, 3], "seed": 0, "batch": 8,
        "description": "tanh RNN, hidden 16, 40 steps, torch's default init: vanishing through time",
        "layers": [{"type": "rnn", "hidden_size": 16, "output": "last"},
                   {"type": "dense", "out": 2}],
        "loss": {"type": "mse"}},
    "lstm-seq": {
        "input_shape": [20, 3], "seed": 0, "batch": 8,
        "description": "LSTM, hidden 16, 2 layers, 20 steps; dense on every step, mse",
        "layers": [{"type": "lstm", "hidden_size": 16, "num_layers": 2},
                   {"type": "dense", "out": 4}],
        "loss": {"type": "mse"}},
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)} "
                         f"(refnet presets lists them)")
    return copy.deepcopy(PRESETS[name])
