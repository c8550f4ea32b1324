"""Progress bars: tqdm's notebook widget where ipywidgets can draw it, tqdm's text bar everywhere else.

``tqdm.auto`` picks the widget inside Jupyter even when ipywidgets is missing, and then warns
(``TqdmWarning: IProgress not found``) as soon as it is imported; asking for it only when
ipywidgets is importable keeps notebooks without the ``notebook`` extra free of that warning.
"""

from __future__ import annotations

import importlib.util

__all__ = ["progress_bar"]


def _widgets_importable() -> bool:
    try:
        return importlib.util.find_spec("ipywidgets") is not None
    except (ImportError, ValueError):  # a broken or half-imported ipywidgets: the text bar
        return False


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar over ``iterable``: ``tqdm.auto``'s when ipywidgets is importable, else plain ``tqdm``.

    Args:
        iterable: what to iterate over, or None for a bar updated by hand (``total=``, ``bar.update(n)``).
        **kwargs: tqdm's own (``desc``, ``total``, ``disable``, ``leave``, ``unit``, ...).

    Returns:
        The tqdm bar (on stderr in a terminal).

    Example:
        >>> sum(progress_bar(range(3), disable=True))
        3
    """
    if _widgets_importable():
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(iterable, **kwargs)
