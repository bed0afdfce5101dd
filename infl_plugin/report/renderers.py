"""Renderers: a dataset example as a `Rendered` (text and/or an image ``[H, W]``/``[H, W, 3]``, a label).

`AutoRenderer` (the default), `ImageRenderer`, `TextRenderer` (optionally with a tokenizer),
`ReprRenderer`; or any callable ``example -> Rendered | str | array``. `make_renderer` resolves
the names of ``RENDERERS`` (``"auto"``, ``"image"``, ``"text"``, ``"repr"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..config.choices import RENDERERS
from .markdown import truncate as _truncate

@dataclass
class Rendered:
    """A displayable example: ``text`` (plain; escaped by `markdown_cell` when shown), an optional
    image ``[H, W]`` or ``[H, W, 3]`` with values in [0, 1], and its label when it has one."""

    text: str
    image: Optional[np.ndarray] = None
    label: Any = None


class Renderer:
    """Base renderer: ``renderer(example) -> Rendered``. Subclass and override ``__call__``."""

    def __call__(self, example: Any) -> Rendered:
        return Rendered(short_repr(example))


class ReprRenderer(Renderer):
    """A short ``repr`` of the example (tensors as shape and first values)."""

    def __init__(self, max_chars: int = 120) -> None:
        self.max_chars = max_chars

    def __call__(self, example: Any) -> Rendered:
        return Rendered(short_repr(example, self.max_chars))


class TextRenderer(Renderer):
    """Text examples: a string, or token ids decoded with ``tokenizer.decode`` when given.

    Mappings are read at ``text_key`` (``"text"``) or ``input_ids``; ``(input, label)`` pairs show
    the label after the text.
    """

    def __init__(self, tokenizer: Any = None, max_chars: int = 300, text_key: str = "text") -> None:
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self.text_key = text_key

    def __call__(self, example: Any) -> Rendered:
        content, label = _split_label(example)
        if isinstance(content, Mapping):
            if isinstance(content.get(self.text_key), str):
                content = content[self.text_key]
            elif content.get("input_ids") is not None:
                content = content["input_ids"]
        if isinstance(content, str):
            text = content
        elif self.tokenizer is not None and isinstance(content, (torch.Tensor, np.ndarray, list)):
            ids = content.tolist() if hasattr(content, "tolist") else list(content)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            text = short_repr(content, self.max_chars)
        text = _truncate(text, self.max_chars)
        return Rendered(text if label is None else f"{text} (label {label})", label=label)


class ImageRenderer(Renderer):
    """Image examples: ``[H, W]``, ``[C, H, W]`` (C ∈ {1, 3}) or flat vectors reshaped to ``shape``.

    ``(image, label)`` pairs put the label (mapped through ``label_names`` when given) in the text.
    Values are min-max scaled to [0, 1] per image.
    """

    def __init__(self, shape: Optional[Sequence[int]] = None, label_names: Optional[Sequence[str]] = None) -> None:
        self.shape = tuple(shape) if shape is not None else None
        self.label_names = list(label_names) if label_names is not None else None

    def __call__(self, example: Any) -> Rendered:
        content, label = _split_label(example)
        image = to_image(content, self.shape)
        if label is not None and self.label_names is not None and isinstance(label, int) and 0 <= label < len(self.label_names):
            label = self.label_names[label]
        text = "image" if label is None else f"label {label}"
        if image is None:
            text = short_repr(example) if label is None else f"{short_repr(content, 60)} (label {label})"
            return Rendered(text, label=label)
        return Rendered(text, image, label)


class AutoRenderer(Renderer):
    """Default: strings as text, image-shaped tensors (2-D, or 3-D with 1/3 channels, or flat with
    a square length ≥ 16) as images, anything else as a short repr; labels of pairs are shown."""

    def __init__(self, image_shape: Optional[Sequence[int]] = None, max_chars: int = 120) -> None:
        self.image = ImageRenderer(image_shape)
        self.text = TextRenderer(max_chars=max_chars)
        self.max_chars = max_chars

    def __call__(self, example: Any) -> Rendered:
        content, label = _split_label(example)
        if isinstance(content, str) or (isinstance(content, Mapping) and isinstance(content.get("text"), str)):
            return self.text(example)
        if to_image(content, self.image.shape) is not None:
            return self.image(example)
        text = short_repr(content, self.max_chars)
        return Rendered(text if label is None else f"{text} (label {label})", label=label)


def make_renderer(spec: Union[str, Renderer, Callable[[Any], Any], None] = "auto",
                  image_shape: Optional[Sequence[int]] = None) -> Callable[[Any], Rendered]:
    """A renderer from a name in ``RENDERERS``, a `Renderer`, or any callable (wrapped to return `Rendered`)."""
    if spec is None or spec == "auto":
        return AutoRenderer(image_shape)
    if isinstance(spec, str):
        if spec == "image":
            return ImageRenderer(image_shape)
        if spec == "text":
            return TextRenderer()
        if spec == "repr":
            return ReprRenderer()
        raise ValueError(f"renderer must be one of {list(RENDERERS)}, a Renderer or a callable, got {spec!r}")
    if not callable(spec):
        raise ValueError(f"renderer must be one of {list(RENDERERS)}, a Renderer or a callable, got {spec!r}")
    if isinstance(spec, Renderer):
        return spec

    def wrapped(example: Any) -> Rendered:
        out = spec(example)
        if isinstance(out, Rendered):
            return out
        if isinstance(out, str):
            return Rendered(out)
        image = to_image(out, image_shape)
        return Rendered("image", image) if image is not None else Rendered(short_repr(out))

    return wrapped


def to_image(value: Any, shape: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """``[H, W]`` or ``[H, W, 3]`` float array in [0, 1], or ``None`` when ``value`` is not image-like."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        value = value.astype(np.float32)
    else:
        return None
    if shape is not None:
        if value.size != int(np.prod(shape)):
            return None
        value = value.reshape(shape)
    elif value.ndim == 1:
        side = int(round(math.sqrt(value.size)))
        if value.size < 16 or side * side != value.size:
            return None
        value = value.reshape(side, side)
    if value.ndim == 3 and value.shape[0] in (1, 3) and value.shape[-1] not in (1, 3):
        value = np.moveaxis(value, 0, -1)
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    if value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[-1] != 3) or min(value.shape[:2]) < 2:
        return None
    lo, hi = float(np.nanmin(value)), float(np.nanmax(value))
    return np.clip((value - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(value)


def short_repr(value: Any, max_chars: int = 120) -> str:
    """A one-line description: tensors/arrays as ``tensor[shape] [v0, v1, …]``, else ``repr``."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        head = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in arr.reshape(-1)[:6].tolist())
        more = ", …" if arr.size > 6 else ""
        text = f"{type(value).__name__}{list(arr.shape)} [{head}{more}]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {short_repr(v, 40)}" for k, v in list(value.items())[:4]) + "}"
    elif isinstance(value, (tuple, list)):
        text = "(" + ", ".join(short_repr(v, 60) for v in value[:4]) + ")"
    else:
        text = repr(value)
    return _truncate(text.replace("\n", " "), max_chars)


def _split_label(example: Any) -> tuple[Any, Any]:
    """``(content, label)`` for ``(x, y)`` pairs and mappings with ``labels``/``label``; else ``(example, None)``."""
    if isinstance(example, (tuple, list)) and len(example) == 2 and _is_scalar(example[1]):
        return example[0], _scalar(example[1])
    if isinstance(example, Mapping):
        for key in ("label", "labels"):
            if key in example and _is_scalar(example[key]):
                return {k: v for k, v in example.items() if k != key}, _scalar(example[key])
    return example, None


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (int, float, np.integer, np.floating, str)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.size == 1 if isinstance(value, np.ndarray) else (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _scalar(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.item()
    return value



__all__ = ["AutoRenderer", "ImageRenderer", "RENDERERS", "Rendered", "Renderer", "ReprRenderer", "TextRenderer",
           "make_renderer", "short_repr", "to_image"]
