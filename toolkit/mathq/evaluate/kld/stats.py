"""KL divergence of next-token distributions: llama-perplexity's statistics, in numpy.

``llama-perplexity --kl-divergence`` compares a model with a reference one position at a time.
The reference pass stores, for every scored position, the reference's log-probabilities in a
compact form: 16-bit integers spread linearly over the top 16 nats below the largest logit,
plus a float scale and offset (:func:`compress_log_probs`). That is 2 bytes per vocabulary entry
instead of 4, and exact to about 1e-4 nats where it matters: the most likely token maps
exactly onto the top code, and a token 16 nats below the top has a probability under 1.2e-7,
so its share of the divergence is negligible. The comparison pass then accumulates, per
position, the KL divergence ``sum p_ref * (log p_ref - log p)`` over the tokens the reference
gives more than ``e^-16``, whether both models rank the same token first, and the change in
the probability of the text's actual next token (:class:`KldAccumulator`).

mathq keeps this exact definition (same rounding, same cut-off, same uncertainty formulas,
same percentile interpolation) so that its figures can be compared with llama.cpp's own tool,
and its reference file is llama-perplexity's ``--kl-divergence-base`` format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The reference's log-probabilities are kept over this many nats below the top logit.
LOG_PROB_RANGE = 16.0
# Reference tokens whose log-probability is not above this are left out of the KL sum.
LOG_PROB_FLOOR = -16.0
_LEVELS = 65535.0
# Positions are processed this many at a time, so temporaries stay a few tens of MB.
BLOCK_ROWS = 16

# Percentiles llama-perplexity prints, by the label mathq stores them under.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90),
    ("median", 0.5), ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001), ("min", 0.0),
)


def row_width(n_vocab: int) -> int:
    """uint16 entries per position: two float32 (scale, offset) then the vocabulary, padded."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _log_sum_exp(logits: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Per row ``log(sum(exp(logits - top)))``: float32 terms summed in float64, as llama.cpp."""
    terms = np.exp(logits - top[:, None])
    return np.log(terms.sum(axis=1, dtype=np.float64)).astype(np.float32)


def compress_log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of float32 logits -> rows of the compact reference form (:func:`row_width` wide)."""
    logits = np.asarray(logits, dtype=np.float32)
    rows, n_vocab = logits.shape
    out = np.zeros((rows, row_width(n_vocab)), dtype=np.uint16)
    for s in range(0, rows, BLOCK_ROWS):
        block = logits[s:s + BLOCK_ROWS]
        top = block.max(axis=1)
        low = np.maximum(block.min(axis=1), top - np.float32(LOG_PROB_RANGE))
        lse = _log_sum_exp(block, top)
        min_log_prob = (low - top - lse).astype(np.float32)
        scale = ((top - low) / np.float32(_LEVELS)).astype(np.float32)
        header = np.stack([scale, min_log_prob], axis=1).astype(np.float32)
        out[s:s + len(block), :4] = header.view(np.uint16)
        with np.errstate(divide="ignore"):
            inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        codes = np.rint(inv[:, None] * (block - low[:, None]))
        codes = np.where(block > low[:, None], np.clip(codes, 0, _LEVELS), 0)
        out[s:s + len(block), 4:4 + n_vocab] = codes.astype(np.uint16)
    return out


def decode_log_probs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Compact rows -> float32 log-probabilities (entries below the kept range read as its
    floor)."""
    rows = np.asarray(rows, dtype=np.uint16)
    header = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    scale, offset = header[:, 0], header[:, 1]
    return (scale[:, None] * rows[:, 4:4 + n_vocab].astype(np.float32)
            + offset[:, None]).astype(np.float32)


def mean_and_uncertainty(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean and its standard error from a sum and a sum of squares (llama-perplexity's rule:
    no error is claimed from ten values or fewer)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total_sq / count - mean * mean
    return mean, (float(np.sqrt(var / (count - 1))) if var > 0 and count > 10 else 0.0)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between order statistics, as llama-perplexity does."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - p) * sorted_values[i] + p * sorted_values[j])


@dataclass(frozen=True)
class KldStats:
    """Statistics over every scored position (llama-perplexity's final block)."""

    count: int
    mean_kld: float
    mean_kld_err: float
    kld_percentiles: dict[str, float]
    same_top: int
    rms_delta_p: float
    rms_delta_p_err: float
    mean_delta_p: float
    mean_delta_p_err: float
    ppl: float
    ppl_reference: float


class KldAccumulator:
    """Collects per-position figures chunk by chunk; memory grows with positions, not vocab."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._kld: list[np.ndarray] = []
        self._p_diff: list[np.ndarray] = []
        self._nll: list[np.ndarray] = []
        self._nll_ref: list[np.ndarray] = []
        self._same_top = 0

    @property
    def count(self) -> int:
        """Positions accumulated so far."""
        return sum(len(k) for k in self._kld)

    @property
    def mean_kld(self) -> float:
        """The running mean KL divergence, for progress lines."""
        n = self.count
        return sum(float(k.sum()) for k in self._kld) / n if n else 0.0

    def add(self, logits: np.ndarray, reference_rows: np.ndarray,
            next_tokens: np.ndarray) -> None:
        """Add positions: this model's logits, the reference's compact rows, the true next tokens.

        ``logits`` may be a view into llama.cpp's output buffer; it is only read.
        """
        n = len(next_tokens)
        if logits.shape[0] != n or reference_rows.shape[0] != n:
            raise ValueError(f"expected {n} positions, got {logits.shape[0]} logits and "
                             f"{reference_rows.shape[0]} reference rows")
        for s in range(0, n, BLOCK_ROWS):
            self._add_block(np.asarray(logits[s:s + BLOCK_ROWS], dtype=np.float32),
                            reference_rows[s:s + BLOCK_ROWS],
                            np.asarray(next_tokens[s:s + BLOCK_ROWS], dtype=np.int64))

    def _add_block(self, logits: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> None:
        idx = np.arange(len(tokens))
        top = logits.max(axis=1)
        top_token = logits.argmax(axis=1)
        lse = _log_sum_exp(logits, top)
        nll = (top + lse - logits[idx, tokens]).astype(np.float32)
        ref = decode_log_probs(rows, self.n_vocab)
        nll_ref = -ref[idx, tokens]
        log_z = (top + lse).astype(np.float32)
        kept = ref > np.float32(LOG_PROB_FLOOR)
        terms = np.where(kept, np.exp(ref) * (ref - logits + log_z[:, None]), np.float32(0))
        kld = terms.sum(axis=1, dtype=np.float64)
        # The reference's top token, read from its codes (the first on a tie, as llama.cpp).
        self._same_top += int(np.count_nonzero(ref.argmax(axis=1) == top_token))
        p_diff = np.exp(-nll) - np.exp(-nll_ref)
        self._kld.append(kld)
        self._p_diff.append(p_diff.astype(np.float64))
        self._nll.append(nll.astype(np.float64))
        self._nll_ref.append(nll_ref.astype(np.float64))

    def result(self) -> KldStats:
        """The statistics so far; raises ValueError when nothing was added."""
        if not self._kld:
            raise ValueError("no positions were scored")
        kld = np.concatenate(self._kld)
        p_diff = np.concatenate(self._p_diff)
        nll = np.concatenate(self._nll)
        nll_ref = np.concatenate(self._nll_ref)
        n = len(kld)
        mean_kld, err_kld = mean_and_uncertainty(float(kld.sum()), float((kld * kld).sum()), n)
        sq = p_diff * p_diff
        mse, mse_err = mean_and_uncertainty(float(sq.sum()), float((sq * sq).sum()), n)
        rms = float(np.sqrt(mse))
        rms_err = 0.5 / rms * mse_err if rms > 0 else 0.0
        mean_dp, err_dp = mean_and_uncertainty(float(p_diff.sum()), float(sq.sum()), n)
        ordered = np.sort(kld.astype(np.float32))
        return KldStats(
            count=n, mean_kld=mean_kld, mean_kld_err=err_kld,
            kld_percentiles={label: percentile(ordered, f) for label, f in PERCENTILES},
            same_top=self._same_top, rms_delta_p=rms, rms_delta_p_err=rms_err,
            mean_delta_p=mean_dp, mean_delta_p_err=err_dp,
            ppl=float(np.exp(nll.mean())), ppl_reference=float(np.exp(nll_ref.mean())))
