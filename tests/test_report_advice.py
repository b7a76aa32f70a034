"""The report's statistics and recommendation: paired differences from BF16 and the frontier.

The paired interval and p-value are checked against a worked example done by hand (every
intermediate figure written out) and against SciPy; the recommendation against hand-made
summaries where the right answer is plain, and against many random ones for its promises
(a pick always qualifies and is never dominated).
"""

from __future__ import annotations

import math
import random
import re

import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from mathq.cli import cli
from mathq.evaluate.summaries import wilson_rate
from mathq.report.advice import advise, frontier, qualifies, size_class
from mathq.report.paired import (
    PairedDifference,
    mcnemar_exact_p,
    newcombe_paired_interval,
    paired_difference,
)
from mathq.report.table import ReportData, VariantRow

# ----------------------------------------------------------------------------- statistics

# The worked example: 200 problems; both right 170, only BF16 right 14, only the variant
# right 4, both wrong 12.
A, B, C, D = 170, 14, 4, 12


def test_mcnemar_exact_p_by_hand():
    # 18 discordant problems; under "no difference" the variant wins X ~ Bin(18, 1/2) of them.
    # P(X <= 4) = (C(18,0) + C(18,1) + C(18,2) + C(18,3) + C(18,4)) / 2^18
    #           = (1 + 18 + 153 + 816 + 3060) / 262144 = 4048 / 262144 = 0.0154419;
    # two-sided: twice that.
    assert mcnemar_exact_p(B, C) == pytest.approx(2 * 4048 / 262144, abs=1e-15)
    assert mcnemar_exact_p(B, C) == pytest.approx(0.0308838, abs=1e-7)
    assert mcnemar_exact_p(C, B) == mcnemar_exact_p(B, C)  # symmetric
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(3, 3) == 1.0  # capped at 1
    assert mcnemar_exact_p(6, 0) == pytest.approx(2 / 64)  # 2 * (1/2)^6
    for b, c in ((14, 4), (23, 0), (9, 10), (0, 1), (40, 25), (1, 7)):
        assert mcnemar_exact_p(b, c) == pytest.approx(binomtest(min(b, c), b + c).pvalue,
                                                      rel=1e-12)


def test_newcombe_paired_interval_by_hand():
    n = A + B + C + D
    # Accuracies: variant (A + C) / n = 174/200 = 0.87, BF16 (A + B) / n = 184/200 = 0.92.
    # Wilson 95 % limits (z = 1.959964), e.g. for 0.87: centre (0.87 + z^2/400) / (1 + z^2/200)
    # = 0.863027, half-width z sqrt(0.87 * 0.13 / 200 + z^2 / 160000) / (1 + z^2/200)
    # = 0.046691:
    l1, u1 = 0.8163365, 0.9097180   # variant
    l2, u2 = 0.8740105, 0.9501594   # BF16
    for k, (low, high) in ((A + C, (l1, u1)), (A + B, (l2, u2))):
        w = wilson_rate(k, n)
        assert (w.low, w.high) == (pytest.approx(low, abs=1e-7), pytest.approx(high, abs=1e-7))
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert (w.low, w.high) == (pytest.approx(ci.low, abs=1e-8),
                                   pytest.approx(ci.high, abs=1e-8))
    # Correlation: ad - bc = 2040 - 56 = 1984 > n/2, so phi = (1984 - 100) / sqrt(184 * 16 *
    # 174 * 26) = 1884 / sqrt(13318656) = 1884 / 3649.4734 = 0.516239.
    phi = 1884 / math.sqrt(184 * 16 * 174 * 26)
    assert phi == pytest.approx(0.516239, abs=1e-6)
    # delta = sqrt((0.87 - l1)^2 - 2 phi (0.87 - l1)(u2 - 0.92) + (u2 - 0.92)^2) = 0.046025
    # eps   = sqrt((u1 - 0.87)^2 - 2 phi (u1 - 0.87)(0.92 - l2) + (0.92 - l2)^2) = 0.042504
    delta, eps = 0.0460254, 0.0425043
    low, high = newcombe_paired_interval(A, B, C, D)
    assert low == pytest.approx(-0.05 - delta, abs=2e-7)    # -0.096025
    assert high == pytest.approx(-0.05 + eps, abs=2e-7)     # -0.007496
    # The independent-intervals difference the old report used is much wider:
    assert (u1 - l2) - (l1 - u2) > 1.5 * (high - low)


def test_newcombe_edge_cases_stay_in_range():
    for a, b, c, d in ((200, 0, 0, 0), (0, 0, 0, 200), (0, 100, 100, 0), (0, 0, 7, 0),
                       (1, 0, 0, 0), (95, 5, 0, 0)):
        low, high = newcombe_paired_interval(a, b, c, d)
        theta = (c - b) / (a + b + c + d)
        assert -1 <= low <= theta <= high <= 1, (a, b, c, d, low, high)
    low, high = newcombe_paired_interval(200, 0, 0, 0)  # identical runs: zero, but not a point
    assert low < 0 < high


def test_paired_difference_counts_only_problems_both_answered():
    ref = {f"p{i}": i % 10 != 0 for i in range(100)}        # 90 right
    var = {f"p{i}": i % 5 != 0 for i in range(100)}         # 80 right, every miss of ref too
    var["extra"] = True                                      # not answered by the reference
    p = paired_difference("Q2_K", "BF16", var, ref)
    assert p is not None and p.n == 100
    assert (p.both, p.reference_only, p.variant_only, p.neither) == (80, 10, 0, 10)
    assert p.difference == pytest.approx(-0.10) and p.significant_loss
    assert p.p_value == pytest.approx(2 / 1024)
    assert paired_difference("Q2_K", "BF16", {"x": True}, ref) is None


# ----------------------------------------------------------------------------- advice


def _paired(quant: str, b: int, c: int, n: int = 200) -> PairedDifference:
    a = n - b - c - 10
    low, high = newcombe_paired_interval(a, b, c, 10)
    return PairedDifference(quant, "BF16", n, a, b, c, 10, (c - b) / n, low, high,
                            mcnemar_exact_p(b, c))


def _row(quant: str, gb: float | None, kld: float | None, loss: tuple[int, int] | None = (2, 1),
         err: float | None = None) -> VariantRow:
    size = None if gb is None else int(gb * 2**30)
    return VariantRow(
        quant=quant, gguf=None, size_bytes=size, bits_per_weight=None, nominal_bpw=4.5,
        accuracy=wilson_rate(180, 200), paired=_paired(quant, *loss) if loss else None,
        delta_vs_paper_pp=None, mean_kld=kld, mean_kld_err=err if err is not None else
        (kld * 0.02 if kld else None), kld_p99=None, same_top=None, rms_delta_p=None,
        is_kld_reference=quant == "BF16", prompt_tps=None, generation_tps=None,
        peak_rss_bytes=None, ollama_tags=(), imatrix=None,
        kind="imatrix" if quant.endswith("-imat") else "tuned" if quant.endswith("-tuned")
        else "stock")


def _bf16() -> VariantRow:
    return _row("BF16", 13.0, None, None)


def _data(rows: list[VariantRow], tags: dict[str, tuple[str, ...]] | None = None) -> ReportData:
    return ReportData(model="m", recipe="r.toml", rows=tuple(rows), accuracy_reference="BF16",
                      paper_accuracy=None, paper_source="", smoke_suite=None, smoke_n=None,
                      kld_reference="BF16", kld_corpus=None, kld_positions=None,
                      bench_threads=None, sources={}, recipe_ref="deepseek-math-7b-rl",
                      recipe_tags=tags if tags is not None else
                      {"Q8_0": ("Q8",), "Q6_K": ("Q6",), "Q4_K_M": ("latest", "q4"),
                       "Q2_K": ("q2",)})


def test_one_pick_per_size_class_with_why_and_publish_line():
    rows = [_bf16(), _row("Q8_0", 7.0, 0.0012), _row("Q6_K", 5.5, 0.0035),
            _row("Q4_K_M", 4.1, 0.030), _row("Q4_K_S", 3.9, 0.052),
            _row("Q2_K", 2.6, 0.44, loss=(23, 0))]
    advice = advise(_data(rows))
    picks = {p.label: p for p in advice.picks}
    assert list(picks) == ["2-bit", "4-bit", "6-bit", "8-bit"]
    assert picks["2-bit"].quant is None
    assert picks["2-bit"].reason == ("No 2-bit pick: Q2_K loses accuracy (−11.5 pp "
                                     "[−16.6, −7.2], p < 0.001).")
    assert picks["4-bit"].quant == "Q4_K_M"  # Q4_K_S is smaller but clearly further from BF16
    assert picks["4-bit"].reason.startswith("Q4_K_M (4.10 GiB): accuracy vs BF16 −0.5 pp")
    assert "the lowest mean KLD 0.0300 ± 0.0006 of the 4-bit files" in picks["4-bit"].reason
    assert picks["4-bit"].publish_command == ("mathq publish deepseek-math-7b-rl --tag "
                                              "latest,q4 --namespace NS")
    assert picks["8-bit"].publish_command == "mathq publish deepseek-math-7b-rl --tag Q8 " \
                                             "--namespace NS"
    assert advice.quant == "Q4_K_M" and advice.text.startswith("Publish Q4_K_M (4.10 GiB): ")
    assert advice.frontier == ("Q4_K_S", "Q4_K_M", "Q6_K", "Q8_0")
    assert "Q2_K" not in advice.qualified


def test_a_dominated_variant_is_never_recommended():
    # Q3_K_L-tuned is smaller than every 4-bit file and closer to BF16: no 4-bit pick.
    rows = [_bf16(), _row("Q4_K_M", 4.1, 0.030), _row("Q4_K_M-imat", 4.1, 0.026),
            _row("Q3_K_L-tuned", 3.6, 0.021), _row("Q3_K_M", 3.3, 0.09)]
    advice = advise(_data(rows))
    picks = {p.label: p for p in advice.picks}
    assert picks["3-bit"].quant == "Q3_K_L-tuned"
    # The recipe has no tag for it: the note says how to add one (tags may name any variant).
    assert picks["3-bit"].publish_command is None
    assert picks["3-bit"].publish_note == (
        "the recipe has no Ollama tag for Q3_K_L-tuned; add one under [ollama.tags] (e.g. "
        "q3_k_l-tuned = \"Q3_K_L-tuned\") to publish it with `mathq publish`")
    tagged = advise(_data(rows, {"Q3_K_L-tuned": ("q3t",)}))
    assert {p.label: p for p in tagged.picks}["3-bit"].publish_command == (
        "mathq publish deepseek-math-7b-rl --tag q3t --namespace NS")
    assert picks["4-bit"].quant is None
    assert picks["4-bit"].reason == ("No 4-bit pick: Q3_K_L-tuned is no larger than "
                                     "Q4_K_M-imat and diverges no more from BF16.")
    assert set(advice.frontier) == {"Q3_K_M", "Q3_K_L-tuned"}


def test_picks_always_qualify_and_are_never_dominated():
    rng = random.Random(7)
    names = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q4_K_M-imat",
             "Q3_K_L", "Q3_K_M", "Q3_K_M-imat", "Q2_K", "Q2_K-imat", "Q4_K_M-tuned"]
    for _ in range(300):
        rows = [_bf16()]
        for name in rng.sample(names, rng.randint(1, len(names))):
            loss = None if rng.random() < 0.1 else (rng.randint(0, 25), rng.randint(0, 6))
            kld = None if rng.random() < 0.1 else round(rng.uniform(0.0005, 0.5), 4)
            rows.append(_row(name, round(rng.uniform(2.0, 7.5), 2), kld, loss,
                             err=rng.choice([0.0, 0.0005, 0.005])))
        data = _data(rows)
        advice = advise(data)
        qualified = [r for r in rows[1:] if qualifies(r)]
        for pick in advice.picks:
            if pick.quant is None:
                continue
            row = next(r for r in rows if r.quant == pick.quant)
            assert qualifies(row) and size_class(row.quant) == pick.size_class
            assert row.quant in advice.frontier
            for other in qualified:
                dominated = (other.size_bytes <= row.size_bytes and other.mean_kld
                             <= row.mean_kld and (other.size_bytes < row.size_bytes
                                                  or other.mean_kld < row.mean_kld))
                assert not dominated, (pick.quant, other.quant)
        assert [r.quant for r in frontier(rows)] == list(advice.frontier)
        assert advice.quant == next((p.quant for p in advice.picks if p.quant), None)


def test_ties_go_to_the_smaller_file():
    # Within 1.96 combined standard errors: the same divergence, as far as we can tell.
    rows = [_bf16(), _row("Q4_K_M", 4.1, 0.0300, err=0.0010),
            _row("Q4_K_S", 3.9, 0.0305, err=0.0010)]
    pick = advise(_data(rows)).picks[0]
    assert pick.quant == "Q4_K_S"
    assert "within the noise of Q4_K_M's (mean KLD 0.0300 ± 0.0010) at a smaller size" \
        in pick.reason
    # Precise enough to tell them apart: the lower divergence wins.
    rows = [_bf16(), _row("Q4_K_M", 4.1, 0.0300, err=0.0001),
            _row("Q4_K_S", 3.9, 0.0305, err=0.0001)]
    assert advise(_data(rows)).picks[0].quant == "Q4_K_M"
    # An exact tie: the larger file is dominated by the smaller one.
    rows = [_bf16(), _row("Q4_K_M", 4.1, 0.03, err=0.0), _row("Q4_K_S", 3.9, 0.03, err=0.0)]
    advice = advise(_data(rows))
    assert advice.picks[0].quant == "Q4_K_S" and advice.frontier == ("Q4_K_S",)


def test_no_pick_without_the_measurements_it_rests_on():
    no_bf16_smoke = [dataclass_replace(_bf16(), accuracy=None),
                     _row("Q4_K_M", 4.1, 0.03, loss=None)]
    advice = advise(_data(no_bf16_smoke))
    assert advice.quant is None
    assert advice.text == ("No recommendation yet: BF16 was not smoke-tested, so no variant's "
                           "accuracy can be compared with it (run `mathq smoke "
                           "deepseek-math-7b-rl --quant BF16`).")
    no_kld = [_bf16(), _row("Q4_K_M", 4.1, None), _row("Q8_0", 7.0, None)]
    assert advise(_data(no_kld)).text == ("No recommendation yet: no KL divergence from BF16 "
                                          "was measured (run `mathq kld deepseek-math-7b-rl`).")
    assert advise(_data(no_kld)).picks[0].reason == ("No 4-bit pick: Q4_K_M has no KL "
                                                     "divergence measured.")
    all_lose = [_bf16(), _row("Q2_K", 2.6, 0.4, loss=(30, 2))]
    assert advise(_data(all_lose)).text.startswith("No variant qualifies: every measured one")
    untagged = advise(_data([_bf16(), _row("Q5_K_M", 4.8, 0.01)], tags={}))
    assert untagged.picks[0].publish_command is None
    assert untagged.picks[0].publish_note == (
        "the recipe has no Ollama tag for Q5_K_M; add one under [ollama.tags] (e.g. q5_k_m = "
        "\"Q5_K_M\") to publish it with `mathq publish`")


def dataclass_replace(row: VariantRow, **changes: object) -> VariantRow:
    import dataclasses

    return dataclasses.replace(row, **changes)


_COMMAND = re.compile(r"mathq ([a-z]+)((?: [^`\n]*?)?)(?=`|$|\n|\))")


def commands_named(text: str) -> list[tuple[str, list[str]]]:
    """Every ``mathq <command> ... --option`` in ``text``: the command and its options."""
    return [(m.group(1), re.findall(r"(--[a-z][a-z-]*)", m.group(2)))
            for m in _COMMAND.finditer(text)]


def assert_options_exist(text: str) -> int:
    """Each option named after `mathq <command>` exists on that command; returns how many
    command lines were checked."""
    found = commands_named(text)
    for command, options in found:
        assert command in cli.commands, command
        names = {o for p in cli.commands[command].params for o in p.opts}
        for option in options:
            assert option in names, f"`mathq {command}` has no {option} ({text[:200]}...)"
    return len(found)


def test_advice_names_only_options_its_commands_have():
    rows = [_bf16(), _row("Q8_0", 7.0, 0.0012), _row("Q4_K_M", 4.1, 0.030),
            _row("Q4_K_M-imat", 4.0, 0.029), _row("Q2_K", 2.6, 0.44, loss=(23, 0))]
    for data in (_data(rows), _data(rows[:1]), _data([dataclass_replace(rows[0], accuracy=None),
                                                      *rows[1:]])):
        advice = advise(data)
        text = "\n".join([advice.text, advice.rule, *(p.reason for p in advice.picks),
                          *(p.publish_command or "" for p in advice.picks),
                          *(p.publish_note or "" for p in advice.picks)])
        assert_options_exist(text)
    # The checker itself catches what the old advice said.
    with pytest.raises(AssertionError, match="has no --kld-bound"):
        assert_options_exist("raise `mathq build tiny-demo --kld-bound 0.1` knowingly")
    report_help = CliRunner().invoke(cli, ["report", "--help"]).output
    assert "--kld-bound" not in report_help


def test_size_classes_follow_the_type_names():
    assert [size_class(q) for q in ("Q8_0", "Q4_K_M-imat", "IQ4_XS", "Q3_K_L-tuned", "IQ2_M",
                                    "TQ1_0", "BF16", "F16")] == [8, 4, 4, 3, 2, 1, None, None]


def test_a_kld_measured_from_another_model_is_not_compared():
    """`mathq kld --reference Q8_0` gives a KLD from Q8_0, not BF16: the row keeps its figure
    (marked with what it was measured from) but no pick rests on it."""
    import dataclasses

    from mathq.report.cells import columns

    q4 = dataclasses.replace(_row("Q4_K_M", 4.1, 0.01), kld_vs="Q8_0")
    data = _data([_bf16(), _row("Q8_0", 7.0, 0.002), q4])
    advice = advise(data)
    picks = {p.label: p for p in advice.picks}
    assert picks["4-bit"].quant is None
    assert picks["4-bit"].reason == ("No 4-bit pick: Q4_K_M's KL divergence was measured "
                                     "from Q8_0, not BF16.")
    kld = next(c for c in columns(data) if c.key == "kld")
    assert kld.cell(q4, data) == "0.0100 ± 0.0002 (from Q8_0)"
