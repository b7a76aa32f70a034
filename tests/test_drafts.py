"""Drafted (speculative) decoding on the trained demo model, run by llama.cpp.

The demo model really solves its word problems, so its quantized variants mostly write
BF16's text: drafts from BF16's answers are mostly kept, and the answers must not change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.datasets.problems import load_problem_set, select_problems
from mathq.evaluate.summaries import SmokeSummary, load_summary
from mathq.layout import BuildLayout
from mathq.llama.drafts import Drafter, Proposal, StepCost, micro_batch_rows, plan_step
from mathq.llama.engine import BatchEngine, EngineOptions, GenRequest, GenResult
from mathq.recipes.prompt import render_prompt, stop_strings
from mathq.recipes.recipe import load_recipe

RECIPE = "tiny-demo"
THREADS = 1


@pytest.fixture(scope="module")
def requests_100() -> list[GenRequest]:
    """100 of the demo's distractor problems in its recipe's prompt, with its stops."""
    recipe = load_recipe(RECIPE)
    pset = select_problems(load_problem_set(recipe.smoke.suite), n=100, seed=3)
    return [GenRequest(p.id, render_prompt(recipe.prompt, p.problem), recipe.smoke.max_tokens,
                       stop_strings(recipe.prompt)) for p in pset.problems]


def _run(gguf: Path, requests: list[GenRequest], **options: object) -> dict[str, GenResult]:
    options.setdefault("threads", THREADS)
    with BatchEngine(gguf, EngineOptions(**options)) as engine:  # type: ignore[arg-type]
        return {r.id: r for r in engine.generate(requests)}


def _with_reference(requests: list[GenRequest], texts: dict[str, str]) -> list[GenRequest]:
    return [GenRequest(r.id, r.prompt, r.max_tokens, r.stop, texts[r.id]) for r in requests]


@pytest.fixture(scope="module")
def bf16_answers(tiny_quant_ggufs: dict[str, Path],
                 requests_100: list[GenRequest]) -> dict[str, GenResult]:
    return _run(tiny_quant_ggufs["BF16"], requests_100, parallel=8, draft=False)


@pytest.mark.parametrize("quant", ["Q4_K_M", "BF16"])
def test_drafted_answers_equal_undrafted(tiny_quant_ggufs: dict[str, Path],
                                         requests_100: list[GenRequest],
                                         bf16_answers: dict[str, GenResult],
                                         quant: str) -> None:
    """With BF16's answers as drafts (BF16 itself: prompt lookup only), at least 99 % of
    answers are token for token the undrafted ones, in fewer decode steps."""
    gguf = tiny_quant_ggufs[quant]
    plain = bf16_answers if quant == "BF16" else _run(gguf, requests_100, parallel=8,
                                                      draft=False)
    requests = requests_100 if quant == "BF16" else _with_reference(
        requests_100, {i: r.text for i, r in bf16_answers.items()})
    drafted = _run(gguf, requests, parallel=8)
    assert set(drafted) == set(plain)
    same = [i for i in plain if drafted[i].tokens == plain[i].tokens]
    assert len(same) >= 0.99 * len(plain)
    assert all(drafted[i].text == plain[i].text for i in same)
    # Undrafted: a step per token, plus the one that chose EOS if that ended the answer.
    assert all(r.drafted == r.kept == 0 and r.steps - len(r.tokens) in (0, 1)
               for r in plain.values())
    tokens = sum(len(r.tokens) for r in drafted.values())
    steps = sum(r.steps for r in drafted.values())
    kept = sum(r.kept for r in drafted.values())
    if quant == "Q4_K_M":  # a variant follows BF16's text: most drafts are kept
        assert kept >= 0.8 * sum(r.drafted for r in drafted.values())
        assert tokens >= 3 * steps  # long drafts: the old cap of 8 gave about 2.1
    # Kept drafts are reached drafts, and each saved a step (so did padding that happened
    # to be kept; an answer's last step may emit EOS, which is not one of its tokens).
    assert all(r.kept <= r.drafted for r in drafted.values())
    assert steps + kept <= tokens + len(drafted)


def test_always_wrong_drafts_give_the_undrafted_answers(tiny_quant_ggufs: dict[str, Path],
                                                        requests_100: list[GenRequest],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts that are never the greedy token (BOS, which the model never writes) are all
    rejected, cost only rows, and leave every answer as it was."""
    gguf = tiny_quant_ggufs["Q8_0"]
    requests = requests_100[:24]
    plain = _run(gguf, requests, parallel=4, draft=False)
    with BatchEngine(gguf, EngineOptions(parallel=4, threads=THREADS)) as engine:
        bos = engine.model.bos
        monkeypatch.setattr(Drafter, "propose", lambda self, limit: [bos] * min(limit, 3))
        # Rows free: every step drafts, the last one (ending on EOS) too, whatever the
        # machine's timings; a draft there must not count as kept.
        monkeypatch.setattr(StepCost, "seconds", lambda self, rows: 1.0)
        drafted = {r.id: r for r in engine.generate(
            _with_reference(requests, {r.id: "nonsense" for r in requests}))}
    assert sum(r.drafted for r in drafted.values()) > 0
    assert sum(r.kept for r in drafted.values()) == 0
    assert {i: r.tokens for i, r in drafted.items()} == {i: r.tokens for i, r in plain.items()}


def test_rejected_positions_leave_the_cache(tiny_quant_ggufs: dict[str, Path],
                                            requests_100: list[GenRequest],
                                            bf16_answers: dict[str, GenResult],
                                            monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """After every step a sequence's KV cache holds exactly its prompt and its tokens but
    the last (the next step's input): rejected drafts are really removed where the step's
    outcome says, and so are the calibration's scratch cells (a fresh cache calibrates)."""
    import llama_cpp

    from mathq.llama import engine as engine_module

    # BF16's answers with every "=" turned into "+": right for a while, then wrong.
    requests = _with_reference(requests_100[:6], {i: r.text.replace("=", "+")
                                                  for i, r in bf16_answers.items()})
    live: list[engine_module._Seq] = []
    outcomes: list[engine_module.StepOutcome] = []
    new_seq, check = BatchEngine._new_seq, BatchEngine._check

    def capture(self: BatchEngine, *args: object) -> engine_module._Seq:
        seq = new_seq(self, *args)  # type: ignore[arg-type]
        live.append(seq)
        return seq

    def record(self: BatchEngine, *args: object) -> engine_module.StepOutcome:
        outcomes.append(check(self, *args))  # type: ignore[arg-type]
        return outcomes[-1]

    monkeypatch.setattr(BatchEngine, "_new_seq", capture)
    monkeypatch.setattr(BatchEngine, "_check", record)
    checked = rejected = 0
    with BatchEngine(tiny_quant_ggufs["Q4_K_M"], EngineOptions(parallel=1, threads=THREADS),
                     cost_cache=tmp_path / "costs.json") as engine:

        def on_step(_stats: object) -> None:
            nonlocal checked, rejected
            ctx = engine._ctx
            assert ctx is not None
            seq = live[-1]
            pos_max = llama_cpp.llama_memory_seq_pos_max(ctx.memory, 0)
            if not seq.tokens:  # still reading its prompt
                assert pos_max + 1 == seq.n_past
                return
            outcome = outcomes[-1]
            if outcome.result is not None:  # finished: its cache is gone
                assert outcome.trim == 0 and pos_max < 0
                return
            assert llama_cpp.llama_memory_seq_pos_min(ctx.memory, 0) == 0
            assert pos_max + 1 == seq.n_past == len(seq.prompt) + len(seq.tokens) - 1
            assert len(outcome.emitted) == outcome.kept + 1
            checked += 1
            if outcome.kept < outcome.drafted:
                assert outcome.trim == seq.n_past
                rejected += 1
            else:
                assert outcome.trim is None

        results = list(engine.generate(requests, on_step))
    assert engine.step_cost is not None and set(engine.step_cost.points) == {1, 8, 32, 128}
    assert len(results) == 6 and checked > 6 and rejected > 0


def test_plan_prefers_no_drafts_when_rows_are_dear() -> None:
    """The plan: drafts with a low kept rate, or rows that cost as much as a pass over the
    weights, are not worth checking; likely ones on cheap rows are."""

    def linear(fixed: float):  # a micro-batch: a pass over the weights, then each row
        return lambda rows: fixed + rows

    likely = [Proposal(s, (5, 6, 7, 8), 0.95, room=100, last=1) for s in range(8)]
    assert plan_step(likely, linear(0.1), max_rows=512).rows == 8
    assert plan_step(likely, linear(64), max_rows=512).rows == 8 * 5
    unlikely = [Proposal(s, (5, 6), 0.1, room=100, last=1) for s in range(8)]
    assert plan_step(unlikely, linear(4), max_rows=512).rows == 8
    # One sequence with drafts among idle ones: padding the others costs rows, leaving
    # them out costs a micro-batch. Where a pass over the weights is dear, padding wins.
    mixed = [Proposal(0, (5, 6, 7, 8), 0.95, room=100, last=1)] + [
        Proposal(s, (), 0.5, room=100, last=1) for s in range(1, 8)]
    plan = plan_step(mixed, linear(64), max_rows=512)
    assert plan.micro_batches == 1 and len(plan.drafts[0]) >= 2
    assert plan.drafts[0] == (5, 6, 7, 8)[:len(plan.drafts[0])]
    assert set(plan.drafts[1]) == {1}  # the idle ones repeat their last token
    # Half of them with drafts, rows dearer: leaving the others out wins.
    half = [Proposal(s, (5, 6, 7, 8) if s < 4 else (), 0.95, room=100, last=1)
            for s in range(8)]
    plan = plan_step(half, linear(4), max_rows=512)
    assert plan.micro_batch_rows == (8, 4 * 4)
    assert micro_batch_rows([(0, 3), (1, 1), (2, 1), (4, 1)]) == (3, 2, 1)
    assert micro_batch_rows([(0, 2), (1, 2), (2, 2)]) == (6,)


def test_drafter_follows_and_realigns_with_its_reference() -> None:
    drafter = Drafter(prompt=[1, 2, 3], draft_reference=[10, 11, 12, 13, 14, 15, 16])
    assert drafter.propose(3) == [10, 11, 12]
    drafter.record(3, 1, [10, 11, 99])  # diverged after two tokens
    assert drafter.draft_ref_pos is None
    drafter.record(0, 0, [13, 14])  # 99, 13, 14 is not in the draft reference
    assert drafter.draft_ref_pos is None
    drafter.record(0, 0, [12, 13, 14])
    assert drafter.propose(8) == [15, 16]
    # Without a draft reference: prompt lookup of the last n-gram.
    lookup = Drafter(prompt=[7, 8, 9, 4, 7, 8])
    lookup.record(0, 0, [9])
    assert lookup.propose(2) == [4, 7]


def test_drafter_realigns_by_text_where_the_tokens_differ() -> None:
    """The output writes the draft reference's text in other tokens ("1" "2" for "12"):
    drafting resumes at the first reference token that starts where the text meets it
    again, not inside a token."""
    pieces = {10: b"The ", 11: b"answer ", 12: b"is ", 13: b"12", 14: b".", 15: b" Done",
              20: b"1", 21: b"2", 1: b"", 2: b"", 3: b""}
    drafter = Drafter([1, 2, 3], [10, 11, 12, 13, 14, 15], piece=pieces.__getitem__)
    assert drafter.propose(8) == [10, 11, 12, 13, 14, 15]
    drafter.record(6, 3, [10, 11, 12, 20])  # "1": the reference has "12" as one token
    assert drafter.draft_ref_pos is None  # "...is 1" ends inside a reference token
    drafter.record(0, 0, [21])  # "...is 12": the text meets the reference before "."
    assert drafter.propose(8) == [14, 15]
    # Without pieces, token ids alone cannot re-align it.
    plain = Drafter([1, 2, 3], [10, 11, 12, 13, 14, 15])
    plain.record(6, 3, [10, 11, 12, 20])
    plain.record(0, 0, [21])
    assert plain.draft_ref_pos is None


def test_draft_reference_ids_are_used_where_they_spell_its_text(
        tiny_quant_ggufs: dict[str, Path]) -> None:
    """A draft reference's token ids are its drafts where they are this vocabulary's and
    spell its text, even where the tokenizer would cut the text otherwise (a random-weight
    model writes "1" "2" as readily as "12"); ids of another vocabulary, or of other text,
    fall back to the text tokenized."""
    text = "Tom has 12 apples."
    with BatchEngine(tiny_quant_ggufs["Q8_0"], EngineOptions(parallel=1, threads=THREADS)) \
            as engine:
        model = engine.model
        canonical = engine._draft_reference_tokens(GenRequest("a", "x", 8, (), text))
        assert b"".join(model.piece(t) for t in canonical) == text.encode()
        split = [t for c in text for t in model.tokenize(c)[int(model.add_bos):]]
        assert b"".join(model.piece(t) for t in split) == text.encode() and split != canonical

        def tokens(ids: list[int], reference: str = text,
                   stop: tuple[str, ...] = ()) -> list[int]:
            return engine._draft_reference_tokens(
                GenRequest("a", "x", 8, stop, reference, tuple(ids)))

        assert tokens(split) == split
        # The token that completed a stop string (the text was cut where it starts).
        stop = model.piece(canonical[0]).decode()
        assert tokens(split + canonical[:1], stop=(stop,)) == split + canonical[:1]
        assert tokens(split + canonical[:1]) == canonical  # more text than the reference
        assert tokens([*split[:-1], model.n_vocab]) == canonical  # not this vocabulary
        assert tokens([model.bos, *split]) == canonical  # a control token writes nothing
        assert tokens(split[:-2]) == canonical  # spells less than the text
        assert tokens(split[::-1]) == canonical  # other text
        assert tokens([]) == canonical and tokens([], "") == []
        assert tokens(split, "") == []  # ids of text the reference does not have


def test_draft_reference_ids_are_read_leniently(tmp_path: Path) -> None:
    from mathq.evaluate.results_log import read_draft_reference

    path = tmp_path / "BF16.jsonl"
    rows = [{"id": "a", "completion": "12", "completion_ids": [16, 17]},
            {"id": "b", "completion": "x", "completion_ids": [1.5]},
            {"id": "c", "completion": "y"}, {"id": 4, "completion": "z",
                                             "completion_ids": "[1]"}]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n{broken\n", encoding="utf-8")
    assert read_draft_reference(path) == {"a": ("12", (16, 17)), "b": ("x", ()),
                                          "c": ("y", ()), "4": ("z", ())}


def test_smoke_drafts_from_bf16_results_and_records_it(tiny_quant_ggufs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """`mathq smoke` drafts a variant from BF16's results in the build folder, records
    drafted and kept tokens, resumes, and `--no-draft` gives the same answers."""
    layout = BuildLayout.for_model(RECIPE, tmp_path)
    layout.root.mkdir(parents=True)
    for q in ("BF16", "Q4_K_M"):
        layout.gguf(q).symlink_to(tiny_quant_ggufs[q])

    def smoke(*args: str) -> str:
        result = CliRunner().invoke(cli, ["smoke", RECIPE, "--threads", "1", "--parallel", "8",
                                          "--build-dir", str(tmp_path), *args],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    smoke("--quant", "BF16", "--n", "40")
    rows = [json.loads(line) for line in layout.smoke_results("BF16").read_text().splitlines()]
    assert all(len(r["completion_ids"]) == r["completion_tokens"] for r in rows)
    bf16 = load_summary(layout.smoke_summary("BF16"), SmokeSummary)
    assert bf16.draft_reference is None and bf16.draft_off is None  # lookup only
    smoke("--quant", "Q4_K_M", "--n", "20")
    out = smoke("--quant", "Q4_K_M", "--n", "40")
    assert "(20 answered, 20 resumed)" in out and "drafts" in out
    s = load_summary(layout.smoke_summary("Q4_K_M"), SmokeSummary)
    assert s.draft_reference == str(layout.smoke_results("BF16")) and s.draft_off is None
    assert s.runs == 2 and s.drafted_tokens and s.accepted_tokens and s.decode_steps
    assert s.accepted_tokens <= s.drafted_tokens
    assert s.tokens_per_step is not None and s.tokens_per_step > 1.5
    plain_dir = tmp_path / "plain"
    smoke("--quant", "Q4_K_M", "--n", "40", "--no-draft", "--out-dir", str(plain_dir))
    plain = load_summary(plain_dir / "Q4_K_M.summary.json", SmokeSummary)
    assert plain.draft_off == "--no-draft" and plain.drafted_tokens == 0
    assert plain.tokens_per_step is not None and plain.tokens_per_step < 1

    def answers(path: Path) -> dict[str, str]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {r["id"]: r["completion"] for r in rows}

    drafted, undrafted = answers(layout.smoke_results("Q4_K_M")), answers(
        plain_dir / "Q4_K_M.jsonl")
    assert sum(drafted[i] == undrafted[i] for i in undrafted) >= 0.99 * len(undrafted)
    assert plain.accuracy.k == s.accuracy.k
