"""One abstraction for "a layer with input activations a and output gradients g".

Every supported module is seen as ``y_t = W ā_t`` per token t, with ``W`` of shape
``[d_out, d_in (+1 for the bias)]`` and ``ā_t`` the input with a constant 1 appended when the layer
has a bias. A `TrackedLayer` turns a module's forward input into ``a: [batch, tokens, d_in(+1)]``
and the gradient at its output into ``g: [batch, tokens, d_out]``, so that the per-example
gradient is ``DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` whatever the layer type:

* ``nn.Linear``: tokens are all dimensions between batch and features.
* GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored ``[d_in, d_out]``, ``y = x W + b``):
  the same as Linear; its weight gradient is ``DWᵀ``. Detected by class name and attributes, so
  transformers is never imported.
* ``nn.Conv2d`` (groups = 1, zero padding): tokens are output positions, ``a`` are unfolded
  input patches ``[batch, H_out·W_out, C_in·k_h·k_w]``.

Only trainable parameters are part of ``W`` (a frozen weight with a trainable bias gives
``ā_t = [1]``). `select_layers` picks the layers; by default it leaves out the unembedding
(`vocabulary_layers`), as the paper does.
"""

from __future__ import annotations

import fnmatch
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.choices import SUPPORTED_TYPES
from ..errors import ConfigurationError


@dataclass(frozen=True)
class TrackedLayer:
    """A module seen as a matrix ``W: [d_out, d_in]`` acting on tokens (bias folded into d_in).

    Only trainable parameters belong to ``W``: ``tracks_weight``/``tracks_bias`` record which of
    weight and bias had ``requires_grad`` when the layer was selected (`TrackedLayer.of`). A
    frozen bias drops the ones column; a frozen weight with a trainable bias is a bias-only
    layer with ``ā_t = [1]`` (``d_in = 1``).
    """

    name: str
    module: nn.Module
    kind: str  # one of SUPPORTED_TYPES
    tracks_weight: bool = True
    tracks_bias: bool = True

    @classmethod
    def of(cls, name: str, module: nn.Module, kind: str) -> "TrackedLayer":
        """The layer with what is trainable now (``requires_grad``) tracked."""
        bias = getattr(module, "bias", None)
        return cls(name, module, kind, bool(module.weight.requires_grad), bias is not None and bool(bias.requires_grad))

    @property
    def has_bias(self) -> bool:
        """Whether the bias column (a trainable bias) is part of ``W``."""
        return self.tracks_bias and getattr(self.module, "bias", None) is not None

    @property
    def in_features(self) -> int:
        """d_in: the weight's input features (when trainable) plus the appended bias column."""
        m = self.module
        if not self.tracks_weight:
            base = 0
        elif self.kind == "Linear":
            base = m.in_features
        elif self.kind == "Conv1D":
            base = m.weight.shape[0]
        else:
            base = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        return base + int(self.has_bias)

    @property
    def out_features(self) -> int:
        m = self.module
        if self.kind == "Linear":
            return m.out_features
        if self.kind == "Conv1D":
            return m.weight.shape[1]
        return m.out_channels

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the layer's gradient matrix (bias included in d_in)."""
        return (self.out_features, self.in_features)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Forward input → ``a: [batch, tokens, d_in]`` (bias column of ones appended)."""
        if not self.tracks_weight:
            return x.new_ones((x.shape[0], self._tokens(x), 1))
        if self.kind == "Conv2d":
            m = self.module
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = patches.transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a

    def _tokens(self, x: torch.Tensor) -> int:
        """Token count of an input: positions between batch and features, or conv output positions."""
        if self.kind != "Conv2d":
            return int(x[0, ..., 0].numel())
        m, count = self.module, 1
        for size, k, s, p, d in zip(x.shape[-2:], m.kernel_size, m.stride, m.padding, m.dilation):
            count *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        return count

    def output_gradients(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Gradient at the module output → ``g: [batch, tokens, d_out]``."""
        if self.kind == "Conv2d":
            return grad_out.flatten(2).transpose(1, 2)
        return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])

    def to_parameter_grads(self, dw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map a gradient matrix ``[..., d_out, d_in]`` to the tracked parameters' shapes."""
        lead = dw.shape[:-2]
        grads = {}
        if self.tracks_weight:
            weight = dw[..., :-1] if self.has_bias else dw
            if self.kind == "Conv1D":
                weight = weight.transpose(-1, -2)
            elif self.kind == "Conv2d":
                weight = weight.reshape(lead + tuple(self.module.weight.shape))
            grads["weight"] = weight
        if self.has_bias:
            grads["bias"] = dw[..., -1]
        return grads


def layer_kind(module: nn.Module) -> Optional[str]:
    """The supported kind of ``module``, or ``None``. Conv1D is matched without importing transformers."""
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        if module.weight.dim() == 2:
            return "Conv1D"
    return None


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolutions (groups != 1) are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        if isinstance(module.padding, str):
            return f"string padding {module.padding!r} is not supported; use explicit integers"
    return None


def select_layers(
    model: nn.Module,
    patterns: Optional[Sequence[str]] = None,
    types: Optional[Iterable[str]] = None,
) -> list[TrackedLayer]:
    """Layers of ``model`` matching the fnmatch ``patterns`` and the class-name ``types``.

    Only layers with a trainable parameter are chosen, and only their trainable parameters are
    tracked. Without ``patterns`` the unembedding (see `vocabulary_layers`) is left out, with a
    warning (once per model) saying how to include it: name it in ``patterns``.

    Leaf modules with parameters that match a pattern but cannot be tracked (a ``LayerNorm``, an
    ``Embedding``, a grouped convolution) are named in a warning; parameter-free leaves a broad pattern
    sweeps up (dropout, activations) are passed over silently. An empty selection raises
    ``ValueError`` listing what the model offers.
    """
    types = None if types is None else set(types)
    if types is not None:
        bad = sorted(types - set(SUPPORTED_TYPES))
        if bad:
            raise ConfigurationError(
                f"InfluenceConfig.module_types has unsupported entries {bad}; allowed: {list(SUPPORTED_TYPES)}"
            )
    chosen: list[TrackedLayer] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        kind = layer_kind(module)
        reason = _unsupported_reason(module) if kind else None
        if kind is None or reason is not None:
            has_parameters = next(module.parameters(recurse=False), None) is not None
            if patterns is not None and has_parameters and next(module.children(), None) is None:
                skipped.append(f"{name} ({type(module).__name__}: {reason or 'unsupported layer type'})")
            continue
        if types is not None and kind not in types:
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        chosen.append(TrackedLayer.of(name, module, kind))
    if skipped:
        warnings.warn("infl_plugin: not tracking requested modules " + ", ".join(skipped), stacklevel=2)
    excluded: dict[str, str] = {}
    if patterns is None:
        excluded = vocabulary_layers(model, chosen)
        if excluded:
            chosen = [layer for layer in chosen if layer.name not in excluded]
            if chosen:
                _note_exclusion(model, excluded)
    if not chosen:
        offered = [n for n, m in model.named_modules() if layer_kind(m) is not None][:20]
        left_out = "; ".join(f"{name!r} ({why})" for name, why in excluded.items())
        raise ConfigurationError(
            f"No trainable layer matches InfluenceConfig.modules={list(patterns) if patterns else None} "
            f"and module_types={sorted(types) if types else None}. Supported types: {list(SUPPORTED_TYPES)}; "
            f"supported layers in this model: {offered}"
            + (f"; left out as the unembedding: {left_out} (name them in InfluenceConfig.modules, for example "
               "modules=['*'], to track them)" if excluded else "")
        )
    return chosen


VOCABULARY_RATIO = 2


def vocabulary_layers(model: nn.Module, layers: Sequence[TrackedLayer]) -> dict[str, str]:
    """The unembedding among ``layers``: name → why it counts as one.

    A layer counts when it is the module ``model.get_output_embeddings()`` returns (Hugging Face
    models), when its weight is an ``nn.Embedding``'s weight (tied), or, for one layer at most,
    by its shape: the last layer (network order) whose output dimension is the vocabulary V (the
    largest ``nn.Embedding``'s ``num_embeddings``), provided other layers exist and V is more than
    `VOCABULARY_RATIO` times each of their dimensions. So a byte-level model whose blocks are as
    wide as its vocabulary (V = 256, width 256) keeps all of them, and a small model's MLP whose
    width happens to equal V is not taken for a head.
    """
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    tied = {_storage(e.weight) for e in embeddings} - {None}
    reasons: dict[str, list[str]] = {layer.name: [] for layer in layers}
    for layer in layers:
        if head is not None and layer.module is head:
            reasons[layer.name].append("the model's output embeddings")
        if _storage(layer.module.weight) in tied:
            reasons[layer.name].append("weight tied to an nn.Embedding")
    if embeddings:
        vocabulary = max(e.num_embeddings for e in embeddings)
        dims = {layer.name: _weight_dims(layer) for layer in layers}
        sized = [name for name, d in dims.items() if d[0] == vocabulary]
        if sized:
            last = sized[-1]
            others = [max(d) for name, d in dims.items() if name != last]
            if others and all(vocabulary > VOCABULARY_RATIO * d for d in others):
                reasons[last].append(f"vocabulary-sized ({vocabulary})")
    return {name: ", ".join(why) for name, why in reasons.items() if why}


def _storage(weight: torch.Tensor) -> Optional[int]:
    """Address of a parameter's data (tied parameters share it); ``None`` when it has none yet.
    Without an address of its own (a meta tensor planning memory, an FSDP2 ``DTensor``, a freed
    FSDP1 shard: 0 for all of them) the object identifies it: tying shares the object too."""
    try:
        if weight.is_meta or hasattr(weight, "placements") or not weight.numel():
            return id(weight) if weight.numel() else None
        return weight.data_ptr() or id(weight)
    except (RuntimeError, ValueError):
        return None


def _weight_dims(layer: TrackedLayer) -> tuple[int, int]:
    """``(d_out, d_in)`` of the layer's weight (without the bias column, trainable or not)."""
    full = TrackedLayer(layer.name, layer.module, layer.kind, True, False)
    return full.shape


_NOTED: "weakref.WeakKeyDictionary[nn.Module, frozenset]" = weakref.WeakKeyDictionary()


def _note_exclusion(model: nn.Module, excluded: dict[str, str]) -> None:
    """Warn once per model and excluded set that the default selection left layers out."""
    key = frozenset(excluded)
    if _NOTED.get(model) == key:
        return
    _NOTED[model] = key
    described = ", ".join(f"{name!r} ({why})" for name, why in excluded.items())
    warnings.warn(
        f"infl_plugin: the default layer selection leaves out the unembedding {described}, as the paper "
        "does (its vocabulary-sized statistics take gigabytes and hours to eigendecompose); name it in "
        "InfluenceConfig.modules (for example modules=['*']) to track it",
        stacklevel=3,
    )
