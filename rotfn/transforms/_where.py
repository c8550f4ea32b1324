"""Selection of parameters as a value: ``Where`` filters over ``(name, tensor)``.

A filter is a tuple of selectors, any of which may match (a tuple means "any"):

* a glob string (``fnmatch`` rules, e.g. ``"*.q_proj.weight"``),
* a compiled regex (``re.compile(...)``; must match the whole name),
* an exact name (from :meth:`Where.names`),
* a predicate ``fn(name, tensor) -> bool``.

Filters are frozen, hashable and printable, and kept apart from "what to do":
transforms take one as their ``where=`` argument. A filter that matches no key
is an error that lists the closest keys (``difflib``), never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping

from rotfn.errors import ArgumentError, SelectionError, message

__all__ = ["Where", "where"]

_KINDS = ("glob", "regex", "name", "predicate")


@dataclasses.dataclass(frozen=True, repr=False)
class Where:
    """A parameter filter: matches ``name`` if any of its selectors does.

    Build one with :func:`rotfn.where` (or :meth:`Where.names` for exact keys).

    Attributes:
        selectors: tuple of ``(kind, value)`` with kind ``"glob"``, ``"regex"``
            (the pattern text), ``"name"`` or ``"predicate"`` (a callable).
    """

    selectors: tuple[tuple[str, object], ...]

    @classmethod
    def names(cls, names: Iterable[str]) -> Where:
        """A filter matching exactly these keys (no glob or regex meaning).

        Example:
            >>> Where.names(["a.weight"])("a.weight", None)
            True
        """
        return cls(tuple(("name", str(n)) for n in names))

    def __call__(self, name: str, tensor=None) -> bool:
        """True when any selector matches ``name`` (predicates also see ``tensor``)."""
        for kind, value in self.selectors:
            if kind == "name" and name == value:
                return True
            if kind == "glob" and fnmatch.fnmatchcase(name, value):
                return True
            if kind == "regex" and re.fullmatch(value, name):
                return True
            if kind == "predicate" and value(name, tensor):
                return True
        return False

    def select(self, params: Mapping[str, object], *, fn: str = "where") -> list[str]:
        """The keys of ``params`` this filter matches, in dict order.

        Args:
            params: ``{name: tensor}``.
            fn: the public function to name in an error.

        Returns:
            A non-empty list of keys.

        Raises:
            SelectionError: nothing matches; the message lists the closest keys.

        Example:
            >>> import torch, rotfn
            >>> rotfn.where("*.bias").select({"a.weight": torch.ones(1), "a.bias": torch.ones(1)})
            ['a.bias']
        """
        keys = [k for k, t in params.items() if self(k, t)]
        if not keys:
            raise SelectionError(
                message(fn, "where", f"a filter matching at least one of {len(params)} keys", repr(self),
                        f"use one of the closest keys: {self.closest(params)}")
            )
        return keys

    def closest(self, params: Iterable[str], n: int = 5) -> list[str]:
        """Up to ``n`` keys closest (difflib) to this filter's text selectors."""
        keys = list(params)
        texts = [str(v) for kind, v in self.selectors if kind != "predicate"]
        found: list[str] = []
        for text in texts:
            for k in difflib.get_close_matches(text, keys, n=n, cutoff=0.3):
                if k not in found:
                    found.append(k)
        return found[:n] or keys[:n]

    def __or__(self, other: Where) -> Where:
        return Where(self.selectors + where(other).selectors)

    def __repr__(self) -> str:
        parts = []
        for kind, value in self.selectors:
            if kind == "regex":
                parts.append(f"re.compile({value!r})")
            elif kind == "predicate":
                parts.append(getattr(value, "__qualname__", repr(value)))
            else:
                parts.append(repr(value))
        return f"where({', '.join(parts)})"

    def to_dict(self) -> dict:
        """A JSON-safe dict (predicates cannot be serialized).

        Raises:
            ArgumentError: the filter holds a predicate.
        """
        if any(kind == "predicate" for kind, _ in self.selectors):
            raise ArgumentError(message("Where.to_dict", "self", "a filter without predicates", repr(self),
                                        "use glob or regex selectors for a filter that is saved"))
        return {"selectors": [[kind, value] for kind, value in self.selectors]}

    @classmethod
    def from_dict(cls, d: dict) -> Where:
        """Rebuild a filter from :meth:`to_dict` output."""
        sel = d.get("selectors") if isinstance(d, dict) else None
        if not isinstance(sel, list) or not all(
            isinstance(s, list) and len(s) == 2 and s[0] in _KINDS[:3] and isinstance(s[1], str) for s in sel
        ):
            raise ArgumentError(message("Where.from_dict", "d", "{'selectors': [[kind, text], ...]}", repr(d)))
        return cls(tuple((k, v) for k, v in sel))


def where(*selectors: str | re.Pattern | Callable | Where | tuple) -> Where:
    """Build a parameter filter: a key is selected when any selector matches it.

    ``where("*.q_proj.weight", re.compile(r".*\\.k_proj\\.weight"), lambda name, t: t.ndim == 1)``
    selects q_proj weights, k_proj weights and every 1-D tensor. Globs follow
    ``fnmatch`` (``*`` also crosses dots); regexes must match the whole name.

    Args:
        *selectors: glob strings, compiled regexes, predicates ``fn(name, tensor) -> bool``,
            other filters, or tuples/lists of these (a tuple means "any").

    Returns:
        A frozen, hashable :class:`Where`.

    Raises:
        ArgumentError: no selector, or a selector of another type.

    Example:
        >>> import rotfn
        >>> w = rotfn.where("*.q_proj.weight", "*.k_proj.weight")
        >>> w("model.layers.0.self_attn.q_proj.weight"), w("model.norm.weight")
        (True, False)
    """
    flat: list[tuple[str, object]] = []

    def add(s) -> None:
        if isinstance(s, Where):
            flat.extend(s.selectors)
        elif isinstance(s, str):
            flat.append(("glob", s))
        elif isinstance(s, re.Pattern):
            flat.append(("regex", s.pattern))
        elif isinstance(s, (tuple, list)):
            for item in s:
                add(item)
        elif callable(s):
            flat.append(("predicate", s))
        else:
            raise ArgumentError(
                message("where", "selectors", "glob strings, compiled regexes, predicates (name, tensor) -> bool, "
                        "or tuples of these", f"{type(s).__name__} {s!r}", "pass e.g. where('*.q_proj.weight')")
            )

    add(selectors)
    if not flat:
        raise ArgumentError(message("where", "selectors", "at least one selector", "none", "pass e.g. where('*.weight')"))
    return Where(tuple(flat))
