"""Curvature statistics against brute force, for Conv2d, Linear and Conv1D, with padding masks.

All in float64; tolerances are rtol 1e-9: the only differences are summation orders.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import infl_plugin as ip
from infl_plugin.curvature.fitting import accumulate, new_statistics
from infl_plugin.curvature.hooks import LayerHooks
from infl_plugin.curvature.passes import isolated

from models import ImageNet, SeqNet, example_loss, image_data, loader, sequence_data
from reference import dense_fisher, per_example_gradients

RTOL, ATOL = 1e-9, 1e-12


def _with_bias(a: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a


def brute_force_image(model: ImageNet, items, bias: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A, S by explicit loops over output positions (no unfold) and per-example output gradients."""
    a_conv, a_fc, s_conv, s_fc = [], [], 0, 0
    for x, y in items:
        xp = F.pad(x, (1, 1, 1, 1))
        patches = [xp[:, 2 * i: 2 * i + 3, 2 * j: 2 * j + 3].reshape(-1) for i in range(3) for j in range(3)]
        a_conv.append(torch.stack(patches))
        conv_out = model.conv(x[None]).detach().requires_grad_(True)
        hidden = torch.tanh(conv_out).flatten(1).detach().requires_grad_(True)
        fc_out = model.fc(hidden)
        a_fc.append(hidden.detach())
        loss = F.cross_entropy(model.fc(torch.tanh(conv_out).flatten(1)), y[None])
        g_conv = torch.autograd.grad(loss, conv_out)[0][0].flatten(1).T  # [positions, C_out]
        g_fc = torch.autograd.grad(F.cross_entropy(fc_out, y[None]), fc_out)[0]
        s_conv = s_conv + g_conv.T @ g_conv
        s_fc = s_fc + g_fc.T @ g_fc
    n = len(items)
    a_conv = _with_bias(torch.cat(a_conv), bias)
    a_fc = _with_bias(torch.cat(a_fc), bias)
    return {"conv": (a_conv.T @ a_conv / a_conv.shape[0], s_conv / n), "fc": (a_fc.T @ a_fc / n, s_fc / n)}


def brute_force_sequence(model: SeqNet, items, bias: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A over real tokens only; S over all positions (padding gradients are exactly zero)."""
    acc = {name: [[], 0] for name in ("inp", "mix", "head")}
    for item in items:
        x, mask = item["x"][None], item["attention_mask"][None]
        h1 = model.inp(x)
        h1_leaf = h1.detach().requires_grad_(True)
        t1 = torch.tanh(h1_leaf)
        h2 = model.mix(t1)
        h = torch.tanh(h2)
        m = mask[..., None].double()
        pooled = (h * m).sum(1) / m.sum(1)
        pooled_leaf = pooled.detach().requires_grad_(True)
        logits = model.head(pooled_leaf)
        loss = F.cross_entropy(logits, item["labels"][None])
        g_head = torch.autograd.grad(loss, logits, retain_graph=True)[0]
        g_pooled = torch.autograd.grad(loss, pooled_leaf)[0]
        g1, g2 = torch.autograd.grad((pooled * g_pooled).sum(), [h1_leaf, h2])
        real = mask[0].bool()
        for name, a, g in (("inp", x[0][real], g1[0]), ("mix", t1[0].detach()[real], g2[0]),
                           ("head", pooled.detach(), g_head)):
            a = _with_bias(a, bias if name != "mix" else True)
            acc[name][0].append(a)
            acc[name][1] = acc[name][1] + g.T @ g
    out = {}
    for name, (a_list, s_sum) in acc.items():
        a = torch.cat(a_list)
        out[name] = (a.T @ a / a.shape[0], s_sum / len(items))
    return out


def run_statistics(model, items, config, batch_size=5):
    layers = ip.select_layers(model)
    statistics = new_statistics(layers, config)
    with LayerHooks(model, layers) as hooks, isolated(model):
        accumulate(model, ip.ClassificationTask(), hooks, statistics, loader(items, batch_size), config,
                   torch.Generator().manual_seed(0))
    return statistics


CASES = [("image", True), ("image", False), ("sequence", True), ("sequence", False)]


def build(kind: str, bias: bool):
    torch.manual_seed(1)
    if kind == "image":
        return ImageNet(bias).double(), image_data(), brute_force_image
    return SeqNet(bias).double(), sequence_data(), brute_force_sequence


@pytest.mark.parametrize("kind,bias", CASES)
def test_covariances_equal_brute_force(kind, bias):
    model, items, brute = build(kind, bias)
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64")
    statistics = run_statistics(model, items, config)
    expected = brute(model, items, bias)
    assert set(expected) == set(statistics.totals)
    for name, (a_ref, s_ref) in expected.items():
        a, s = statistics.covariance(name)
        torch.testing.assert_close(a, a_ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(s, s_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind,bias", CASES)
def test_ekfac_eigenvalues_equal_dense_fisher_diagonal_in_kronecker_basis(kind, bias):
    model, items, _ = build(kind, bias)
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 5), config)
    modules = [layer.module for layer in ip.select_layers(model)]
    grads = per_example_gradients(modules, lambda i: example_loss(model, items[i]), len(items))
    for layer, g in zip(ip.select_layers(model), grads):
        f = factors.layers[layer.name]
        basis = torch.kron(f.q_s, f.q_a)  # row-major vec of Q_Sᵀ V Q_A
        expected = torch.diagonal(basis.T @ dense_fisher(g) @ basis).reshape(layer.shape)
        torch.testing.assert_close(f.eigenvalues, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind,bias", CASES)
def test_diagonal_equals_mean_squared_per_example_gradients(kind, bias):
    model, items, _ = build(kind, bias)
    config = ip.InfluenceConfig(strategy="diagonal", accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 5), config)
    modules = [layer.module for layer in ip.select_layers(model)]
    grads = per_example_gradients(modules, lambda i: example_loss(model, items[i]), len(items))
    for layer, g in zip(ip.select_layers(model), grads):
        torch.testing.assert_close(factors.layers[layer.name].eigenvalues, g.pow(2).mean(0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind,bias", CASES)
def test_kfac_preconditioner_is_the_damped_kronecker_inverse(kind, bias):
    model, items, brute = build(kind, bias)
    config = ip.InfluenceConfig(strategy="kfac", damping=1e-2, accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 5), config)
    expected = brute(model, items, bias)
    for layer in ip.select_layers(model):
        a, s = expected[layer.name]
        v = torch.randn(layer.shape, dtype=torch.float64)
        dense = torch.kron(s, a) + 1e-2 * torch.eye(a.shape[0] * s.shape[0], dtype=torch.float64)
        solved = torch.linalg.solve(dense, v.flatten()).reshape(layer.shape)
        torch.testing.assert_close(factors.precondition(layer.name, v), solved, rtol=1e-8, atol=1e-10)


def test_padding_does_not_change_statistics():
    """Extra padded positions (random values behind mask 0) leave A and S unchanged."""
    torch.manual_seed(0)
    model = SeqNet().double()
    items = sequence_data(tokens=4)
    padded = [dict(it, x=torch.cat([it["x"], torch.randn(3, 4, dtype=torch.float64)]),
                   attention_mask=torch.cat([it["attention_mask"], torch.zeros(3, dtype=torch.long)])) for it in items]
    config = ip.InfluenceConfig(strategy="kfac", accumulation_dtype="float64")
    short, long = run_statistics(model, items, config), run_statistics(model, padded, config)
    for name in short.totals:
        for x, y in zip(short.covariance(name), long.covariance(name)):
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


def test_float32_accumulation_of_a_bfloat16_model_is_close_to_float64():
    """bf16 activations are cast before accumulating; eigendecomposition stays in float64."""
    torch.manual_seed(0)
    model = ImageNet().to(torch.bfloat16)
    items = [(x.to(torch.bfloat16), y) for x, y in image_data()]
    config = ip.InfluenceConfig(strategy="ekfac")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4), config)
    for f in factors.layers.values():
        assert f.q_a.dtype == torch.float64 and torch.isfinite(f.eigenvalues).all()
        torch.testing.assert_close(f.q_a.T @ f.q_a, torch.eye(f.q_a.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
