"""The kld stage on a real tiny model: llama.cpp in process, cached reference, summaries, CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.datasets.corpus import BUNDLED_CORPUS, load_corpus
from mathq.evaluate.kld.evaluator import ChunkEvaluator
from mathq.evaluate.kld.measure import KldOptions
from mathq.evaluate.stage import run_kld
from mathq.evaluate.summaries import KldSummary, load_summary
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from tests.buildfolder import TINY_MODEL, link_ggufs, write_tiny_recipe
from tests.conftest import FIXTURES

CTX = 64
SCORED = CTX - 1 - CTX // 2


@pytest.fixture
def build(tmp_path: Path, tiny_quant_ggufs: dict[str, Path]) -> tuple[Path, BuildLayout]:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml")
    layout = link_ggufs(tmp_path / "build", tiny_quant_ggufs)
    return recipe, layout


def test_variants_are_measured_against_a_cached_reference(build) -> None:
    recipe, layout = build
    options = KldOptions(n_ctx=CTX, max_chunks=3, threads=1)
    run = run_kld(recipe, None, options, layout.root.parent)
    assert run.reference.computed and run.reference.n_chunks == 3
    assert run.reference.path.parent == layout.kld_dir
    assert run.reference.path.read_bytes()[:8] == b"_logits_"
    by_quant = {s.quant: s for s in run.summaries}
    assert set(by_quant) == {"Q8_0", "Q4_K_M"}
    q8, q4 = by_quant["Q8_0"], by_quant["Q4_K_M"]
    for s in (q8, q4):
        assert s.model == TINY_MODEL and s.reference == "BF16"
        assert s.n_tokens == 3 * SCORED and s.same_top.n == 3 * SCORED
        assert s.corpus == "mathq's bundled math notes"
        assert 0 < s.mean_kld_err < s.mean_kld
        p = s.kld_percentiles
        assert p["min"] <= p["median"] <= p["90"] <= p["99"] <= p["99.9"] <= p["max"]
        assert s.rms_delta_p > 0 and s.ppl and s.ppl_reference
        assert load_summary(layout.kld_summary(s.quant), KldSummary) == s
        assert Manifest(layout.manifest).get(f"kld/{s.quant}.json").stage == "kld"
    # 4-bit weights move the distributions further than 8-bit ones, and change more top tokens.
    assert q4.mean_kld > 3 * q8.mean_kld
    assert q4.same_top.value < q8.same_top.value

    again = run_kld(recipe, ("Q8_0",), options, layout.root.parent)
    assert not again.reference.computed and again.reference.path == run.reference.path
    # Same reference file, same model: the same figures (only the time taken differs).
    assert dataclasses.replace(again.summaries[0], seconds=None) == dataclasses.replace(
        q8, seconds=None)

    other = layout.root.parent / "other.txt"
    other.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8")[5000:], encoding="utf-8")
    options = KldOptions(corpus=other, n_ctx=CTX, max_chunks=2, threads=1)
    changed = run_kld(recipe, ("Q8_0",), options, layout.root.parent)
    assert changed.reference.computed and changed.reference.key != run.reference.key
    assert not run.reference.path.exists()  # the stale reference pass was removed
    assert changed.summaries[0].corpus == "other.txt"


def _exact_kld(ref: Path, model: Path, tokens: np.ndarray) -> tuple[float, float, float]:
    """Mean KLD, same-top share and RMS Δp from full float64 logits of llama-cpp-python's
    high-level API (logits_all), independently of mathq's engine and compact reference."""
    logs = []
    for path in (ref, model):
        # flash_attn: llama.cpp's default (auto) turns it on for CPU, as in mathq and
        # llama-perplexity; the high-level API turns it off unless asked, which moves the
        # logits of this random model by up to 0.1.
        llm = llama_cpp.Llama(str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=1,
                              flash_attn=True, verbose=False)
        rows = []
        for start in range(0, len(tokens), CTX):
            chunk = [llm.token_bos(), *tokens[start + 1:start + CTX].tolist()]
            llm.reset()
            llm.eval(chunk)
            x = np.array(llm.scores[CTX // 2:CTX - 1], dtype=np.float64)
            m = x.max(axis=1, keepdims=True)
            rows.append(x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True)))
        logs.append(np.concatenate(rows))
        llm.close()
    lp, lq = logs
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    nxt = np.concatenate([tokens[s + CTX // 2 + 1:s + CTX] for s in range(0, len(tokens), CTX)])
    idx = np.arange(len(nxt))
    dp = np.exp(lq[idx, nxt]) - np.exp(lp[idx, nxt])
    same = (lp.argmax(axis=1) == lq.argmax(axis=1)).mean()
    return float(kld.mean()), float(same), float(np.sqrt((dp * dp).mean()))


def test_figures_agree_with_full_precision_logits_within_2_percent(build) -> None:
    recipe, layout = build
    run = run_kld(recipe, ("Q4_K_M",), KldOptions(n_ctx=CTX, max_chunks=3, threads=1),
                  layout.root.parent)
    s = run.summaries[0]
    with ChunkEvaluator(layout.gguf("BF16"), CTX, threads=1) as ev:
        tokens = ev.tokenize(load_corpus().text)[:3 * CTX]
    kld, same, rms = _exact_kld(layout.gguf("BF16"), layout.gguf("Q4_K_M"), tokens)
    assert s.mean_kld == pytest.approx(kld, rel=0.02)
    assert s.same_top.value == pytest.approx(same, abs=1.5 / s.n_tokens)
    assert s.rms_delta_p == pytest.approx(rms, rel=0.02)


def test_kld_command_prints_one_line_per_variant(build) -> None:
    recipe, layout = build
    result = CliRunner().invoke(cli, ["kld", str(recipe), "--quant", "Q4_K_M", "-c", str(CTX),
                                      "--chunks", "2", "--threads", "1",
                                      "--build-dir", str(layout.root.parent)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()
    assert re.match(rf"reference BF16: 2 chunks of {CTX} tokens, computed in [\d.]+s \(.+"
                    r"reference-BF16-[0-9a-f]{16}\.logits\)$", first)
    assert re.match(r"Q4_K_M +KLD \d\.\d{6} ± \d\.\d{6}  99% [\d.]+  same top +[\d.]+%  "
                    rf"RMS Δp [\d.]+%  \({2 * SCORED} positions\)  .+Q4_K_M\.json$", second)
    as_json = CliRunner().invoke(cli, ["kld", str(recipe), "--quant", "Q4_K_M", "-c", str(CTX),
                                       "--chunks", "2", "--threads", "1", "--json",
                                       "--build-dir", str(layout.root.parent)])
    data = json.loads(as_json.output)
    assert data["reference"]["computed"] is False
    assert data["summaries"][0]["n_tokens"] == 2 * SCORED


def _error(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output.strip().splitlines()[-1]


def test_kld_errors_name_the_fix(tmp_path: Path, tiny_quant_ggufs: dict[str, Path]) -> None:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml")
    root = tmp_path / "build"
    layout = link_ggufs(root, {"Q4_K_M": tiny_quant_ggufs["Q4_K_M"]})
    base = ["kld", str(recipe), "--build-dir", str(root), "-c", str(CTX), "--threads", "1"]
    assert _error([*base, "--quant", "Q4_K_M"]) == (
        1, f"Error: reference model {layout.gguf('BF16')} not found (run `mathq convert "
           f"{TINY_MODEL}`, or measure against Q8_0 with --reference Q8_0)")
    link_ggufs(root, {"Q8_0": tiny_quant_ggufs["Q8_0"]})
    assert _error([*base, "--quant", "Q6_K", "--reference", "Q8_0"]) == (
        1, f"Error: Q6_K model {layout.gguf('Q6_K')} not found "
           f"(run `mathq quantize {TINY_MODEL} --quant Q6_K`)")
    assert _error([*base, "--quant", "Q8_0", "--reference", "Q8_0"]) == (
        1, "Error: Q8_0 is the reference; its divergence from itself is 0 "
           "(leave it out of --quant, or pick another --reference)")
    short = tmp_path / "short.txt"
    short.write_text("We have $1 + 1 = 2$.\n", encoding="utf-8")
    code, line = _error([*base, "--quant", "Q4_K_M", "--reference", "Q8_0", "--corpus",
                         str(short)])
    assert code == 1
    assert re.fullmatch(r"Error: the corpus \(short\.txt\) has \d+ tokens, fewer than one chunk "
                        rf"of {CTX} \(lower --ctx-size or give a longer --corpus\)", line)
    # With Q8_0 as the reference the measurement works without any BF16 file.
    result = CliRunner().invoke(cli, [*base, "--quant", "Q4_K_M", "--reference", "Q8_0",
                                      "--chunks", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert load_summary(layout.kld_summary("Q4_K_M"), KldSummary).reference == "Q8_0"


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_bundled_corpus_is_long_enough_and_apart_from_math500() -> None:
    corpus = load_corpus()
    vocab = FIXTURES / "deepseek-llm-tokenizer" / "ggml-vocab-deepseek-llm.gguf"
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(vocab).encode(), params)
    try:
        data = corpus.text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 2))()
        n = llama_cpp.llama_tokenize(llama_cpp.llama_model_get_vocab(model), data, len(data),
                                     buf, len(buf), True, False)
    finally:
        llama_cpp.llama_model_free(model)
    assert n >= 16 * 512  # sixteen chunks at llama-perplexity's default context
    mine = _shingles(corpus.text)
    for line in (FIXTURES / "math500" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        problem = json.loads(line)
        shared = mine & _shingles(problem["problem"] + " " + problem["solution"])
        assert not shared, (problem["unique_id"], sorted(shared)[:3])


def test_memory_stays_at_one_chunk_whatever_the_corpus_length(build) -> None:
    """Python-side allocations (numpy included) peak at the same height for 1 and 4 chunks:
    the passes hold one chunk of logits and reference rows, never the whole corpus's."""
    import tracemalloc

    from mathq.datasets.corpus import load_corpus
    from mathq.evaluate.kld.measure import ensure_reference, measure_variant

    _recipe, layout = build
    corpus = load_corpus()
    peaks = {}
    for chunks in (1, 4):
        options = KldOptions(n_ctx=CTX, max_chunks=chunks, threads=1)
        tracemalloc.start()
        try:
            ref = ensure_reference(layout, corpus, options)
            measure_variant(layout, "Q4_K_M", ref, corpus, options)
            peaks[chunks] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    one_chunk_of_logits = SCORED * 102400 * 4
    assert peaks[4] < peaks[1] + one_chunk_of_logits / 2, peaks


def test_the_recipe_names_the_text_and_the_command_defaults_to_it(
        tmp_path: Path, tiny_quant_ggufs: dict[str, Path]) -> None:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml")
    own = tmp_path / "own-text.txt"
    own.write_text(BUNDLED_CORPUS.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    recipe.write_text(recipe.read_text(encoding="utf-8") + '\n[kld]\ncorpus = "own-text.txt"\n',
                      encoding="utf-8")
    root = tmp_path / "build"
    layout = link_ggufs(root, tiny_quant_ggufs)
    base = ["kld", str(recipe), "--quant", "Q8_0", "--build-dir", str(root), "-c", str(CTX),
            "--chunks", "1", "--threads", "1"]
    assert CliRunner().invoke(cli, base, catch_exceptions=False).exit_code == 0
    summary = load_summary(layout.kld_summary("Q8_0"), KldSummary)
    assert summary.corpus == "own-text.txt"
    assert summary.corpus_sha256 == load_corpus(own).sha256
    # --corpus still wins over the recipe.
    assert CliRunner().invoke(cli, [*base, "--corpus", str(BUNDLED_CORPUS)],
                              catch_exceptions=False).exit_code == 0
    assert load_summary(layout.kld_summary("Q8_0"), KldSummary).corpus == "kld-corpus.md"


def test_kld_takes_gguf_paths_like_llama_perplexity(tmp_path: Path,
                                                    tiny_quant_ggufs: dict[str, Path]) -> None:
    variant, reference = tiny_quant_ggufs["Q4_K_M"], tiny_quant_ggufs["BF16"]
    out = tmp_path / "kld-out"
    args = ["kld", str(variant), "--reference", str(reference), "--out-dir", str(out),
            "-c", str(CTX), "--chunks", "2", "--threads", "1"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    name = variant.name.removesuffix(".gguf")
    summary = load_summary(out / f"{name}.json", KldSummary)
    assert summary.quant == name and summary.reference == reference.name.removesuffix(".gguf")
    assert summary.n_tokens == 2 * SCORED and summary.mean_kld > 0
    assert list(out.glob("reference-*.logits"))
    # The same pair measured inside a build folder gives the same figure.
    recipe = write_tiny_recipe(tmp_path / "tiny.toml")
    root = tmp_path / "build"
    layout = link_ggufs(root, tiny_quant_ggufs)
    run_kld(recipe, ("Q4_K_M",), KldOptions(n_ctx=CTX, max_chunks=2, threads=1), root)
    in_build = load_summary(layout.kld_summary("Q4_K_M"), KldSummary)
    assert summary.mean_kld == pytest.approx(in_build.mean_kld, rel=1e-9)
    for extra, message in ((["--reference", "BF16"], "needs the reference as a file too"),
                           (["--quant", "Q8_0", "--reference", str(reference)],
                            "a GGUF path is one file")):
        bad = CliRunner().invoke(cli, ["kld", str(variant), *extra])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    bad = CliRunner().invoke(cli, ["kld", str(recipe), "--reference", "Q5_K_M"])
    assert bad.exit_code == 2 and "expected BF16 or Q8_0" in bad.output
