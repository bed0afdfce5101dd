"""Which training examples an attribution scores: ``candidates="stream" | "all" | "tfidf" | "random"``.

* ``"stream"``: the examples trained on since the previous attribution, with the scores streamed
  from their training backward (`InfluenceTracker.streamed_scores`): no candidate pass at all.
  Before any streamed score exists (the first attribution, or dataset indices unknown) the
  attribution scores as ``"all"`` does (``num_candidates`` evenly spaced examples when set).
* ``"all"``: a checkpoint pass over the training set (``num_candidates`` evenly spaced examples
  when set): one forward and backward per candidate.
* ``"tfidf"``: per query, the ``num_candidates`` training examples most similar to it by TF-IDF
  cosine similarity of their text (the paper's filter, biased toward word overlap); the union over
  queries is scored for every query. Built once per run (needs scikit-learn: the ``tfidf`` extra).
* ``"random"``: a fixed random subset of ``num_candidates`` examples (seeded by
  ``InfluenceConfig.seed``), the same at every attribution.

The fixed sets (all but ``"stream"``) are chosen once, when the training data is known, by
`select_candidates`; the session reads the streamed scores itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..config.choices import CANDIDATE_MODES, DEFAULT_CANDIDATES, check_candidates

Document = Union[str, list[str]]


# --------------------------------------------------------------------------------- documents
def example_document(example: Any, decode: Optional[Callable[[list[int]], str]] = None) -> Document:
    """What TF-IDF reads of one dataset example: its ``"text"``, its decoded ``input_ids`` (with a
    ``decode`` function such as ``tokenizer.decode``) or its token ids as words (``["17", "3", …]``)."""
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping):
        if isinstance(example.get("text"), str):
            return example["text"]
        ids = example.get("input_ids")
    elif isinstance(example, (tuple, list)) and example:
        ids = example[0]
    else:
        ids = example
    ids = _token_ids(ids)
    if ids is None:
        raise ValueError("candidates='tfidf' needs text: examples with a 'text' string, 'input_ids', or "
                         f"integer token ids as their first element; got {type(example).__name__}")
    return decode(ids) if decode is not None else [str(i) for i in ids]


def _token_ids(value: Any) -> Optional[list[int]]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        return value.reshape(-1).tolist()
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    return None


def _identity(document: list[str]) -> list[str]:
    return document


class TfidfIndex:
    """TF-IDF vectors of a corpus (scikit-learn's ``TfidfVectorizer``, L2-normalised rows), built once.

    ``documents``: strings (word analyzer, lowercased) or lists of token words (used as given).
    """

    def __init__(self, documents: Sequence[Document]) -> None:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError as error:  # pragma: no cover - checked at configuration time
            raise ImportError("TF-IDF candidates need scikit-learn: pip install 'infl-plugin[tfidf]'") from error
        if not documents:
            raise ValueError("TfidfIndex needs at least one document")
        tokenized = not isinstance(documents[0], str)
        self.vectorizer = TfidfVectorizer(analyzer=_identity) if tokenized else TfidfVectorizer()
        self.matrix = self.vectorizer.fit_transform(list(documents))  # sparse [N, vocabulary]

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def similarity(self, queries: Sequence[Document]) -> np.ndarray:
        """Cosine similarities ``[Q, N]`` of ``queries`` to the corpus."""
        return np.asarray((self.vectorizer.transform(list(queries)) @ self.matrix.T).todense())

    def top(self, queries: Sequence[Document], n: int) -> torch.Tensor:
        """Corpus positions ``LongTensor[Q, min(n, N)]`` of each query's most similar documents,
        most similar first (ties: lower position first)."""
        sims = self.similarity(queries)
        n = min(n, sims.shape[1])
        order = np.argsort(-sims, axis=1, kind="stable")[:, :n]
        return torch.as_tensor(order, dtype=torch.long)


# --------------------------------------------------------------------------------- selection
def spaced_indices(length: int, count: int) -> list[int]:
    """``count`` evenly spaced positions in ``range(length)`` (all of them when count ≥ length)."""
    if count >= length:
        return list(range(length))
    return torch.linspace(0, length - 1, count).round().long().tolist()


def select_candidates(mode: str, size: int, num_candidates: Optional[int] = None, seed: int = 0,
                      documents: Optional[Callable[[], Sequence[Document]]] = None,
                      query_documents: Optional[Callable[[], Sequence[Document]]] = None) -> Optional[list[int]]:
    """Dataset positions to score in a checkpoint pass (sorted), or ``None`` for all ``size`` examples.

    ``"all"`` and ``"stream"`` (its fallback pass): ``num_candidates`` evenly spaced examples, or
    all; ``"random"``: a seeded subset of ``num_candidates``; ``"tfidf"``: the union of each query's
    top ``num_candidates`` by TF-IDF (``documents`` / ``query_documents`` give the texts, read only
    in this mode).
    """
    if mode in ("all", "stream"):
        if num_candidates is None or num_candidates >= size:
            return None
        return spaced_indices(size, num_candidates)
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(size, generator=generator)[:num_candidates].tolist())
    if mode == "tfidf":
        if documents is None or query_documents is None:
            raise ValueError("candidates='tfidf' needs the texts of the training examples and of the queries")
        top = TfidfIndex(documents()).top(query_documents(), num_candidates)
        return sorted(set(top.reshape(-1).tolist()))
    raise ValueError(f"candidates must be one of {list(CANDIDATE_MODES)}, got {mode!r}")


def dataset_documents(dataset: Any, indices: Optional[Sequence[int]] = None,
                      decode: Optional[Callable[[list[int]], str]] = None) -> list[Document]:
    """`example_document` of each item of ``dataset`` (or of ``dataset[indices]``)."""
    positions = range(len(dataset)) if indices is None else indices
    return [example_document(dataset[int(i)], decode) for i in positions]


__all__ = ["CANDIDATE_MODES", "DEFAULT_CANDIDATES", "TfidfIndex", "check_candidates", "dataset_documents",
           "example_document", "select_candidates", "spaced_indices"]
