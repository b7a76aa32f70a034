"""A smoke run's results file: one JSON record per problem, appended as each is graded.

Each record is flushed to disk before the next problem is taken, so a run killed at any
moment leaves whole records and at most one line cut short, which the next reader drops.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mathq.errors import ProblemSetError
from mathq.evaluate.grading.grade import ProblemResult, first_bad_token_id
from mathq.inputs import UnreadableInput, parse_json


def read_results_log(path: Path) -> dict[str, ProblemResult]:
    """Finished records by id (a later line wins), repairing a last line cut by a kill.

    A final line without its newline is kept if it is a whole record (its newline is
    added) and cut off otherwise. A broken line anywhere else is an error: the file was
    damaged by something other than an interrupted append.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    records: dict[str, ProblemResult] = {}
    offset = 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        last = lineno == len(lines)
        if last and not raw:
            break
        try:
            row = parse_json(raw.decode("utf-8")) if raw.strip() else None
            result = (ProblemResult.from_json(row, f"{path}:{lineno}")
                      if isinstance(row, dict) else None)
        except (UnicodeDecodeError, UnreadableInput, ProblemSetError, TypeError) as e:
            if last:  # torn by a kill mid-append: drop it
                with open(path, "r+b") as f:
                    f.truncate(offset)
                break
            # A record's own error already names the file and line.
            problem = (e.message if isinstance(e, ProblemSetError)
                       else f"{path}:{lineno}: damaged results line ({e})")
            raise ProblemSetError(problem, "pass --restart to discard these results",
                                  path=str(path), line=lineno) from e
        if result is None and raw.strip():
            raise ProblemSetError(f"{path}:{lineno}: expected a JSON object",
                                  "pass --restart to discard these results",
                                  path=str(path), line=lineno)
        if result is not None:
            records[result.id] = result
        offset += len(raw) + 1
        if last:  # a whole record without its newline
            with open(path, "ab") as f:
                f.write(b"\n")
    return records


def append_result(f: Any, result: ProblemResult) -> None:
    """Append one record as a line and force it to disk before going on."""
    f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_draft_reference(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Completions by problem id from a results file, each with the token ids it was
    generated as (empty where the file has none or they are not a list of token ids),
    read only: drafts to check, so a damaged line is skipped rather than repaired or
    refused."""
    completions: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return completions
    for raw in lines:
        try:
            row = parse_json(raw)
        except UnreadableInput:
            continue
        if isinstance(row, dict) and isinstance(row.get("completion"), str) \
                and isinstance(row.get("id"), (str, int)):
            ids = row.get("completion_ids")
            valid = isinstance(ids, list) and first_bad_token_id(ids) is None
            completions[str(row["id"])] = (row["completion"], tuple(ids) if valid else ())
    return completions
