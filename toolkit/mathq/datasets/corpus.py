"""The text KL divergence is measured on: mathq's bundled math notes, or a file of the user's.

The default is ``mathq/data/kld-corpus.md``, about 28 KB of mathematics prose with LaTeX
written for mathq (worked reasoning in algebra, number theory, geometry, counting,
probability, precalculus and calculus). It ships with the package, so ``mathq kld`` works
offline, and it is kept apart from the MATH problems the smoke test grades: none of its
text comes from a graded problem set. ``--corpus FILE`` measures on any UTF-8 text instead
(for example a dump of MATH's train split, or wikitext to compare with published tables).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mathq.errors import InputFileError
from mathq.inputs import UnreadableInput, read_text

BUNDLED_CORPUS = Path(__file__).resolve().parent / "data" / "kld-corpus.md"
BUNDLED_NAME = "mathq's bundled math notes"


@dataclass(frozen=True)
class Corpus:
    """A text to measure on, with a name for reports and a hash that keys the reference cache."""

    name: str
    text: str
    sha256: str
    #: The option that gives a longer text, for the error when it is too short for a chunk.
    option: str = "--corpus"


def load_corpus(path: Path | None = None) -> Corpus:
    """The bundled notes, or the UTF-8 file at ``path``.

    One trailing newline is dropped, as ``llama-perplexity -f`` does, so both tools see the
    same tokens.
    """
    source = BUNDLED_CORPUS if path is None else Path(path)
    try:
        text = read_text(source)
    except UnreadableInput as e:
        raise InputFileError(f"corpus file {e.describe(source)}",
                             "give an existing UTF-8 text file") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise InputFileError(f"corpus file {source} is empty", "give a file with some text")
    name = BUNDLED_NAME if path is None else source.name
    return Corpus(name=name, text=text, sha256=hashlib.sha256(text.encode()).hexdigest())
