"""Paired accuracy differences: each variant against BF16 on the very same problems.

Every variant answers the same problems as the reference, so their verdicts are paired, and
a difference of two independent Wilson intervals overstates the uncertainty (most problems
are solved by both or by neither). What carries the information is the *discordant* pairs:
``b`` problems the reference solved and the variant did not, ``c`` the other way round.

- The p-value is McNemar's exact test: under "no difference" each discordant problem is as
  likely to go either way, so ``min(b, c)`` is Binomial(b + c, 1/2); two-sided
  ``p = min(1, 2 P(X <= min(b, c)))``.
- The interval is Newcombe's (1998, *Statistics in Medicine* 17:2635, method 10), the
  "square-and-add" combination of the two accuracies' Wilson intervals with their
  correlation: for the 2x2 table ``a`` (both right), ``b``, ``c``, ``d`` (both wrong),
  accuracies ``p1 = (a + c) / n`` (variant) and ``p2 = (a + b) / n`` (reference) with Wilson
  limits ``l1, u1`` and ``l2, u2``, and ``phi`` their continuity-corrected correlation,
  ``p1 - p2 - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)`` to
  ``p1 - p2 + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)``.

A loss counts as *significant* when the variant is worse and the p-value is under
:data:`ALPHA`; that one rule is what the recommendation uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mathq.evaluate.summaries import wilson_rate
from mathq.inputs import UnreadableInput, parse_json, read_text

ALPHA = 0.05
Z95 = 1.959964


@dataclass(frozen=True)
class PairedDifference:
    """A variant's accuracy minus the reference's on the problems both answered.

    ``both`` solved by both, ``reference_only`` by the reference alone (the variant's losses),
    ``variant_only`` by the variant alone (its gains), ``neither`` by neither. ``difference``,
    ``low`` and ``high`` are fractions (0.05 is 5 percentage points).
    """

    variant: str
    reference: str
    n: int
    both: int
    reference_only: int
    variant_only: int
    neither: int
    difference: float
    low: float
    high: float
    p_value: float

    @property
    def significant_loss(self) -> bool:
        """Worse than the reference, and McNemar's exact p-value under :data:`ALPHA`."""
        return self.difference < 0 and self.p_value < ALPHA


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts cannot be negative")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def newcombe_paired_interval(a: int, b: int, c: int, d: int,
                             z: float = Z95) -> tuple[float, float]:
    """Newcombe's method 10 interval for (a + c)/n - (a + b)/n, the second-listed member's
    accuracy minus the first's, in a paired 2x2 table (see the module docstring)."""
    n = a + b + c + d
    if n <= 0:
        raise ValueError("no pairs")
    first, second = wilson_rate(a + b, n, z), wilson_rate(a + c, n, z)
    p1, l1, u1 = second.value, second.low, second.high   # the variant
    p2, l2, u2 = first.value, first.low, first.high      # the reference
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins > 0:
        # Newcombe's continuity correction: a positive association is shrunk by n/2, and
        # one that small counts as none.
        cross = a * d - b * c
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    theta = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - delta), min(1.0, theta + eps)


def paired_difference(variant: str, reference: str, variant_correct: Mapping[str, bool],
                      reference_correct: Mapping[str, bool]) -> PairedDifference | None:
    """Compare two runs' verdicts on the problems both answered (None if there are none)."""
    common = sorted(set(variant_correct) & set(reference_correct))
    if not common:
        return None
    both = ref_only = var_only = neither = 0
    for pid in common:
        r, v = reference_correct[pid], variant_correct[pid]
        both += r and v
        ref_only += r and not v
        var_only += v and not r
        neither += not (r or v)
    n = len(common)
    low, high = newcombe_paired_interval(both, ref_only, var_only, neither)
    return PairedDifference(
        variant=variant, reference=reference, n=n, both=both, reference_only=ref_only,
        variant_only=var_only, neither=neither, difference=(var_only - ref_only) / n,
        low=low, high=high, p_value=mcnemar_exact_p(ref_only, var_only))


def read_verdicts(results: Path) -> dict[str, bool]:
    """Problem id -> solved, from a smoke results file, without touching it.

    A later line wins (as the smoke stage reads it); a last line cut short by a killed run
    is ignored here rather than repaired, since the report never writes stage files.
    """
    out: dict[str, bool] = {}
    try:
        text = read_text(results)
    except UnreadableInput:
        return out
    for line in text.splitlines():
        try:
            row = parse_json(line)
        except UnreadableInput:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            out[row["id"]] = row.get("verdict") == "correct"
    return out
