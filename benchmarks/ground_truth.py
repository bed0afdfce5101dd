"""Ground truth for ``benchmarks/accuracy.py``: digits data, float64 training to tight tolerance,
dense exact-GGN influence, leave-one-out and LDS retraining (cached under ``benchmarks/.cache``).

Objective everywhere: ``J(θ) = (1/N) Σ_i w_i CE_i(θ) + (l2/2)‖θ‖²`` with N the size of the full
training set and ``w_i ∈ {0, 1}``. Leave-one-out sets one ``w_z = 0`` (the sklearn-style "sum of
losses + fixed penalty" LOO; it is exactly the ε = -1/N up-weighting of the influence derivation,
so the first-order prediction is ``Δf(q) ≈ +score(q, z)/N`` with no constant offset). LDS subsets
train on a 50 % subset with the usual mean over the subset (``N = |S|``).

Everything here avoids infl_plugin: exact GGN and gradients come from ``torch.func``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

DTYPE = torch.float64
CACHE = Path(__file__).resolve().parent / ".cache"
COMPUTED: list = []  # names of cache entries computed (not loaded) in this process


# ----------------------------------------------------------------------------- data and models
def digits(n_train: int, n_query: int, seed: int = 0):
    """Standardised sklearn digits: ``(X_train, y_train, X_query, y_query)`` float64 / int64.

    Train and query are disjoint random draws; features are standardised with the training mean
    and std (constant pixels keep std 1).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, q = perm[:n_train], perm[n_train:n_train + n_query]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd == 0] = 1.0
    x = (x - mu) / sd
    t = lambda a: torch.tensor(a, dtype=DTYPE)  # noqa: E731
    return t(x[tr]), torch.tensor(y[tr]), t(x[q]), torch.tensor(y[q])


def diabetes(n_train: int, n_query: int, seed: int = 0):
    """Standardised sklearn diabetes regression (442 × 10, bundled): ``(X_train, y_train, X_query,
    y_query)``, float64, targets standardised with the training mean and std."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, q = perm[:n_train], perm[n_train:n_train + n_query]
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()
    t = lambda a: torch.tensor(a, dtype=DTYPE)  # noqa: E731
    return t(x[tr]), t(y[tr]), t(x[q]), t(y[q])


class MLP(nn.Module):
    """``d_in → hidden → d_out`` tanh MLP: 64-32-10 for digits, 10-32-1 for diabetes regression."""

    def __init__(self, hidden: int = 32, d_in: int = 64, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class LogReg(nn.Module):
    """``nn.Linear(64, 10)`` in a container (both libraries track child modules, not the root)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """``"logreg"`` / ``"mlp"`` (digits) or ``"regmlp"`` (diabetes regression), float64."""
    torch.manual_seed(seed)
    model = LogReg() if kind == "logreg" else MLP(d_in=10, d_out=1) if kind == "regmlp" else MLP()
    return model.to(DTYPE)


def example_losses(kind: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example losses ``[..., N]`` of outputs ``[..., N, C]``: cross-entropy, or for ``"regmlp"``
    the squared error ``(pred − y)²`` (the objective's mean-squared error, ``F.mse_loss``)."""
    if kind == "regmlp":
        return (outputs[..., 0] - y).pow(2)
    return torch.logsumexp(outputs, -1) - outputs.gather(-1, y.expand(outputs.shape[:-1])[..., None])[..., 0]


class Flat:
    """Flat-parameter view of a model for ``torch.func`` (named_parameters order)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]

    def get(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()])

    def set(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, part in zip(self.model.parameters(), flat.split(self.sizes)):
                p.copy_(part.view(p.shape))

    def unflatten(self, flat: torch.Tensor) -> dict:
        return {n: part.view(s) for n, s, part in zip(self.names, self.shapes, flat.split(self.sizes))}

    def logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(flat), (x,))

    def objective(self, flat, x, y, weights, n_norm, l2):
        ce = F.cross_entropy(self.logits(flat, x), y, reduction="none")
        return (weights * ce).sum() / n_norm + 0.5 * l2 * flat.pow(2).sum()


# ----------------------------------------------------------------------------- training
def train_lbfgs(flat_view: Flat, theta0, x, y, weights, n_norm, l2, tol=1e-9, max_rounds=60):
    """Full-batch float64 L-BFGS (strong Wolfe) until ‖∇J‖ < tol or the budget runs out."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, history_size=50, tolerance_grad=tol / 10,
                            tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = flat_view.objective(theta, x, y, weights, n_norm, l2)
        loss.backward()
        return loss

    gnorm = float("inf")
    for _ in range(max_rounds):
        opt.step(closure)
        g = torch.autograd.grad(flat_view.objective(theta, x, y, weights, n_norm, l2), theta)[0]
        gnorm = float(g.norm())
        if gnorm < tol:
            break
    return theta.detach(), gnorm


def lr_newton(xb, y, weights, n_norm, l2, theta0, tol=1e-10, max_iter=50):
    """Batched damped Newton for multinomial logistic regression in layer-matrix form.

    ``xb: [N, d+1]`` shared by all models or ``[M, N, d+1]`` per model (bias column appended),
    ``y`` likewise ``[N]`` or ``[M, N]``, ``weights: [M, N]``, ``n_norm: [M]``,
    ``theta0: [M, C, d+1]``. The Hessian is analytic: ``Σ_n w_n (diag p − p pᵀ) ⊗ x̄ x̄ᵀ / n + l2 I``.
    Returns ``theta [M, C, d+1]`` and the final gradient norms ``[M]``.
    """
    m, c, d = theta0.shape
    shared = xb.dim() == 2
    onehot = F.one_hot(y, c).to(DTYPE)
    nn_ = n_norm.to(DTYPE)[:, None]
    eye = torch.eye(c * d, dtype=DTYPE)
    # x̄ x̄ᵀ per example, [.., N, d·d]: contracting with it avoids einsum's huge 5-D temporaries
    outer = (xb[..., :, None] * xb[..., None, :]).flatten(-2)
    spec = "ni,mci->mnc" if shared else "mni,mci->mnc"

    def obj(theta):
        logits = torch.einsum(spec, xb, theta)
        ce = torch.logsumexp(logits, -1) - (logits * onehot).sum(-1)
        return (weights * ce).sum(1) / nn_[:, 0] + 0.5 * l2 * theta.pow(2).sum((1, 2))

    theta = theta0.clone()
    gnorm = torch.full((m,), float("inf"), dtype=DTYPE)
    for _ in range(max_iter):
        p = torch.softmax(torch.einsum(spec, xb, theta), -1)
        r = (p - onehot) * weights[..., None]
        g = torch.einsum("mnc,ni->mci" if shared else "mnc,mni->mci", r, xb) / nn_[..., None] + l2 * theta
        gnorm = g.flatten(1).norm(dim=1)
        active = gnorm >= tol
        if not bool(active.any()):
            break
        k = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) * weights[..., None, None]
        h = k.reshape(m, k.shape[1], -1).transpose(1, 2) @ outer  # [M, C·C, d·d]
        h = h.view(m, c, c, d, d).permute(0, 1, 3, 2, 4).reshape(m, c * d, c * d) / nn_[..., None] + l2 * eye
        # Cholesky (H is SPD): batched torch.linalg.solve fails in this torch CPU/MKL build
        # ("DLASWP parameter 6" / lu_solve pivots error) for batched float64 systems.
        step = torch.cholesky_solve(g.reshape(m, -1, 1), torch.linalg.cholesky(h)).reshape(m, c, d)
        step = step * active[:, None, None]
        t = torch.ones(m, dtype=DTYPE)
        f0 = obj(theta)
        for _ in range(30):  # backtracking (Armijo) per model
            ok = obj(theta - t[:, None, None] * step) <= f0 - 1e-4 * t * (g * step).sum((1, 2))
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        theta = theta - t[:, None, None] * step
    return theta, gnorm


def logreg_to_flat(theta: torch.Tensor) -> torch.Tensor:
    """Layer matrix ``[10, 65]`` → nn.Linear flat parameters (weight then bias)."""
    return torch.cat([theta[:, :-1].flatten(), theta[:, -1]])


def flat_to_logreg(flat: torch.Tensor) -> torch.Tensor:
    return torch.cat([flat[:640].view(10, 64), flat[640:].view(10, 1)], dim=1)


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def train_mlp_batched(x, y, weights, l2, seeds, steps=2000, lr=0.02, hidden=32, kind="mlp"):
    """Train ``M`` independent tanh MLPs (``kind``: see `make_model`) at once with full-batch Adam (cosine decay).

    ``weights: [M, N]`` select each model's subset (mean over it). Adam is per-coordinate and the
    models share no parameter, so summing their objectives trains each independently. A fixed
    step budget (the usual LDS protocol), not a convergence test: see the gradient norms returned.
    Returns ``[M, P]`` flat parameters (MLP named_parameters order) and the gradient norms ``[M]``.
    """
    inits = [make_model(kind, s) for s in seeds]
    params = [torch.stack([m.get_parameter(name).detach() for m in inits]).requires_grad_(True)
              for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    n_norm = weights.sum(1)

    def objective(params):
        w1, b1, w2, b2 = params
        h = torch.tanh(torch.einsum("ni,mhi->mnh", x, w1) + b1[:, None])
        logits = torch.bmm(h, w2.transpose(1, 2)) + b2[:, None]
        losses = example_losses(kind, logits, y)
        reg = sum(p.pow(2).flatten(1).sum(1) for p in params)
        return (weights * losses).sum(1) / n_norm + 0.5 * l2 * reg

    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        objective(params).sum().backward()
        opt.step()
        sched.step()
    grads = torch.autograd.grad(objective(params).sum(), params)
    gnorm = torch.cat([g.flatten(1) for g in grads], 1).norm(dim=1)
    flat = torch.cat([p.detach().flatten(1) for p in params], 1)
    return flat, gnorm


# ----------------------------------------------------------------------------- exact influence
def per_example_grads(view: Flat, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kind: str = "mlp") -> torch.Tensor:
    """``[n, P]`` gradients of each example's (unreduced) cross-entropy, or for ``kind="regmlp"`` of
    ``½(pred − y)²`` (infl_plugin's `RegressionTask` loss)."""
    def loss(f, xi, yi):
        if kind == "regmlp":
            return 0.5 * (view.logits(f, xi[None])[0, 0] - yi).pow(2)
        return F.cross_entropy(view.logits(f, xi[None]), yi[None])
    return vmap(grad(loss), in_dims=(None, 0, 0))(flat, x, y)


def dense_ggn(view: Flat, flat: torch.Tensor, x: torch.Tensor, chunk: int = 100, kind: str = "mlp") -> torch.Tensor:
    """Exact GGN of the mean cross-entropy: ``(1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` ``[P, P]``;
    for ``kind="regmlp"`` that of ``½(pred − y)²``: ``(1/N) Σ_n J_nᵀ J_n``."""
    p_dim = flat.numel()
    out = torch.zeros(p_dim, p_dim, dtype=DTYPE)
    jac = vmap(jacrev(lambda f, xi: view.logits(f, xi[None])[0]), in_dims=(None, 0))
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        j = jac(flat, xs)  # [n, C, P]
        p = torch.softmax(view.logits(flat, xs), -1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        if kind == "regmlp":
            h = torch.ones_like(h)  # one output: the Hessian of ½(pred − y)² is 1
        # factor H_out = L Lᵀ is not needed: Σ_n J_nᵀ H_n J_n = Σ_n (H_n J_n)ᵀ-contracted with J_n
        out += torch.einsum("nap,nab,nbq->pq", j, h, j)
    return out / x.shape[0]


def exact_scores(curvature: torch.Tensor, damping: float, q_grads: torch.Tensor, tr_grads: torch.Tensor) -> torch.Tensor:
    """``∇f(q)ᵀ (C + λI)⁻¹ ∇L(z)`` ``[Q, N]`` with a Cholesky solve."""
    mat = curvature + damping * torch.eye(curvature.shape[0], dtype=DTYPE)
    chol = torch.linalg.cholesky(mat)
    return torch.cholesky_solve(q_grads.T, chol).T @ tr_grads.T


# ----------------------------------------------------------------------------- cache
def cached(name: str, key: dict, compute: Callable[[], dict], refresh: bool = False) -> dict:
    """Load ``CACHE/{name}-{hash(key)}.pt`` or compute and save it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{digest}.pt"
    if path.exists() and not refresh:
        return torch.load(path, weights_only=False)
    value = compute()
    COMPUTED.append(name)
    value["key"] = key
    torch.save(value, path)
    return value


def lds(scores: torch.Tensor, truth: dict) -> float:
    """Linear datamodeling score of ``scores [Q, N]`` (positive = helpful) against retrained
    ``truth`` (``masks [S, N]``, query losses ``losses [S, seeds, Q]``): per query, the Spearman
    correlation over subsets between ``−Σ_(z∈S) score`` and the seed-averaged loss; mean over queries."""
    predicted = -(truth["masks"] @ scores.T.to(DTYPE))  # [S, Q]: higher = lower loss expected
    return mean_rowwise(spearman, predicted.T, truth["losses"].mean(1).T)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().to(DTYPE)
    rb = b.argsort().argsort().to(DTYPE)
    return pearson(ra, rb)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.to(DTYPE) - a.to(DTYPE).mean()
    b = b.to(DTYPE) - b.to(DTYPE).mean()
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def mean_rowwise(fn, a: torch.Tensor, b: torch.Tensor, rows: Optional[torch.Tensor] = None) -> float:
    idx = range(a.shape[0]) if rows is None else rows.tolist()
    vals = [fn(a[i], b[i]) for i in idx]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
