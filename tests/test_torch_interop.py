"""Vendoring: a torch nn.Sequential's state_dict, saved to .npz, gives torch's gradients here."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refnet import BOUND, FLOAT64, Model, MPBackend  # noqa: E402
from refnet.io import load_params  # noqa: E402
from refnet.verification.triangle import LAMBDA  # noqa: E402

pytestmark = pytest.mark.torch

TORCH_TO_SPEC = {
    torch.nn.Tanh: {"type": "tanh"}, torch.nn.ReLU: {"type": "relu"},
    torch.nn.Sigmoid: {"type": "sigmoid"}, torch.nn.ELU: {"type": "elu"},
    torch.nn.GELU: {"type": "gelu"}, torch.nn.Softplus: {"type": "softplus"},
    torch.nn.SELU: {"type": "selu"}, torch.nn.PReLU: {"type": "prelu"},
    torch.nn.Identity: {"type": "identity"},
}


def spec_of(layers, in_features, loss):
    """The refnet spec of a torch nn.Sequential of Linear and activation layers."""
    spec_layers = []
    for m in layers:
        if isinstance(m, torch.nn.Linear):
            spec_layers.append({"type": "dense", "out": m.out_features, "bias": m.bias is not None})
        elif isinstance(m, torch.nn.LeakyReLU):
            spec_layers.append({"type": "leaky_relu", "slope": m.negative_slope})
        else:
            spec_layers.append(dict(TORCH_TO_SPEC[type(m)]))
    return {"input_shape": [in_features], "layers": spec_layers, "loss": {"type": loss}}


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_state_dict_npz_gives_the_same_gradients_as_torch_float64_autograd(tmp_path, loss):
    """Every parameter gradient and the input gradient agree with torch float64 autograd: both
    lie within refnet's error bound (min(rigorous, 8σ)) of the exact gradient — torch performs
    the same roundings in another order, which the probabilistic bound allows for."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
              torch.nn.Linear(8, 8), torch.nn.LeakyReLU(0.02), torch.nn.Linear(8, 8),
              torch.nn.Sigmoid(), torch.nn.Linear(8, 8), torch.nn.ELU(), torch.nn.Linear(8, 8),
              torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.Softplus(),
              torch.nn.Linear(8, 8, bias=False), torch.nn.SELU(), torch.nn.Linear(8, 8),
              torch.nn.PReLU(), torch.nn.Linear(8, 4)]
    net = torch.nn.Sequential(*layers).double()
    path = tmp_path / "state_dict.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in net.state_dict().items()})

    model = Model(spec_of(layers, 5, loss))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5))
    y = rng.integers(0, 4, 16) if loss == "softmax_cross_entropy" else rng.standard_normal((16, 4))
    params, x, y = model.prepare(load_params(path), x, y)

    tx = torch.tensor(x, requires_grad=True)
    f = (torch.nn.functional.cross_entropy if loss == "softmax_cross_entropy"
         else torch.nn.functional.mse_loss)
    torch_loss = f(net(tx), torch.tensor(y))
    torch_loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    torch_grads["x"] = tx.grad.numpy()

    ours = model.loss_and_grads(FLOAT64, params, x, y)
    bounds = model.loss_and_grads(BOUND, params, x, y)
    mp = MPBackend(50)
    exact = model.loss_and_grads(mp, params, x, y)
    assert set(torch_grads) == set(ours.params) | {"x"}
    for name in torch_grads:
        pick = (lambda g: g.x) if name == "x" else (lambda g: g.params[name])
        b = pick(bounds)
        bound = np.minimum(b.e, b.probabilistic_bound(LAMBDA))
        ref = mp.to_numpy(pick(exact))
        assert np.all(np.abs(torch_grads[name] - ref) <= bound), name
        assert np.all(np.abs(pick(ours) - ref) <= bound), name
    loss_bound = min(float(bounds.loss.e), float(bounds.loss.probabilistic_bound(LAMBDA)))
    exact_loss = float(mp.to_numpy(exact.loss))
    assert abs(torch_loss.item() - exact_loss) <= loss_bound
    assert abs(float(ours.loss) - exact_loss) <= loss_bound
