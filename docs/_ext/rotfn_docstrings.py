"""Griffe extension of the docs build: render rotfn's docstring habits the way mkdocstrings expects.

rotfn docstrings are Google style with two habits of their own:

* the runnable example sits under ``Example:`` (singular). Griffe parses only ``Examples:`` as
  doctest code; under ``Example:`` the ``>>>`` lines would render as nested block quotes.
* cross-references are Sphinx roles (:func:`rotfn.rotate`, :class:`Plan`). They become optional
  autorefs: a link when the target is documented on the site, plain code otherwise (never a
  broken link, never a strict-mode warning). Relative names are resolved in the docstring's scope.

Only the text the site renders changes; the docstrings in the source stay as they are.
Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([A-Za-z_][\w.]*)`")
_LITERAL_BLOCK = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _target(obj: griffe.Object, name: str) -> str:
    """The full path a role's name points to (resolved in ``obj``'s scope when it is relative)."""
    if name == "rotfn" or name.startswith("rotfn."):
        return name
    head, _, rest = name.partition(".")
    try:
        base = obj.resolve(head)
    except (griffe.NameResolutionError, KeyError, ValueError, AttributeError):
        return name
    return f"{base}.{rest}" if rest else base


def rewrite(obj: griffe.Object, text: str) -> str:
    """``text`` with ``Example:`` sections and Sphinx roles turned into what mkdocstrings renders well."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _LITERAL_BLOCK.sub(r"\1:", text)

    def role(match: re.Match) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        return f'<autoref identifier="{_target(obj, name)}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(role, text)


class RotfnDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package once its object tree is complete."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)

        walk(pkg)
