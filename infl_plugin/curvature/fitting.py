"""Post-hoc factor fitting: explicit passes over a loader, like the peer libraries do."""

from __future__ import annotations

import logging
import warnings
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..config.influence import InfluenceConfig
from .factors import Factors, compute_factors, eigenbases
from .hooks import LayerHooks
from .layers import TrackedLayer, select_layers
from .memory import estimate_memory
from .passes import backward_pass, isolated, model_device
from .statistics import CurvatureStatistics
from ..tasks import Task, move_to_device


def fit_factors(model: nn.Module, task: Task, loader: Iterable, config: Optional[InfluenceConfig] = None) -> Factors:
    """Fit ``config.strategy`` factors on ``loader`` at the model's current parameters.

    kfac/ekfac read the loader once for the covariances; ekfac reads it again for the corrected
    eigenvalues in the new eigenbasis; diagonal reads it once. ``config.fisher`` chooses real or
    sampled labels (generator seeded with ``config.seed``; ``config.fisher_samples`` draws per example).
    """
    config = config or InfluenceConfig()
    layers = select_layers(model, config.modules, config.module_types)
    if config.strategy == "identity":
        return compute_factors(None, layers, config)
    statistics = new_statistics(layers, config)
    generator = torch.Generator().manual_seed(config.seed)
    with LayerHooks(model, layers) as hooks, isolated(model):
        accumulate(model, task, hooks, statistics, loader, config, generator)
        if config.strategy == "ekfac":
            statistics.set_basis(eigenbases(statistics))
            statistics.covariances = False
            accumulate(model, task, hooks, statistics, loader, config, generator)
    return compute_factors(statistics, layers, config)


LARGE_LAYER_BYTES = 1 << 30
logger = logging.getLogger("infl_plugin")


def new_statistics(layers: Sequence[TrackedLayer], config: InfluenceConfig) -> CurvatureStatistics:
    """Accumulators for ``config.strategy`` (identity basis for the diagonal Fisher).

    Logs the memory estimate of the selection (`estimate_memory`, logger ``"infl_plugin"``, level
    INFO) and warns about layers whose accumulators alone exceed 1 GiB: typically a language
    model's output head (``S`` is vocabulary², and must later be eigendecomposed), which the paper
    leaves out.
    """
    covariances = config.strategy in ("kfac", "ekfac")
    dtype = getattr(torch, config.accumulation_dtype)
    estimate = estimate_memory(layers, config)
    logger.info("infl_plugin: curvature statistics of the tracked layers\n%s", estimate.table())
    for layer in estimate.layers:
        if layer.statistics > LARGE_LAYER_BYTES:
            d_out, d_in = layer.shape
            warnings.warn(
                f"infl_plugin: layer {layer.name!r} ([{d_out}, {d_in}]) needs {layer.statistics / 2**30:.1f} GiB of "
                f"{config.accumulation_dtype} curvature statistics; leave it out with InfluenceConfig.modules or "
                "module_types unless that is intended (output heads over a vocabulary usually are not tracked)",
                stacklevel=3,
            )
    statistics = CurvatureStatistics(layers, covariances=covariances, dtype=dtype)
    if config.strategy == "diagonal":
        statistics.set_basis({layer.name: (None, None) for layer in layers})
    return statistics


def accumulate(
    model: nn.Module,
    task: Task,
    hooks: LayerHooks,
    statistics: CurvatureStatistics,
    loader: Iterable,
    config: InfluenceConfig,
    generator: torch.Generator,
) -> int:
    """One pass of per-example statistics over ``loader`` (at most ``config.max_fit_batches``).

    With ``fisher="sampled"`` each batch is backpropagated ``config.fisher_samples`` times, with
    fresh pseudo-labels from ``generator`` each time, and every draw is committed like a batch of
    its own: the statistics average over the draws (A is unchanged, S and the eigenvalues become
    the mean of the single-draw estimates). Returns the number of draws committed; raises if the
    loader is empty, warns on skips.
    """
    device = model_device(model)
    sample = config.fisher == "sampled"
    draws = config.fisher_samples if sample else 1
    committed = seen = 0
    skipped_before = statistics.skipped_batches
    for batch in loader:
        if config.max_fit_batches is not None and seen >= config.max_fit_batches:
            break
        seen += 1
        batch = move_to_device(batch, device)
        for _ in range(draws):
            backward_pass(model, task, hooks, batch, statistics, sample=sample, generator=generator)
            committed += statistics.commit(1.0)
    if seen == 0:
        raise ValueError("The loader yielded no batch: cannot fit curvature factors on an empty loader")
    skipped = statistics.skipped_batches - skipped_before
    if skipped:
        warnings.warn(f"infl_plugin: skipped {skipped} of {seen} batches (NaN/inf gradients or no real tokens)", stacklevel=3)
    if committed == 0:
        raise ValueError(f"None of the {seen} batches gave usable statistics (all NaN/inf, empty or padding)")
    return committed
