"""The cross layers compute the DCN formulas of DESIGN.md, checked against direct per-sample arithmetic."""

import pytest
import torch

from toolkit.model.zoo.cross import (
    CrossLayerFull,
    CrossLayerLowRank,
    CrossLayerMixture,
    CrossLayerV1,
    CrossNetwork,
)

torch.manual_seed(0)
B, N = 5, 6


@pytest.fixture
def x0():
    return torch.randn(B, N)


@pytest.fixture
def xl():
    return torch.randn(B, N)


def test_full_rank_layer_is_x0_times_affine_plus_residual(x0, xl):
    layer = CrossLayerFull(N)
    w, b = layer.linear.weight, layer.linear.bias
    expected = torch.stack([x0[i] * (w @ xl[i] + b) + xl[i] for i in range(B)])
    assert torch.allclose(layer(x0, xl), expected, atol=1e-6)


def test_diag_scale_adds_scaled_input_inside_the_product(x0, xl):
    layer = CrossLayerFull(N, diag_scale=0.5)
    w, b = layer.linear.weight, layer.linear.bias
    expected = x0 * (xl @ w.T + b + 0.5 * xl) + xl
    assert torch.allclose(layer(x0, xl), expected, atol=1e-6)


def test_low_rank_layer_factorises_w_as_u_times_v(x0, xl):
    layer = CrossLayerLowRank(N, rank=2, bias=False)
    u, v = layer.up.weight, layer.down.weight
    assert u.shape == (N, 2) and v.shape == (2, N)
    expected = x0 * (xl @ (u @ v).T) + xl
    assert torch.allclose(layer(x0, xl), expected, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mixture_layer_matches_per_expert_loop(x0, xl, activation):
    layer = CrossLayerMixture(N, rank=3, experts=4, activation=activation, diag_scale=0.25)
    torch.nn.init.normal_(layer.bias)
    act = torch.relu if activation == "relu" else torch.tanh
    gates = torch.softmax(xl @ layer.gates.weight.T, dim=-1)
    expected = xl.clone()
    for i in range(4):
        h = act(act(xl @ layer.v[i].T) @ layer.c[i].T)
        expert = x0 * (h @ layer.u[i].T + layer.bias + 0.25 * xl)
        expected = expected + gates[:, i : i + 1] * expert
    assert torch.allclose(layer(x0, xl), expected, atol=1e-5)


def test_v1_layer_scales_x0_by_a_scalar_projection(x0, xl):
    layer = CrossLayerV1(N)
    torch.nn.init.normal_(layer.bias)
    expected = torch.stack([x0[i] * (xl[i] @ layer.weight) + layer.bias + xl[i] for i in range(B)])
    assert torch.allclose(layer(x0, xl), expected, atol=1e-6)


def test_network_feeds_the_same_x0_to_every_layer(x0):
    net = CrossNetwork(N, kind="full", layers=2)
    first, second = net.layers
    assert torch.allclose(net(x0), second(x0, first(x0, x0)))


def test_full_rank_output_grows_as_polynomial_of_degree_layers_plus_one():
    """Scaling x0 by s scales the top-order term by s^(l+1): the overflow risk FP16 lowering must handle."""
    net = CrossNetwork(N, kind="full", layers=3, bias=False)
    x = torch.rand(1, N) + 0.5
    small, big = net(x).abs().max(), net(100 * x).abs().max()
    assert big / small > 100**3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "bogus"}, "cross kind"),
        ({"layers": 0}, "at least one layer"),
        ({"kind": "v1", "diag_scale": 1.0}, "diag_scale"),
        ({"kind": "mixture", "activation": "gelu"}, "activation"),
    ],
)
def test_invalid_cross_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossNetwork(N, **kwargs)
