"""KL-divergence arithmetic and the reference file format, against plain float64 numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mathq.errors import MathqError
from mathq.evaluate.kld.logprob_file import LogprobFile, LogprobWriter, file_size, scored_per_chunk
from mathq.evaluate.kld.stats import (
    KldAccumulator,
    compress_log_probs,
    decode_log_probs,
    mean_and_uncertainty,
    percentile,
    row_width,
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _logits(rng: np.random.Generator, rows: int, vocab: int, sharpness: float) -> np.ndarray:
    return (rng.standard_normal((rows, vocab)) * sharpness).astype(np.float32)


def test_compressed_log_probs_keep_16_nats_to_a_ten_thousandth() -> None:
    rng = np.random.default_rng(1)
    logits = _logits(rng, 40, 3001, 6.0)  # wide enough that some entries fall below 16 nats
    exact = _log_softmax(logits)
    rows = compress_log_probs(logits)
    assert rows.shape == (40, row_width(3001)) and rows.dtype == np.uint16
    decoded = decode_log_probs(rows, 3001).astype(np.float64)
    top = exact.max(axis=1, keepdims=True)
    kept = exact > top - 16
    assert (~kept).any(), "the test should cover entries outside the kept range"
    assert np.abs(decoded - exact)[kept].max() < 2e-4
    # The most likely token is represented exactly (up to float32 rounding).
    assert np.abs(decoded.max(axis=1) - exact.max(axis=1)).max() < 1e-5
    # Entries below the range read as its floor, which lies 16 nats or more below the top.
    assert (decoded[~kept] <= (top - 16 + 1e-3).repeat(3001, axis=1)[~kept]).all()


def test_kld_statistics_match_an_exact_float64_computation() -> None:
    rng = np.random.default_rng(2)
    vocab, n = 4000, 300
    ref = _logits(rng, n, vocab, 3.0)
    noisy = (ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3).astype(np.float32)
    probs = np.exp(_log_softmax(ref))
    # The text's next tokens are drawn from the reference, as real text is likely under it.
    tokens = np.array([rng.choice(vocab, p=row / row.sum()) for row in probs])
    acc = KldAccumulator(vocab)
    acc.add(noisy[:170], compress_log_probs(ref[:170]), tokens[:170])  # two calls, as chunks
    acc.add(noisy[170:], compress_log_probs(ref[170:]), tokens[170:])
    stats = acc.result()

    lp, lq = _log_softmax(ref), _log_softmax(noisy)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    idx = np.arange(n)
    dp = np.exp(lq[idx, tokens]) - np.exp(lp[idx, tokens])
    assert stats.count == n
    assert stats.mean_kld == pytest.approx(kld.mean(), rel=2e-3)
    assert stats.mean_kld_err == pytest.approx(kld.std(ddof=0) / np.sqrt(n - 1), rel=2e-2)
    assert stats.kld_percentiles["median"] == pytest.approx(np.median(kld), rel=5e-3)
    assert stats.kld_percentiles["max"] == pytest.approx(kld.max(), rel=5e-3)
    assert stats.kld_percentiles["99"] == pytest.approx(np.quantile(kld, 0.99), rel=5e-3)
    assert stats.same_top == int((lp.argmax(axis=1) == lq.argmax(axis=1)).sum())
    assert stats.rms_delta_p == pytest.approx(np.sqrt((dp * dp).mean()), rel=2e-3)
    assert stats.ppl == pytest.approx(np.exp(-lq[idx, tokens].mean()), rel=1e-4)
    assert stats.ppl_reference == pytest.approx(np.exp(-lp[idx, tokens].mean()), rel=1e-3)
    assert 0 < stats.same_top < n


def test_a_model_compared_with_itself_diverges_by_nothing() -> None:
    rng = np.random.default_rng(3)
    logits = _logits(rng, 64, 2000, 2.0)
    acc = KldAccumulator(2000)
    acc.add(logits, compress_log_probs(logits), rng.integers(0, 2000, 64))
    stats = acc.result()
    assert abs(stats.mean_kld) < 1e-5
    assert stats.same_top == 64
    assert stats.rms_delta_p < 1e-4


def test_accumulator_refuses_mismatched_shapes_and_empty_results() -> None:
    acc = KldAccumulator(10)
    with pytest.raises(ValueError, match="no positions were scored"):
        acc.result()
    with pytest.raises(ValueError, match="expected 3 positions"):
        acc.add(np.zeros((2, 10), np.float32), np.zeros((3, row_width(10)), np.uint16),
                np.zeros(3, np.int64))


def test_percentile_and_uncertainty_follow_llama_perplexity() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert percentile(values, 0.5) == 2.5  # the median of an even count
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert percentile(values, 0.9) == pytest.approx(3.7)
    assert mean_and_uncertainty(10.0, 30.0, 5) == (2.0, 0.0)  # ten values or fewer: no error
    mean, err = mean_and_uncertainty(20.0, 60.0, 20)
    assert mean == 1.0 and err == pytest.approx(np.sqrt(2.0 / 19))


def test_reference_file_round_trip_and_truncation(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n_ctx, vocab, n_chunk = 16, 101, 3
    tokens = rng.integers(0, vocab, n_ctx * n_chunk).astype(np.int32)
    chunks = [compress_log_probs(_logits(rng, scored_per_chunk(n_ctx), vocab, 2.0))
              for _ in range(n_chunk)]
    path = tmp_path / "ref.logits"
    w = LogprobWriter(path, n_ctx, vocab, tokens)
    for c in chunks:
        w.write_chunk(c)
    with pytest.raises(ValueError, match="already written"):
        w.write_chunk(chunks[0])
    w.close()
    assert path.stat().st_size == file_size(n_ctx, vocab, n_chunk)
    assert path.read_bytes()[:8] == b"_logits_"
    f = LogprobFile(path)
    assert (f.n_ctx, f.n_vocab, f.n_chunk) == (n_ctx, vocab, n_chunk)
    assert (f.chunk_tokens(1) == tokens[n_ctx:2 * n_ctx]).all()
    assert (f.chunk_rows(2) == chunks[2]).all()
    del f
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MathqError, match=r"has \d+ bytes, expected \d+ \(3 chunks of 16 "
                                         r"tokens, vocabulary 101\)"):
        LogprobFile(path)
    path.write_bytes(b"not a logits file at all")
    with pytest.raises(MathqError, match="is not a llama-perplexity log-probability file"):
        LogprobFile(path)
