"""The one label -> target lookup, with one error for values (or ids) that have no target.

Objectives with hard labels (EmoCls, prompts) map a batch's raw label values through a
label -> index table; fine-tuning maps utterance ids through the protocol's id -> target table.
Both go through `lookup_targets`, so a missing entry is always the same clear error: which
values, how many, an example id, and what is known.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from uniter3m.errors import UserError

T = TypeVar("T")


def lookup_targets(
    keys: Sequence[Any],
    table: Mapping[str, T],
    *,
    what: str,
    where: str,
    ids: Sequence[str] | None = None,
    fix: str = "",
) -> list[T]:
    """`table[str(key)]` for every key; unknown keys are listed (with counts and an id) in one error."""
    out: list[T] = []
    unknown: Counter[str] = Counter()
    first_id: dict[str, Any] = {}
    for i, key in enumerate(keys):
        value = table.get(str(key))
        if value is None:
            unknown[str(key)] += 1
            first_id.setdefault(str(key), ids[i] if ids is not None and i < len(ids) else i)
            continue
        out.append(value)
    if unknown:
        listed = ", ".join(f"{k!r} ({n}x, e.g. utterance {first_id[k]!r})" for k, n in unknown.most_common(5))
        known = sorted(table)[:10]
        raise UserError(
            f"{where}: no {what} for {listed}; known: {known}{'...' if len(table) > 10 else ''}"
            + (f"; {fix}" if fix else "")
        )
    return out
