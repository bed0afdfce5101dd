"""Refining the query solve: EK-FAC-preconditioned conjugate gradient on the exact Gauss-Newton matrix.

EK-FAC scores use ``x₀ = M⁻¹ ∇f(q)`` with ``M`` the (block-diagonal, Kronecker-factored) EK-FAC
approximation of the damped curvature. `InfluenceConfig.refine_steps` = K solves

    ``(G + Λ) x = ∇f(q)``

instead with K steps of preconditioned conjugate gradient (PCG), ``M`` as the preconditioner, where

* ``G = (1/N) Σ_n J_nᵀ H_n J_n`` is the exact Gauss-Newton matrix of the tracked layers' trainable
  parameters (all layers jointly: its cross-layer blocks too) over N examples of evenly spaced
  training batches: ``J_n`` the Jacobian of example n's model output, ``H_n`` the Hessian of its
  loss in that output (`Task.output_hessian`: ``diag p − p pᵀ`` per scored token for
  cross-entropy, the identity for ``½‖pred − y‖²``). This is the normalisation of the factors
  (``E_n[DW_n DW_nᵀ]``: a mean over examples, a sum over a sequence's tokens), i.e. the matrix a
  sampled-Fisher EK-FAC approximates;
* ``Λ`` is the damping the scores use, block-diagonal: ``λ_ℓ I`` on layer ℓ's parameters
  (`LayerFactors.damping`; the default heuristic sets one λ per layer).

Products ``G v`` are computed with ``torch.func``: a ``jvp`` of the model output in the tracked
parameters, ``H`` in output space, and a ``vjp`` back; no Jacobian or matrix is formed.

Why PCG and not Richardson iteration ``x ← x + ω M⁻¹ (b − A x)``: both cost one product per
step, but PCG picks its step lengths and directions from the residuals (each step minimises the
``A``-norm error over a growing Krylov space) and needs no step size, while Richardson diverges
unless ``ω`` is below ``2 / λ_max(M⁻¹ A)``, which is unknown. PCG starts at ``x = 0``, so its first
step is the EK-FAC solution scaled by the best factor, and K steps cost exactly K products.

Cost per query and step: a forward with tangents and a backward over the curvature batches
(`GaussNewton.products` counts them). Under DDP (``collective=True``, the streaming-query refresh
that every rank runs at the same step) rank r takes every world-size-th of the chosen batches from
r on, and ``G v`` and the example count are summed with one ``all_reduce`` per step: every rank
must then have the same curvature batches (the entry condition reads the configuration, the
factors and whether batches exist, never their content). The checkpoint attribution runs on the
main process alone and is not collective.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, IterableDataset

from ..curvature.factors import Factors, LayerFactors
from ..curvature.layers import TrackedLayer
from ..curvature.passes import model_device
from ..tasks import Task, move_to_device

Vectors = dict[str, torch.Tensor]  # layer name → ``[Q, d_out, d_in]``


_REGISTERED: "weakref.WeakKeyDictionary[nn.Module, Iterable]" = weakref.WeakKeyDictionary()


def register_curvature_data(model: nn.Module, data: Optional[Iterable]) -> None:
    """Training batches that refinement of ``model``'s queries reads when an `Attributor` is given
    none (``None`` unregisters): how `InfluenceSession` hands its candidates to every preconditioning,
    the tracker's streaming-query refreshes included."""
    if data is None:
        _REGISTERED.pop(model, None)
    else:
        _REGISTERED[model] = data


def registered_curvature_data(model: nn.Module) -> Optional[Iterable]:
    """The batches `register_curvature_data` set for ``model``, or ``None``."""
    return _REGISTERED.get(model)


def evenly_spaced_batches(loader: Iterable, count: int) -> list:
    """``count`` evenly spaced batches of ``loader`` (all when it has fewer), in its order.

    A ``DataLoader`` over a map-style dataset (no workers) collates only the chosen batches from
    its batch sampler's indices; another loader with a length is read up to its last chosen batch,
    one without is read whole."""
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        batches = list(loader)
        return [batches[i] for i in _spaced(len(batches), count)]
    wanted = set(_spaced(length, count))
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None and hasattr(loader.dataset, "__getitem__") \
            and not isinstance(loader.dataset, IterableDataset) and loader.num_workers == 0:
        return [loader.collate_fn([loader.dataset[i] for i in indices])
                for index, indices in enumerate(loader.batch_sampler) if index in wanted]
    chosen = []
    for index, batch in enumerate(loader):
        if index in wanted:
            chosen.append(batch)
            if len(chosen) == len(wanted):
                break
    return chosen


def _spaced(length: int, count: int) -> list[int]:
    if count >= length:
        return list(range(length))
    return sorted(set(torch.linspace(0, length - 1, count).round().long().tolist()))


class _TaskOutput(nn.Module):
    """``task.output(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, task: Task, batch: Any) -> None:
        super().__init__()
        self.model, self.task, self.batch = model, task, batch

    def forward(self) -> torch.Tensor:
        return self.task.output(self.model, self.batch)


class GaussNewton:
    """Exact Gauss-Newton-vector products ``G v`` of the tracked layers over fixed batches.

    Args:
        model, task, layers: the model, how its outputs and loss Hessians are read, the tracked layers.
        batches: the training batches of ``G`` (on any device; moved to the model's).
        collective: sum products and example counts over the processes of the default group.
    """

    def __init__(self, model: nn.Module, task: Task, layers: Sequence[TrackedLayer], batches: Sequence[Any],
                 collective: bool = False) -> None:
        self.model, self.task, self.layers = model, task, list(layers)
        self.device = model_device(model)
        self.collective = collective and dist.is_available() and dist.is_initialized()
        if self.collective:  # each process takes its share of the (same) chosen batches
            batches = list(batches)[dist.get_rank()::dist.get_world_size()]
        self.batches = [move_to_device(b, self.device) for b in batches]
        self.products = 0  # Gauss-Newton-vector products computed (one per query and step)

    def _parameters(self) -> dict[str, torch.Tensor]:
        """``"model.<qualified name>" → detached parameter`` of every tracked parameter."""
        out = {}
        for layer in self.layers:
            prefix = f"model.{layer.name}." if layer.name else "model."
            if layer.tracks_weight:
                out[prefix + "weight"] = layer.module.weight.detach()
            if layer.has_bias:
                out[prefix + "bias"] = layer.module.bias.detach()
        return out

    def _tangents(self, v: Vectors, primals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layer matrices ``[Q, d_out, d_in]`` as parameter-shaped tangents ``[Q, *parameter shape]``."""
        out = {}
        for layer in self.layers:
            prefix = f"model.{layer.name}." if layer.name else "model."
            for key, value in layer.to_parameter_grads(v[layer.name]).items():
                primal = primals[prefix + key]
                out[prefix + key] = value.to(primal.dtype).reshape((value.shape[0],) + tuple(primal.shape))
        return out

    def _matrices(self, grads: dict[str, torch.Tensor], dtype: torch.dtype) -> Vectors:
        """Parameter-shaped gradients ``[Q, *shape]`` → each layer's ``[Q, d_out, d_in]`` (bias last column)."""
        out = {}
        for layer in self.layers:
            prefix = f"model.{layer.name}." if layer.name else "model."
            parts = []
            if layer.tracks_weight:
                w = grads[prefix + "weight"]  # [Q, *weight shape]
                w = w.transpose(-1, -2) if layer.kind == "Conv1D" else w.reshape(w.shape[0], w.shape[1], -1)
                parts.append(w)
            if layer.has_bias:
                parts.append(grads[prefix + "bias"].unsqueeze(-1))
            out[layer.name] = torch.cat(parts, dim=-1).to(dtype)
        return out

    def __call__(self, v: Vectors) -> Vectors:
        """``G v`` for ``v: name → [Q, d_out, d_in]`` (same layout and dtype out)."""
        dtype = next(iter(v.values())).dtype
        total = {name: torch.zeros_like(t) for name, t in v.items()}
        primals = self._parameters()
        # the fused attention kernels lack forward-mode derivatives: the math one is composite.
        # No outer graph: untracked parameters (embeddings, norms) require grad, and autograd would
        # otherwise record every product through them and keep it alive in ``total``
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            examples = self._accumulate(self._tangents(v, primals), primals, total, dtype)
        self.products += next(iter(v.values())).shape[0]
        if self.collective:
            flat = torch.cat([examples.to(dtype).reshape(1)] + [t.flatten() for t in total.values()])
            dist.all_reduce(flat)
            examples, offset = flat[0], 1
            for t in total.values():
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
        scale = 1.0 / examples.clamp_min(1).to(dtype)
        return {name: t * scale for name, t in total.items()}

    def _accumulate(self, tangents: dict[str, torch.Tensor], primals: dict[str, torch.Tensor], total: Vectors,
                    dtype: torch.dtype) -> torch.Tensor:
        """Add ``Σ_n J_nᵀ H_n J_n t`` over this process's batches into ``total``; returns the example count.

        One ``vjp`` (forward + graph) per batch, then the queries' tangents batched with ``vmap``:
        ``J t`` by forward mode, ``H`` in output space, ``Jᵀ`` by the pullback."""
        examples = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.batches:
            wrapper = _TaskOutput(self.model, self.task, batch)
            output_of: Callable = lambda p: functional_call(wrapper, p, ())  # noqa: E731
            output, pullback = vjp(output_of, primals)
            output = output.detach()
            forward = lambda t: jvp(output_of, (primals,), (t,))[1]  # noqa: E731
            hessian = lambda u: self.task.output_hessian(output, batch, u)  # noqa: E731
            back = vmap(pullback)(vmap(hessian)(vmap(forward)(tangents)))[0]
            for name, value in self._matrices(back, dtype).items():
                total[name] += value
            examples += self.task.batch_size(batch)
            del output, pullback, forward, hessian, back  # this batch's graph, before the next forward
        return examples


def _dot(a: Vectors, b: Vectors) -> torch.Tensor:
    """Per-query inner products ``Σ_layers <a_q, b_q>``: ``[Q]``."""
    return sum((a[n] * b[n]).flatten(1).sum(1) for n in a)


def conjugate_gradient(product: Callable[[Vectors], Vectors], precondition: Callable[[Vectors], Vectors],
                       b: Vectors, steps: int) -> Vectors:
    """``steps`` PCG iterations for ``A x = b`` from ``x = 0``, each query (row) on its own.

    ``product`` applies the SPD ``A`` and ``precondition`` the SPD ``M⁻¹`` to ``name → [Q, d_out, d_in]``.
    Step lengths of a query whose residual is exactly zero (no gradient) are 0.
    """
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    r = {n: t.clone() for n, t in b.items()}
    z = precondition(r)
    p = {n: t.clone() for n, t in z.items()}
    rz = _dot(r, z)
    for step in range(steps):
        ap = product(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        for n in x:
            x[n] += alpha[:, None, None] * p[n]
            r[n] -= alpha[:, None, None] * ap[n]
        if step == steps - 1:
            break
        z = precondition(r)
        rz_next = _dot(r, z)
        beta = torch.where(rz > 0, rz_next / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = {n: z[n] + beta[:, None, None] * p[n] for n in p}
        rz = rz_next
    return x


def refine_solve(gauss_newton: GaussNewton, factors: Factors, gradients: Vectors, steps: int) -> Vectors:
    """``(G + Λ)⁻¹ ∇f`` after ``steps`` PCG steps preconditioned by ``factors``: ``name → [Q, d_out, d_in]``."""
    damped = lambda v: {n: t + factors.layers[n].damping * v[n] for n, t in gauss_newton(v).items()}  # noqa: E731
    precondition = lambda v: {n: factors.precondition(n, t) for n, t in v.items()}  # noqa: E731
    return conjugate_gradient(damped, precondition, gradients, steps)


def _sink_layout(f: LayerFactors, x: torch.Tensor) -> torch.Tensor:
    """The gradient whose EK-FAC preconditioning (as `Attributor` applies it) is ``x``: ``M x``,
    rotated into the eigenbasis when the factors have one (``Q_Sᵀ x Q_A ⊙ (Λ + λ)``)."""
    if f.eigenvalues is None:
        return x
    if f.q_s is not None:
        x = f.q_s.T @ x @ f.q_a
    return x * (f.eigenvalues + f.damping)


class QueryRefiner:
    """Turns one batch of raw query gradients into the gradients whose preconditioning is refined.

    `Attributor.precondition` collects raw (unrotated) gradients ``name → [B, d_out, d_in]`` when
    refining and hands them here; the returned ``M x_K`` (in the layout its own sink would have
    produced) makes its unchanged preconditioning and rank-r truncation yield ``x_K``, the refined
    solution, truncated after refinement.
    """

    def __init__(self, gauss_newton: GaussNewton, factors: Factors, layers: Sequence[TrackedLayer], steps: int,
                 dtype: torch.dtype) -> None:
        self.gauss_newton, self.factors, self.layers, self.steps, self.dtype = gauss_newton, factors, layers, steps, dtype

    def __call__(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = next(iter(grads.values())).shape[0] if grads else 0
        if count == 0:
            return grads
        device = next(iter(grads.values())).device
        b = {layer.name: grads.get(layer.name, torch.zeros((count,) + tuple(layer.shape), dtype=self.dtype,
                                                            device=device)) for layer in self.layers}
        x = refine_solve(self.gauss_newton, self.factors, b, self.steps)
        return {name: _sink_layout(self.factors.layers[name], value) for name, value in x.items()}


def query_refiner(attributor: Any, curvature_batches: Optional[Iterable], collective: bool = False
                  ) -> Optional[QueryRefiner]:
    """The `QueryRefiner` of an `Attributor` (``None``: no refinement, today's preconditioning).

    Refines when ``config.refine_steps > 0``, the factors are damped (not ``identity``) and
    curvature batches are given (else the attributor's ``curvature_data``, else those registered for
    the model with `register_curvature_data`); without any it warns and does not refine. ``config.refine_batches`` evenly spaced batches are read.
    """
    config = attributor.config
    if config.refine_steps == 0 or attributor.factors.strategy == "identity":
        return None
    data = next((d for d in (curvature_batches, attributor.curvature_data, registered_curvature_data(attributor.model))
                 if d is not None), None)
    if data is None:
        warnings.warn(f"infl_plugin: InfluenceConfig.refine_steps={config.refine_steps} needs training batches "
                      "(Attributor(curvature_data=...)); scoring with the unrefined preconditioning", stacklevel=3)
        return None
    batches = evenly_spaced_batches(data, config.refine_batches)
    gauss_newton = GaussNewton(attributor.model, attributor.task, attributor.layers, batches, collective)
    factors = attributor._device_factors(model_device(attributor.model))
    return QueryRefiner(gauss_newton, factors, attributor.layers, config.refine_steps, attributor.dtype)


__all__ = ["GaussNewton", "QueryRefiner", "conjugate_gradient", "evenly_spaced_batches", "query_refiner",
           "refine_solve", "register_curvature_data", "registered_curvature_data"]
