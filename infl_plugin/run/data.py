"""What an attribution reads: fixed-order query and candidate loaders, built once for every adapter.

`build_attribution_data` turns `AttributionOptions` and the framework's datasets (the queries,
the training set) into an `AttributionData`: the query loader (``num_queries`` evenly spaced
examples), the candidate loader (the examples ``options.candidates`` selects, in dataset order),
the dataset positions of their rows, and what renders them (`DatasetSource`, the collate function
and tokenizer of the token views). Loaders never shuffle: column j of the scores is always
candidate ``candidate_indices[j]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from .candidates import dataset_documents, select_candidates, spaced_indices
from ..config.influence import InfluenceConfig
from ..config.options import AttributionOptions

EIGENVALUE_EXAMPLES = 1024

logger = logging.getLogger("infl_plugin")


class DatasetSource:
    """`ExampleSource` over two indexable datasets (``None`` = not renderable)."""

    def __init__(self, query_dataset: Any = None, candidate_dataset: Any = None) -> None:
        self.query_dataset = query_dataset
        self.candidate_dataset = candidate_dataset

    def query_example(self, index: int) -> Any:
        return _get(self.query_dataset, index)

    def candidate_example(self, index: int) -> Any:
        return _get(self.candidate_dataset, index)

    @property
    def candidate_dataset_size(self) -> Optional[int]:
        """``len(candidate_dataset)`` (the N of a mean training loss when it is the training set)."""
        return _sized(self.candidate_dataset)


@dataclass
class AttributionData:
    """Query and candidate batches of an attribution and the datasets their rows come from.

    Row i of the queries is ``source.query_dataset[query_indices[i]]`` (``None``: ``0, 1, …``),
    likewise for candidates. ``tokenized``: candidate batches are token sequences (mappings with
    ``input_ids``), so attributions add per-token views, for which ``collate_fn`` and
    ``tokenizer`` turn candidate examples back into batches and text.
    """

    queries: Iterable
    candidates: Iterable
    source: DatasetSource = field(default_factory=DatasetSource)
    query_indices: Optional[torch.Tensor] = None
    candidate_indices: Optional[torch.Tensor] = None
    collate_fn: Optional[Callable[[list], Any]] = None
    tokenizer: Any = None
    tokenized: bool = False

    def __post_init__(self) -> None:
        self.query_indices = _index_tensor(self.query_indices)
        self.candidate_indices = _index_tensor(self.candidate_indices)

    @property
    def num_candidates(self) -> Optional[int]:
        """How many candidates the loader yields (``None`` when unknown)."""
        if self.candidate_indices is not None:
            return int(self.candidate_indices.numel())
        return _sized(getattr(self.candidates, "dataset", None))


def build_attribution_data(options: AttributionOptions, queries: Any, training_set: Any, *, batch_size: int,
                           collate_fn: Optional[Callable[[list], Any]] = None,
                           query_collate_fn: Optional[Callable[[list], Any]] = None, seed: int = 0,
                           tokenizer: Any = None, tokenized: bool = False) -> AttributionData:
    """The query and candidate loaders of ``options`` over ``queries`` and ``training_set``.

    ``queries``: indexable examples (``options.num_queries`` evenly spaced ones are used) or a
    ready ``DataLoader`` (used as it is). The candidates are ``options.candidates`` when it is a
    dataset, else the training set, narrowed by the candidate mode (`select_candidates`; TF-IDF
    reads the examples' text, decoding token ids with ``tokenizer``). ``collate_fn`` batches
    candidates (the training loader's), ``query_collate_fn`` queries (default ``collate_fn``);
    ``tokenized``: the examples are token sequences (see `AttributionData`).
    """
    decode = getattr(tokenizer, "decode", None)
    query_collate_fn = query_collate_fn or collate_fn
    if isinstance(queries, DataLoader):
        query_loader, query_dataset, query_indices = queries, queries.dataset, None
    else:
        query_dataset = queries
        count = len(queries) if options.num_queries is None else options.num_queries
        if count < len(queries):  # said once per run: the other queries are silently not explained otherwise
            logger.warning(f"infl_plugin: explaining {count} evenly spaced of the {len(queries)} queries given "
                           f"(num_queries={count}; num_queries=None explains all)")
        query_indices = spaced_indices(len(queries), count)
        query_loader = make_loader(queries, batch_size, query_collate_fn, query_indices, options.num_workers)
    candidates = options.candidate_dataset if options.candidate_dataset is not None else training_set
    indices = select_candidates(
        options.candidate_mode, len(candidates), options.num_candidates, seed,
        documents=lambda: dataset_documents(candidates, decode=decode),
        query_documents=lambda: dataset_documents(query_dataset, query_indices, decode=decode))
    return AttributionData(
        query_loader, make_loader(candidates, batch_size, collate_fn, indices, options.num_workers),
        DatasetSource(query_dataset, candidates), query_indices, indices, collate_fn, tokenizer, tokenized)


def make_loader(dataset: Any, batch_size: int, collate_fn: Optional[Callable] = None,
                indices: Optional[Sequence[int]] = None, num_workers: int = 0) -> DataLoader:
    """A fixed-order (unshuffled) loader over ``dataset`` (or its ``indices``), for queries or candidates."""
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers,
                      drop_last=False)


def eigenvalue_loader(candidates: Iterable, config: InfluenceConfig) -> Iterable:
    """What an attribution's bounded EK-FAC eigenvalue pass reads: the candidates, or, when
    ``config.max_fit_batches`` is ``None`` and they are a loader over more than
    `EIGENVALUE_EXAMPLES` examples, that many evenly spaced ones (same batch size and collate), so
    that the pass never costs an epoch (which streamed candidates exist to avoid)."""
    if config.max_fit_batches is not None or not isinstance(candidates, DataLoader):
        return candidates
    length = _sized(candidates.dataset)
    if length is None or length <= EIGENVALUE_EXAMPLES:
        return candidates
    return make_loader(candidates.dataset, candidates.batch_size or 1, candidates.collate_fn,
                       spaced_indices(length, EIGENVALUE_EXAMPLES), candidates.num_workers)


def _get(dataset: Any, index: int) -> Any:
    if dataset is None or not hasattr(dataset, "__getitem__"):
        return None
    return dataset[index]


def _sized(dataset: Any) -> Optional[int]:
    """``len(dataset)``, or ``None`` when it has no length."""
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _index_tensor(indices: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
    return None if indices is None else torch.as_tensor(list(indices), dtype=torch.long)


__all__ = ["AttributionData", "DatasetSource", "EIGENVALUE_EXAMPLES", "build_attribution_data", "eigenvalue_loader",
           "make_loader", "spaced_indices"]
