"""Lists of names in messages: a count and the first few, never 50,000 names on one line."""

from __future__ import annotations

from collections.abc import Iterable

SHOWN = 3  # names a message shows before it only counts


def counted(names: Iterable[str], noun: str, shown: int = SHOWN) -> str:
    """``"3 services: a, b, c"``, or ``"50000 services (a, b, c, ...)"`` past ``shown``
    names (sorted); ``noun`` is singular and takes an ``s`` past one."""
    ordered = sorted(names)
    what = f"{len(ordered)} {noun}{'' if len(ordered) == 1 else 's'}"
    if len(ordered) <= shown:
        return f"{what}: {', '.join(ordered)}" if ordered else what
    return f"{what} ({', '.join(ordered[:shown])}, ...)"


def listed(names: Iterable[str], noun: str, shown: int = 10) -> str:
    """``"a, b, c"`` for a few names; past ``shown`` of them as :func:`counted` says it."""
    ordered = sorted(names)
    return ", ".join(ordered) if len(ordered) <= shown else counted(ordered, noun, shown)
