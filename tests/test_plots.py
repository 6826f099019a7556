"""The figures' logic, without pixels: what each figure is given to draw (series, edge markers,
grids), its legend entries and its ticks. A log axis cannot draw 0 or inf/NaN, so those are
the cases every test here plants."""

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import Normalize, to_rgba  # noqa: E402

from refnet.lowp.diagnose import Diagnosis, TensorHealth  # noqa: E402
from refnet.lowp.emulation import Precision  # noqa: E402
from refnet.study import plots  # noqa: E402
from refnet.study.grid import Result  # noqa: E402


def _result(act="sigmoid", init="xavier", arch="plain", precision="float64", norms=(1.0, 2.0),
            verdict="healthy", depth=2, fp16_layers=()):
    return Result(act, init, depth, arch, precision, verdict, "", None, list(norms), [], None,
                  None, None, None, fp16_layers=list(fp16_layers))


def _legend_labels(fig):
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_split_profile_sets_zeros_and_inf_nan_apart_from_what_a_log_axis_can_draw():
    logs, zero, nonfinite = plots.split_profile([1e-3, 0.0, None, math.inf, math.nan, 100.0])
    assert logs[0] == pytest.approx(-3) and logs[5] == pytest.approx(2)
    assert all(math.isnan(v) for v in logs[1:5])
    assert zero == [1] and nonfinite == [2, 3, 4]


def test_layers_whose_gradient_underflowed_or_went_inf_nan_are_marked_on_the_edges():
    """An fp16 series with its first two layers exactly 0 and its last inf/NaN (None, as
    results.json writes it): those layers are the bottom and top edge markers, 1-based like
    the axis, and the drawn panel carries them as marker-only lines at the edges."""
    results = [_result(norms=(1e-3, 1e-2, 1e-1)),
               _result(precision="fp16", verdict="nonfinite", norms=(0.0, 0.0, None))]
    data = plots.grad_norm_panels(results)
    fp16 = [s for s in data["panels"][("sigmoid", "xavier")] if s["precision"] == "fp16"][0]
    assert fp16["zero"] == [1, 2] and fp16["nonfinite"] == [3]
    assert all(math.isnan(v) for v in fp16["logs"])
    fig = plots.draw_grad_norms(results)
    ax = fig.axes[0]
    edges = {line.get_marker(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.lines if line.get_linestyle() == "None"}
    assert edges["v"] == ([1, 2], [plots.EDGE["zero"][1]] * 2)
    assert edges["X"] == ([3], [plots.EDGE["nonfinite"][1]])


def test_the_legend_names_only_what_the_figure_draws():
    """No inf/NaN anywhere: no "inf/NaN" entry; no batchnorm net: no "batchnorm"; only the
    verdicts that occur. With an underflowed and a non-finite fp16 series, both marker entries
    appear, and the precisions are told apart."""
    clean = [_result(norms=(1e-9, 1.0), verdict="vanishing"), _result(arch="residual")]
    labels = [e["label"] for e in plots.grad_norm_legend(plots.grad_norm_panels(clean))]
    assert labels == ["plain", "residual", "healthy", "vanishing"]
    fig = plots.draw_grad_norms(clean)
    assert _legend_labels(fig) == labels

    mixed = clean + [_result(precision="fp16", norms=(0.0, 1.0), verdict="vanishing"),
                     _result(arch="residual", precision="fp16", norms=(None, None),
                             verdict="nonfinite")]
    labels = [e["label"] for e in plots.grad_norm_legend(plots.grad_norm_panels(mixed))]
    assert labels == ["plain", "residual", "healthy", "vanishing", "nonfinite", "float64",
                      "fp16", plots.ZERO_LABEL, plots.NONFINITE_LABEL]


def test_layer_ticks_are_whole_layers_and_include_the_output_layer():
    assert plots.layer_ticks(5) == [1, 2, 3, 4, 5]
    assert plots.layer_ticks(13) == [1, 3, 5, 7, 9, 11, 13]
    assert plots.layer_ticks(51) == [1, 8, 15, 22, 29, 36, 43, 50]     # 51 is 1 step from 50
    fig = plots.draw_grad_norms([_result(norms=[1.0] * 13, depth=12)])
    ticks = fig.axes[0].get_xticks()
    assert list(ticks) == plots.layer_ticks(13)


def _fp16_layers(n_forward, n_backward, underflow=0.0):
    return ([{"name": f"{i}.out", "kind": "activation", "overflow": 0.0, "underflow": underflow}
             for i in range(n_forward)] +
            [{"name": f"{i}.weight", "kind": "param_grad", "overflow": 0.5, "underflow": 0.0}
             for i in range(n_backward)])


def test_fp16_map_aligns_backward_tensors_after_one_separator_and_keeps_no_tensor_apart_from_0():
    """Rows with 3 and 5 forward tensors: backward tensors start at column 5 in both, so one
    vertical line separates forward from backward; a missing tensor is NaN, an exact 0 stays 0."""
    results = [_result(precision="fp16", fp16_layers=_fp16_layers(3, 2)),
               _result(arch="batchnorm", precision="fp16", fp16_layers=_fp16_layers(5, 4, 0.25))]
    data = plots.fp16_map_data(results)
    assert data["n_forward"] == 5 and data["labels"] == ["sigmoid/xavier/plain",
                                                         "sigmoid/xavier/batchnorm"]
    under, over = data["under"], data["over"]
    assert under.shape == (2, 9)
    assert list(under[0, :3]) == [0.0, 0.0, 0.0] and np.isnan(under[0, 3:5]).all()
    assert list(over[0, 5:7]) == [0.5, 0.5] and np.isnan(over[0, 7:]).all()
    assert list(under[1, :5]) == [0.25] * 5 and not np.isnan(over[1]).any()
    fig = plots.draw_fp16_map(results)
    for ax in fig.axes[:2]:                       # both panels: row labels and the separator
        assert [t.get_text() for t in ax.get_yticklabels()] == data["labels"]
        assert any(list(line.get_xdata()) == [4.5, 4.5] for line in ax.lines)


def test_fp16_map_colors_0_white_any_nonzero_fraction_visibly_and_no_tensor_grey():
    """One element in 16384 underflowing is not drawn as the white of "exactly 0"."""
    cmap, norm = plots.fraction_colormap("Blues"), Normalize(plots.ZERO_FRACTION, 1)
    white, grey = to_rgba(plots.ZERO_COLOR), to_rgba(plots.NO_TENSOR_COLOR)
    assert cmap(norm(0.0)) == white
    smallest = cmap(norm(1 / 16384))
    assert smallest != white and min(smallest[:3]) < 0.9
    assert tuple(cmap(np.ma.masked_invalid([np.nan]))[0]) == grey


def _health(name, kind, norm, norm64, numel=4):
    return TensorHealth(name, kind, "float16", numel, 0, 0, 0, 0, 0.0, 0.0, {}, norm, norm64)


def _diagnosis(tensors, first=None):
    return Diagnosis(Precision("fp16", "autocast"), 1.0, 1.0, 1.0, 0, first, tensors)


def test_diagnose_plot_draws_weights_and_biases_apart_with_a_note_where_none_is_drawable():
    """Layer 0's bias underflows in fp16 and layer 2 has no bias at all: the fp16 bias series
    has no drawable value, and the note says why (0, not inf/NaN: the absent bias of layer 2 is
    not counted as inf/NaN)."""
    d = _diagnosis([_health("0.out", "activation", 1.0, 1.0),
                    _health("0.weight", "param_grad", 1e-3, 1e-3),
                    _health("0.bias", "param_grad", 0.0, 1e-9),
                    _health("2.weight", "param_grad", 1e-1, 1e-1)])
    data = plots.diagnose_data(d)
    assert data["layers"] == ["0", "2"]
    labels = [s["label"] for s in data["series"]]
    assert labels == ["weight float64", "weight fp16 (autocast)", "bias float64",
                      "bias fp16 (autocast)"]
    bias16 = data["series"][3]
    assert bias16["zero"] == [0] and bias16["nonfinite"] == []
    assert data["notes"] == ["bias fp16 (autocast): no finite nonzero norm (every one 0 "
                             "(underflow), on the bottom edge)"]
    fig = plots.draw_diagnose(d)
    assert "bias fp16 (autocast): no finite nonzero norm" in fig.axes[0].get_title()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == labels + [plots.ZERO_LABEL]


def test_diagnose_plot_of_the_exploding_preset_notes_that_no_fp16_gradient_is_finite(tmp_path):
    """relu-normal1 overflows in its 5th Linear: every fp16 gradient norm is inf/NaN, which the
    figure says in its title and marks on the top edge."""
    from refnet.lowp.diagnose import diagnose
    from refnet.model import Model
    from refnet.study.presets import preset
    with np.errstate(all="ignore"):
        d = diagnose(Model(preset("relu-normal1")), Precision("fp16", "autocast"))
    data = plots.diagnose_data(d)
    assert [n.split(":")[0] for n in data["notes"]] == ["weight fp16 (autocast)",
                                                        "bias fp16 (autocast)"]
    assert all("inf/NaN, on the top edge" in n for n in data["notes"])
    assert plots.diagnose_figure(d, tmp_path / "d.png").stat().st_size > 0
