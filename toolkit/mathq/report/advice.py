"""The report's one line of advice: the smallest variant that loses nothing measurable.

A variant qualifies when its MATH accuracy interval overlaps the reference's (BF16's when
it was smoke-tested, else the KL reference's, else the paper's figure must lie inside the
variant's interval) and its mean KL divergence from the reference is under a stated bound.
Variants missing either measurement cannot qualify: the advice never rests on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from mathq.report.table import ReportData, VariantRow

# Mean KL divergence (nats per token) under which a variant counts as close to the reference.
# llama.cpp's tools/perplexity/README.md (wikitext-2, 512-token chunks) reports for LLaMA-2 7B,
# DeepSeek-Math's architecture: Q8_0 0.0004, Q6_K 0.0021, Q4_K_M 0.0127, Q2_K 0.109; and for
# LLaMA-3 8B: Q8_0 0.0014, Q6_K 0.0055, Q5_K_M 0.0108, Q4_K_M 0.031, Q3_K_M 0.102, Q2_K 0.445.
# 0.05 admits the usual 4-bit default and rejects the 2-bit (and, on harder-to-quantize
# models, 3-bit) mixes. Untrained toy models sit far lower (their distributions are nearly
# flat): pass a smaller --kld-bound to judge those.
DEFAULT_KLD_BOUND = 0.05


@dataclass(frozen=True)
class Advice:
    """The chosen variant (None when none qualifies) and the sentence that says why."""

    quant: str | None
    text: str
    kld_bound: float
    accuracy_reference: str


def _overlaps(row: VariantRow, data: ReportData) -> bool | None:
    acc = row.accuracy
    if acc is None:
        return None
    ref = next((r.accuracy for r in data.rows if r.quant == data.accuracy_reference), None)
    if ref is not None:
        return acc.low <= ref.high and ref.low <= acc.high
    if data.paper_accuracy is not None:
        return acc.low <= data.paper_accuracy / 100 <= acc.high
    return None


def _reference_words(data: ReportData) -> str:
    if data.accuracy_reference is not None:
        return f"{data.accuracy_reference}'s MATH interval"
    if data.paper_accuracy is not None:
        return f"the published MATH figure ({data.paper_accuracy:g} %)"
    return "a reference MATH accuracy"


def advise(data: ReportData, kld_bound: float = DEFAULT_KLD_BOUND) -> Advice:
    """Pick the smallest qualifying quantized variant of ``data``."""
    ref_words = _reference_words(data)
    candidates = [r for r in data.rows if r.quant != data.accuracy_reference
                  and not r.is_kld_reference and r.quant != "BF16"]
    qualified = [r for r in candidates
                 if _overlaps(r, data) and r.mean_kld is not None and r.mean_kld < kld_bound]
    if qualified:
        best = min(qualified, key=lambda r: (r.size_bytes if r.size_bytes is not None
                                             else float("inf"), r.nominal_bpw))
        value = data.size_in_unit(best)
        size = f", {value:.2f} {data.size_unit[0]}" if value is not None else ""
        text = (f"Smallest variant whose MATH accuracy interval overlaps {ref_words} and whose "
                f"mean KL divergence is under {kld_bound:g}: {best.quant}{size}.")
        return Advice(best.quant, text, kld_bound, ref_words)
    measured = [r for r in candidates if r.accuracy is not None and r.mean_kld is not None]
    if not measured:
        text = ("No advice yet: no quantized variant has both a MATH accuracy and a KL "
                "divergence (run `mathq smoke` and `mathq kld`).")
    elif all(_overlaps(r, data) is None for r in measured):
        text = (f"No advice yet: {ref_words} is unknown (smoke-test BF16, or set "
                "reference_accuracy in the recipe).")
    else:
        text = (f"No variant both overlaps {ref_words} and has a mean KL divergence under "
                f"{kld_bound:g}; keep the reference or raise --kld-bound knowingly.")
    return Advice(None, text, kld_bound, ref_words)
