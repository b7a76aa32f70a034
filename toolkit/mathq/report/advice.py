"""Which file to publish: the quality-versus-size frontier and one pick per size class.

A variant *qualifies* when it was smoke-tested on the same problems as BF16 without a
significant accuracy loss (:attr:`mathq.report.paired.PairedDifference.significant_loss`:
McNemar's exact test, paired) and its KL divergence from BF16 was measured. Among the
qualifying variants the *frontier* is every one that no other qualifying variant dominates,
that is, none is at most as large with at most its KL divergence (and strictly better in one).

Variants fall into *size classes* by the bits their type is named for (Q4_K_M, IQ4_XS and
Q4_K_M-imat are all 4-bit). Each class's *pick* is its frontier variant with the lowest
mean KL divergence, except that a smaller frontier variant whose divergence is within the
noise of that lowest one (the two standard errors combined, times 1.96) wins the tie: the
smaller file. The headline answer is the pick of the smallest class that has one. So a
dominated variant is never recommended, and a class whose best file is beaten by a
smaller one from another class says so instead of offering it.

Each pick comes with the exact ``mathq publish`` line that ships it, built only from the
options ``mathq publish`` has, and only when the recipe has an Ollama tag for that variant
(a tag may name a plain, ``-imat`` or ``-tuned`` one); else how to add the tag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mathq.report.cells import format_p, kld_text, signed
from mathq.report.paired import ALPHA, Z95, PairedDifference
from mathq.report.table import (
    FULL_PRECISION,
    ReportData,
    VariantRow,
    qualifies,
    size_class,
)

__all__ = ["QUALIFIES", "Advice", "Pick", "advise", "frontier", "qualifies", "size_class",
           "why_not", "with_advice"]



@dataclass(frozen=True)
class Pick:
    """One size class's answer: the variant to publish (None: none qualifies) and why."""

    size_class: int
    quant: str | None
    reason: str
    publish_command: str | None = None
    publish_note: str | None = None

    @property
    def label(self) -> str:
        """``4-bit``."""
        return f"{self.size_class}-bit"


@dataclass(frozen=True)
class Advice:
    """The headline answer, one pick per size class, and the frontier they come from."""

    quant: str | None
    text: str
    picks: tuple[Pick, ...]
    frontier: tuple[str, ...]
    qualified: tuple[str, ...]
    rule: str


#: What qualifying means, in the few words the headline and the model card use.
QUALIFIES = "no measurable accuracy loss against BF16, and its KL divergence measured"

RULE = ("A variant qualifies when its paired accuracy difference from BF16 is not a "
        f"significant loss (McNemar's exact test, p ≥ {ALPHA:g}) and its KL divergence from "
        "BF16 was measured. The frontier holds the qualifying variants that no other is both "
        "at most as large and at most as divergent as. Each size class's pick is its frontier "
        "variant with the lowest mean KLD; a smaller one within the noise of that lowest "
        "(1.96 combined standard errors) wins the tie.")


def _dominates(u: VariantRow, v: VariantRow) -> bool:
    su, sv = u.size_bytes or 0, v.size_bytes or 0
    ku, kv = u.mean_kld or 0.0, v.mean_kld or 0.0
    return su <= sv and ku <= kv and (su < sv or ku < kv)


def _tied(a: VariantRow, b: VariantRow) -> bool:
    """The two mean KLDs are within 1.96 combined standard errors of each other."""
    assert a.mean_kld is not None and b.mean_kld is not None
    noise = Z95 * math.hypot(a.mean_kld_err or 0.0, b.mean_kld_err or 0.0)
    return abs(a.mean_kld - b.mean_kld) <= noise


def pct_pp(p: PairedDifference) -> str:
    """``−0.5 pp [−3.1, +2.1], p = 1.00``: a paired difference as the report writes it."""
    value = format_p(p.p_value)
    return (f"{signed(100 * p.difference)} pp [{signed(100 * p.low)}, {signed(100 * p.high)}],"
            f" p {value if value.startswith('<') else '= ' + value}")


def candidates(data: ReportData) -> list[VariantRow]:
    """Quantized variants with a size class (the reference and float files excluded)."""
    return [r for r in data.rows if r.quant != FULL_PRECISION and not r.is_kld_reference
            and size_class(r.quant) is not None]


def frontier(rows: list[VariantRow]) -> list[VariantRow]:
    """The qualifying rows no other qualifying row dominates, smallest first."""
    q = [r for r in rows if qualifies(r)]
    front = [v for v in q if not any(_dominates(u, v) for u in q if u is not v)]
    return sorted(front, key=lambda r: (r.size_bytes or 0, r.mean_kld or 0.0, r.quant))


def _class_pick(front_c: list[VariantRow]) -> tuple[VariantRow, VariantRow | None]:
    """The class's pick and, when a tie moved the pick to a smaller file, the lowest one."""
    lowest = min(front_c, key=lambda r: (r.mean_kld or 0.0, r.size_bytes or 0, r.quant))
    tied = [r for r in front_c if _tied(r, lowest)]
    pick = min(tied, key=lambda r: (r.size_bytes or 0, r.mean_kld or 0.0, r.quant))
    return pick, (lowest if pick is not lowest else None)


def publish_line(data: ReportData, quant: str) -> tuple[str | None, str | None]:
    """``mathq publish`` for ``quant``'s recipe tags, or None and why it cannot ship it."""
    tags = data.recipe_tags.get(quant, ())
    if tags:
        return (f"mathq publish {data.recipe_ref} --tag {','.join(tags)} --namespace NS",
                "NS is your ollama.com user name; --hf-repo USER/NAME uploads to Hugging "
                "Face instead")
    return None, (f"the recipe has no Ollama tag for {quant}; add one under [ollama.tags] "
                  f"(e.g. {quant.lower()} = \"{quant}\") to publish it with `mathq publish`")


def _size_words(data: ReportData, row: VariantRow) -> str:
    value = data.size_in_unit(row)
    bpw = f", {row.bits_per_weight:.2f} bits/weight" if row.bits_per_weight else ""
    return f"{value:.2f} {data.size_unit[0]}{bpw}" if value is not None else "size unknown"


def _kld_words(row: VariantRow) -> str:
    return f"mean KLD {kld_text(row)}"


def why_not(row: VariantRow, data: ReportData) -> str:
    """Why a candidate does not qualify, in a few words."""
    if row.paired is None and row.accuracy is not None and data.accuracy_reference is None:
        return f"{row.quant} has no BF16 baseline (BF16 was not smoke-tested)"
    if row.paired is None:
        return f"{row.quant} was not smoke-tested on BF16's problems"
    if row.paired.significant_loss:
        return f"{row.quant} loses accuracy ({pct_pp(row.paired)})"
    if row.mean_kld is None:
        return f"{row.quant} has no KL divergence measured"
    if row.kld_vs not in (None, FULL_PRECISION):
        return f"{row.quant}'s KL divergence was measured from {row.kld_vs}, not BF16"
    return f"{row.quant} has no size"


def advise(data: ReportData) -> Advice:
    """Recommend one variant per size class and a headline (see the module docstring)."""
    rows = candidates(data)
    front = frontier(rows)
    qualified = [r for r in rows if qualifies(r)]
    picks: list[Pick] = []
    for bits in sorted({size_class(r.quant) for r in rows}):  # type: ignore[type-var]
        in_class = [r for r in rows if size_class(r.quant) == bits]
        front_c = [r for r in front if size_class(r.quant) == bits]
        if front_c:
            pick, lowest = _class_pick(front_c)
            assert pick.paired is not None
            if lowest is not None:
                kld_reason = (f"{_kld_words(pick)}, within the noise of {lowest.quant}'s "
                              f"({_kld_words(lowest)}) at a smaller size")
            elif len(front_c) > 1:
                kld_reason = (f"the lowest {_kld_words(pick)} of the {bits}-bit files on the "
                              "frontier")
            else:
                kld_reason = _kld_words(pick)
            reason = (f"{pick.quant} ({_size_words(data, pick)}): accuracy vs BF16 "
                      f"{pct_pp(pick.paired)} on {pick.paired.n} paired problems, not a "
                      f"significant loss; {kld_reason}.")
            command, note = publish_line(data, pick.quant)
            picks.append(Pick(bits, pick.quant, reason, command, note))
            continue
        qual_c = [r for r in qualified if size_class(r.quant) == bits]
        if qual_c:
            best = min(qual_c, key=lambda r: (r.mean_kld or 0.0, r.size_bytes or 0))
            by = next(u for u in front if _dominates(u, best))
            reason = (f"No {bits}-bit pick: {by.quant} is no larger than {best.quant} and "
                      "diverges no more from BF16.")
        else:
            reason = f"No {bits}-bit pick: " + "; ".join(why_not(r, data) for r in in_class) + "."
        picks.append(Pick(bits, None, reason))
    chosen = next((p for p in picks if p.quant is not None), None)
    if chosen is not None:
        row = next(r for r in rows if r.quant == chosen.quant)
        text = (f"Publish {chosen.quant} ({_size_words(data, row)}): {chosen.label} is the "
                f"smallest size class with a file that qualifies ({QUALIFIES}), and "
                f"{chosen.quant} is that class's pick ({_kld_words(row)}). "
                "Other sizes: the pick of each class below.")
    else:
        text = _no_pick_text(data, rows)
    return Advice(quant=chosen.quant if chosen else None, text=text, picks=tuple(picks),
                  frontier=tuple(r.quant for r in front),
                  qualified=tuple(r.quant for r in qualified), rule=RULE)


def _no_pick_text(data: ReportData, rows: list[VariantRow]) -> str:
    ref = data.recipe_ref
    if not rows:
        return "No recommendation: the build has no quantized variant."
    if not any(r.accuracy is not None for r in data.rows if r.quant == FULL_PRECISION):
        return (f"No recommendation yet: BF16 was not smoke-tested, so no variant's accuracy "
                f"can be compared with it (run `mathq smoke {ref} --quant BF16`).")
    if all(r.paired is None for r in rows):
        return (f"No recommendation yet: no quantized variant was smoke-tested "
                f"(run `mathq smoke {ref}`).")
    if all(r.mean_kld is None for r in rows):
        return (f"No recommendation yet: no KL divergence from BF16 was measured "
                f"(run `mathq kld {ref}`).")
    return ("No variant qualifies: every measured one loses accuracy significantly against "
            "BF16 or lacks a KL divergence; publish BF16 itself or try larger types.")


def with_advice(data: ReportData) -> ReportData:
    """``data`` with its :attr:`ReportData.advice` filled in (the pages, plots and the
    table's Advice column read it from there)."""
    return dataclasses.replace(data, advice=advise(data))
