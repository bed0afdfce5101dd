"""Leave-one-out ground truth for influence scores on a convex model.

Multinomial logistic regression (one ``nn.Linear(64, 10)`` with bias, float64) on standardised
sklearn digits (500 training examples), objective

    J(θ) = (1/N) Σ_i CE_i(θ) + (λ/2) ‖θ‖²     (all parameters, bias included; λ = L2 below)

minimised by full-batch float64 Newton (analytic Hessian steps) to ‖∇J‖ < 1e-10. Removing z means dropping
its term from the sum with N unchanged (the sklearn "sum of losses + fixed penalty" leave-one-out,
which is exactly up-weighting z by ε = −1/N), retrained by Newton warm-started from the optimum to
the same tolerance. First order:

    f_q(θ_{−z}) − f_q(θ) ≈ + score(q, z) / N,   score = ∇f(q)ᵀ H⁻¹ ∇L(z),   H = ∇²J (mean objective)

so a positive score means "helpful": removing z raises the query's loss.

For this single layer the Hessian of the mean CE equals its GGN, so ``H = G + λI``: infl_plugin's
``Attributor`` with damping = λ targets exactly this H (its G is the *per-example average* Fisher,
its training gradients are per-example *sums*); with ``fisher="sampled"`` its Fisher equals the GGN
in expectation (``"empirical"`` does not). EK-FAC/K-FAC approximate G by Kronecker structure, so
they are held to looser, measured thresholds (see the constants below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import infl_plugin as ip

N_TRAIN = 500
L2 = 1e-2  # λ: the data term still dominates H; with 1e-3 (or N = 300) digits has more parameters
# (650) than well-determined directions, single examples get high leverage and LOO turns visibly
# nonlinear (measured exact-vs-LOO Pearson down to 0.93 there).
GRAD_TOL = 1e-9  # Newton converges quadratically down to the float64 floor, where the last step's
# gradient norm lands anywhere in 1e-11–2e-10 with the BLAS summation order (measured 1.7e-10 on a
# loaded 2-core machine); 1e-9 puts parameter error ≲ 1e-9/λ = 1e-7, i.e. query-loss error ~1e-8,
# far below the smallest LOO effects we correlate (~1e-5).
N_REMOVED = 40
N_QUERIES = 3


class LogReg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, held = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + 100]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd == 0] = 1.0
    x = torch.tensor((x - mu) / sd, dtype=torch.float64)
    y = torch.tensor(y)
    return x[tr], y[tr], x[held], y[held]


class Problem:
    """Flat-parameter view of the model plus Newton training on weighted objectives."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = LogReg().double()
        self.x, self.y, xh, yh = _digits()
        self.shapes = [(n, p.shape) for n, p in self.model.named_parameters()]

        # Start from the optimum of the full problem.
        self.theta, self.gnorm = self.newton(torch.zeros(self.dim, dtype=torch.float64), torch.ones(N_TRAIN, dtype=torch.float64))
        self.set_model(self.theta)
        # Queries: the first held-out examples (random digits; not cherry-picked hard ones, whose
        # LOO effects are large and visibly nonlinear).
        self.xq, self.yq = xh[:N_QUERIES], yh[:N_QUERIES]

    @property
    def dim(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.shapes)

    def unflatten(self, flat):
        out, i = {}, 0
        for name, shape in self.shapes:
            k = int(np.prod(shape))
            out[name] = flat[i:i + k].view(shape)
            i += k
        return out

    def logits(self, flat, x):
        return functional_call(self.model, self.unflatten(flat), (x,))

    def objective(self, flat, weights):
        ce = F.cross_entropy(self.logits(flat, self.x), self.y, reduction="none")
        return (weights * ce).sum() / N_TRAIN + 0.5 * L2 * flat.pow(2).sum()

    def newton(self, theta, weights, max_iter=50):
        """Damped Newton on J; returns (θ, ‖∇J(θ)‖).

        Steps use the analytic Hessian of the weighted mean CE in layer-matrix form
        ``Σ_n w_n (diag p_n − p_n p_nᵀ) ⊗ x̄_n x̄_nᵀ / N + λI`` (x̄ = [x, 1]), much cheaper than
        re-tracing torch.func.hessian per step; convergence is judged on autograd's ∇J.
        """
        xb = torch.cat([self.x, torch.ones(N_TRAIN, 1, dtype=torch.float64)], 1)
        k = self.model.linear.out_features
        f = lambda t: self.objective(t, weights)  # noqa: E731
        for _ in range(max_iter):
            g = torch.func.grad(f)(theta)
            if g.norm() < GRAD_TOL:
                break
            mat = torch.cat([theta[: k * 64].view(k, 64), theta[k * 64:].view(k, 1)], 1)  # Θ = [W | b]
            p = torch.softmax(xb @ mat.T, -1)
            curv = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) * weights[:, None, None]
            outer = (xb[:, :, None] * xb[:, None, :]).reshape(N_TRAIN, -1)  # [n, 65·65]
            h = (curv.reshape(N_TRAIN, -1).T @ outer).view(k, k, 65, 65).permute(0, 2, 1, 3).reshape(k * 65, k * 65)
            h = h / N_TRAIN
            h = h + L2 * torch.eye(k * 65, dtype=torch.float64)
            g_mat = torch.cat([g[: k * 64].view(k, 64), g[k * 64:].view(k, 1)], 1)
            d = torch.linalg.solve(h, g_mat.reshape(-1)).view(k, 65)
            step = torch.cat([d[:, :64].reshape(-1), d[:, 64]])
            t, f0 = 1.0, f(theta)
            while f(theta - t * step) > f0 - 1e-4 * t * (g @ step) and t > 1e-8:
                t /= 2
            theta = theta - t * step
        return theta, float(torch.func.grad(f)(theta).norm())

    def set_model(self, flat):
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), self.unflatten(flat).values()):
                p.copy_(v)

    def query_losses(self, flat):
        return F.cross_entropy(self.logits(flat, self.xq), self.yq, reduction="none")

    def per_example_grads(self, x, y):
        def loss(flat, xi, yi):
            return F.cross_entropy(self.logits(flat, xi[None]), yi[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))(self.theta, x, y)


@pytest.fixture(scope="module")
def problem():
    return Problem()


@pytest.fixture(scope="module")
def reference(problem):
    return exact_reference(problem)


def exact_reference(problem):
    """Dense exact-Hessian influence ``[Q, N]`` (torch.func hessian of the mean objective + L2)."""
    h = hessian(lambda t: problem.objective(t, torch.ones(N_TRAIN, dtype=torch.float64)))(problem.theta)
    gq = problem.per_example_grads(problem.xq, problem.yq)
    gz = problem.per_example_grads(problem.x, problem.y)
    return torch.linalg.solve(h, gq.T).T @ gz.T


@pytest.fixture(scope="module")
def loo(problem, reference):
    return leave_one_out(problem, reference)


def leave_one_out(problem, reference):
    """Removed indices ``[R]`` and actual query-loss changes ``[Q, R]``.

    Removed: each query's 7 largest |reference| examples (the regime where influence matters and
    effects are far above the retraining tolerance) plus random ones up to N_REMOVED.
    """
    top = reference.abs().argsort(dim=1, descending=True)[:, :7].flatten().tolist()
    chosen = list(dict.fromkeys(top))
    for i in torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0)).tolist():
        if len(chosen) >= N_REMOVED:
            break
        if i not in chosen:
            chosen.append(i)
    removed = torch.tensor(chosen)
    base = problem.query_losses(problem.theta)
    deltas, gnorms = [], []
    for z in chosen:
        w = torch.ones(N_TRAIN, dtype=torch.float64)
        w[z] = 0.0
        theta, gnorm = problem.newton(problem.theta.clone(), w)
        gnorms.append(gnorm)
        deltas.append(problem.query_losses(theta) - base)
    return removed, torch.stack(deltas, 1).detach(), max(gnorms)


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def slope(pred, actual):
    """Least-squares slope of actual on pred (through the origin)."""
    return float((pred * actual).sum() / (pred * pred).sum())


def fit_ours(problem, strategy, fisher="sampled", passes=8, damping=L2):
    task = ip.ClassificationTask()
    train = [(problem.x[i:i + 100], problem.y[i:i + 100]) for i in range(0, N_TRAIN, 100)]
    cfg = ip.InfluenceConfig(strategy=strategy, damping=damping, fisher=fisher, accumulation_dtype="float64", seed=0)
    # passes > 1: several pseudo-label draws per example, so the sampled Fisher is close to the GGN
    factors = ip.fit_factors(problem.model, task, train * passes, cfg)
    attributor = ip.Attributor(problem.model, task, factors, cfg)
    return factors, attributor.pairwise_scores([(problem.xq, problem.yq)], train)


# ----------------------------------------------------------------------------- fast checks
def test_optimum_is_tight(problem):
    assert problem.gnorm < GRAD_TOL


def test_identity_scores_are_sum_gradient_dot_products(problem):
    # Scaling check 1: training gradients are per-example (not divided by the batch size) and the
    # query measurement is its loss. float32 tolerance: ClassificationTask evaluates the
    # cross-entropy in float32 (logits.float()), so gradients carry ~1e-7 relative error.
    _, scores = fit_ours(problem, "identity")
    gq = problem.per_example_grads(problem.xq, problem.yq)
    gz = problem.per_example_grads(problem.x, problem.y)
    torch.testing.assert_close(scores, gq @ gz.T, rtol=1e-5, atol=1e-8)


def test_fisher_is_per_example_average(problem):
    # Scaling check 2: with fisher="empirical", EK-FAC's eigenvalues are E_n[(Q_Sᵀ DW_n Q_A)²]; the
    # basis is orthogonal, so their sum is E_n ‖∇L_n‖² exactly (an average, not a sum over n).
    factors, _ = fit_ours(problem, "ekfac", fisher="empirical", passes=1)
    gz = problem.per_example_grads(problem.x, problem.y)
    total = float(factors.layers["linear"].eigenvalues.sum())
    assert total == pytest.approx(float(gz.pow(2).sum(1).mean()), rel=1e-5)


# ----------------------------------------------------------------------------- retraining
@pytest.mark.slow
def test_exact_influence_matches_leave_one_out(problem, reference, loo):
    removed, delta, gnorm = loo
    assert gnorm < GRAD_TOL
    predicted = reference[:, removed] / N_TRAIN
    for q in range(N_QUERIES):
        # 0.95 (measured 0.975-0.981): first order is exact up to the leverage terms below.
        assert pearson(predicted[q], delta[q]) >= 0.95
        # Actual LOO exceeds first order on high-influence examples by ~1/(1 − leverage) (measured
        # slopes 1.5-2.1 with these top-|score| removals); a scale error (score·N or score/N²)
        # would be off by a factor of 500.
        assert 0.8 <= slope(predicted[q], delta[q]) <= 3.0
    # Sign: removing the most helpful example raises the query loss, the most harmful lowers it.
    for q in range(N_QUERIES):
        scores = reference[q, removed]
        assert delta[q, scores.argmax()] > 0
        if scores.min() < 0:
            assert delta[q, scores.argmin()] < 0


@pytest.mark.slow
def test_first_order_scale_is_score_over_n(problem, reference):
    # Down-weighting z by δ = 1e-2 (w_z = 1 − δ) stays in the linear regime, so Δf/δ must equal
    # +score/N to ~δ·leverage ≈ 1 %: pins both the 1/N scaling and the sign precisely.
    delta_w = 1e-2
    base = problem.query_losses(problem.theta)
    chosen = reference.abs().sum(0).argsort(descending=True)[:8]
    changes = []
    for z in chosen.tolist():
        w = torch.ones(N_TRAIN, dtype=torch.float64)
        w[z] = 1.0 - delta_w
        theta, gnorm = problem.newton(problem.theta.clone(), w)
        assert gnorm < GRAD_TOL
        changes.append((problem.query_losses(theta) - base) / delta_w)
    actual = torch.stack(changes, 1).detach()
    predicted = reference[:, chosen] / N_TRAIN
    assert slope(predicted.flatten(), actual.flatten()) == pytest.approx(1.0, abs=0.05)
    assert pearson(predicted.flatten(), actual.flatten()) >= 0.999


# Measured on this setup with fisher="sampled", 8 passes (per query): Pearson with LOO
# ekfac 0.957/0.983/0.963, kfac 0.963/0.985/0.968; with the exact-Hessian reference over all 500
# examples ekfac 0.892/0.938/0.845, kfac 0.906/0.938/0.847. Thresholds leave ~0.05 for the
# pseudo-label draw. Below 1.0 because K-FAC structure (E[H_out] ⊗ E[x̄x̄ᵀ]) ignores the
# correlation between softmax curvature and inputs, and the Fisher is sampled; the Pearson with LOO
# is higher than with the reference because the removed set is dominated by large-effect examples.
LOO_MIN = {"ekfac": 0.90, "kfac": 0.90}
REF_MIN = {"ekfac": 0.80, "kfac": 0.80}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_attributor_tracks_leave_one_out(problem, reference, loo, strategy):
    removed, delta, _ = loo
    _, scores = fit_ours(problem, strategy)
    for q in range(N_QUERIES):
        assert pearson(scores[q, removed], delta[q]) >= LOO_MIN[strategy]
        assert pearson(scores[q], reference[q]) >= REF_MIN[strategy]
        # Same scale as the exact influence (damping = λ = L2 reproduces H = G + λI); measured
        # 1.9-3.1 (K-FAC underestimates curvature along gradient directions). A per-example-sum
        # Fisher or a batch-mean gradient would be off by ~500x.
        assert 0.5 <= slope(reference[q], scores[q]) <= 5.0
        # Sign agrees with retraining on the example ours ranks most helpful.
        assert delta[q, scores[q, removed].argmax()] > 0
