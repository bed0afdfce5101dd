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
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("Linear", "Conv1D", "Conv2d")


@dataclass(frozen=True)
class TrackedLayer:
    """A module seen as a matrix ``W: [d_out, d_in]`` acting on tokens (bias folded into d_in)."""

    name: str
    module: nn.Module
    kind: str  # one of SUPPORTED_TYPES

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def in_features(self) -> int:
        """d_in including the appended bias column."""
        m = self.module
        if self.kind == "Linear":
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
        """Forward input → ``a: [batch, tokens, d_in(+1)]`` (bias column of ones appended)."""
        if self.kind == "Conv2d":
            m = self.module
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = patches.transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a

    def output_gradients(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Gradient at the module output → ``g: [batch, tokens, d_out]``."""
        if self.kind == "Conv2d":
            return grad_out.flatten(2).transpose(1, 2)
        return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])

    def to_parameter_grads(self, dw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map a gradient matrix ``[..., d_out, d_in(+1)]`` to the module's parameter shapes."""
        lead = dw.shape[:-2]
        weight, bias = (dw[..., :-1], dw[..., -1]) if self.has_bias else (dw, None)
        if self.kind == "Conv1D":
            weight = weight.transpose(-1, -2)
        elif self.kind == "Conv2d":
            weight = weight.reshape(lead + tuple(self.module.weight.shape))
        grads = {"weight": weight}
        if bias is not None:
            grads["bias"] = bias
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

    Leaf modules with parameters that match a pattern but cannot be tracked (a ``LayerNorm``, an
    ``Embedding``, a grouped convolution) are named in a warning; parameter-free leaves a broad pattern
    sweeps up (dropout, activations) are passed over silently. An empty selection raises
    ``ValueError`` listing what the model offers.
    """
    types = None if types is None else set(types)
    if types is not None:
        bad = sorted(types - set(SUPPORTED_TYPES))
        if bad:
            raise ValueError(f"InfluenceConfig.module_types has unsupported entries {bad}; allowed: {list(SUPPORTED_TYPES)}")
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
        chosen.append(TrackedLayer(name, module, kind))
    if skipped:
        warnings.warn("infl_plugin: not tracking requested modules " + ", ".join(skipped), stacklevel=2)
    if not chosen:
        offered = [n for n, m in model.named_modules() if layer_kind(m) is not None][:20]
        raise ValueError(
            f"No trainable layer matches InfluenceConfig.modules={list(patterns) if patterns else None} "
            f"and module_types={sorted(types) if types else None}. Supported types: {list(SUPPORTED_TYPES)}; "
            f"supported layers in this model: {offered}"
        )
    return chosen
