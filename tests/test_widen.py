"""benchmarks/widen.py: the trained demo at a larger shape answers exactly as the demo does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.widen import Shape, widen  # noqa: E402


def _greedy(path: Path, prompts: list[str], n: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens for each prompt, and the real tokens' logits at every step."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    answers, logits = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=True))
        out: list[int] = []
        while len(out) < n:
            row = np.array(llm.scores[llm.n_tokens - 1])
            out.append(int(row.argmax()))
            logits.append(row[:768])
            if out[-1] == llm.token_eos():
                break
            llm.eval([out[-1]])
        answers.append(out)
    llm.close()
    return answers, np.array(logits)


def test_a_widened_demo_gives_the_demos_answers(demo_bf16_gguf, tmp_path):
    from gguf import GGUFReader

    from mathq.recipes.prompt import render_prompt
    from mathq.recipes.recipe import load_recipe

    wide = tmp_path / "wide.gguf"
    widen(demo_bf16_gguf, wide, Shape(n_embd=512, n_ff=1024, n_layer=6, n_vocab=2048))
    fields = GGUFReader(wide).fields
    assert fields["llama.embedding_length"].contents() == 512
    assert fields["llama.attention.head_count"].contents() == 8  # heads of the demo's 64
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 2048
    spec = load_recipe("tiny-demo").prompt
    rows = [json.loads(line) for line in
            (ROOT / "models/tiny-demo/problems-distractor.jsonl").read_text().splitlines()[:8]]
    prompts = [render_prompt(spec, r["problem"]) for r in rows]
    demo, demo_logits = _greedy(demo_bf16_gguf, prompts, 48)
    ours, our_logits = _greedy(wide, prompts, 48)
    assert ours == demo
    # Float rounding of the rescaled norms only: far below the demo's top-2 gaps.
    assert np.abs(our_logits - demo_logits).max() < 0.1
