"""Typed errors of rotfn.

Every error is a :class:`RotfnError` and also the builtin that fits the
mistake (``ValueError``, ``TypeError``, ``KeyError``, ``RuntimeError``), so
``except ValueError`` in user code keeps working. Messages follow one shape,
built by :func:`message`::

    rotate: argument 'x': expected a floating tensor, got torch.int64; fix: cast with x.float()

naming the function, the argument (or parameter key), what was expected,
what was got, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "RotfnError",
    "ArgumentError",
    "ShapeError",
    "DTypeError",
    "RotationError",
    "OrderError",
    "FormatError",
    "SpecError",
    "BackendUnavailableError",
    "SelectionError",
    "FamilyError",
    "PlanError",
    "FoldError",
    "CheckpointError",
    "CheckpointWarning",
    "MissingDependencyError",
    "DistributedError",
    "message",
]


def message(fn: str, arg: str, expected: str, got: object, fix: str | None = None) -> str:
    """Build the one-line error text every rotfn error uses.

    Args:
        fn: public function name, e.g. ``"rotate"``.
        arg: argument or parameter key, e.g. ``"x"`` or ``"fmt.group"``.
        expected: what was expected, in words.
        got: what was received (formatted with ``str``).
        fix: a concrete way out, or ``None``.

    Returns:
        ``"fn: argument 'arg': expected E, got G; fix: F"``.

    Example:
        >>> message("rotate", "x", "a tensor", "list", "wrap it in torch.tensor")
        "rotate: argument 'x': expected a tensor, got list; fix: wrap it in torch.tensor"
    """
    text = f"{fn}: argument '{arg}': expected {expected}, got {got}"
    return f"{text}; fix: {fix}" if fix else text


class RotfnError(Exception):
    """Base class of every error rotfn raises on purpose."""


class ArgumentError(RotfnError, ValueError):
    """An argument outside its allowed set of values (e.g. an unknown ``backend``)."""


class ShapeError(RotfnError, ValueError):
    """A tensor's shape does not fit the rotation or format (e.g. last dim not divisible by the block)."""


class DTypeError(RotfnError, TypeError):
    """A tensor has a dtype the function does not take (e.g. an integer tensor for ``rotate``)."""


class RotationError(RotfnError, ValueError):
    """A rotation argument is invalid: not orthogonal, bad block, bad seed, wrong size."""


class OrderError(RotationError):
    """No Hadamard matrix of the requested order can be built by rotfn's constructions."""


class FormatError(RotfnError, ValueError):
    """A number-format argument is invalid (unknown scale rule, bits out of range, ...)."""


class SpecError(RotfnError, ValueError):
    """A serialized spec (``to_dict`` output) is malformed or of an unknown version."""


class BackendUnavailableError(RotfnError, RuntimeError):
    """An explicitly requested backend cannot run this call; rotfn never falls back silently."""


class SelectionError(RotfnError, KeyError):
    """A ``where=`` filter or a parameter name matches no key; the message lists the closest keys."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


class FamilyError(RotfnError, ValueError):
    """The model's family has no adapter (the message lists the supported families)."""


class PlanError(RotfnError, ValueError):
    """A plan does not fit the model or params it is used with, or cannot be exact there."""


class FoldError(PlanError):
    """Params and plan disagree on what was folded: folding twice, or calling unfolded params."""


class CheckpointError(RotfnError, ValueError):
    """A file or directory is not a readable rotfn checkpoint (not rotfn, unknown version, missing,
    mismatched, corrupted or truncated data), or params cannot be written to one."""


class MissingDependencyError(RotfnError, ImportError):
    """An optional package a call needs (pandas for ``Report.to_pandas``, matplotlib for ``Report.plot``) is not
    installed; the message names the ``pip install`` that brings it."""


class DistributedError(RotfnError, RuntimeError):
    """Under ``torch.distributed``: another rank failed or stopped, or the ranks disagree where they must agree
    (each rank raises, so none waits forever and none writes a half result)."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but with a caveat worth knowing (e.g. plain transformers would skip its
    online transforms; a random rotation's stored matrix differs from what this torch regenerates)."""
