"""refnet.from_torch and `refnet import`: torch models refnet has never seen come back as refnet
models computing the same function, their gradients under torch's names equal to torch's
autograd, and `refnet verify` passes on them; what refnet cannot import is refused by name."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import refnet  # noqa: E402
from refnet.cli import main  # noqa: E402
from refnet.interop import torch_import  # noqa: E402
from refnet.interop.torch_import import UnsupportedModel, from_torch, load_program  # noqa: E402

pytestmark = pytest.mark.torch


# --- unseen models: the four (a ResNet in both modes) ---------------------------------

def mlp_batchnorm():
    """nn.Sequential (nested) MLP with BatchNorm1d."""
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Dropout(0.0)),
                         nn.Linear(12, 5))


class StridedCNN(nn.Module):
    """Strided, dilated and grouped convs, BatchNorm2d, torch.flatten in forward."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False), nn.BatchNorm2d(8),
            nn.GELU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, as written there (one ReLU module called twice, out += identity)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Two blocks, the second with a strided 1×1-conv + BatchNorm downsample shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, 2, nn.Sequential(
            nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LoopMLP(nn.Module):
    """A forward that loops over an nn.ModuleList: pre-norm residual blocks (LayerNorm,
    functional gelu/silu, a scale of 0.5 on the branch)."""

    def __init__(self, width=8, depth=3):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(width),
                                                   "fc1": nn.Linear(width, 2 * width),
                                                   "fc2": nn.Linear(2 * width, width)})
                                    for _ in range(depth))
        self.out = nn.Linear(width, 5)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for i, block in enumerate(self.blocks):
            act = F.gelu if i % 2 == 0 else F.silu
            h = h + 0.5 * block["fc2"](act(block["fc1"](block["norm"](h))))
        return self.out(F.relu(h))


def _randomized(net, seed):
    """BatchNorm weights, biases and running statistics away from 1 and 0, so that a misplaced
    γ, β, mean or variance shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g,
                                                       dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g,
                                                     dtype=m.running_var.dtype))
    return net


UNSEEN = {
    "mlp-batchnorm1d": (mlp_batchnorm, (6, 6), "train"),
    "cnn-strided-dilated-grouped": (StridedCNN, (3, 3, 8, 8), "train"),
    "resnet-train": (TinyResNet, (2, 3, 8, 8), "train"),
    "resnet-eval": (TinyResNet, (2, 3, 8, 8), "eval"),
    "modulelist-residual-layernorm": (LoopMLP, (4, 5), "train"),
}


def _unseen(name, dtype=torch.float64):
    make, shape, mode = UNSEEN[name]
    torch.manual_seed(0)
    net = _randomized(make().to(dtype), 1).train(mode == "train")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = torch.randint(0, 5, (shape[0],), generator=torch.Generator().manual_seed(3))
    return net, x, y


def _torch_grads(net, x, y):
    net = copy.deepcopy(net)
    tx = x.clone().requires_grad_(True)
    loss = F.cross_entropy(net(tx), y)
    loss.backward()
    grads = {k: p.grad.numpy().astype(np.float64) for k, p in net.named_parameters()}
    grads["x"] = tx.grad.numpy().astype(np.float64)
    return loss.item(), grads


@pytest.mark.parametrize("name", UNSEEN)
def test_an_unseen_torch_model_gives_torchs_float64_gradients_under_torchs_names(name):
    """Every gradient agrees with torch's float64 autograd normwise to 1e-11, keyed by torch's
    own names (named_parameters), and the parameters come keyed by the state_dict's names.
    The bias before a train-mode BatchNorm has an exact gradient of 0, where both hold only
    rounding residue (~1e-17): it is measured against its layer's weight gradient, the scale
    its residue comes from. Measured: 3e-15 at worst (float64 rounding, orders apart)."""
    net, x, y = _unseen(name)
    model, params = from_torch(net, x, loss="softmax_cross_entropy")
    assert set(params) <= set(net.state_dict())
    assert set(params) >= {k for k, _ in net.named_parameters()}
    assert model.mode == UNSEEN[name][2]
    torch_loss, theirs = _torch_grads(net, x, y)
    ours = model.loss_and_grads(refnet.FLOAT64, params, x.numpy(), y.numpy())
    grads = {**ours.params, "x": ours.x}
    assert set(grads) == set(theirs)
    for k, g in theirs.items():
        weight = k.rsplit(".", 1)[0] + ".weight"
        scale = max(np.linalg.norm(g), np.linalg.norm(theirs.get(weight, g)))
        assert np.linalg.norm(grads[k] - g) <= 1e-11 * scale, k
    assert abs(float(ours.loss) - torch_loss) <= 1e-13 * abs(torch_loss)


@pytest.mark.parametrize("name", UNSEEN)
def test_verify_passes_on_an_unseen_torch_model(name):
    """The verification triangle on the imported model, at torch's parameters and input."""
    net, x, y = _unseen(name)
    model, params = from_torch(net, x, loss="softmax_cross_entropy")
    report = refnet.verify(model, params, x.numpy(), y.numpy())
    assert report.passed, [t.name for t in report.tensors if not t.passed]


def test_the_module_keeps_its_buffers_and_the_layers_carry_its_module_paths():
    """Importing a train-mode model runs it on copies: the module's running statistics do not
    move. The layers' torch_name are the module paths (a residual's shortcut included)."""
    net, x, _ = _unseen("resnet-train")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model, _ = from_torch(net, x, loss="softmax_cross_entropy")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    names = [layer.torch_name for layer in torch_import._leaves(model)
             if layer.torch_name is not None]
    assert {"conv1", "bn1", "layer1.0.conv1", "layer2.0.downsample.0",
            "layer2.0.downsample.1", "fc"} <= set(names)
    blocks = [layer for layer in model.layers if layer.type == "residual"]
    assert len(blocks) == 2 and blocks[0].shortcut is None and blocks[1].shortcut is not None


def test_a_float32_module_imports_with_its_values_exactly():
    """A float32 module's parameters come back as float64 holding the same numbers."""
    net, x, _ = _unseen("mlp-batchnorm1d", torch.float32)
    model, params = from_torch(net, x, loss="softmax_cross_entropy")
    for k, v in net.state_dict().items():
        if k in params:
            assert params[k].dtype == np.float64
            assert np.array_equal(params[k], v.double().numpy()), k


def test_to_torch_of_an_imported_model_has_torchs_names_and_refnets_gradients():
    """refnet.to_torch(model, params) of an imported model is a module whose named_parameters
    and state_dict are the original's names, and whose autograd gives the original's gradients."""
    net, x, y = _unseen("resnet-eval")
    model, params = from_torch(net, x, loss="softmax_cross_entropy")
    twin = refnet.to_torch(model, params).eval()
    assert set(twin.state_dict()) == set(params)
    assert {k for k, _ in twin.named_parameters()} == {k for k, _ in net.named_parameters()}
    _, theirs = _torch_grads(net, x, y)
    _, again = _torch_grads(twin, x, y)
    for k in theirs:
        assert np.allclose(again[k], theirs[k], rtol=1e-12, atol=1e-15), k


# --- what is refused ----------------------------------------------------------------------

class Sine(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.sin(self.fc(x))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return F.linear(x, self.w)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(x))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def _mixed():
    m = Mixed()
    m.drop.eval()
    return m


@pytest.mark.parametrize("make, needles", [
    (Sine, ["unsupported op sin.default", "at <root> (Sine)", "nn.Linear"]),
    (Shared, ["fc.weight is used by two ops", "no shared weights"]),
    (Functional, ["uses w as its weight", "<module>.weight"]),
    (_mixed, ["both modes", "bn", "drop"]),
    (Concat, ["cat.default", "supported:"]),
], ids=["unsupported-op", "shared-weights", "functional-parameter", "mixed-modes", "concat"])
def test_what_refnet_cannot_import_is_a_clear_error_naming_the_op_and_module(make, needles):
    """One ValueError naming the op (or tensor), its module path and what is supported."""
    with pytest.raises(UnsupportedModel) as caught:
        from_torch(make(), torch.randn(4, 3), loss="mse")
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_a_conversion_that_changed_the_function_is_caught_by_the_forward_check(monkeypatch):
    """The import runs the module and the refnet model on the example input and holds them to
    twice refnet's error bound: a planted mistake in the op table (tanh read as sigmoid) stops
    the import instead of returning a wrong model."""
    monkeypatch.setitem(torch_import.OPS, "tanh.default", torch_import._activation("sigmoid"))
    net, x, _ = _unseen("mlp-batchnorm1d")
    with pytest.raises(UnsupportedModel, match="differs from the module's"):
        from_torch(net, x, loss="softmax_cross_entropy")


@pytest.mark.parametrize("loss, spec", [
    ("mse", {"type": "mse"}),
    (nn.CrossEntropyLoss(reduction="sum"), {"type": "softmax_cross_entropy", "reduction": "sum"}),
    (F.binary_cross_entropy_with_logits, {"type": "bce_with_logits"}),
])
def test_a_loss_is_a_name_a_torch_loss_module_or_function(loss, spec):
    assert torch_import.loss_spec(loss) == spec


def test_a_torch_loss_option_refnet_lacks_is_refused():
    with pytest.raises(UnsupportedModel, match="label_smoothing"):
        torch_import.loss_spec(nn.CrossEntropyLoss(label_smoothing=0.1))


# --- refnet import MODEL.pt2 --------------------------------------------------------------

@pytest.fixture
def pt2(tmp_path):
    net, x, _ = _unseen("resnet-train", torch.float32)
    path = tmp_path / "resnet.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    return path, net


def test_refnet_import_writes_a_spec_and_params_that_verify_passes_on(pt2, tmp_path, capsys):
    """A program saved with torch.export.save becomes SPEC.json (torch_name on each layer) and
    P.npz (torch's names, buffers included); `refnet verify SPEC --params P` passes on them."""
    path, net = pt2
    spec, params = tmp_path / "resnet.json", tmp_path / "resnet.npz"
    assert main(["import", str(path), "--out", str(spec), "--params", str(params),
                 "--loss", "softmax_cross_entropy"]) == 0
    assert "train mode" in capsys.readouterr().out
    with np.load(params) as f:
        assert set(f.files) == set(net.state_dict())
    assert json.loads(spec.read_text())["layers"][0]["torch_name"] == "conv1"
    assert main(["verify", str(spec), "--params", str(params)]) == 0


def test_loading_a_pt2_never_unpickles(pt2, monkeypatch):
    """The archive's sample inputs are a torch.save pickle, which torch.export.load would
    unpickle (falling back to weights_only=False); refnet hands torch a copy without them, so
    neither torch.load nor pickle runs while the program loads."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    program = load_program(pt2[0])
    assert len(program.graph_signature.user_inputs) == 1


def _rewritten(src, dst, edit):
    import zipfile
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            b.writestr(info, edit(info.filename, a.read(info)))


def test_refnet_import_refuses_pickles_before_torch_sees_them(pt2, tmp_path, capsys):
    """A torch.save file (.pt: a zip holding data.pkl), a legacy pickle, and a .pt2 whose
    weights config marks a tensor as pickled: exit 2, one line, nothing written."""
    path, net = pt2
    pt = tmp_path / "model.pt"
    torch.save(net.state_dict(), pt)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x04" + b"\x00" * 20)
    marked = tmp_path / "pickled.pt2"

    def mark(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        return data
    _rewritten(path, marked, mark)
    for bad, needle in ((pt, "torch.save file"), (legacy, "a pickle"),
                        (marked, "stored as a pickle")):
        out = tmp_path / "o.json"
        code = main(["import", str(bad), "--out", str(out), "--params", str(tmp_path / "o.npz"),
                     "--loss", "mse"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "never unpickles" in err and err.count("\n") == 1
        assert not out.exists()


def test_refnet_import_checks_its_output_paths_before_loading(pt2, tmp_path, capsys, monkeypatch):
    """A --params in a directory that does not exist: exit 2 before the model is read."""
    monkeypatch.setattr(torch_import, "load_program", lambda *a: (_ for _ in ()).throw(
        AssertionError("loaded before the paths were checked")))
    code = main(["import", str(pt2[0]), "--out", str(tmp_path / "s.json"),
                 "--params", str(tmp_path / "nodir" / "p.npz"), "--loss", "mse"])
    assert code == 2 and "--params" in capsys.readouterr().err


# --- every layer refnet has, from its torch module or function -----------------------------

class Functional(nn.Module):
    """Functional forms of the layers and reshapes: F.* activations, x.mean((2, 3), keepdim),
    x.view(N, -1), a scaled branch written as its own add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding="same")
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = F.leaky_relu(self.conv(x), 0.05)
        h = h + 0.25 * F.softplus(F.elu(h, 1.2), beta=2.0, threshold=5.0)
        h = h.mean((2, 3), keepdim=True).view(x.shape[0], -1)
        return F.hardtanh(torch.sigmoid(self.fc(h)), -0.5, 0.75)


LAYER_MODULES = {
    "conv-pools": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), nn.AvgPool2d(2, 1, 1, ceil_mode=True,
                                                                        count_include_pad=False),
        nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveMaxPool2d((2, 3)),
        nn.AdaptiveAvgPool2d((None, 2)), nn.Flatten(), nn.Linear(16, 3)),
    "norms": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.Tanh(),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Tanh(),
        nn.LayerNorm([4, 6, 6]), nn.Dropout2d(0.0), nn.Flatten(), nn.Dropout(0.0),
        nn.Linear(144, 3)),
    "activations": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(72, 8), nn.SiLU(), nn.Mish(), nn.Hardswish(), nn.ReLU6(),
        nn.CELU(1.25), nn.SELU(), nn.LogSigmoid(), nn.GELU(approximate="tanh"),
        nn.Softsign(), nn.PReLU(), nn.Identity(), nn.Linear(8, 3)),
    "functional": Functional,
    # torch's float64 hardsigmoid backward multiplies by float32(1/6): 3e-8 relative
    # (spec/operations.md), so this one is held to 1e-7 rather than 1e-11.
    "hardsigmoid": lambda: nn.Sequential(nn.Flatten(), nn.Linear(72, 8), nn.Hardsigmoid(),
                                         nn.Linear(8, 3)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", LAYER_MODULES)
def test_every_layer_refnet_has_imports_from_its_torch_module_or_function(name, mode):
    """Pools with their options, the norms with their buffers, every activation module, and the
    functional forms: imported, then torch's float64 gradients to 1e-11 normwise (or, for a
    tensor whose exact gradient is ~0, to 1e-11 of its layer's weight gradient)."""
    torch.manual_seed(4)
    net = LAYER_MODULES[name]().double().train(mode == "train")
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    if name == "functional":
        y = torch.randint(0, 4, (3,))
    model, params = from_torch(net, x, loss="softmax_cross_entropy")
    tol = 1e-7 if name == "hardsigmoid" else 1e-11
    _, theirs = _torch_grads(net, x, y)
    ours = model.loss_and_grads(refnet.FLOAT64, params, x.numpy(), y.numpy())
    grads = {**ours.params, "x": ours.x}
    assert set(grads) == set(theirs)
    for k, g in theirs.items():
        weight = k.rsplit(".", 1)[0] + ".weight"
        scale = max(np.linalg.norm(g), np.linalg.norm(theirs.get(weight, g)))
        assert np.linalg.norm(grads[k] - g) <= tol * scale, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", UNSEEN)
def test_torchs_own_gradients_of_an_unseen_model_pass_refnet_testing(name, dtype):
    """assert_torch_module_gradients on the module as it is, in float32 and float64: every
    element within 2 ulps + 8σ·u_d/u_64 of the exact gradient. Measured: at most 0.11 of the
    allowance (λ = 8 against errors of about 1σ); the bound still catches 100 ulps
    (tests/test_testing.py)."""
    from refnet.testing import assert_torch_module_gradients
    net, x, y = _unseen(name, dtype)
    results = assert_torch_module_gradients(net, x, y, loss="softmax_cross_entropy")
    assert max(r.ratio for r in results) < 0.5


def test_an_unbatched_conv_input_imports_as_a_batch_of_one_with_torchs_gradients():
    """torch's Conv2d and pooling take an unbatched (C, H, W) input; refnet's format always has
    the batch axis. ``unbatched=True`` builds the model for x[None]: its gradients are torch's
    autograd on the unbatched input (x's with a leading axis of 1), normwise 1e-12. Without it
    the (C, H, W) input reads as a batch of C and the conv is refused by name."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(),
                                 torch.nn.MaxPool2d(2)).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    with pytest.raises(torch_import.UnsupportedModel, match="Conv2d"):
        refnet.from_torch(module, x, loss="mse")
    model, params = refnet.from_torch(module, x, loss="mse", unbatched=True)
    assert model.batch == 1 and list(model.spec["input_shape"]) == [2, 6, 6]
    xx = x.clone().requires_grad_(True)
    module.zero_grad()
    out = module(xx)
    y = np.linspace(-1, 1, out.numel()).reshape((1,) + tuple(out.shape))
    torch.nn.functional.mse_loss(out, torch.tensor(y[0])).backward()
    got = model.loss_and_grads(refnet.FLOAT64, params, x.numpy()[None], y)
    for name, p in module.named_parameters():
        ref = p.grad.numpy()
        assert np.linalg.norm(got.params[name] - ref) <= 1e-12 * np.linalg.norm(ref), name
    assert np.linalg.norm(got.x[0] - xx.grad.numpy()) <= 1e-12 * np.linalg.norm(xx.grad.numpy())
