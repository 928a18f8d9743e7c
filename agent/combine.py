"""How the readings of a service's several ``sources`` become one: ``combine``.

``max`` (the default), ``min`` and ``sum`` take the sources that have a good
reading; an expression is evaluated by :mod:`simpleeval` (no attribute access,
no imports, no loops) over the sources' names, with ``max``, ``min``, ``ceil``,
``floor``, ``abs`` and ``round``::

    combine: "max(web_rps, queue) if business_hours else 2"

:meth:`Combine.parse` checks an expression when the config is loaded (syntax,
unknown names, and a trial evaluation), so ``shipmate check`` reports a mistake
with the line of ``combine``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "max": max, "min": min, "ceil": math.ceil, "floor": math.floor, "abs": abs, "round": round,
}
BUILTIN = ("max", "min", "sum")


class CombineError(ValueError):
    """The combination cannot be computed (or, at load time, is not a valid one)."""


@dataclass(frozen=True)
class Combine:
    """A parsed ``combine``: one of :data:`BUILTIN`, or an expression over ``names``."""

    spec: str
    names: tuple[str, ...]
    tree: Any = None

    @property
    def is_expression(self) -> bool:
        return self.spec not in BUILTIN

    @classmethod
    def parse(cls, spec: str, names: list[str] | tuple[str, ...]) -> Combine:
        """Check ``spec`` against the sources' ``names``.

        :raises CombineError: saying what is wrong (the syntax error's column, an
            unknown name, an evaluation that fails or gives no number).
        """
        from simpleeval import SimpleEval

        names = tuple(names)
        spec = spec.strip()
        if spec in BUILTIN:
            return cls(spec, names)
        try:
            ast.parse(spec, mode="eval")  # one expression, nothing else
            tree = SimpleEval().parse(spec)
        except SyntaxError as exc:
            where = f" at column {exc.offset}" if exc.offset else ""
            raise CombineError(f"invalid expression {spec!r}: {exc.msg}{where}") from None
        if any(isinstance(n, ast.Attribute | ast.Subscript | ast.Lambda) for n in ast.walk(tree)):
            raise CombineError(f"{spec!r}: use only numbers, source names, operators, "
                               "if/else and max, min, ceil, floor, abs, round")
        unknown = sorted(_names_used(tree) - set(names) - set(FUNCTIONS) - {"True", "False"})
        if unknown:
            raise CombineError(f"unknown name{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(unknown)} in {spec!r}; the sources are named "
                               f"{', '.join(names)}")
        made = cls(spec, names, tree)
        made.evaluate({n: 1.0 for n in names})  # a trial: types, calls, division by zero
        made.evaluate({n: 0.0 for n in names}, trial=True)
        return made

    def evaluate(self, values: Mapping[str, float], *, trial: bool = False) -> float:
        """The expression's value with ``values`` for the names.

        :raises CombineError: if it fails or gives no (finite, non-negative) number.
        """
        from simpleeval import SimpleEval

        missing = sorted(_names_used(self.tree) & set(self.names) - set(values))
        if missing:
            raise CombineError(f"{', '.join(missing)} never gave a reading; "
                               f"{self.spec!r} needs it")
        evaluator = SimpleEval(names=dict(values), functions=FUNCTIONS)
        try:
            result = evaluator.eval(self.spec, previously_parsed=self.tree)
        except ZeroDivisionError:
            if trial:  # 0 for every source is a legitimate corner: leave it to run time
                return 0.0
            raise CombineError(f"{self.spec!r} divides by zero") from None
        except Exception as exc:  # noqa: BLE001 - simpleeval raises many kinds
            raise CombineError(f"{self.spec!r} fails: {type(exc).__name__}: {exc}") from None
        if isinstance(result, bool) or not isinstance(result, Real):
            raise CombineError(f"{self.spec!r} gives {result!r}, not a count")
        if not math.isfinite(result) or result < 0:
            raise CombineError(f"{self.spec!r} gives {result}, not a count")
        return float(result)

    def __call__(self, fresh: Mapping[str, float],
                 last: Mapping[str, float] | None = None) -> tuple[float, str | None]:
        """Combine the good readings ``fresh``; an expression takes a source without one at
        its ``last`` good reading. Returns the value and the source that decided it (if one).

        :raises CombineError: if there is nothing to combine or the expression fails.
        """
        if not fresh:
            raise CombineError("no source has a good reading")
        if self.spec == "sum":
            return float(sum(fresh.values())), None
        if self.spec in ("max", "min"):
            pick = max if self.spec == "max" else min
            name = pick(fresh, key=lambda n: fresh[n])
            return fresh[name], name
        values = {**(last or {}), **fresh}
        result = self.evaluate(values)
        equal = [n for n in self.names if n in values and values[n] == result]
        return result, equal[0] if len(equal) == 1 else None


def _names_used(tree: Any) -> set[str]:
    if tree is None:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
