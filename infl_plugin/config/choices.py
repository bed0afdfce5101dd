"""The allowed values of every declared field, and the checks that need only those values.

Kept apart from the classes that use them (the layer abstraction, candidate selection, the
renderers) so that the configuration validates without importing any of them.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import ConfigurationError

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("empirical", "sampled")
ACCUMULATION_DTYPES = ("float32", "float64")
STREAM_WEIGHTS = ("none", "lr")
SUPPORTED_TYPES = ("Linear", "Conv1D", "Conv2d")  # module class names a `TrackedLayer` can be
CANDIDATE_MODES = ("stream", "all", "tfidf", "random")
DEFAULT_CANDIDATES = "stream"
NEEDS_COUNT = ("tfidf", "random")
RENDERERS = ("auto", "image", "text", "repr")


def check_candidates(mode: Any, num_candidates: Any, owner: str, allow_dataset: bool = False) -> None:
    """Validate ``candidates`` / ``num_candidates`` of ``owner``; raise `ConfigurationError` (a
    ``ValueError``) naming the field and the allowed values."""
    if not isinstance(mode, str):
        if allow_dataset and hasattr(mode, "__getitem__") and hasattr(mode, "__len__"):
            return
        raise ConfigurationError(f"{owner}.candidates must be one of {list(CANDIDATE_MODES)}"
                         + (" or a Dataset" if allow_dataset else "") + f", got {mode!r}")
    if mode not in CANDIDATE_MODES:
        raise ConfigurationError(f"{owner}.candidates must be one of {list(CANDIDATE_MODES)}"
                         + (" or a Dataset" if allow_dataset else "") + f", got {mode!r}")
    if num_candidates is not None and (isinstance(num_candidates, bool) or not isinstance(num_candidates, int)
                                       or num_candidates < 1):
        raise ConfigurationError(f"{owner}.num_candidates must be None or an integer >= 1, got {num_candidates!r}")
    if mode in NEEDS_COUNT and num_candidates is None:
        raise ConfigurationError(f"{owner}.num_candidates must be an integer >= 1 with candidates={mode!r} "
                         f"({'per-query TF-IDF candidates' if mode == 'tfidf' else 'size of the random subset'})")
    if mode == "tfidf" and importlib.util.find_spec("sklearn") is None:
        raise ConfigurationError(f"{owner}.candidates='tfidf' needs scikit-learn: pip install 'infl-plugin[tfidf]'")


__all__ = ["ACCUMULATION_DTYPES", "CANDIDATE_MODES", "DEFAULT_CANDIDATES", "FISHERS", "NEEDS_COUNT", "RENDERERS",
           "STRATEGIES", "STREAM_WEIGHTS", "SUPPORTED_TYPES", "check_candidates"]
