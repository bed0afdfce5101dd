"""Query examples in every natural format, turned into token sequences a causal LM task scores.

What a user has at hand to explain is rarely a tokenized batch: a list of strings, the
``{"prompt", "completion"}`` pairs or ``{"messages": [...]}`` chats an SFT dataset is made of, rows
of a ``datasets.Dataset`` (raw or already tokenized), a mapping of columns. `prepare_queries`
accepts all of them and returns an indexable of examples that the training collator or
`PadCollator` batches; each query's *measurement* is its summed loss over the tokens it scores:

* a string (or a mapping whose ``text_field`` is a string): every token of the text;
* ``{"prompt": str, "completion": str}``: the completion's tokens given the prompt (all tokens
  when ``completion_only`` is off); prompt and completion may also be lists of chat messages;
* ``{"messages": [{"role", "content"}, ...]}``: the assistant turns' tokens, rendered through the
  tokenizer's chat template (each turn found as the part the template adds after the
  conversation so far with a generation prompt);
* a mapping with ``input_ids`` (lists, arrays or tensors; ``labels`` -100 where not scored): as it is.

`Preparation` mirrors what a trainer did to its own training text (TRL's SFTTrainer: EOS after
the text or completion, truncation to ``max_length``), so queries are scored as the training set
was trained. The tokenizer is duck-typed: ``tokenizer(text, add_special_tokens=...)["input_ids"]``,
``apply_chat_template(..., tokenize=False)``, ``decode``, ``eos_token``, ``pad_token_id``. Nothing
here imports a framework; the adapters only wire it. A format that cannot be handled raises
`ConfigurationError` naming the argument, the format received and the formats accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigurationError
from ..report.renderers import Rendered, Renderer, TextRenderer, make_renderer

IGNORE_INDEX = -100
ACCEPTED_FORMATS = (
    "strings (the loss of the whole text), {'prompt': ..., 'completion': ...} mappings (the completion's loss "
    "given the prompt), {'messages': [{'role': ..., 'content': ...}, ...]} chats (the assistant turns' loss, through "
    "the tokenizer's chat template), tokenized mappings with 'input_ids' (and optionally 'attention_mask', "
    "'labels' with -100 where not scored), rows of the training dataset (raw or processed, e.g. a datasets.Dataset), "
    "a mapping of such columns, or a DataLoader of ready batches")


@dataclass(frozen=True)
class Preparation:
    """How text queries become token sequences: the trainer's own preparation of its training text.

    ``text_field``: the key holding a row's text (TRL's ``dataset_text_field``); ``add_eos``: append
    the tokenizer's EOS to a text or completion (TRL does for non-chat data); ``completion_only``:
    score only a completion's tokens; ``max_length`` / ``truncation_mode`` (``"keep_start"`` or
    ``"keep_end"``): truncation of the token sequence.
    """

    text_field: str = "text"
    add_eos: bool = False
    completion_only: bool = True
    max_length: Optional[int] = None
    truncation_mode: str = "keep_start"


def query_format(example: Any, text_field: str = "text") -> str:
    """``"tokenized"``, ``"text"``, ``"prompt_completion"``, ``"messages"`` or ``"unknown"``."""
    if isinstance(example, str):
        return "text"
    if isinstance(example, Mapping):
        if example.get("input_ids") is not None:
            return "tokenized"
        if isinstance(example.get("messages"), (list, tuple)):
            return "messages"
        if "prompt" in example and "completion" in example:
            return "prompt_completion"
        if isinstance(example.get(text_field), str):
            return "text"
    return "unknown"


def describe_example(example: Any) -> str:
    """A short description of an example's type and keys, for error messages."""
    if isinstance(example, Mapping):
        keys = sorted(map(str, example))
        shown = ", ".join(repr(k) for k in keys[:8]) + (", …" if len(keys) > 8 else "")
        return f"a {type(example).__name__} with keys [{shown}]"
    if isinstance(example, torch.Tensor):
        return f"a tensor of shape {list(example.shape)}"
    if isinstance(example, str):
        return f"a string ({example[:40]!r}{'…' if len(example) > 40 else ''})"
    return f"a {type(example).__name__}"


def format_error(owner: str, received: Any, problem: str, hint: str = "") -> ConfigurationError:
    """`ConfigurationError` naming ``owner``, the first query's format and the formats accepted."""
    hint = f" {hint}" if hint else ""
    return ConfigurationError(f"{owner}: {problem}; the first query is {describe_example(received)}.{hint} "
                              f"Accepted: {ACCEPTED_FORMATS}.")


class ColumnRows:
    """Rows of a mapping of columns (``{"input_ids": [[...], ...]}``, a tokenizer's batch, a ``Dataset`` slice)."""

    def __init__(self, columns: Mapping) -> None:
        self.columns = dict(columns)
        lengths = {len(v) for v in self.columns.values()}
        if len(lengths) != 1:
            raise ConfigurationError(f"queries: the columns of a mapping of queries must have one length, got "
                                     f"{ {k: len(v) for k, v in self.columns.items()} }")
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(index)
        return {k: v[index] for k, v in self.columns.items()}


def as_rows(queries: Any) -> Any:
    """``queries`` as an indexable of examples: a mapping of equal-length columns becomes its rows."""
    if isinstance(queries, Mapping):
        values = list(queries.values())
        if values and all(hasattr(v, "__len__") and not isinstance(v, str) for v in values):
            return ColumnRows(queries)
        raise ConfigurationError(f"queries: a mapping is read as columns of equal length, got {describe_example(queries)}; "
                                 f"pass a list of examples instead. Accepted: {ACCEPTED_FORMATS}.")
    return queries


class PreparedQueries:
    """An indexable of token-sequence examples over ``rows`` of any accepted format, converted
    on first access (a large dataset of queries is not tokenized up front) and cached.

    A converted example is ``{"input_ids", "attention_mask", "labels", "text"}`` (lists; ``text``
    is what reports show); tokenized rows are returned as they are.
    """

    def __init__(self, rows: Any, tokenizer: Any, preparation: Preparation = Preparation(),
                 owner: str = "queries") -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.preparation = preparation
        self.owner = owner
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index not in self._cache:
            self._cache[index] = self.convert(self.rows[index], index)
        return self._cache[index]

    @property
    def converted(self) -> bool:
        """Whether the rows are text (converted here) rather than tokenized already."""
        return len(self.rows) > 0 and query_format(self.rows[0], self.preparation.text_field) != "tokenized"

    def convert(self, example: Any, index: int = 0) -> Any:
        """One example as a token sequence (see the class docstring)."""
        prep = self.preparation
        kind = query_format(example, prep.text_field)
        if kind == "tokenized":
            return example
        if kind == "unknown":
            raise format_error(self.owner, example, f"query {index} is in no format the callback can score")
        if self.tokenizer is None or not callable(self.tokenizer):
            raise format_error(self.owner, example, "text queries need a tokenizer",
                               "Pass the tokenizer as the Trainer's processing_class (or tokenize the queries).")
        if kind == "text":
            text = example if isinstance(example, str) else example[prep.text_field]
            text = self._with_eos(text)
            ids = self._encode(text)
            labels = list(ids)
        elif kind == "prompt_completion":
            text, ids, labels = self._prompt_completion(example["prompt"], example["completion"])
        else:
            text, ids, labels = self._messages(list(example["messages"]), index)
        ids, labels = self._truncate(ids, labels)
        if not any(label != IGNORE_INDEX for label in labels):
            raise format_error(self.owner, example, f"query {index} has no scored token left (after truncation to "
                               f"max_length={prep.max_length})")
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "text": text}

    # ----------------------------------------------------------------------------- formats
    def _prompt_completion(self, prompt: Any, completion: Any) -> tuple[str, list[int], list[int]]:
        if isinstance(prompt, str) and isinstance(completion, str):
            text = prompt + self._with_eos(completion)
            prompt_ids, ids = self._encode(prompt), self._encode(text)
        elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
            prompt_text = self._chat(list(prompt), generation_prompt=True)
            text = self._chat(list(prompt) + list(completion))
            prompt_ids, ids = self._encode(prompt_text, special=False), self._encode(text, special=False)
        else:
            raise format_error(self.owner, {"prompt": prompt, "completion": completion},
                               "prompt and completion must both be strings or both be lists of chat messages")
        start = common_prefix_length(prompt_ids, ids) if self.preparation.completion_only else 0
        return text, ids, [IGNORE_INDEX] * start + ids[start:]

    def _messages(self, messages: list, index: int) -> tuple[str, list[int], list[int]]:
        text = self._chat(messages)
        ids = self._encode(text, special=False)
        scored = [False] * len(ids)
        for turn, message in enumerate(messages):
            if not (isinstance(message, Mapping) and message.get("role") == "assistant"):
                continue
            before = self._encode(self._chat(messages[:turn], generation_prompt=True), special=False) if turn else []
            upto = self._encode(self._chat(messages[: turn + 1]), special=False)
            for t in range(common_prefix_length(before, ids), common_prefix_length(upto, ids)):
                scored[t] = True
        if not any(scored):
            raise format_error(self.owner, {"messages": messages}, f"chat query {index} has no assistant turn to score")
        return text, ids, [i if s else IGNORE_INDEX for i, s in zip(ids, scored)]

    # ----------------------------------------------------------------------------- tokenizer
    def _encode(self, text: str, special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]

    def _chat(self, messages: list, generation_prompt: bool = False) -> str:
        render = getattr(self.tokenizer, "apply_chat_template", None)
        if render is None:
            raise format_error(self.owner, {"messages": messages}, "chat queries need a tokenizer with a chat template")
        try:
            return render(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except (ValueError, TypeError, KeyError) as error:  # no template set, or a template that rejects the turns
            raise format_error(self.owner, {"messages": messages},
                               f"the tokenizer's chat template cannot render the query ({error})",
                               "Set tokenizer.chat_template or pass plain strings.") from error

    def _with_eos(self, text: str) -> str:
        eos = getattr(self.tokenizer, "eos_token", None)
        return text + eos if self.preparation.add_eos and eos and not text.endswith(eos) else text

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        length = self.preparation.max_length
        if length is None or len(ids) <= length:
            return ids, labels
        if self.preparation.truncation_mode == "keep_end":
            return ids[-length:], labels[-length:]
        return ids[:length], labels[:length]


def prepare_queries(queries: Any, tokenizer: Any, preparation: Preparation = Preparation(),
                    owner: str = "queries") -> Any:
    """``queries`` (any accepted format, see the module docstring) as an indexable of examples:
    tokenized ones unchanged (a ``Dataset`` stays a ``Dataset``), text ones a `PreparedQueries`."""
    rows = as_rows(queries)
    if len(rows) == 0:
        raise ConfigurationError(f"{owner} is empty; pass None to attribute nothing")
    first = rows[0]
    kind = query_format(first, preparation.text_field)
    if kind == "unknown":
        raise format_error(owner, first, "the queries are in no format the callback can score")
    return rows if kind == "tokenized" else PreparedQueries(rows, tokenizer, preparation, owner)


def common_prefix_length(left: Sequence[int], right: Sequence[int]) -> int:
    """How many leading tokens ``left`` and ``right`` share."""
    n = 0
    for a, b in zip(left, right):
        if a != b:
            break
        n += 1
    return n


class PadCollator:
    """Right-pads examples with ``input_ids`` (``attention_mask`` 0 and ``labels`` -100 on padding);
    batches the converted queries whatever the training collator expects (equal-length blocks, …)."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, examples: list) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for n, example in enumerate(examples):
            row = torch.as_tensor(example["input_ids"], dtype=torch.long).flatten()
            ids[n, : row.numel()] = row
            mask[n, : row.numel()] = torch.as_tensor(example.get("attention_mask", [1] * row.numel())).flatten()
            labels[n, : row.numel()] = torch.as_tensor(example.get("labels", row)).flatten()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding id, else its EOS id, else 0 (padding is masked out either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


class TokenTextRenderer(Renderer):
    """Examples as text in every view: strings and token sequences (a mapping's ``text``, or its
    ``input_ids`` as a list, array or tensor, decoded with ``tokenizer``); anything else through
    ``fallback`` (images, plain features)."""

    def __init__(self, tokenizer: Any, fallback: Renderer, max_chars: int = 300) -> None:
        self.text = TextRenderer(tokenizer, max_chars=max_chars)
        self.fallback = fallback

    def __call__(self, example: Any) -> Rendered:
        if isinstance(example, str) or (isinstance(example, Mapping) and (
                isinstance(example.get("text"), str) or example.get("input_ids") is not None)):
            return self.text(example)
        return self.fallback(example)


def readable_renderer(spec: Any, tokenizer: Any, image_shape: Optional[Sequence[int]] = None) -> Any:
    """``spec``, except that ``"auto"`` with a decoding tokenizer shows token sequences as text."""
    if spec == "auto" and callable(getattr(tokenizer, "decode", None)):
        return TokenTextRenderer(tokenizer, make_renderer("auto", image_shape))
    return spec


__all__ = ["ACCEPTED_FORMATS", "ColumnRows", "PadCollator", "Preparation", "PreparedQueries", "TokenTextRenderer",
           "as_rows", "common_prefix_length", "describe_example", "format_error", "pad_token_id", "prepare_queries",
           "query_format", "readable_renderer"]
