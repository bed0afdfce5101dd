"""One machine-readable record per attribution, written atomically; read a run's records back.

`AttributionResult` is what `InfluenceSession.attribute` produces and what `TensorBoardReporter`
logs. `write_artifact` stores it as one ``.npz`` file (arrays + a JSON metadata string, no pickle)
under ``<logdir>/influence/attribution-step{step:08d}.npz``, atomically (`replace_atomically`: a
temporary file renamed over it), so a reader never sees a half-written file. `read_artifacts`
finds every artifact under a directory (recursively, so a logger's root or version directory both
work) and returns one row per attribution, as a ``pandas.DataFrame`` when pandas is installed,
else a list of dicts.

Arrays in an artifact (Q queries, N candidates, k = top_k, L layers):

* ``scores [Q, N]`` float32: influence of candidate n on query q (positive = helpful, i.e.
  up-weighting the candidate lowers the query's loss; negative = harmful);
* ``candidate_indices [N]``: the candidates' positions in the candidate dataset (column n of
  ``scores`` is dataset item ``candidate_indices[n]``); ``query_indices [Q]`` likewise;
* ``helpful_indices/helpful_scores/harmful_indices/harmful_scores [Q, k]``: dataset positions;
* ``layer_shares [Q, L]``: each layer's share of Σ|score| (rows sum to 1), names in metadata;
* ``tail_exponents [Q]``: fitted power-law exponent α of the |score| tail (CCDF ~ s^-α);
* ``measurements [Q]``: the queries' measurements (their loss by default);
* ``self_scores [N]`` (optional): self-influence ``∇L(z)ᵀ(G+λI)⁻¹∇L(z)`` of each candidate.

Metadata: ``step``, ``reason``, ``strategy``, ``fisher``, ``config`` (the `InfluenceConfig`
dict), ``layer_names``, ``duration_s``, ``num_candidates``, ``num_train`` (N of the mean training
loss, for the predicted change ``-score / N``), ``measurement_name``, ``candidate_mode`` (which
candidates were scored: ``"stream"``, ``"all"``, ``"tfidf"`` or ``"random"``, see
`infl_plugin.run.candidates`), ``extra`` (JSON-able, free-form).

Not written: ``token_views`` (query position → `infl_plugin.results.token_views.TokenViews`: token
strings and per-token tensors for the reporter's token and layer views); the artifact format does
not depend on it and `read_artifacts` rows have no such column.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

from ..serialization import replace_atomically

if TYPE_CHECKING:
    from .views import TokenViews

ARTIFACT_DIR = "influence"
ARTIFACT_PREFIX = "attribution-step"
ARRAY_FIELDS = (
    "scores", "candidate_indices", "query_indices", "measurements", "helpful_indices", "helpful_scores",
    "harmful_indices", "harmful_scores", "layer_shares", "tail_exponents", "self_scores",
)


@dataclass
class AttributionResult:
    """Everything one attribution produced (tensors on the CPU). See the module docstring."""

    step: int
    reason: str
    scores: torch.Tensor  # [Q, N]
    candidate_indices: torch.Tensor  # [N]
    query_indices: torch.Tensor  # [Q]
    measurements: torch.Tensor  # [Q]
    helpful_indices: torch.Tensor  # [Q, k] dataset positions
    helpful_scores: torch.Tensor  # [Q, k]
    harmful_indices: torch.Tensor  # [Q, k]
    harmful_scores: torch.Tensor  # [Q, k]
    layer_names: list[str]
    layer_shares: torch.Tensor  # [Q, L]
    tail_exponents: torch.Tensor  # [Q]
    strategy: str
    fisher: str
    config: dict[str, Any]
    duration_s: float = 0.0
    self_scores: Optional[torch.Tensor] = None  # [N]
    extra: dict[str, Any] = field(default_factory=dict)
    num_train: Optional[int] = None  # examples the training loss averages over (None: num_candidates)
    measurement_name: str = "loss"  # what ``measurements`` and the scores' f are, for display
    candidate_mode: str = "all"  # which candidates were scored (`infl_plugin.run.candidates`)
    # query position → views of its top helpful then top harmful sequences (not written to the artifact)
    token_views: dict[int, TokenViews] = field(default_factory=dict)

    @property
    def training_set_size(self) -> int:
        """N in the mean training loss: `num_train`, else the number of candidates scored."""
        return int(self.num_train) if self.num_train else self.num_candidates

    def predicted_change(self, scores: torch.Tensor) -> torch.Tensor:
        """First-order change of the query's measurement if an example's weight were doubled: ``-score / N``.

        Up-weighting z by ε changes f by ``-ε · score`` (see `infl_plugin.scoring.attributor`); counting z
        twice in a mean over N training examples is ε = 1/N.
        """
        return -scores / self.training_set_size

    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.scores.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.helpful_indices.shape[1])

    def self_top(self, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [k], dataset indices [k])`` of the most self-influential candidates."""
        if self.self_scores is None:
            raise ValueError("This attribution computed no self-influence scores")
        k = min(k or self.top_k, self.self_scores.numel())
        values, pos = self.self_scores.nan_to_num(float("-inf")).topk(k)
        return values, self.candidate_indices[pos]

    def metadata(self) -> dict[str, Any]:
        return {
            "step": int(self.step), "reason": self.reason, "strategy": self.strategy, "fisher": self.fisher,
            "config": self.config, "layer_names": list(self.layer_names), "duration_s": float(self.duration_s),
            "num_candidates": self.num_candidates, "num_queries": self.num_queries, "top_k": self.top_k,
            "extra": self.extra, "num_train": self.num_train, "measurement_name": self.measurement_name,
            "candidate_mode": self.candidate_mode,
        }


def artifact_path(logdir: Union[str, os.PathLike], step: int) -> Path:
    """Where `write_artifact` puts the artifact of ``step`` under ``logdir``."""
    return Path(logdir) / ARTIFACT_DIR / f"{ARTIFACT_PREFIX}{int(step):08d}.npz"


def write_artifact(logdir: Union[str, os.PathLike], result: AttributionResult) -> Path:
    """Write ``result`` atomically (`replace_atomically`); returns the path.

    A second attribution at the same step (e.g. a save right after a scheduled one) replaces the
    first one's file.
    """
    path = artifact_path(logdir, result.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in ARRAY_FIELDS:
        value = getattr(result, name)
        if value is not None:
            arrays[name] = value.detach().cpu().numpy()
    arrays["metadata"] = np.array(json.dumps(result.metadata(), default=_json_default))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: given a name, np.savez would append ".npz" to it
            np.savez(handle, **arrays)

    replace_atomically(path, write)
    return path


def load_artifact(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """One artifact as a dict: metadata keys plus numpy arrays, and ``path``."""
    with np.load(path, allow_pickle=False) as data:
        row: dict[str, Any] = json.loads(str(data["metadata"]))
        for name in ARRAY_FIELDS:
            row[name] = data[name] if name in data.files else None
    row["path"] = str(path)
    return row


def read_artifacts(logdir: Union[str, os.PathLike], as_dataframe: Optional[bool] = None):
    """All attribution artifacts under ``logdir`` (searched recursively), sorted by directory and step.

    Returns a ``pandas.DataFrame`` (one row per attribution; array columns hold numpy arrays) when
    pandas is installed and ``as_dataframe`` is not ``False``, else a list of dicts. Raises
    ``FileNotFoundError`` when ``logdir`` does not exist.
    """
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"No such log directory: {root}")
    paths = sorted(root.rglob(f"{ARTIFACT_PREFIX}*.npz"), key=lambda p: (str(p.parent), p.name))
    rows = [load_artifact(p) for p in paths]
    if as_dataframe is False:
        return rows
    try:
        import pandas as pd
    except ImportError:
        if as_dataframe:
            raise
        return rows
    columns = ["step", "reason", "strategy", "fisher", "num_queries", "num_candidates", "num_train", "top_k",
               "duration_s", "measurement_name", "candidate_mode", "layer_names", "config", "extra", "path", *ARRAY_FIELDS]
    return pd.DataFrame(rows, columns=columns)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


__all__ = ["AttributionResult", "artifact_path", "load_artifact", "read_artifacts", "write_artifact"]
