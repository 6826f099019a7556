"""Figures for ``refnet study`` and ``refnet diagnose --plot`` (matplotlib, the ``plot`` extra).

Importing this module without matplotlib raises ImportError; callers treat the figures as
optional. The Agg backend is used: no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

VERDICT_COLORS = {"healthy": "#4caf50", "vanishing": "#2196f3", "exploding": "#f44336",
                  "nonfinite": "#212121"}
ARCH_STYLES = {"plain": "-", "batchnorm": "--", "residual": ":"}


def _log_profile(norms):
    """log10 norms; 0 and non-finite become NaN (a gap in the line)."""
    return [math.log10(v) if v is not None and v > 0 and math.isfinite(v) else math.nan
            for v in norms]


def grad_norm_figure(results, path: Path) -> Path:
    """Per-layer gradient norms on a log scale: one panel per (activation, init), one line per
    architecture and precision at the grid's greatest depth."""
    depth = max(r.depth for r in results)
    acts = sorted({r.activation for r in results}, key=[r.activation for r in results].index)
    inits = sorted({r.init for r in results}, key=[r.init for r in results].index)
    fig, axes = plt.subplots(len(acts), len(inits), figsize=(2.6 * len(inits), 2.1 * len(acts)),
                             sharex=True, squeeze=False)
    for i, act in enumerate(acts):
        for j, init in enumerate(inits):
            ax = axes[i][j]
            for r in results:
                if (r.activation, r.init, r.depth) != (act, init, depth):
                    continue
                color = VERDICT_COLORS[r.verdict]
                ax.plot(range(1, len(r.grad_norms) + 1), _log_profile(r.grad_norms),
                        ARCH_STYLES[r.arch], color=color, lw=1.2 if r.precision == "float64" else 0.7,
                        alpha=1.0 if r.precision == "float64" else 0.6,
                        label=f"{r.arch} {r.precision}")
            ax.axhspan(-6, 3, color="#eeeeee", zorder=0)
            if i == 0:
                ax.set_title(init, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{act}\nlog10 ‖∂L/∂W‖", fontsize=8)
            if i == len(acts) - 1:
                ax.set_xlabel("layer (input → output)", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], ls=s, color="gray", label=a) for a, s in ARCH_STYLES.items()]
    handles += [plt.Line2D([], [], color=c, label=v) for v, c in VERDICT_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Per-layer gradient norms at depth {depth} (grey band: [1e-6, 1e3]; thin lines "
                 f"fp16)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def verdict_heatmap(results, path: Path) -> Path:
    """The verdict of every configuration: rows activation × init, columns arch × precision ×
    depth."""
    rows = sorted({(r.activation, r.init) for r in results},
                  key=[(r.activation, r.init) for r in results].index)
    cols = sorted({(r.arch, r.precision, r.depth) for r in results},
                  key=lambda c: ([r.arch for r in results].index(c[0]), c[1], c[2]))
    codes = {v: k for k, v in enumerate(VERDICT_COLORS)}
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in results:
        grid[rows.index((r.activation, r.init)), cols.index((r.arch, r.precision, r.depth))] = \
            codes[r.verdict]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(cols) + 2), max(4, 0.22 * len(rows) + 1.5)))
    ax.imshow(grid, cmap=ListedColormap(list(VERDICT_COLORS.values())), vmin=-0.5,
              vmax=len(VERDICT_COLORS) - 0.5, aspect="auto")
    ax.set_yticks(range(len(rows)), [f"{a} / {i}" for a, i in rows], fontsize=7)
    ax.set_xticks(range(len(cols)), [f"{a[:5]} {p} d{d}" for a, p, d in cols], fontsize=7,
                  rotation=90)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=v) for v, c in VERDICT_COLORS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("Verdict per configuration", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fp16_map(results, path: Path) -> Path:
    """Per-layer fp16 underflow and overflow fractions (gradients of each weight, and each
    activation), one row per fp16 configuration at the greatest depth."""
    depth = max(r.depth for r in results)
    chosen = [r for r in results if r.precision == "fp16" and r.depth == depth]
    if not chosen:
        chosen = [r for r in results if r.precision == "fp16"]
    width = max((len(r.fp16_layers) for r in chosen), default=1)
    under = np.full((len(chosen), width), np.nan)
    over = np.full((len(chosen), width), np.nan)
    for i, r in enumerate(chosen):
        for j, layer in enumerate(r.fp16_layers):
            under[i, j], over[i, j] = layer["underflow"], layer["overflow"]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3, 0.18 * len(chosen) + 1.5)), sharey=True)
    for ax, data, title, cmap in ((axes[0], under, "underflow (0 in fp16, not in float64)",
                                   "Blues"), (axes[1], over, "overflow (inf/NaN in fp16)", "Reds")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tensor: layer outputs (forward), then weight/bias gradients", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    axes[0].set_yticks(range(len(chosen)), [f"{r.activation}/{r.init}/{r.arch}" for r in chosen],
                       fontsize=6)
    fig.suptitle(f"fp16 (autocast, no loss scaling) at depth {depth}: fraction of each tensor",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def study_figures(results, out: Path) -> List[Path]:
    out = Path(out)
    return [grad_norm_figure(results, out / "grad_norms.png"),
            verdict_heatmap(results, out / "verdicts.png"),
            fp16_map(results, out / "fp16_map.png")]


def diagnose_figure(d, path) -> Path:
    """``refnet diagnose --plot``: per layer, the gradient norm in float64 and in the emulated
    precision (log scale), and the underflow/overflow fraction of each tensor."""
    grads = [t for t in d.tensors if t.kind == "param_grad"]
    acts = [t for t in d.tensors if t.kind == "activation"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6))
    x = range(len(grads))
    top.plot(x, _log_profile([t.norm_float64 for t in grads]), "o-", label="float64", lw=1.2)
    top.plot(x, _log_profile([t.norm for t in grads]), "s--", label=str(d.precision), lw=1)
    top.set_xticks(list(x), [t.name for t in grads], rotation=90, fontsize=6)
    top.set_ylabel("log10 ‖gradient‖")
    top.legend(fontsize=8)
    top.set_title(f"{d.precision}, loss scale {d.loss_scale:g}; first inf/NaN: "
                  f"{d.first_nonfinite or 'none'}", fontsize=9)
    rows = acts + grads
    idx = range(len(rows))
    bottom.bar(idx, [t.underflow / t.numel for t in rows], color="#2196f3", label="underflow")
    bottom.bar(idx, [(t.overflow + t.nan) / t.numel for t in rows], color="#f44336",
               bottom=[t.underflow / t.numel for t in rows], label="overflow + NaN")
    bottom.set_xticks(list(idx), [t.name for t in rows], rotation=90, fontsize=6)
    bottom.set_ylabel("fraction of elements")
    bottom.set_ylim(0, 1)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
