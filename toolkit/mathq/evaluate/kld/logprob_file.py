"""The reference's log-probabilities on disk, in llama-perplexity's ``--kl-divergence-base`` format.

Layout (little-endian): the magic ``_logits_``, ``uint32 n_ctx``, ``int32 n_vocab``, ``int32
n_chunk``, then ``n_chunk * n_ctx`` int32 tokens, then for each chunk ``n_ctx - 1 - n_ctx // 2``
rows of :func:`mathq.evaluate.kld.stats.row_width` uint16 values (see
:func:`mathq.evaluate.kld.stats.compress_log_probs`). Using llama.cpp's own format means a file
mathq wrote can be given to ``llama-perplexity --kl-divergence-base FILE --kl-divergence`` and the
other way round, which is how mathq's figures are checked against llama.cpp's.

The writer appends one chunk at a time and the reader maps the file, so neither holds more
than a chunk of rows in memory.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mathq.errors import MathqError
from mathq.evaluate.kld.stats import row_width

MAGIC = b"_logits_"
_HEADER = struct.Struct("<8sIii")


def scored_per_chunk(n_ctx: int) -> int:
    """Positions scored in a chunk: the second half, less the last (it has no next token)."""
    return n_ctx - 1 - n_ctx // 2


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Bytes of a complete file."""
    return (_HEADER.size + 4 * n_ctx * n_chunk
            + 2 * n_chunk * scored_per_chunk(n_ctx) * row_width(n_vocab))


class LogprobWriter:
    """Writes the header and token stream, then one chunk of compact rows per call."""

    def __init__(self, path: Path, n_ctx: int, n_vocab: int, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype="<i4")
        if len(tokens) == 0 or len(tokens) % n_ctx:
            raise ValueError(f"{len(tokens)} tokens is not a whole number of {n_ctx}-token chunks")
        self.n_ctx, self.n_vocab = n_ctx, n_vocab
        self.n_chunk = len(tokens) // n_ctx
        self.written = 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(_HEADER.pack(MAGIC, n_ctx, n_vocab, self.n_chunk))
        self._f.write(tokens.tobytes())

    def write_chunk(self, rows: np.ndarray) -> None:
        """Append one chunk's rows (``scored_per_chunk(n_ctx)`` by ``row_width(n_vocab)``)."""
        expected = (scored_per_chunk(self.n_ctx), row_width(self.n_vocab))
        if rows.shape != expected or rows.dtype != np.uint16:
            raise ValueError(f"expected uint16 rows of shape {expected}, got {rows.dtype} "
                             f"{rows.shape}")
        if self.written >= self.n_chunk:
            raise ValueError(f"all {self.n_chunk} chunks were already written")
        self._f.write(np.ascontiguousarray(rows, dtype="<u2").tobytes())
        self.written += 1

    def close(self) -> None:
        """Flush and close; the caller renames the file into place once complete."""
        self._f.close()


class LogprobFile:
    """A complete reference file, mapped read-only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic, n_ctx, n_vocab, n_chunk = _HEADER.unpack(f.read(_HEADER.size))
        except (OSError, struct.error) as e:
            raise MathqError(f"cannot read reference log-probabilities {self.path}: {e}",
                             "delete it; `mathq kld` computes it again") from e
        if magic != MAGIC or n_ctx <= 0 or n_vocab <= 0 or n_chunk <= 0:
            raise MathqError(f"{self.path} is not a llama-perplexity log-probability file",
                             "delete it; `mathq kld` computes it again")
        expected = file_size(n_ctx, n_vocab, n_chunk)
        actual = self.path.stat().st_size
        if actual != expected:
            raise MathqError(f"{self.path} has {actual} bytes, expected {expected} "
                             f"({n_chunk} chunks of {n_ctx} tokens, vocabulary {n_vocab})",
                             "it was cut short; delete it and rerun `mathq kld`")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
        self.tokens = np.memmap(self.path, dtype="<i4", mode="r", offset=_HEADER.size,
                                shape=(n_chunk * n_ctx,))
        self._rows = np.memmap(self.path, dtype="<u2", mode="r",
                               offset=_HEADER.size + 4 * n_chunk * n_ctx,
                               shape=(n_chunk, scored_per_chunk(n_ctx), row_width(n_vocab)))

    def chunk_tokens(self, i: int) -> np.ndarray:
        """The ``n_ctx`` tokens of chunk ``i`` (as stored, before BOS replaces the first)."""
        return np.asarray(self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx])

    def chunk_rows(self, i: int) -> np.ndarray:
        """Chunk ``i``'s compact rows, read from disk now."""
        return np.asarray(self._rows[i])
