"""Shared set-up of the publish tests: a recipe, real quantized GGUFs in a build folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

RECIPE = """\
[model]
name = "tiny"
hf_repo = "deepseek-ai/deepseek-math-7b-rl"
kind = "chat"
license_name = "DeepSeek License"
license_url = "https://github.com/deepseek-ai/DeepSeek-Math/blob/main/LICENSE-MODEL"

[prompt]
template = "deepseek-chat"

[quants]
variants = ["Q4_K_M", "Q8_0"]

[ollama]
model = "tiny"

[ollama.tags]
latest = "Q4_K_M"
q8 = "Q8_0"
q4 = "Q4_K_M"

[ollama.parameters]
temperature = 0.0
repeat_penalty = 1.0
num_predict = {num_predict}

[smoke]
n = 20
max_tokens = 512
"""


def write_recipe(folder: Path, num_predict: int = 512) -> Path:
    """A chat recipe whose three tags use two quantizations."""
    path = folder / "tiny.toml"
    path.write_text(RECIPE.replace("{num_predict}", str(num_predict)), encoding="utf-8")
    return path


def build_folder(root: Path, ggufs: dict[str, Path], copy: bool = False) -> Path:
    """``root/tiny/tiny-<QUANT>.gguf`` for each GGUF: hard links (cheap) or copies."""
    folder = root / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    for quant, src in ggufs.items():
        dst = folder / f"tiny-{quant}.gguf"
        if copy:
            shutil.copyfile(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return root
