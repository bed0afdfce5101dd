"""Files that must never be seen half-written: atomic replacement and checkpoint state.

`replace_atomically` writes a file to a temporary name next to its destination, flushes it to disk
and renames it over the destination, so a reader (TensorBoard, a resumed run, `read_artifacts`)
sees the old file or the new one, never a half-written one. Every file the package writes
(attribution artifacts, factors, checkpoint state) goes through it.

`save_state` / `load_state` store a session's nested state (tensors in dicts, lists and tuples,
plus JSON scalars) as the pair ``<folder>/influence_state.safetensors`` (the tensors, no pickle)
and ``<folder>/influence_state.json`` (the nesting and the metadata); `clone_state` deep-copies
such a state so a snapshot does not change with the live tensors.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .errors import StateFileError

STATE_FILE = "influence_state"  # <folder>/influence_state.safetensors + .json


def state_path(folder: str, suffix: str) -> str:
    """``<folder>/influence_state<suffix>`` (``suffix`` is ``".json"`` or ``".safetensors"``)."""
    return os.path.join(folder, STATE_FILE + suffix)


def replace_atomically(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a fresh temporary file next to ``path``, flush it to disk, then rename it
    over ``path``: a reader sees the old file or the new one, never a half-written one.

    The temporary file (``<path>.<random>.tmp``, created with the usual permissions) is removed if
    ``write`` raises; ``write`` may write to it by name or replace it.
    """
    path = os.fspath(path)
    tmp = _fresh_file(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fresh_file(path: str) -> str:
    """Create an empty file of a new name next to ``path`` (mode 0o666 less the umask, as ``open``)."""
    while True:
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def save_state(folder: str, state: dict, meta: Optional[dict] = None) -> None:
    """Write a nested state (tensors, dicts, lists, tuples, scalars) as safetensors + JSON.

    The JSON, written last, records the safetensors file's size, so `load_state` can tell a
    truncated file or a pair from two different saves.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    os.makedirs(folder, exist_ok=True)
    tensor_path = state_path(folder, ".safetensors")
    replace_atomically(tensor_path, lambda tmp: save_file(tensors, tmp))
    saved = {"meta": meta or {}, "state": tree, "tensors_bytes": os.path.getsize(tensor_path)}

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(saved, handle)

    replace_atomically(state_path(folder, ".json"), write_json)


def load_state(folder: str) -> tuple[dict, dict]:
    """Read what `save_state` wrote: ``(state, meta)``.

    Raises `StateFileError` naming the file and what is wrong with it: a file of the pair missing,
    JSON that does not parse or is not an influence state, a truncated or unreadable safetensors
    file, or a pair whose entries do not match.
    """
    json_path, tensor_path = state_path(folder, ".json"), state_path(folder, ".safetensors")
    for path in (json_path, tensor_path):
        if not os.path.isfile(path):
            raise StateFileError(f"{path} is missing (an influence state is the pair {STATE_FILE}.json + "
                                 f"{STATE_FILE}.safetensors)")
    try:
        with open(json_path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateFileError(f"{json_path} is not valid JSON (truncated or overwritten?): {error}") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("meta"), dict) or "state" not in saved:
        raise StateFileError(f"{json_path} is not an influence state (no 'meta' and 'state' entries)")
    size, expected = os.path.getsize(tensor_path), saved.get("tensors_bytes")
    if expected is not None and size != expected:
        raise StateFileError(f"{tensor_path} has {size} bytes where {json_path} expects {expected} (truncated, or "
                             "the two files come from different saves)")
    try:
        tensors = load_file(tensor_path)
    except Exception as error:  # safetensors raises its own error types (header, truncation, I/O)
        raise StateFileError(f"{tensor_path} is not a readable safetensors file: {type(error).__name__}: "
                             f"{error}") from error
    try:
        state = _unflatten(saved["state"], tensors)
    except (KeyError, TypeError, AttributeError) as error:
        raise StateFileError(f"{json_path} does not match {tensor_path}: missing or malformed entry {error}") from error
    return state, saved["meta"]


def clone_state(value: Any) -> Any:
    """A copy of a nested state whose tensors are detached clones (dicts, lists and tuples rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return value


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON tree of ``value``; each tensor goes into ``tensors`` under its path ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _flatten(v, f"{key}/{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    return value


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_flatten`: the nested state with the tensors put back."""
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(_unflatten(v, tensors) for v in tree["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in tree["__dict__"].items()}
    return tree


__all__ = ["STATE_FILE", "clone_state", "load_state", "replace_atomically", "save_state", "state_path"]
