"""Calibration batches without a network, and the batch checks of rotfn.learn.

The text is ``calibration.txt`` next to this file: about 11 KB of plain English prose
written for rotfn (rivers, bread, clocks, bees, numbers, stars, bridges, gardens, trains,
music, libraries, sailing, weather, markets, glass, lighthouses, maps, leaves, chess, ice),
so calibration never downloads a data set.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Iterable, Mapping

import torch

from rotfn.errors import ArgumentError, DTypeError, message

__all__ = ["calibration", "calibration_text", "check_batches", "to_device", "Batch"]

#: A batch: a tensor (the model's one positional input) or ``{name: tensor}`` (keyword inputs).
Batch = torch.Tensor | Mapping[str, torch.Tensor]

_TEXT = pathlib.Path(__file__).with_name("calibration.txt")


@functools.cache
def calibration_text() -> str:
    """The calibration prose that ships with rotfn (paragraphs separated by blank lines).

    Example:
        >>> len(calibration_text()) > 10_000
        True
    """
    return _TEXT.read_text(encoding="utf-8")


def _positive(fn: str, arg: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(message(fn, arg, f"an int >= {minimum}", repr(value)))
    return value


def _encode(fn: str, tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "encode") else tokenizer(text)
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ArgumentError(message(fn, "tokenizer", "a transformers tokenizer or a function text -> list of int ids",
                                    f"it returned {type(ids).__name__}", "pass the model's tokenizer"))
    return list(ids)


def calibration(
    tokenizer: object | Callable[[str], list[int]],
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    skip: int = 0,
    special_tokens: bool = False,
    text: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of token windows cut from rotfn's own calibration text (no download), or from ``text``.

    Each paragraph is tokenized without special tokens, the ids are joined into one stream,
    and the stream is cut into consecutive windows of ``seq_len`` ids; batch ``i`` holds windows
    ``(skip + i) * batch_size ...``. Batches with different ``skip`` ranges never share a
    window, so ``skip=n_batches`` of a training set gives held-out batches. With
    ``special_tokens=True`` each window holds ``seq_len - k`` text ids wrapped in the
    tokenizer's ``k`` special tokens (``[CLS] ... [SEP]``, ``<s> ...``), as the model sees text in use.

    Args:
        tokenizer: the model's transformers tokenizer (``encode(text, add_special_tokens=False)``
            is used) or any function ``text -> list[int]`` (e.g. bytes: ``lambda s: list(s.encode())``).
        seq_len: tokens per window (>= 2).
        batch_size: windows per batch.
        n_batches: number of batches.
        skip: batches to skip at the start of the stream.
        special_tokens: wrap each window in the special tokens (needs a transformers tokenizer).
        text: the prose to cut, paragraphs separated by blank lines (e.g. a file of your domain's text);
            None: :func:`calibration_text`.

    Returns:
        A list of ``{"input_ids": int64 [batch_size, seq_len], "attention_mask": ones}``.

    Raises:
        ArgumentError: a size that is not a positive int; a tokenizer that does not return ids, returns none
            at all (an empty tokenizer) or has no special tokens to add; ``text`` not a str; more windows than
            the text holds (the message says how many).

    Example:
        >>> batches = calibration(lambda s: list(s.encode()), seq_len=64, batch_size=4, n_batches=3)
        >>> len(batches), batches[0]["input_ids"].shape
        (3, torch.Size([4, 64]))
    """
    fn = "learn.calibration"
    seq_len = _positive(fn, "seq_len", seq_len, 2)
    batch_size = _positive(fn, "batch_size", batch_size)
    n_batches = _positive(fn, "n_batches", n_batches)
    skip = _positive(fn, "skip", skip, 0)
    if not isinstance(special_tokens, bool):
        raise ArgumentError(message(fn, "special_tokens", "a bool", repr(special_tokens)))
    if text is not None and not isinstance(text, str):
        raise ArgumentError(message(fn, "text", "None or a str", type(text).__name__, "read the file first"))
    wrap = _wrapper(fn, tokenizer, seq_len) if special_tokens else list
    body = seq_len - len(wrap([]))
    paragraphs = (calibration_text() if text is None else text).split("\n\n")
    stream = [i for p in paragraphs if p.strip() for i in _encode(fn, tokenizer, p.strip())]
    if not stream:  # transformers 5 loads an empty tokenizer from a checkpoint saved without tokenizer files
        raise ArgumentError(message(fn, "tokenizer", "a tokenizer that encodes text to ids",
                                    f"{type(tokenizer).__name__} returned no ids for the whole text (an empty "
                                    "tokenizer: the checkpoint has no tokenizer files)",
                                    "load the model's own tokenizer, or use random ids: "
                                    "torch.randint(0, vocab_size, (batch_size, seq_len))"))
    windows = len(stream) // body
    need = (skip + n_batches) * batch_size
    if need > windows:
        raise ArgumentError(message(fn, "n_batches", f"at most {windows // batch_size - skip} batches "
                                    f"({windows} windows of {seq_len} tokens, skip={skip})", n_batches,
                                    "use fewer or smaller batches, or a shorter seq_len"))
    rows = [wrap(stream[w * body:(w + 1) * body]) for w in range(skip * batch_size, need)]
    ids = torch.tensor(rows, dtype=torch.int64).view(n_batches, batch_size, seq_len)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def _wrapper(fn: str, tokenizer, seq_len: int) -> Callable[[list[int]], list[int]]:
    """``ids -> prefix + ids + suffix``, the special tokens the tokenizer puts around one text."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise ArgumentError(message(fn, "tokenizer", "a transformers tokenizer for special_tokens=True",
                                    type(tokenizer).__name__, "pass the model's tokenizer, or special_tokens=False"))
    probe = "rotation"
    plain, full = encode(probe, add_special_tokens=False), encode(probe, add_special_tokens=True)
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        raise ArgumentError(message(fn, "tokenizer", "a tokenizer whose special tokens wrap the text",
                                    f"{full} around {plain}", "use special_tokens=False"))
    if len(full) - len(plain) >= seq_len:
        raise ArgumentError(message(fn, "seq_len", f"more than the {len(full) - len(plain)} special tokens", seq_len))
    prefix, suffix = full[:at], full[at + len(plain):]
    return lambda ids: [*prefix, *ids, *suffix]


def check_batches(fn: str, data: Iterable[Batch]) -> list[Batch]:
    """The batches of ``data`` as a list, each a tensor or a dict of tensors.

    Raises:
        ArgumentError: data not iterable, or empty.
        DTypeError: a batch of another type.
    """
    if isinstance(data, (torch.Tensor, Mapping, str)) or not isinstance(data, Iterable):
        raise ArgumentError(message(fn, "data", "an iterable of batches (tensors or dicts of tensors)",
                                    type(data).__name__, "wrap a single batch in a list: data=[batch]"))
    batches = list(data)
    if not batches:
        raise ArgumentError(message(fn, "data", "at least one batch", "an empty iterable",
                                    "pass batches, e.g. rotfn.learn.calibration(tokenizer, ...)"))
    for i, b in enumerate(batches):
        ok = isinstance(b, torch.Tensor) or (isinstance(b, Mapping) and len(b) > 0 and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in b.items()))
        if not ok:
            raise DTypeError(message(fn, f"data[{i}]", "a tensor or a non-empty dict {name: tensor}", type(b).__name__,
                                     "tokenize with return_tensors='pt'"))
    return batches


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}
