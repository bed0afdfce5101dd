"""Curvature factors: eigenbases, eigenvalues and damping per layer, and their inverse action.

For a layer with gradient matrices ``V: [..., d_out, d_in]`` the damped inverse is

* ``identity``: ``V`` (plain gradient dot products; damping unused),
* ``diagonal``: ``V ⊘ (Λ + λ)`` with ``Λ = E_n[DW_n²]``,
* ``kfac`` / ``ekfac``: ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` where ``A = Q_A diag(λ_A) Q_Aᵀ`` and
  ``S = Q_S diag(λ_S) Q_Sᵀ`` (float64 eigendecompositions) and ``Λ = λ_S λ_Aᵀ`` (kfac) or the
  corrected ``Λ = E_n[(Q_Sᵀ DW_n Q_A)²]`` (ekfac).

``damping=None`` gives ``λ = 0.1 × mean(Λ)`` per layer. Factors save to one safetensors file with
JSON metadata, and refuse to serve a layer set they were not fitted for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import InfluenceConfig
from .layers import TrackedLayer
from .statistics import CurvatureStatistics

FORMAT_VERSION = 1
DAMPING_HEURISTIC = 0.1


@dataclass
class LayerFactors:
    """One layer's factors. ``q_a: [d_in, d_in]``, ``q_s: [d_out, d_out]``, ``eigenvalues: [d_out, d_in]``."""

    q_a: Optional[torch.Tensor]
    q_s: Optional[torch.Tensor]
    eigenvalues: Optional[torch.Tensor]
    damping: float

    def precondition(self, v: torch.Tensor) -> torch.Tensor:
        """``(G + λI)⁻¹ V`` for ``V: [..., d_out, d_in]`` (same shape and dtype out)."""
        if self.eigenvalues is None:
            return v
        dtype = self.eigenvalues.dtype
        w = v.to(dtype)
        if self.q_s is not None:
            w = self.q_s.T @ w @ self.q_a
        w = w / (self.eigenvalues + self.damping)
        if self.q_s is not None:
            w = self.q_s @ w @ self.q_a.T
        return w.to(v.dtype)

    def to(self, device: Union[str, torch.device]) -> "LayerFactors":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerFactors(move(self.q_a), move(self.q_s), move(self.eigenvalues), self.damping)


class Factors:
    """Per-layer `LayerFactors` plus what they were fitted with."""

    def __init__(self, strategy: str, layers: dict[str, LayerFactors], shapes: dict[str, tuple[int, int]],
                 config: Optional[dict] = None) -> None:
        self.strategy = strategy
        self.layers = layers
        self.shapes = shapes
        self.config = config or {}

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def precondition(self, name: str, v: torch.Tensor) -> torch.Tensor:
        return self.layers[name].precondition(v)

    def to(self, device: Union[str, torch.device]) -> "Factors":
        return Factors(self.strategy, {n: f.to(device) for n, f in self.layers.items()}, self.shapes, self.config)

    def check_layers(self, layers: Sequence[TrackedLayer]) -> None:
        """Raise ``ValueError`` unless ``layers`` are exactly the layers these factors were fitted on."""
        wanted = {layer.name: tuple(layer.shape) for layer in layers}
        have = {name: tuple(shape) for name, shape in self.shapes.items()}
        if wanted != have:
            missing = sorted(set(wanted) - set(have))
            extra = sorted(set(have) - set(wanted))
            mismatched = sorted(n for n in set(wanted) & set(have) if wanted[n] != have[n])
            raise ValueError(
                "These factors were fitted for another layer set: "
                f"layers without factors {missing}, factors without a layer {extra}, "
                f"shape mismatches {[(n, have[n], wanted[n]) for n in mismatched]}. "
                "Fit factors with the same InfluenceConfig.modules/module_types on the same model."
            )

    # ----------------------------------------------------------------------------- persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write one safetensors file (atomically) with JSON metadata."""
        tensors: dict[str, torch.Tensor] = {}
        dampings: dict[str, float] = {}
        for name, f in self.layers.items():
            for key in ("q_a", "q_s", "eigenvalues"):
                value = getattr(f, key)
                if value is not None:
                    tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            dampings[name] = f.damping
        meta = {
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "config": self.config,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "dampings": dampings,
            "torch_version": torch.__version__,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"infl_plugin": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "Factors":
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            raw = (handle.metadata() or {}).get("infl_plugin")
            if raw is None:
                raise ValueError(f"{path} is not an infl_plugin factors file (no 'infl_plugin' metadata)")
            meta = json.loads(raw)
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path} has factors format {meta.get('format_version')}, expected {FORMAT_VERSION}")
            keys = set(handle.keys())
            layers = {}
            for name in meta["shapes"]:
                get = lambda k: handle.get_tensor(f"{name}::{k}") if f"{name}::{k}" in keys else None  # noqa: E731
                layers[name] = LayerFactors(get("q_a"), get("q_s"), get("eigenvalues"), float(meta["dampings"][name]))
        shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        return cls(meta["strategy"], layers, shapes, meta.get("config"))


# --------------------------------------------------------------------------------- computation
def eigenbases(statistics: CurvatureStatistics) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name → (Q_A, Q_S)`` from float64 eigendecompositions of the accumulated covariances."""
    return {name: _eigh(statistics, name)[0] for name in statistics.totals}


def _eigh(statistics: CurvatureStatistics, name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    a, s = statistics.covariance(name)
    a, s = a.double(), s.double()
    if not (torch.isfinite(a).all() and torch.isfinite(s).all()):
        raise RuntimeError(f"Covariances of layer {name!r} hold NaN/inf; cannot eigendecompose")
    lam_a, q_a = torch.linalg.eigh((a + a.T) / 2)
    lam_s, q_s = torch.linalg.eigh((s + s.T) / 2)
    kfac = torch.outer(lam_s.clamp(min=0), lam_a.clamp(min=0))
    return (q_a, q_s), kfac


def compute_factors(
    statistics: Optional[CurvatureStatistics], layers: Sequence[TrackedLayer], config: InfluenceConfig
) -> Factors:
    """Turn accumulated statistics into `Factors` for ``config.strategy``.

    ``ekfac`` reads eigenvalues accumulated in ``statistics.bases`` (see `eigenbases`); ``kfac``
    eigendecomposes the covariances; ``diagonal`` reads eigenvalues accumulated in the identity
    basis; ``identity`` needs no statistics.
    """
    strategy = config.strategy
    result: dict[str, LayerFactors] = {}
    for layer in layers:
        name = layer.name
        if strategy == "identity":
            result[name] = LayerFactors(None, None, None, 0.0)
            continue
        if strategy == "kfac":
            (q_a, q_s), eig = _eigh(statistics, name)
        else:
            eig = statistics.eigenvalues(name).double()
            q_a, q_s = statistics.bases[name] if strategy == "ekfac" else (None, None)
            q_a = None if q_a is None else q_a.double()
            q_s = None if q_s is None else q_s.double()
        damping = DAMPING_HEURISTIC * float(eig.mean()) if config.damping is None else float(config.damping)
        if damping <= 0:
            damping = torch.finfo(torch.float32).eps
        result[name] = LayerFactors(q_a, q_s, eig, damping)
    shapes = {layer.name: tuple(layer.shape) for layer in layers}
    return Factors(strategy, result, shapes, config.to_dict())
