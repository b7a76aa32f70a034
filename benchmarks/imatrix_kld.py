"""Does a mathq importance matrix help? Mean KL divergence to BF16, with and without it.

Quantizes a BF16 GGUF with mathq (plain, and with ``--imatrix``), then lets llama.cpp's own
``llama-perplexity --kl-divergence`` measure each variant against the BF16 model's logits
on an evaluation text that must not be the calibration text (e.g. held-out problems; no
special-token text in it, which llama-perplexity would read as plain characters).
Prints mean KLD and same-top-token rate per type, and the ratio imatrix / plain.

    .venv/bin/python benchmarks/imatrix_kld.py --model M-BF16.gguf --imatrix M.imatrix.gguf \\
        --text eval.txt [--quants Q2_K,Q3_K_M,Q4_K_M,IQ2_XXS,IQ3_XXS] [--ctx 512]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import CACHE, tool
from mathq.quantize.core import QuantizeOptions, quantize_gguf
from mathq.recipes.quants import get_quant

_MEAN_KLD = re.compile(r"^Mean\s+KLD:\s+([0-9.eE+-]+)", re.MULTILINE)
_SAME_TOP = re.compile(r"^Same top p:\s+([0-9.]+)", re.MULTILINE)


def perplexity(args: list[str], want: re.Pattern[str] | None = None) -> str:
    """Run llama-perplexity. Its last log lines are sometimes lost at exit (the vendored
    build's asynchronous logger; about one run in four here), so a run whose summary is
    missing is repeated: the computation is deterministic, only the printing is not."""
    for _ in range(5):
        done = subprocess.run([str(tool("llama-perplexity")), *args], capture_output=True,
                              text=True, check=True)
        log = done.stdout + done.stderr
        if want is None or want.search(log):
            break
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--imatrix", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--quants", default="Q2_K,Q3_K_M,Q4_K_M,IQ2_XXS,IQ3_XXS")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = CACHE / "imatrix-kld" / args.model.stem
    work.mkdir(parents=True, exist_ok=True)
    base = work / "bf16.logits"
    # llama-perplexity has no --parse-special: keep special-token text out of the eval text
    common = ["-f", str(args.text), "-c", str(args.ctx), "-t", str(args.threads)]
    perplexity(["-m", str(args.model), "--kl-divergence-base", str(base), *common])
    print(f"model {args.model.name}, eval text {args.text.name}, ctx {args.ctx}")
    print(f"{'type':<9} {'plain KLD':>10} {'imatrix KLD':>12} {'ratio':>6} "
          f"{'plain top1':>10} {'imx top1':>9}")
    for name in args.quants.split(","):
        quant = get_quant(name)
        row = {}
        for label, imatrix in (("plain", None), ("imatrix", args.imatrix)):
            if imatrix is None and quant.requires_imatrix:
                continue
            out = work / f"{name}-{label}.gguf"
            quantize_gguf(args.model, out, QuantizeOptions(quant, imatrix=imatrix,
                                                           threads=args.threads))
            log = perplexity(["-m", str(out), "--kl-divergence-base", str(base),
                              "--kl-divergence", *common], want=_SAME_TOP)
            kld, top = _MEAN_KLD.search(log), _SAME_TOP.search(log)
            if kld is None or top is None:
                raise SystemExit(f"no KLD in llama-perplexity's output for {out.name}:\n{log}")
            row[label] = (float(kld.group(1)), float(top.group(1)))
        plain = row.get("plain")
        imx = row["imatrix"]
        ratio = f"{imx[0] / plain[0]:6.2f}" if plain else "     -"
        print(f"{name:<9} {plain[0] if plain else float('nan'):10.5f} {imx[0]:12.5f} {ratio} "
              f"{plain[1] if plain else float('nan'):9.2f}% {imx[1]:8.2f}%")


if __name__ == "__main__":
    main()
