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

from ..config.influence import InfluenceConfig
from ..errors import ConfigurationError, FactorsFileError
from .layers import TrackedLayer
from ..serialization import replace_atomically
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
            raise ConfigurationError(
                "These factors were fitted for another layer set: "
                f"layers without factors {missing}, factors without a layer {extra}, "
                f"shape mismatches {[(n, have[n], wanted[n]) for n in mismatched]}. "
                "Fit factors with the same InfluenceConfig.modules/module_types on the same model."
            )

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """CPU copies of the tensors and what they were fitted with (a checkpoint entry)."""
        copy = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {"strategy": self.strategy, "config": dict(self.config),
                "shapes": {n: list(s) for n, s in self.shapes.items()},
                "layers": {n: {"q_a": copy(f.q_a), "q_s": copy(f.q_s), "eigenvalues": copy(f.eigenvalues),
                               "damping": float(f.damping)} for n, f in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, state: dict, device: Union[str, torch.device] = "cpu") -> "Factors":
        """The factors `state_dict` described, on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        layers = {n: LayerFactors(move(f["q_a"]), move(f["q_s"]), move(f["eigenvalues"]), float(f["damping"]))
                  for n, f in state["layers"].items()}
        return cls(state["strategy"], layers, {n: tuple(s) for n, s in state["shapes"].items()}, state["config"])

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
        replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"infl_plugin": json.dumps(meta)}))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "Factors":
        """Read a file written by `save`.

        Raises ``FileNotFoundError`` for a missing file and `FactorsFileError` (a ``ValueError``)
        naming the path and the problem for an empty, truncated or foreign file, a file of
        another format version, or one that lacks the entries its strategy needs.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"No factors file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                meta = _metadata(path, handle.metadata())
                keys = set(handle.keys())
                wanted = _STRATEGY_TENSORS[meta["strategy"]]
                layers = {}
                for name in meta["shapes"]:
                    missing = [k for k in wanted if f"{name}::{k}" not in keys]
                    if missing:
                        raise FactorsFileError(f"{path}: layer {name!r} lacks the {missing} tensors of "
                                               f"strategy {meta['strategy']!r}; the file is damaged")
                    get = lambda k: handle.get_tensor(f"{name}::{k}") if k in wanted else None  # noqa: E731
                    layers[name] = LayerFactors(get("q_a"), get("q_s"), get("eigenvalues"), float(meta["dampings"][name]))
        except FactorsFileError:
            raise
        except Exception as error:  # safetensors raises its own error type for damaged headers/data
            raise FactorsFileError(f"{path} is not a readable factors file ({type(error).__name__}: {error}); "
                                   "it may be empty, truncated or of another format") from error
        shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        return cls(meta["strategy"], layers, shapes, meta.get("config"))


_STRATEGY_TENSORS = {
    "identity": (),
    "diagonal": ("eigenvalues",),
    "kfac": ("q_a", "q_s", "eigenvalues"),
    "ekfac": ("q_a", "q_s", "eigenvalues"),
}


def _metadata(path: Union[str, os.PathLike], raw: Optional[dict]) -> dict:
    """The file's ``infl_plugin`` metadata, checked for the keys and version `Factors.load` reads."""
    text = (raw or {}).get("infl_plugin")
    if text is None:
        raise FactorsFileError(f"{path} is not an infl_plugin factors file (no 'infl_plugin' metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise FactorsFileError(f"{path} has unreadable factors metadata ({error})") from error
    if not isinstance(meta, dict):
        raise FactorsFileError(f"{path} has factors metadata of type {type(meta).__name__}, expected an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FactorsFileError(f"{path} has factors format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    missing = [k for k in ("strategy", "shapes", "dampings") if k not in meta]
    if missing:
        raise FactorsFileError(f"{path} lacks the factors metadata entries {missing}")
    if meta["strategy"] not in _STRATEGY_TENSORS:
        raise FactorsFileError(f"{path} names an unknown strategy {meta['strategy']!r}; "
                               f"expected one of {list(_STRATEGY_TENSORS)}")
    without = sorted(set(meta["shapes"]) - set(meta["dampings"]))
    if without:
        raise FactorsFileError(f"{path} lacks the damping of layers {without}")
    return meta


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
