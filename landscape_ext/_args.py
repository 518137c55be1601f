"""Argument checks shared by the public solvers (one message format everywhere)."""
from __future__ import annotations

import operator
from typing import Any

__all__ = ["count_argument"]


def count_argument(value: Any, name: str, owner: str, minimum: int = 1) -> int:
    """``value`` as a Python ``int`` when it is an integer ``>= minimum``.

    Any integral type is accepted (``int``, ``np.int64``, a 0-d integer tensor: whatever
    ``operator.index`` takes); ``bool``, floats (also integral ones such as ``2.0``) and strings
    are not.

    Parameters
    ----------
    value : Any
        The argument as passed.
    name, owner : str
        The argument's and the calling function's names, for the message.
    minimum : int
        The smallest allowed value.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        ``"<owner>: <name> must be a positive integer, got <value>"`` (``minimum == 1``) or
        ``"... must be an integer >= <minimum>, got ..."``.
    """
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    error = ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    if isinstance(value, bool):
        raise error
    try:
        n = operator.index(value)
    except TypeError:
        raise error from None
    if n < minimum:
        raise error
    return int(n)
