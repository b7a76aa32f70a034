"""mathq tune on the real demo model: ggml's bytes, the budget, the overrides file, resuming.

One tune of the demo model at ``--match Q2_K`` (module fixture, about 20 s on 2 cores) is
checked from every side; a second run in a fresh folder, killed with SIGKILL after some
probes and run again, must finish without measuring those probes again and must choose
exactly the same file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mathq.convert.gguf_info import read_gguf_header, read_gguf_summary, tensor_data
from mathq.errors import TuneError
from mathq.manifest import Manifest
from mathq.tune import ggml
from mathq.tune.plan import SizeModel, TensorCost, allocate, parse_size, predicted
from tests.clirun import run

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = str(REPO / "models" / "tiny-demo" / "problems.jsonl")
# No -c: the demo recipe's [tune] calibration (its own held-out problems) is the default, so
# the tune runs offline; the fixture runs it with the Hub switched off to prove it.
ARGS = ("tune", "tiny-demo", "--match", "Q2_K", "--json")


def _build_with_bf16(root: Path, bf16: Path) -> Path:
    folder = root / "tiny-demo"
    folder.mkdir(parents=True)
    shutil.copy2(bf16, folder / "tiny-demo-BF16.gguf")
    return folder


@pytest.fixture(scope="module")
def tuned(demo_bf16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tune-build")
    folder = _build_with_bf16(root, demo_bf16_gguf)
    with pytest.MonkeyPatch.context() as offline:
        import huggingface_hub.constants

        offline.setenv("HF_HUB_OFFLINE", "1")
        offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        result = json.loads(run(*ARGS, "--build-dir", str(root)).output)
    return {"root": root, "folder": folder, "result": result}


def test_the_demo_tunes_offline_on_its_recipes_calibration(tuned):
    record = json.loads((tuned["folder"] / "tiny-demo-Q2_K-tuned.tune.json").read_text())
    assert record["calibration"].endswith("problems.jsonl")


def test_ggml_bytes_are_llama_cpp_bytes(tiny_quant_ggufs: dict[str, Path]):
    """The cost model quantizes with the very routine llama.cpp's quantizer calls."""
    from gguf import GGMLQuantizationType

    bf16, q4 = tiny_quant_ggufs["BF16"], tiny_quant_ggufs["Q4_K_M"]
    src, dst = read_gguf_summary(bf16), read_gguf_summary(q4)
    out = {t.name: t for t in dst.tensors}
    checked = set()
    for t in src.tensors:
        if len(t.shape) < 2:
            continue
        rows = (np.asarray(tensor_data(bf16, t)).astype(np.uint32) << 16).view(np.float32)
        q = out[t.name]
        mine = ggml.quantize_rows(int(GGMLQuantizationType[q.type]), rows, None, threads=2)
        assert np.array_equal(mine, np.asarray(tensor_data(q4, q))), t.name
        checked.add(q.type)
    assert checked == {"Q4_K", "Q6_K"}


def test_tuned_file_fits_its_budget_and_is_what_was_planned(tuned):
    r, folder = tuned["result"], tuned["folder"]
    path = folder / "tiny-demo-Q2_K-tuned.gguf"
    assert Path(r["path"]) == path
    assert path.stat().st_size == r["size"] <= r["budget"] == r["stock_size"]
    stock = read_gguf_summary(folder / "tune" / "stock-Q2_K.gguf")
    assert r["budget"] == stock.size
    header = read_gguf_header(path)
    assert header.summary.file_type_name == "Q2_K"
    types = header.summary.tensor_types()
    assert {n: types[n] for n in r["types"]} == r["types"]
    assert header.values["quantize.tuned.by"].startswith("mathq tune")
    assert header.values["quantize.tuned.budget"] == f"match Q2_K: {r['budget']} bytes"
    assert len(set(r["types"].values())) > 1  # a mix, not one type everywhere
    # the truth beside the prediction: measured on held-out text
    assert r["kld"]["corpus"] == "kld-text.txt" and r["kld"]["mean_kld"] > 0
    assert r["predicted_kld"] > 0
    assert len(r["probes"]) == 9  # one per tensor group
    # each probe read chunks (255 scored positions each) until its KLD was known to 10 %,
    # or the calibration reference (2 chunks by default) ended
    for p in r["probes"]:
        assert p["tokens"] % 255 == 0 and 255 <= p["tokens"] <= 2 * 255
        assert p["kld_err"] <= 0.1 * p["kld"] or p["tokens"] == 2 * 255, p
    assert set(r["phase_seconds"]) == {"prepare", "costs", "probes", "write", "measure"}
    # the probes' copy of the model is gone once every probe is journalled
    assert not list((folder / "tune").glob("shards-*"))


def test_the_overrides_file_reproduces_the_file_byte_for_byte(tuned, tmp_path):
    folder, r = tuned["folder"], tuned["result"]
    overrides = folder / "tiny-demo-Q2_K-tuned.overrides.txt"
    lines = overrides.read_text().splitlines()
    assert len(lines) == len(r["types"]) and all("=" in line for line in lines)
    run("quantize", str(folder / "tiny-demo-BF16.gguf"), "-Q", "Q2_K", "--tensor-type-file",
        str(overrides), "--out-dir", str(tmp_path))
    again, tuned_file = tmp_path / "tiny-demo-Q2_K.gguf", folder / "tiny-demo-Q2_K-tuned.gguf"
    a, b = read_gguf_summary(again), read_gguf_summary(tuned_file)
    assert [(t.name, t.type, t.shape) for t in a.tensors] == \
        [(t.name, t.type, t.shape) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(np.asarray(tensor_data(again, ta)).view(np.uint8),
                              np.asarray(tensor_data(tuned_file, tb)).view(np.uint8)), ta.name


def test_the_manifest_records_the_search(tuned):
    rec = Manifest(tuned["folder"] / "manifest.json").get("tiny-demo-Q2_K-tuned.gguf")
    assert rec is not None and rec.stage == "tune"
    assert rec.settings["budget"]["match"] == "Q2_K"
    r = tuned["result"]
    assert rec.result["kld"] == r["kld"]["mean_kld"]
    assert rec.result["predicted_kld"] == r["predicted_kld"]
    assert rec.result["budget_bytes"] == r["budget"] and rec.size == r["size"]
    assert rec.result["seconds"] > 0


def test_the_held_out_measurement_is_the_kld_stages_so_a_build_measures_once(tuned):
    """The tune's KLD on the held-out text is saved and recorded as the kld stage's
    summary of the tuned variant, with the fingerprint a build's kld step has: a build
    with that variant finds it current and measures nothing again."""
    from mathq.datasets.corpus import load_corpus
    from mathq.evaluate.kld.measure import KldOptions
    from mathq.evaluate.stage import kld_fingerprint
    from mathq.layout import BuildLayout
    from mathq.recipes.recipe import load_recipe

    root, folder, r = tuned["root"], tuned["folder"], tuned["result"]
    summary = json.loads((folder / "kld" / "Q2_K-tuned.json").read_text())
    assert summary["mean_kld"] == r["kld"]["mean_kld"] and summary["model"] == "tiny-demo"
    rec = Manifest(folder / "manifest.json").get("kld/Q2_K-tuned.json")
    assert rec is not None and rec.stage == "kld"
    recipe = load_recipe("tiny-demo")
    build_kld = KldOptions(corpus=recipe.kld.corpus)  # what a build's kld step measures with
    fingerprint = kld_fingerprint(BuildLayout.for_model("tiny-demo", root), "Q2_K-tuned",
                                  build_kld, load_corpus(build_kld.corpus))
    assert fingerprint is not None and rec.same_recipe(*fingerprint)


def test_killed_mid_search_a_rerun_keeps_its_probes_and_chooses_the_same(
        tuned, demo_bf16_gguf, tmp_path):
    root = tmp_path / "build"
    folder = _build_with_bf16(root, demo_bf16_gguf)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "toolkit"), str(REPO)]),
           "MATHQ_BUILD_DIR": str(root), "MATHQ_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    journal = folder / "tune" / "probes.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", "from mathq.cli import main; main()",
                             *ARGS[:-1], "-q"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "tiny-demo-Q2_K-tuned.gguf").exists(), "killed too late"
    done = len(journal.read_text().splitlines())
    assert done >= 3
    r = json.loads(run(*ARGS, "--build-dir", str(root)).output)
    measured = r["probes"]
    assert sum(p["reused"] for p in measured) == done
    assert sum(not p["reused"] for p in measured) == len(measured) - done
    # deterministic: the same inputs choose the same types and write the same tensors
    assert r["types"] == tuned["result"]["types"]
    assert (folder / "tiny-demo-Q2_K-tuned.overrides.txt").read_bytes() == \
        (tuned["folder"] / "tiny-demo-Q2_K-tuned.overrides.txt").read_bytes()
    assert [p["kld"] for p in r["probes"]] == [p["kld"] for p in tuned["result"]["probes"]]


def _probe_inputs(bf16: Path, work: Path):
    """The probes' inputs for the demo model: its shards, its pass over the KLD text as the
    reference, plain squared error (a matrix with no entries)."""
    from mathq.datasets.corpus import load_corpus
    from mathq.evaluate.kld.measure import KldOptions, ensure_reference_file
    from mathq.quantize.imatrix_file import Imatrix
    from mathq.tune.plan import candidates, group_of, quantizable, tensor_bytes
    from mathq.tune.probes import ProbeInputs, shards_for

    model = read_gguf_summary(bf16)
    costs = [TensorCost(t.name, group_of(t.name),
                        {ty: tensor_bytes(t, ty) for ty in candidates(t, ("Q3_K", "Q8_0"))}, {})
             for t in quantizable(model)]
    corpus = load_corpus(REPO / "models" / "tiny-demo" / "kld-text.txt")
    options = KldOptions(n_ctx=256, max_chunks=2, threads=2)
    ref = ensure_reference_file(bf16, "BF16", work, corpus, options)
    ones = Imatrix(path=work / "none", entries={}, datasets=(), chunk_count=0, legacy=False)
    return ProbeInputs(source=model, shards=shards_for(model, work, costs), reference=ref,
                       calib=corpus, quant_imatrix=None, cost_imatrix=ones, preferred="Q3_K",
                       kld=options, threads=2), costs


def test_a_probe_is_the_model_llama_cpp_would_write_for_it(demo_bf16_gguf, tmp_path):
    """The shards, untouched, are the BF16 model (zero KLD, every top token the same); a
    probe's shards, with one group quantized, give exactly the KLD of a whole file written by
    llama.cpp's quantizer with the same types, as the probes were measured before."""
    from mathq.evaluate.kld.measure import measure_gguf
    from mathq.quantize.core import QuantizeOptions, quantize_gguf
    from mathq.recipes.quants import get_quant
    from mathq.tune.plan import overrides_pairs
    from mathq.tune.probes import _write_probe, shard_path, write_shards

    inputs, costs = _probe_inputs(demo_bf16_gguf, tmp_path)
    shards = inputs.shards
    write_shards(shards)
    assert shards.count == 10 and all(shards.shard(i).is_file() for i in range(10))
    first = shard_path(shards.folder, 0, shards.count)
    same = measure_gguf(first, "shards", "demo", inputs.reference, inputs.calib, inputs.kld)
    assert same.mean_kld < 1e-4 and same.same_top.value == 1.0

    plan = {c.name: "Q3_K" for c in costs if c.group == "attn_q"}
    folder = tmp_path / "probe"
    error = _write_probe(inputs, folder, "attn_q", plan)
    assert error > 0 and sorted(p.name for p in folder.iterdir() if p.is_symlink()) == sorted(
        shard_path(folder, i, 10).name for i in range(10) if i != shards.groups.index("attn_q") + 1)
    probe = measure_gguf(shard_path(folder, 0, 10), "probe", "demo", inputs.reference,
                         inputs.calib, inputs.kld)
    everything = {c.name: plan.get(c.name, "BF16") for c in costs}
    whole = quantize_gguf(demo_bf16_gguf, tmp_path / "whole.gguf", QuantizeOptions(
        get_quant("Q8_0"), overrides=overrides_pairs(everything))).path
    direct = measure_gguf(whole, "whole", "demo", inputs.reference, inputs.calib, inputs.kld)
    assert probe.mean_kld > 0.01
    assert probe.mean_kld == pytest.approx(direct.mean_kld, rel=1e-6)
    assert probe.same_top == direct.same_top


def test_shards_changed_since_they_were_written_are_written_again(demo_bf16_gguf, tmp_path):
    """A shard cut short or overwritten in place (same size) after a killed run is not fed
    to llama.cpp: the set is written again, byte for byte what it was."""
    from mathq.tune.probes import write_shards

    inputs, _costs = _probe_inputs(demo_bf16_gguf, tmp_path)
    shards = inputs.shards
    write_shards(shards)
    assert shards.complete()
    victim = shards.shard(5)
    original = victim.read_bytes()
    with open(victim, "r+b") as f:  # the same size, other bytes
        f.seek(len(original) - 64)
        f.write(bytes(64))
    assert not shards.complete()
    write_shards(shards)
    assert shards.complete() and victim.read_bytes() == original
    os.truncate(victim, len(original) // 2)
    assert not shards.complete()
    write_shards(shards)
    assert victim.read_bytes() == original


def test_the_probe_journal_skips_what_is_not_a_probe_and_refuses_a_pipe(tmp_path):
    """Rows cut short or edited (a missing or non-numeric figure) are measured again, an
    append after a cut line stays a line of its own, and a named pipe where the journal
    goes is refused at once instead of blocking the first append."""
    from mathq.errors import OutputError
    from mathq.tune.probes import _Journal

    good = {"key": "a", "kld": 0.5, "kld_err": 0.01, "error": 2.0, "tokens": 255}
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        good, {**good, "key": "b", "kld": None}, {k: v for k, v in good.items() if k != "error"}
        | {"key": "c"}, {**good, "key": "d", "kld": "NaN"})) + "\n" + '{"key": "e", "kl')
    journal = _Journal(path)
    assert set(journal.done) == {"a"}
    journal.add({**good, "key": "f"})
    assert set(_Journal(path).done) == {"a", "f"}
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    with pytest.raises(OutputError, match="named pipe"):
        _Journal(pipe)


def test_a_second_tune_into_the_same_folder_is_refused_before_any_work(tuned):
    """The work folder is held for the whole run: a second tune of any budget is refused at
    once with one line, not after redoing the first one's costs."""
    from mathq.errors import OutputBusyError
    from mathq.fsutil import exclusive_lock

    root, folder = tuned["root"], tuned["folder"]
    before = sorted(p.name for p in (folder / "tune").iterdir())
    with exclusive_lock(folder / "tune" / "tune.lock", OutputBusyError("held", "wait")):
        out = run("tune", "tiny-demo", "--bpw", "5", "--build-dir", str(root), code=1).output
    assert "another mathq command is computing a tune in" in out
    assert sorted(p.name for p in (folder / "tune").iterdir()) == before


def test_a_probe_quantizes_a_spread_of_a_deep_groups_layers():
    from mathq.tune.probes import PROBE_LAYERS, probed_layers

    names = [f"blk.{i}.attn_q.weight" for i in range(30)]
    picked = probed_layers(names)
    assert len(picked) == PROBE_LAYERS and picked[0] == names[0] and picked[-1] == names[-1]
    assert list(picked) == sorted(set(picked), key=names.index)
    assert probed_layers(names[:5]) == tuple(names[:5])


def test_allocation_never_exceeds_the_budget_and_uses_it_well():
    rng = random.Random(7)
    types = ("A", "B", "C", "D")
    costs = []
    for i in range(40):
        n = rng.choice((256, 512, 1024)) * rng.randint(1, 8)
        size = {t: n * (k + 2) for k, t in enumerate(types)}
        err = {t: rng.uniform(0.5, 2.0) * n / 4 ** k for k, t in enumerate(types)}
        costs.append(TensorCost(f"t{i}", f"g{i % 3}", size, err))
    sens = {"g0": 1.0, "g1": 3.0, "g2": 0.2}
    sizes = SizeModel(fixed=1000, bf16_size=10**9)
    smallest = sizes.file_bytes(costs, {c.name: "A" for c in costs})
    largest = sizes.file_bytes(costs, {c.name: "D" for c in costs})
    last = float("inf")
    for budget in range(smallest, largest + 1, (largest - smallest) // 25):
        plan = allocate(costs, sens, budget, sizes)
        assert sizes.file_bytes(costs, plan) <= budget
        assert plan == allocate(costs, sens, budget, sizes)
        kld = predicted(costs, sens, plan)
        assert kld <= last + 1e-9  # more bytes never predict more KLD
        last = kld
    with pytest.raises(TuneError, match="below the smallest mix"):
        allocate(costs, sens, smallest - 1, sizes)


@pytest.mark.parametrize("text,expected", [("1879136", 1879136), ("1.5MiB", 1572864),
                                           ("4.2GiB", int(4.2 * 2**30)), ("4200 MB", 4.2e9)])
def test_sizes_parse(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("args,says", [
    (("--size", "100KB"), "below the smallest mix of the candidate types"),
    (("--size", "1GiB"), "is not below the BF16 file"),
    (("--bpw", "1.0"), "below the smallest candidate type (Q2_K"),
    (("--match", "Q4_K_M", "--types", "IQ2_XXS"), "--types IQ2_XXS needs an importance matrix"),
    (("--size", "2MB", "--types", "Q4_K,F16"), "--types F16: not a type the tuner can choose"),
])
def test_impossible_requests_are_refused_before_any_work(demo_bf16_gguf, tmp_path, args, says):
    root = tmp_path / "build"
    folder = _build_with_bf16(root, demo_bf16_gguf)
    before = sorted(p.name for p in folder.iterdir())
    out = run("tune", "tiny-demo", *args, "-c", CALIBRATION, "--build-dir", str(root),
              code=2).output
    assert says in out
    assert sorted(p.name for p in folder.iterdir()) == before


def test_build_plans_tuned_siblings_and_measures_them_like_any_variant(tmp_path):
    out = run("build", "tiny-demo", "--quant", "Q4_K_M", "--tune", "Q4_K_M,Q2_K", "--imatrix",
              "--build-dir", str(tmp_path), "--dry-run", "--json").stdout
    names = [p["name"] for p in json.loads(out)]
    tuned = ["Q4_K_M-tuned", "Q4_K_M-imat-tuned", "Q2_K-tuned", "Q2_K-imat-tuned"]
    assert [n for n in names if n.startswith("tune ")] == [f"tune {t}" for t in tuned]
    assert names.index("tune Q4_K_M-tuned") > names.index("quantize Q4_K_M-imat")
    for t in tuned:
        for step in ("smoke", "bench", "kld"):
            assert f"{step} {t}" in names
    assert not list(tmp_path.iterdir())
    run("build", "tiny-demo", "--tune", "BF16", "--build-dir", str(tmp_path), "--dry-run",
        code=2)


@pytest.mark.parametrize(("name", "canonical", "bpw", "making"), [
    ("T4.85", "T4.85", 4.85, "mathq tune r --bpw 4.85"),
    ("t3.5-imat", "T3.50-imat", 3.5, "mathq tune r --bpw 3.5 --imatrix FILE"),
    ("Q4_K_M-tuned", "Q4_K_M-tuned", 4.5, "mathq tune r --match Q4_K_M"),
    ("TQ1_0", "TQ1_0", 1.6875, "mathq quantize r --quant TQ1_0"),  # a type, not a budget
])
def test_budget_names_are_variant_names(name, canonical, bpw, making):
    from mathq.recipes.quants import making_command, parse_variant

    v = parse_variant(name)
    assert (v.name, v.nominal_bpw, making_command("r", name)) == (canonical, bpw, making)
    assert parse_variant(v.name) == v


def test_build_plans_budget_variants_from_tune_and_the_recipe(tmp_path):
    out = run("build", "tiny-demo", "--quant", "Q4_K_M", "--tune", "T4,Q2_K", "--build-dir",
              str(tmp_path), "--dry-run", "--json").stdout
    names = [p["name"] for p in json.loads(out)]
    assert [n for n in names if n.startswith("tune ")] == ["tune T4.00", "tune Q2_K-tuned"]
    assert {"smoke T4.00", "bench T4.00", "kld T4.00"} <= set(names)
    run("build", "tiny-demo", "--tune", "T4,Q2_K-imat", "--build-dir", str(tmp_path),
        "--dry-run", code=2)
    # A budget below every candidate type is refused by the plan, not by the tune later.
    out = run("build", "tiny-demo", "--tune", "T1", "--build-dir", str(tmp_path),
              "--dry-run", code=2).output
    assert "1 bits per weight is below the smallest candidate type (Q2_K" in out
    assert not list(tmp_path.iterdir())


def test_a_bpw_budget_goes_through_measurement_report_and_publish(tuned, tmp_path):
    """``mathq tune --bpw`` names its file T<bpw>; smoke, kld, bench, report and publish take
    the name like any variant's. The tune reuses the --match run's probes."""
    root, folder = tuned["root"], tuned["folder"]
    stale = folder / "tune" / "probe-0123456789abcdef01234567"  # a killed run's probe
    stale.mkdir()
    (stale / "model-00002-of-00010.gguf").write_bytes(b"GGUF")
    out = json.loads(run("tune", "tiny-demo", "--bpw", "4", "--json",
                         "--build-dir", str(root)).output)
    assert out["name"] == "T4.00" and all(p["reused"] for p in out["probes"])
    assert not list((folder / "tune").glob("probe-*"))
    n_params = read_gguf_summary(folder / "tiny-demo-BF16.gguf").n_params
    assert out["size"] <= out["budget"] == int(4 * n_params / 8)
    assert read_gguf_summary(folder / "tiny-demo-T4.00.gguf").size == out["size"]
    for step in (("smoke", "--n", "8"), ("bench", "-p", "16", "-n", "4", "-r", "1"), ("kld",)):
        run(step[0], "tiny-demo", "-Q", "T4.00", *step[1:], "--build-dir", str(root))
    run("report", "tiny-demo", "--build-dir", str(root))
    report = json.loads((folder / "report" / "report.json").read_text())
    (row,) = [r for r in report["rows"] if r["quant"] == "T4.00"]
    assert row["kind"] == "tuned" and row["nominal_bpw"] == 4.0
    assert row["accuracy"] is not None and row["mean_kld"] is not None
    recipe = tmp_path / "tiny-demo.toml"
    text = (REPO / "recipes" / "tiny-demo.toml").read_text().replace(
        "../models/", str(REPO / "models") + "/").replace(
        'q8_0 = "Q8_0"', 'q8_0 = "Q8_0"\nt4 = "T4.00"')
    recipe.write_text(text)
    plan = run("publish", str(recipe), "--tag", "t4", "--namespace", "someone", "--dry-run",
               "--build-dir", str(root))
    assert "tiny-demo-T4.00.gguf" in plan.output


def test_sampled_costs_are_within_their_stated_error_of_the_full_costs(tuned, tmp_path,
                                                                       monkeypatch):
    """Costs from sampled rows against every row, on the trained demo model's tensors: each
    estimate is within 4 of its standard errors of the full cost (a 1-in-16,000 miss for a
    normal estimate; the seeds are fixed, so this is checked once, not re-rolled), and a
    sample that holds every row is exact."""
    from mathq.quantize.imatrix_file import load_imatrix
    from mathq.tune import costs as tune_costs
    from mathq.tune.plan import DEFAULT_TYPES

    bf16 = tuned["folder"] / "tiny-demo-BF16.gguf"
    model = read_gguf_summary(bf16)
    (matrix,) = (tuned["folder"] / "tune").glob("cost-*.imatrix.gguf")
    weights = load_imatrix(matrix)
    full = tune_costs.tensor_costs(bf16, model, DEFAULT_TYPES, None, weights,
                                   tmp_path / "full.json", sample_rows=None)
    monkeypatch.setattr(tune_costs, "RELATIVE_SE", 0.05)  # stop early: demo tensors are small
    sampled = tune_costs.tensor_costs(bf16, model, DEFAULT_TYPES, None, weights,
                                      tmp_path / "sampled.json", sample_rows=64)
    estimated = 0
    for s, f in zip(sampled, full, strict=True):
        assert (s.name, s.n_bytes) == (f.name, f.n_bytes) and not any(f.error_se.values())
        for ty, value in f.error.items():
            se = s.error_se[ty]
            assert abs(s.error[ty] - value) <= 4 * se + 1e-9 * value, (s.name, ty)
            estimated += se > 0
    assert estimated > 0  # some tensors were settled by a sample, not by every row


def test_an_unknown_calibration_set_is_refused_when_a_tune_is_planned(tmp_path):
    """A recipe's [tune] calibration naming no set fails the build's dry run, before any
    BF16 file or stock variant is made, not the tune hours later."""
    text = (REPO / "recipes" / "tiny-demo.toml").read_text().replace(
        "../models/", str(REPO / "models") + "/").replace(
        'calibration = "' + str(REPO / "models") + '/tiny-demo/problems.jsonl"',
        'calibration = "no-such-set"')
    recipe = tmp_path / "demo.toml"
    recipe.write_text(text)
    out = run("build", str(recipe), "--tune", "Q2_K", "--dry-run", "--build-dir",
              str(tmp_path / "b"), code=2).output
    assert "[tune.calibration] 'no-such-set' is neither a calibration set" in out
    assert "math-train" in out
    run("build", str(recipe), "--dry-run", "--build-dir", str(tmp_path / "b"))  # no tune
