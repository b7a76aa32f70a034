"""The step-cost curve and the long drafts it allows.

The curve and the plan are checked with made-up step times (no model): long drafts where
rows are cheap, none where they are dear. The demo model then shows the real thing: the
calibration is measured once and cached, and an answer that is its own draft reference
is checked in one step after its first token.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mathq.llama.drafts import (
    CALIBRATION_REPEATS,
    CostIdentity,
    Drafter,
    KeptRates,
    Proposal,
    StepCost,
    calibrated_cost,
    plan_step,
)
from mathq.llama.engine import BatchEngine, EngineOptions, GenRequest, GenResult

THREADS = 1


def cpu_like(rows: int) -> float:
    """A CPU micro-batch as llama.cpp's kernels make it: a pass over the weights, then
    rows that cost less each the more there are (vector kernels, then tiled ones)."""
    return 0.010 + 0.0008 * rows ** 0.6


class Timer:
    """A fake ``time_rows`` that counts its calls."""

    def __init__(self, curve: Callable[[int], float] = cpu_like) -> None:
        self.curve = curve
        self.calls: list[int] = []

    def __call__(self, rows: int) -> float:
        self.calls.append(rows)
        return self.curve(rows)


def identity(path: Path, threads: int = 2) -> CostIdentity:
    path.write_bytes(b"GGUF model")
    return CostIdentity.of(path, threads=threads, gpu_layers=0)


def test_the_calibrated_curve_makes_rows_cheaper_in_bigger_batches(tmp_path: Path) -> None:
    timer = Timer()
    cost = calibrated_cost(cache=tmp_path / "costs.json", identity=identity(tmp_path / "m"),
                           gpu=False, max_rows=512, time_rows=timer)
    assert set(cost.points) == {1, 8, 32, 128}
    assert len(timer.calls) == 4 * (1 + CALIBRATION_REPEATS)  # a warm-up, then the timed
    for rows in (1, 8, 32, 128):
        assert cost.seconds(rows) == pytest.approx(cpu_like(rows))
    assert cpu_like(8) < cost.seconds(16) < cpu_like(32)  # interpolated between points
    per_row = [cost.seconds(r) / r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert all(a > b for a, b in itertools.pairwise(per_row))
    assert per_row[0] > 20 * per_row[7]  # the switch to matrix kernels is in the curve


def test_a_long_calibration_decode_is_timed_once(tmp_path: Path) -> None:
    """A 7B on a CPU: a batch of 128 rows takes seconds, and three of them would make the
    calibration cost more than a short smoke run; what is long is timed once."""
    timer = Timer(lambda rows: 0.15 + 0.04 * rows)  # 0.19 s at 1 row, 5.3 s at 128
    cost = calibrated_cost(cache=tmp_path / "costs.json", identity=identity(tmp_path / "m"),
                           gpu=False, max_rows=512, time_rows=timer)
    assert timer.calls == [1, 1, 1, 1, 8, 8, 32, 32, 128, 128]  # warm-up + 3; warm-up + 1
    assert cost.seconds(128) == pytest.approx(0.15 + 0.04 * 128)


def test_calibration_stays_inside_the_context(tmp_path: Path) -> None:
    timer = Timer()
    cost = calibrated_cost(cache=tmp_path / "costs.json", identity=identity(tmp_path / "m"),
                           gpu=False, max_rows=20, time_rows=timer)
    assert set(cost.points) == {1, 8} and max(timer.calls) == 8


def test_long_drafts_where_rows_are_cheap_none_where_they_are_dear(tmp_path: Path) -> None:
    """Eight sequences that keep 99 % of their drafts, each with the 200 tokens left of its
    draft reference: under a CPU-like curve every one checks far more than the 8 drafts
    the old cap allowed; where every row costs as much as a pass over the weights, none."""
    proposals = [Proposal(s, tuple(range(200)), 0.99, room=400, last=1) for s in range(8)]
    cheap = StepCost(gpu=False, points={r: cpu_like(r) for r in (1, 8, 32, 128)})
    plan = plan_step(proposals, cheap.seconds, max_rows=512)
    assert all(len(d) > 8 for d in plan.drafts.values())
    assert plan.drafts[0] == tuple(range(len(plan.drafts[0])))  # the draft reference, in order
    assert plan_step(proposals, lambda rows: 0.01 * rows, max_rows=512).rows == 8
    # Rows free: as many as the context's micro-batch holds.
    assert plan_step(proposals, lambda rows: 0.01, max_rows=512).rows == 512
    # One sequence alone checks the whole rest of its draft reference.
    alone = [Proposal(0, tuple(range(100)), 0.99, room=400, last=1)]
    assert plan_step(alone, cheap.seconds, max_rows=512).drafts[0] == tuple(range(100))


def test_drafts_go_where_they_are_likely_kept() -> None:
    """k is chosen across sequences together: the sequences whose drafts are kept check
    long ones, the others short ones or none, in the same step."""
    proposals = [Proposal(s, tuple(range(100)), 0.99 if s < 2 else 0.3, room=400, last=1)
                 for s in range(8)]
    plan = plan_step(proposals, lambda rows: 0.010 + 0.0001 * rows, max_rows=512)
    assert min(len(plan.drafts[s]) for s in (0, 1)) > 20
    assert max(len(plan.drafts[s]) for s in range(2, 8)) < 4


def test_the_engines_own_time_per_step_makes_drafts_pay() -> None:
    """Rows that each cost as much as a decode call are not worth drafting for, unless
    the step costs more than its decode: the engine's own work per step (planning,
    reading logits) is spread over every token the step keeps, as a decode call's is."""
    proposals = [Proposal(0, tuple(range(50)), 0.95, room=100, last=1)]
    assert plan_step(proposals, lambda rows: 0.001 * rows, max_rows=512).rows == 1
    plan = plan_step(proposals, lambda rows: 0.001 * rows, max_rows=512, overhead=0.01)
    assert plan.rows > 10
    cost = StepCost(gpu=False, points={1: 0.001})
    assert cost.host_seconds == 0.0
    for host in (0.008, 0.002) * 50:
        cost.observe((1,), 0.001, host_seconds=host)
    assert cost.host_seconds == pytest.approx(0.005, rel=0.05)


def test_the_engines_work_per_row_makes_rarely_kept_drafts_dear() -> None:
    """Reading each row's logits is work per row: learned from steps of different sizes, it
    is charged to every draft, so lookup drafts kept one time in five stop looking free on
    a model whose decode barely grows with rows."""
    cost = StepCost(gpu=False, points={1: 0.001, 8: 0.001, 32: 0.0011, 128: 0.0012})
    for rows in (8, 16, 64, 8, 40) * 30:
        cost.observe((rows,), cost.seconds(rows), host_seconds=0.002 + 0.0004 * rows)
    assert cost.host_per_row == pytest.approx(0.0004, rel=0.01)
    assert cost.host_seconds == pytest.approx(0.002, rel=0.01)
    assert cost.step_seconds(16) == pytest.approx(cost.seconds(16) + 16 * 0.0004)
    lookups = [Proposal(i, (5, 6, 7), 0.2, room=100, last=1) for i in range(8)]
    assert plan_step(lookups, cost.seconds, 512, overhead=0.002).rows > 8  # looked free
    assert plan_step(lookups, cost.step_seconds, 512, overhead=cost.host_seconds).rows == 8


def test_timed_steps_correct_the_curve_and_older_ones_fade() -> None:
    points = {r: cpu_like(r) for r in (1, 8, 32, 128)}
    cost = StepCost(gpu=False, points=points)
    for _ in range(200):  # the machine got busy: 64-row steps take 3x the calibration's
        cost.observe((64,), 3 * cpu_like(64))
    assert cost.seconds(64) == pytest.approx(3 * cpu_like(64), rel=0.05)
    assert cost.seconds(1) > 2 * cpu_like(1)  # unmeasured rows lean on every step's
    for _ in range(400):
        cost.observe((64,), cpu_like(64))
    assert cost.seconds(64) == pytest.approx(cpu_like(64), rel=0.05)
    # A step of two micro-batches is shared in proportion to what the curve expects.
    before = cost.seconds(8), cost.seconds(128)
    for _ in range(200):
        cost.observe((8, 128), 2 * (cpu_like(8) + cpu_like(128)))
    assert cost.seconds(8) == pytest.approx(2 * before[0], rel=0.05)
    assert cost.seconds(128) == pytest.approx(2 * before[1], rel=0.05)


def test_the_cache_round_trips_per_file_and_threads(tmp_path: Path) -> None:
    cache = tmp_path / "costs.json"
    model = identity(tmp_path / "m")
    first = calibrated_cost(cache=cache, identity=model, gpu=False, max_rows=512,
                            time_rows=Timer())
    again = Timer(lambda rows: 99.0)
    second = calibrated_cost(cache=cache, identity=model, gpu=False, max_rows=512,
                             time_rows=again)
    assert again.calls == [] and second.points == first.points
    # Other threads: a calibration of its own, beside the first.
    other = Timer(lambda rows: 2 * cpu_like(rows))
    threads4 = calibrated_cost(cache=cache,
                               identity=CostIdentity.of(tmp_path / "m", threads=4, gpu_layers=0),
                               gpu=False, max_rows=512, time_rows=other)
    assert other.calls and threads4.seconds(8) == pytest.approx(2 * cpu_like(8))
    assert len(json.loads(cache.read_text())["entries"]) == 2
    # The file rebuilt (a new modification time): measured again, replacing its entry.
    path = Path(model.path)
    os.utime(path, ns=(model.mtime_ns + 10**9, model.mtime_ns + 10**9))
    rebuilt = Timer(lambda rows: 3 * cpu_like(rows))
    cost = calibrated_cost(cache=cache, identity=CostIdentity.of(path, threads=2, gpu_layers=0),
                           gpu=False, max_rows=512, time_rows=rebuilt)
    assert rebuilt.calls and cost.seconds(8) == pytest.approx(3 * cpu_like(8))
    # ... and the old file's calibration at 4 threads, which no longer holds, is dropped.
    assert list(json.loads(cache.read_text())["entries"]) == [model.key]


def test_the_cache_keeps_other_runs_entries_and_drops_gone_files(tmp_path: Path) -> None:
    cache = tmp_path / "costs.json"
    first, second, gone = (identity(tmp_path / name) for name in ("a", "b", "c"))
    calibrated_cost(cache=cache, identity=gone, gpu=False, max_rows=512, time_rows=Timer())
    Path(gone.path).unlink()

    def while_another_run_writes(rows: int) -> float:
        """Calibrating ``second`` while a run of ``first`` calibrates and writes."""
        if not cache.read_text().count(first.key):
            calibrated_cost(cache=cache, identity=first, gpu=False, max_rows=512,
                            time_rows=Timer())
        return cpu_like(rows)

    calibrated_cost(cache=cache, identity=second, gpu=False, max_rows=512,
                    time_rows=while_another_run_writes)
    # The later write merged with what was on disk: both entries, none for the deleted file.
    assert set(json.loads(cache.read_text())["entries"]) == {first.key, second.key}
    again = Timer()
    calibrated_cost(cache=cache, identity=first, gpu=False, max_rows=512, time_rows=again)
    assert again.calls == []


@pytest.mark.parametrize("damage", [
    "{not json",
    '{"version": 1, "entries": []}',
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": {"1": -1}}}}',
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": 7}}}',
    # values that parse but no calibration has: a 401-digit row count, seconds at the ends
    # of the float range, and a curve where 128 rows decode 100x faster than one
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": '
    '{"1": 1.0, "1' + "0" * 400 + '": 2.0}}}}',
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": '
    '{"1": 1e300, "128": 1e-300}}}}',
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": '
    '{"1": 5e-324, "8": 5e-324}}}}',
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": '
    '{"1": 0.4, "8": 0.4, "32": 0.0024, "128": 0.4}}}}',
    # a batch slowed by other work while it was timed: 128 rows at 2.3x 32 rows' time per
    # row (a real cache this benchmark kept, which held drafts short run after run)
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": '
    '{"1": 0.027, "8": 0.0605, "32": 0.186, "128": 1.704}}}}',
    # the time per row rising 1.4x at every size, 2.7x from 1 to 128 rows
    '{"version": 1, "entries": {"KEY": {"size": 10, "mtime_ns": MTIME, "seconds": '
    '{"1": 0.001, "8": 0.0112, "32": 0.06272, "128": 0.351232}}}}',
])
def test_a_damaged_cache_is_measured_again(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "costs.json"
    model = identity(tmp_path / "m")
    cache.write_text(damage.replace("KEY", model.key).replace("MTIME", str(model.mtime_ns)))
    timer = Timer()
    cost = calibrated_cost(cache=cache, identity=model, gpu=False, max_rows=512,
                           time_rows=timer)
    assert timer.calls and cost.seconds(8) == pytest.approx(cpu_like(8))
    again = Timer()
    calibrated_cost(cache=cache, identity=model, gpu=False, max_rows=512, time_rows=again)
    assert again.calls == []  # rewritten whole


def test_drafts_are_not_capped_and_rates_carry_to_new_sequences() -> None:
    draft_reference = list(range(10, 60))
    drafter = Drafter(prompt=[1, 2, 3], draft_reference=draft_reference)
    assert drafter.propose(100) == draft_reference  # the whole rest of the draft reference
    assert drafter.propose(7) == draft_reference[:7]
    rates = KeptRates()
    fresh = Drafter([1], draft_reference, rates).kept_rate("draft_reference")
    follower = Drafter([1], draft_reference, rates)
    follower.propose(100)
    follower.record(50, 50, draft_reference)  # every draft kept
    assert follower.kept_rate() > fresh
    assert Drafter([1], draft_reference, rates).kept_rate("draft_reference") > 0.98 > fresh


# -- on the demo model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def requests_16() -> list[GenRequest]:
    from mathq.datasets.problems import load_problem_set, select_problems
    from mathq.recipes.prompt import render_prompt, stop_strings
    from mathq.recipes.recipe import load_recipe

    recipe = load_recipe("tiny-demo")
    pset = select_problems(load_problem_set(recipe.smoke.suite), n=16, seed=5)
    return [GenRequest(p.id, render_prompt(recipe.prompt, p.problem), recipe.smoke.max_tokens,
                       stop_strings(recipe.prompt)) for p in pset.problems]


def test_the_engine_calibrates_once_per_model_file(tiny_quant_ggufs: dict[str, Path],
                                                   requests_16: list[GenRequest],
                                                   tmp_path: Path) -> None:
    cache = tmp_path / "costs.json"
    options = EngineOptions(parallel=4, threads=THREADS)
    with BatchEngine(tiny_quant_ggufs["Q8_0"], options, cost_cache=cache) as engine:
        list(engine.generate(requests_16[:4]))
        cost = engine.step_cost
    assert cost is not None and set(cost.points) == {1, 8, 32, 128}
    # The tiny model's rows are cheap next to a decode call: the curve says so. (Between 8
    # and 128 rows its Q8_0 kernels, on one thread, keep the cost per row about level.)
    assert cost.points[8] / 8 < 0.7 * cost.points[1]
    assert cost.points[128] / 128 < 0.7 * cost.points[1]
    # Another engine on the same file: the cached calibration, not a new measurement.
    with BatchEngine(tiny_quant_ggufs["Q8_0"], options, cost_cache=cache) as engine:
        list(engine.generate(requests_16[:4]))
        assert engine.step_cost is not None and engine.step_cost.points == cost.points


def test_an_answer_that_is_its_draft_reference_takes_two_steps_where_rows_are_cheap(
        tiny_quant_ggufs: dict[str, Path], requests_16: list[GenRequest],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Given its own answers as draft references, with rows as cheap next to a pass over
    the weights as a 7B's on a CPU, the variant checks each answer whole in the step after
    the one that read the prompt and chose the first token: two steps. The first run
    teaches the engine that its drafts are kept; the second shows it. (One sequence at a
    time: beside others, a few of the last drafts of the longest answer may not pay for
    the rows that would pad the others to its length.) Rows as dear as tokens: no drafts."""
    gguf = tiny_quant_ggufs["Q8_0"]
    options = EngineOptions(parallel=1, threads=THREADS)
    with BatchEngine(gguf, EngineOptions(parallel=1, threads=THREADS, draft=False)) as engine:
        own = {r.id: r for r in engine.generate(requests_16)}
    requests = [GenRequest(r.id, r.prompt, r.max_tokens, r.stop, own[r.id].text,
                           own[r.id].tokens) for r in requests_16]
    monkeypatch.setattr(StepCost, "seconds", lambda self, rows: cpu_like(rows))
    with BatchEngine(gguf, options, cost_cache=tmp_path / "costs.json") as engine:
        list(engine.generate(requests))
        again: dict[str, GenResult] = {r.id: r for r in engine.generate(requests)}
    same = [i for i in own if again[i].text == own[i].text]
    assert len(same) == 16
    assert all(own[i].steps > 10 for i in same)  # undrafted: a step per token
    assert [again[i].steps for i in same] == [2] * len(same)
    assert all(again[i].kept == len(again[i].tokens) - 1 for i in same)
    monkeypatch.setattr(StepCost, "seconds", lambda self, rows: 0.1 * rows)
    with BatchEngine(gguf, options, cost_cache=tmp_path / "costs.json") as engine:
        dear = list(engine.generate(requests[:8]))
    assert [r.drafted for r in dear] == [0] * 8
    assert {r.id: r.text for r in dear} == {i: own[i].text for i in {r.id for r in dear}}
