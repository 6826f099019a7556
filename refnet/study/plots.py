"""Figures for ``refnet study`` and ``refnet diagnose --plot`` (matplotlib, the ``plot`` extra).

Importing this module without matplotlib raises ImportError; callers treat the figures as
optional. The Agg backend is used: no display needed.

Each figure is built in two steps: a function that computes what is drawn (``*_data``/``*_panels``,
plain Python and numpy, tested without pixels) and one that draws it. A value a log axis cannot
show is never left out silently: a tensor whose values are all 0 (it underflowed entirely) gets a
marker on the panel's bottom edge, one holding inf/NaN a marker on the top edge, and the legend
says which is which — only for what the figure actually draws.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

VERDICT_COLORS = {"healthy": "#4caf50", "vanishing": "#2196f3", "exploding": "#f44336",
                  "nonfinite": "#212121"}
ARCH_STYLES = {"plain": "-", "batchnorm": "--", "residual": ":"}
# Line widths: float64 wide and pale, the low precision narrow and dark on top of it, so where
# the two coincide both stay visible (a pale band with a dark core).
PRECISION_STYLE = {"float64": {"lw": 2.4, "alpha": 0.45, "zorder": 2},
                   "low": {"lw": 0.9, "alpha": 1.0, "zorder": 3}}
# Edge markers, in axes coordinates: zero at the bottom, inf/NaN at the top, just inside the axes.
ZERO_LABEL, NONFINITE_LABEL = "all zero (underflow)", "inf/NaN"
EDGE = {"zero": ("v", 0.03, ZERO_LABEL), "nonfinite": ("X", 0.97, NONFINITE_LABEL)}
MAX_LAYER_TICKS = 8


def split_profile(values):
    """A per-layer series as a log axis can draw it: (log10 of each value, NaN where it cannot
    be drawn; indices of exact zeros; indices of inf/NaN). ``None`` is how results.json writes
    inf/NaN."""
    logs, zero, nonfinite = [], [], []
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            logs.append(math.nan)
            nonfinite.append(i)
        elif v == 0:
            logs.append(math.nan)
            zero.append(i)
        else:
            logs.append(math.log10(abs(v)))
    return logs, zero, nonfinite


def layer_ticks(n: int) -> List[int]:
    """Integer ticks for layers 1..n: every layer up to ``MAX_LAYER_TICKS``, else every k-th
    from 1 (and n itself, the output layer)."""
    step = max(1, math.ceil(n / MAX_LAYER_TICKS))
    ticks = list(range(1, n + 1, step))
    if ticks[-1] != n and n - ticks[-1] >= step / 2:
        ticks.append(n)
    return ticks


def _edge_markers(ax, xs, which, color, size=5):
    marker, y, _ = EDGE[which]
    ax.plot(xs, [y] * len(xs), marker, color=color, ms=size, ls="none", clip_on=False,
            transform=ax.get_xaxis_transform(), zorder=4)


def _edge_room(ax, zero: bool, nonfinite: bool, room=0.12):
    """Widen the y range by ``room`` of it at the bottom (zero markers) or top (inf/NaN), so the
    edge markers sit apart from the lines."""
    lo, hi = ax.get_ylim()
    span = hi - lo
    ax.set_ylim(lo - room * span if zero else lo, hi + room * span if nonfinite else hi)


def _order(values):
    """Unique values in the order they first appear."""
    return list(dict.fromkeys(values))


# --- the study's per-layer gradient norms -------------------------------------------------

def grad_norm_panels(results) -> dict:
    """What ``grad_norm_figure`` draws: the greatest depth of the grid, the activations (rows),
    the inits (columns), and per panel (activation, init) the series of that depth, each
    ``{"arch", "precision", "verdict", "layers" (1-based), "logs", "zero", "nonfinite"}`` with
    ``zero``/``nonfinite`` the layers marked on the bottom/top edge."""
    depth = max(r.depth for r in results)
    acts = _order(r.activation for r in results)
    inits = _order(r.init for r in results)
    panels: Dict[tuple, list] = {(a, i): [] for a in acts for i in inits}
    for r in results:
        if r.depth != depth:
            continue
        logs, zero, nonfinite = split_profile(r.grad_norms)
        panels[(r.activation, r.init)].append({
            "arch": r.arch, "precision": r.precision, "verdict": r.verdict,
            "layers": list(range(1, len(logs) + 1)), "logs": logs,
            "zero": [i + 1 for i in zero], "nonfinite": [i + 1 for i in nonfinite]})
    return {"depth": depth, "activations": acts, "inits": inits, "panels": panels}


def grad_norm_legend(data) -> List[dict]:
    """The legend entries of ``grad_norm_figure``, one per thing drawn and only for those:
    architectures (line style), verdicts (color), precisions (line width), and the edge
    markers. Each entry: ``{"label", "ls", "color", "lw", "marker"}``."""
    series = [s for panel in data["panels"].values() for s in panel]
    archs = _order(s["arch"] for s in series if _drawn(s))
    entries = [{"label": a, "ls": ARCH_STYLES[a], "color": "gray", "lw": 1.2, "marker": None}
               for a in ARCH_STYLES if a in archs]
    return entries + _verdict_precision_edge_entries(series)


def _drawn(series) -> bool:
    return any(v == v for v in series["logs"])                    # a line with a finite value


def _verdict_precision_edge_entries(series) -> List[dict]:
    """The legend entries both figures share: the verdicts drawn (color), the precisions
    (line width, where more than one), and the edge markers in use."""
    entries = [{"label": v, "ls": "-", "color": VERDICT_COLORS[v], "lw": 1.2, "marker": None}
               for v in VERDICT_COLORS if any(s["verdict"] == v for s in series)]
    precisions = _order(s["precision"] for s in series if _drawn(s))
    if len(precisions) > 1:
        entries += [{"label": p, "ls": "-", "color": "gray", "marker": None,
                     "lw": PRECISION_STYLE["float64" if p == "float64" else "low"]["lw"]}
                    for p in precisions]
    for which in ("zero", "nonfinite"):
        if any(s[which] for s in series):
            marker, _, label = EDGE[which]
            entries.append({"label": label, "ls": "none", "color": "gray", "lw": 0,
                            "marker": marker})
    return entries


def _legend_handles(entries):
    return [plt.Line2D([], [], ls=e["ls"], color=e["color"], lw=e["lw"], marker=e["marker"],
                       label=e["label"]) for e in entries]


def draw_grad_norms(results):
    """The figure of ``grad_norm_figure`` (a matplotlib Figure, not saved)."""
    data = grad_norm_panels(results)
    acts, inits, depth = data["activations"], data["inits"], data["depth"]
    fig, axes = plt.subplots(len(acts), len(inits), figsize=(2.6 * len(inits), 2.1 * len(acts)),
                             sharex=True, squeeze=False)
    n_layers = max((len(s["layers"]) for p in data["panels"].values() for s in p), default=1)
    low = sorted({s["precision"] for p in data["panels"].values() for s in p} - {"float64"})
    for i, act in enumerate(acts):
        for j, init in enumerate(inits):
            ax = axes[i][j]
            for s in data["panels"][(act, init)]:
                color = VERDICT_COLORS[s["verdict"]]
                style = PRECISION_STYLE["float64" if s["precision"] == "float64" else "low"]
                ax.plot(s["layers"], s["logs"], ARCH_STYLES[s["arch"]], color=color, **style)
                for which in ("zero", "nonfinite"):
                    if s[which]:
                        _edge_markers(ax, s[which], which, color)
            ax.axhspan(-6, 3, color="#eeeeee", zorder=0)
            panel = data["panels"][(act, init)]
            _edge_room(ax, any(s["zero"] for s in panel), any(s["nonfinite"] for s in panel))
            ax.set_xticks(layer_ticks(n_layers))
            ax.set_xlim(0.5, n_layers + 0.5)
            if i == 0:
                ax.set_title(init, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{act}\nlog10 ‖∂L/∂W‖", fontsize=8)
            if i == len(acts) - 1:
                ax.set_xlabel("layer (input → output)", fontsize=8)
            ax.tick_params(labelsize=7)
    entries = grad_norm_legend(data)
    fig.legend(handles=_legend_handles(entries), loc="lower center", ncol=len(entries),
               fontsize=8, frameon=False, handlelength=2.5, columnspacing=1.2)
    lows = " and ".join(low)
    fig.suptitle(f"Per-layer gradient norms at depth {depth} (grey band: [1e-6, 1e3]; wide pale "
                 f"lines float64" + (f", narrow dark lines {lows}" if low else "") + ")",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.035, 1, 0.97))
    return fig


def grad_norm_figure(results, path: Path) -> Path:
    """Per-layer gradient norms on a log scale: one panel per (activation, init), one line per
    architecture and precision at the grid's greatest depth."""
    fig = draw_grad_norms(results)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- verdicts -------------------------------------------------------------------------------

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


# --- the fp16 map -----------------------------------------------------------------------------

NO_TENSOR_COLOR, ZERO_COLOR = "#cccccc", "#ffffff"
# A nonzero fraction, however small (one element of thousands), gets at least this far into the
# colormap, so that it never looks like the white of "exactly 0".
LIGHTEST = 0.2


def fp16_map_data(results) -> dict:
    """What ``fp16_map`` draws: one row per fp16 configuration at the greatest depth (label
    "activation/init/arch"), columns the forward tensors (layer outputs) from column 0 and the
    backward ones (weight and bias gradients) from column ``n_forward``, so one line separates
    them in every row. ``under``/``over``: the fraction of each tensor's elements that underflow
    / overflow (inf or NaN); NaN where a row has no tensor in that column."""
    depth = max(r.depth for r in results)
    chosen = [r for r in results if r.precision == "fp16" and r.depth == depth]
    if not chosen:
        chosen = [r for r in results if r.precision == "fp16"]
    forward = lambda r: [t for t in r.fp16_layers if t["kind"] == "activation"]     # noqa: E731
    backward = lambda r: [t for t in r.fp16_layers if t["kind"] != "activation"]    # noqa: E731
    n_forward = max((len(forward(r)) for r in chosen), default=0)
    n_backward = max((len(backward(r)) for r in chosen), default=0)
    under = np.full((len(chosen), n_forward + n_backward), np.nan)
    over = np.full_like(under, np.nan)
    for i, r in enumerate(chosen):
        for offset, tensors in ((0, forward(r)), (n_forward, backward(r))):
            for j, t in enumerate(tensors):
                under[i, offset + j], over[i, offset + j] = t["underflow"], t["overflow"]
    return {"depth": depth, "labels": [f"{r.activation}/{r.init}/{r.arch}" for r in chosen],
            "under": under, "over": over, "n_forward": n_forward}


def fraction_colormap(name: str):
    """A matplotlib colormap for a fraction in [0, 1] where 0 is white (``set_under``), any
    nonzero fraction at least ``LIGHTEST`` into ``name``, and "no tensor" (NaN) grey."""
    base = plt.get_cmap(name)
    cmap = ListedColormap(base(np.linspace(LIGHTEST, 1.0, 256)), name=f"{name}-nonzero")
    return cmap.with_extremes(under=ZERO_COLOR, bad=NO_TENSOR_COLOR)


# Fractions below this are drawn as exactly 0 (the white of set_under): smaller than one element
# of the largest tensor a study net has (10⁶ elements would be far beyond its width 32).
ZERO_FRACTION = 1e-9


def draw_fp16_map(results):
    data = fp16_map_data(results)
    labels, n_forward = data["labels"], data["n_forward"]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.5, 0.2 * len(labels) + 2.2)))
    for ax, grid, title, cmap_name in (
            (axes[0], data["under"], "underflow: 0 in fp16, not in float64", "Blues"),
            (axes[1], data["over"], "overflow: inf/NaN in fp16", "Reds")):
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=fraction_colormap(cmap_name),
                       vmin=ZERO_FRACTION, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9, pad=16)
        ax.axvline(n_forward - 0.5, color="black", lw=1.5)
        above = ax.get_xaxis_transform()             # x in columns, y in axes fractions
        ax.text(n_forward / 2 - 0.5, 1.004, "forward: layer outputs", ha="center", va="bottom",
                fontsize=7, transform=above)
        ax.text(n_forward + (grid.shape[1] - n_forward) / 2 - 0.5, 1.004,
                "backward: weight and bias gradients", ha="center", va="bottom", fontsize=7,
                transform=above)
        ax.set_xlabel("tensor: layer outputs in layer order | gradients, input side first",
                      fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the tensor's elements")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=ZERO_COLOR, edgecolor="black", lw=0.5,
                             label="exactly 0"),
               plt.Rectangle((0, 0), 1, 1, facecolor=NO_TENSOR_COLOR, label="no such tensor")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"fp16 (autocast, no loss scaling) at depth {data['depth']}: fraction of each "
                 f"tensor", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    return fig


def fp16_map(results, path: Path) -> Path:
    """Per-layer fp16 underflow and overflow fractions (each layer's output, then the gradients
    of each weight and bias), one row per fp16 configuration at the greatest depth."""
    fig = draw_fp16_map(results)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def study_figures(results, out: Path) -> List[Path]:
    out = Path(out)
    return [grad_norm_figure(results, out / "grad_norms.png"),
            verdict_heatmap(results, out / "verdicts.png"),
            fp16_map(results, out / "fp16_map.png")]


# --- refnet diagnose --plot ----------------------------------------------------------------

def diagnose_data(d) -> dict:
    """What ``diagnose_figure`` draws on top: the layers holding parameters (in order), and per
    parameter kind ("weight", "bias", ...) and run (float64, the emulated precision) one series
    over those layers: ``{"label", "kind", "run", "logs" (NaN where not drawable or where the
    layer has no such parameter), "zero", "nonfinite" (layer indices)}``; ``notes``: one line per
    series with no value the log axis can show."""
    grads = [t for t in d.tensors if t.kind == "param_grad"]
    owner = lambda t: t.name.rsplit(".", 1)[0]                              # noqa: E731
    kind = lambda t: t.name.rsplit(".", 1)[-1]                              # noqa: E731
    layers = _order(owner(t) for t in grads)
    series, notes = [], []
    for k in _order(kind(t) for t in grads):
        by_layer = {owner(t): t for t in grads if kind(t) == k}
        for run, attr in (("float64", "norm_float64"), (str(d.precision), "norm")):
            values = [getattr(by_layer[layer], attr) if layer in by_layer else math.nan
                      for layer in layers]
            logs, zero, nonfinite = split_profile(values)
            nonfinite = [i for i in nonfinite if layers[i] in by_layer]   # absent: not inf/NaN
            label = f"{k} {run}"
            series.append({"label": label, "kind": k, "run": run, "logs": logs, "zero": zero,
                           "nonfinite": nonfinite})
            if not any(v == v for v in logs):
                what = ("every one 0 (underflow), on the bottom edge" if not nonfinite else
                        "every one inf/NaN, on the top edge" if not zero else
                        "each 0 (bottom edge) or inf/NaN (top edge)")
                notes.append(f"{label}: no finite nonzero norm ({what})")
    return {"layers": layers, "series": series, "notes": notes}


DIAGNOSE_STYLE = {"weight": ("o", "-"), "bias": ("s", "--")}
STEP_COLORS = ("#1565c0", "#2e7d32", "#6a1b9a", "#00838f", "#5d4037", "#ad1457")


def diagnose_steps_data(d) -> dict:
    """What the gradients-through-time panel of ``diagnose_figure`` draws (recurrent models):
    per profile of ``d.steps`` and run (float64, the emulated precision) one series over the
    time steps: ``{"label", "profile" (its index, which sets the color), "run", "steps"
    (0-based t), "logs", "zero", "nonfinite" (steps)}``; ``notes`` as ``diagnose_data``'s."""
    series, notes = [], []
    for i, p in enumerate(d.steps):
        for run, values in (("float64", p.norm_float64), (str(d.precision), p.norm)):
            logs, zero, nonfinite = split_profile(values)
            label = f"{p.label} {run}"
            series.append({"label": label, "profile": i, "run": run,
                           "steps": list(range(len(values))), "logs": logs, "zero": zero,
                           "nonfinite": nonfinite})
            if not any(v == v for v in logs):
                notes.append(f"{label}: no finite nonzero norm at any step")
    return {"series": series, "notes": notes}


def _draw_steps(ax, d):
    data = diagnose_steps_data(d)
    drawn = set()
    for s in data["series"]:
        wide = s["run"] == "float64"
        color = STEP_COLORS[s["profile"] % len(STEP_COLORS)]
        ax.plot(s["steps"], s["logs"], "-", color=color, label=s["label"],
                **PRECISION_STYLE["float64" if wide else "low"])
        for which in ("zero", "nonfinite"):
            if s[which]:
                _edge_markers(ax, s[which], which, color, size=4)
                drawn.add(which)
    _edge_room(ax, "zero" in drawn, "nonfinite" in drawn)
    ax.set_xlabel("time step t (0: the earliest)", fontsize=8)
    ax.set_ylabel("log10 ‖∂L/∂state_t‖")
    handles, _ = ax.get_legend_handles_labels()
    handles += [plt.Line2D([], [], marker=EDGE[w][0], ls="none", color="gray", label=EDGE[w][2])
                for w in ("zero", "nonfinite") if w in drawn]
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set_title("gradients through time (wide pale: float64; narrow dark: "
                 f"{d.precision})" + "".join("\n" + n for n in data["notes"]), fontsize=8)


def draw_diagnose(d):
    data = diagnose_data(d)
    grads = [t for t in d.tensors if t.kind == "param_grad"]
    acts = [t for t in d.tensors if t.kind == "activation"]
    if d.steps:
        fig, (top, bottom, steps) = plt.subplots(3, 1, figsize=(9, 9.5))
        _draw_steps(steps, d)
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5))
    x = list(range(len(data["layers"])))
    colors = {"float64": "#1565c0"}
    low_color = "#ef6c00"
    markers_drawn = set()
    kinds = _order(s["kind"] for s in data["series"])
    for s in data["series"]:
        marker, ls = DIAGNOSE_STYLE.get(s["kind"], ("^", ":"))
        color = colors.get(s["run"], low_color)
        wide = s["run"] == "float64"        # wide and pale under the narrow low precision
        top.plot(x, s["logs"], marker=marker, ls=ls, color=color, label=s["label"],
                 ms=6 if wide else 3, **PRECISION_STYLE["float64" if wide else "low"])
        # The edge markers of a layer's weight and bias side by side, not on top of each other.
        shift = 0.25 * (kinds.index(s["kind"]) - (len(kinds) - 1) / 2)
        for which in ("zero", "nonfinite"):
            if s[which]:
                _edge_markers(top, [i + shift for i in s[which]], which, color, size=6)
                markers_drawn.add(which)
    _edge_room(top, "zero" in markers_drawn, "nonfinite" in markers_drawn)
    top.set_xticks(x, data["layers"], rotation=90, fontsize=6)
    top.set_xlabel("layer", fontsize=8)
    top.set_ylabel("log10 ‖gradient‖")
    handles, _ = top.get_legend_handles_labels()
    handles += [plt.Line2D([], [], marker=EDGE[w][0], ls="none", color="gray", label=EDGE[w][2])
                for w in ("zero", "nonfinite") if w in markers_drawn]
    top.legend(handles=handles, fontsize=7, ncol=2)
    top.set_title("\n".join([f"{d.precision}, loss scale {d.loss_scale:g}; first inf/NaN: "
                             f"{d.first_nonfinite or 'none'}"] + data["notes"]), fontsize=8)
    rows = acts + grads
    idx = range(len(rows))
    under = [t.underflow / t.numel for t in rows]
    bottom.bar(idx, under, color="#2196f3", label="underflow")
    bottom.bar(idx, [(t.overflow + t.nan) / t.numel for t in rows], color="#f44336",
               bottom=under, label="overflow + NaN")
    if acts and grads:
        bottom.axvline(len(acts) - 0.5, color="black", lw=1)
        bottom.text(len(acts) - 0.5, 1.02, "forward ← │ → backward ", ha="center",
                    fontsize=7, transform=bottom.get_xaxis_transform())
    bottom.set_xticks(list(idx), [t.name for t in rows], rotation=90, fontsize=6)
    bottom.set_ylabel("fraction of elements")
    bottom.set_ylim(0, 1)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return fig


def diagnose_figure(d, path) -> Path:
    """``refnet diagnose --plot``: per layer, the gradient norm of its weight and of its bias in
    float64 and in the emulated precision (log scale; all-zero and inf/NaN tensors on the edges),
    and the underflow/overflow fraction of each tensor, forward then backward; for a recurrent
    model a third panel, ‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖) against the time step t."""
    fig = draw_diagnose(d)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


# --- refnet study --recurrent -----------------------------------------------------------------

INIT_STYLES = {"uniform": "-", "orthogonal": "--"}


def through_time_panels(results) -> dict:
    """What ``draw_through_time`` draws: the longest length of the grid, the cells (rows),
    the radii (columns), and per panel (cell, radius) the series of that length, each
    ``{"init", "precision", "verdict", "steps" (t, 0-based), "logs", "zero", "nonfinite"}``
    (``zero``: the steps whose ∂L/∂h_t is exactly 0 — in fp16, underflowed entirely)."""
    length = max(r.length for r in results)
    cells = _order(r.cell for r in results)
    radii = sorted(set(r.radius for r in results))
    panels: Dict[tuple, list] = {(c, rho): [] for c in cells for rho in radii}
    for r in results:
        if r.length != length:
            continue
        logs, zero, nonfinite = split_profile(r.step_norms)
        panels[(r.cell, r.radius)].append({
            "init": r.init, "precision": r.precision, "verdict": r.verdict,
            "steps": list(range(len(logs))), "logs": logs, "zero": zero,
            "nonfinite": nonfinite})
    return {"length": length, "cells": cells, "radii": radii, "panels": panels}


def through_time_legend(data) -> List[dict]:
    """Legend entries, one per thing drawn: inits (line style), verdicts (color), precisions
    (line width) and the edge markers."""
    series = [s for panel in data["panels"].values() for s in panel]
    inits = _order(s["init"] for s in series if _drawn(s))
    entries = [{"label": i, "ls": INIT_STYLES.get(i, ":"), "color": "gray", "lw": 1.2,
                "marker": None} for i in inits]
    return entries + _verdict_precision_edge_entries(series)


def draw_through_time(results):
    data = through_time_panels(results)
    cells, radii, length = data["cells"], data["radii"], data["length"]
    fig, axes = plt.subplots(len(cells), len(radii), figsize=(max(10.0, 2.7 * len(radii)),
                                                             2.1 * len(cells) + 0.8),
                             sharex=True, squeeze=False)
    for i, cell in enumerate(cells):
        for j, rho in enumerate(radii):
            ax = axes[i][j]
            panel = data["panels"][(cell, rho)]
            for s in panel:
                color = VERDICT_COLORS[s["verdict"]]
                style = PRECISION_STYLE["float64" if s["precision"] == "float64" else "low"]
                ax.plot(s["steps"], s["logs"], INIT_STYLES.get(s["init"], ":"), color=color,
                        **style)
                for which in ("zero", "nonfinite"):
                    if s[which]:
                        _edge_markers(ax, s[which], which, color, size=3)
            _edge_room(ax, any(s["zero"] for s in panel), any(s["nonfinite"] for s in panel))
            ax.set_xlim(-0.5, length - 0.5)
            if i == 0:
                ax.set_title(f"spectral radius {rho:g}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{cell}\nlog10 ‖∂L/∂h_t‖", fontsize=8)
            if i == len(cells) - 1:
                ax.set_xlabel("time step t (the loss enters at the last)", fontsize=8)
            ax.tick_params(labelsize=7)
    entries = through_time_legend(data)
    fig.legend(handles=_legend_handles(entries), loc="lower center",
               ncol=math.ceil(len(entries) / 2), fontsize=8, frameon=False, handlelength=2.5,
               columnspacing=1.2)
    fig.suptitle(f"Gradients through time at T = {length}: ‖∂L/∂h_t‖ (wide pale lines float64, "
                 f"narrow dark fp16 autocast; color: the verdict)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def step_underflow_data(results) -> dict:
    """What ``draw_step_underflow`` draws: one row per fp16 configuration at the longest
    length (label "cell/init/rho", "(inf/NaN)" added where the run went non-finite, which no
    underflow count shows), one column per step t; the fraction of ∂L/∂h_t's elements that
    are 0 in fp16 where float64's are not."""
    length = max(r.length for r in results)
    chosen = [r for r in results if r.precision == "fp16" and r.length == length]
    grid = np.full((len(chosen), length), np.nan)
    for i, r in enumerate(chosen):
        grid[i, :len(r.step_underflow)] = r.step_underflow
    labels = [f"{r.cell}/{r.init}/rho {r.radius:g}" + (" (inf/NaN)" if r.verdict == "nonfinite"
                                                        else "") for r in chosen]
    return {"length": length, "labels": labels, "under": grid}


def draw_step_underflow(results):
    data = step_underflow_data(results)
    labels = data["labels"]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(labels) + 1.8)))
    im = ax.imshow(np.ma.masked_invalid(data["under"]), aspect="auto",
                   cmap=fraction_colormap("Blues"), vmin=ZERO_FRACTION, vmax=1,
                   interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("time step t (the loss enters at the last)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of ∂L/∂h_t's elements")
    ax.set_title(f"fp16 (autocast, no loss scaling) at T = {data['length']}: ∂L/∂h_t "
                 f"underflowed to 0 (white: nothing lost)", fontsize=10)
    fig.tight_layout()
    return fig


def clipping_data(clip) -> dict:
    """What ``clipping_figure`` draws: per run (without clipping, with clip-norm) the loss and
    the global gradient norm per step as ``split_profile`` series, and ``stop``: the step at
    which a run stopped on a non-finite loss (marked on the top edge), else None."""
    runs = []
    for run in (clip.unclipped, clip.clipped):
        label = "without clipping" if run.max_norm is None else f"clip-norm {run.max_norm:g}"
        loss = split_profile(run.loss)
        norm = split_profile(run.grad_norm)
        runs.append({"label": label, "loss": loss, "grad_norm": norm,
                     "stop": len(run.loss) - 1 if run.stopped else None})
    return {"settings": clip.settings, "runs": runs}


def draw_clipping(clip):
    data = clipping_data(clip)
    s = data["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"without clipping": "#f44336"}
    for run in data["runs"]:
        color = colors.get(run["label"], "#1565c0")
        for ax, key in ((left, "loss"), (right, "grad_norm")):
            logs, zero, nonfinite = run[key]
            ax.plot(range(len(logs)), logs, "-", color=color, lw=1.4, label=run["label"])
            if nonfinite:
                _edge_markers(ax, nonfinite, "nonfinite", color, size=7)
    right.axhline(math.log10(s["max_norm"]), color="gray", ls=":", lw=1,
                  label=f"max_norm {s['max_norm']:g}")
    for ax, what in ((left, "log10 loss"), (right, "log10 ‖∂L/∂θ‖₂ (before clipping)")):
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel(what, fontsize=8)
        ax.tick_params(labelsize=7)
        handles, _ = ax.get_legend_handles_labels()
        if any(run[key][2] for run in data["runs"] for key in ("loss", "grad_norm")):
            handles.append(plt.Line2D([], [], marker=EDGE["nonfinite"][0], ls="none",
                                      color="gray", label=NONFINITE_LABEL))
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(f"Clipping an exploding RNN: {s['cell']} + {s['init']}, T = {s['length']}, "
                 f"spectral radius {s['radius']:g} (‖W_hh‖₂ = {s['norm_hh']:.2f}), "
                 f"{s['optimizer']} lr {s['lr']:g}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def recurrent_figures(results, clip, out: Path) -> List[Path]:
    """The recurrent study's figures: ‖∂L/∂h_t‖ against t, fp16's underflow per step (when
    the grid has fp16 rows) and the clipping experiment (when it ran)."""
    out = Path(out)
    written = [_save(draw_through_time(results), out / "recurrent-grad-norms.png")]
    if any(r.precision == "fp16" for r in results):
        written.append(_save(draw_step_underflow(results), out / "recurrent-fp16-steps.png"))
    if clip is not None:
        written.append(_save(draw_clipping(clip), out / "recurrent-clipping.png"))
    return written
