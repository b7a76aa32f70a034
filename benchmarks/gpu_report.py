"""The text summary of `benchmarks/gpu.py run` (``$OUT/gpu.txt``), from its JSON record.

Anything not measured (a phase skipped for the budget, or failed) shows as ``-``.
"""

from __future__ import annotations

from typing import Any

GiB = 1 << 30


def _num(value: Any, fmt: str = ",.1f") -> str:
    return "-" if value is None else format(value, fmt)


def _mean_sd(value: dict[str, Any] | None) -> str:
    if not value:
        return "-"
    return f"{value['mean']:,.1f} ± {value['sd']:,.1f}"


def _per_hour(problems: Any, seconds: Any) -> float | None:
    if not problems or not seconds:
        return None
    return problems / seconds * 3600


def headline(report: dict[str, Any]) -> str:
    c = report.get("config", {})
    llama = report.get("llama") or {}
    device = llama.get("device") or "?"
    build = report.get("build") or {}
    params = (report.get("model") or {}).get("parameters")
    how = {"cuda": f"CUDA build for sm_{c.get('arch')}", "cpu": "CPU build",
           "installed": "this interpreter's llama-cpp-python (dry run)"}.get(c.get("llama"), "")
    lines = [f"mathq on {device}: llama-cpp-python {llama.get('llama_cpp', '?')}, {how}",
             f"model: DeepSeek-shaped, random weights, {c.get('layers')} of 30 layers (hidden "
             f"{c.get('hidden')}, FFN {c.get('ffn')}, {c.get('heads')} heads, vocabulary "
             f"102400)" + (f", {params / 1e9:.2f} B parameters" if params else "")]
    if build.get("seconds"):
        lines.append(f"build: {build['seconds']:.0f} s with {build.get('jobs')} jobs "
                     f"({build.get('cmake_args')})"
                     + (", in an earlier run" if build.get("reused") else ""))
    return "\n".join(lines)


def speed_table(report: dict[str, Any]) -> list[str]:
    c = report.get("config", {})
    ps = [p for p in str(c.get("bench_parallel", "")).split(",") if p]
    lines = ["", f"mathq bench (pp512, tg128: t/s, mean ± sd of {c.get('bench_reps')}; "
             f"aggregate generation t/s at P = {', '.join(ps)}):",
             f"{'kind':<7} {'GiB':>6} {'pp512':>17} {'tg128':>15}  "
             f"{' / '.join(f'P={p}' for p in ps):<32} {'VRAM GiB':>8}  layers on GPU"]
    for kind, r in (report.get("results") or {}).items():
        b = (r or {}).get("bench") or {}
        agg = " / ".join(_num((b.get("throughput_by_parallel") or {}).get(p), ",.0f")
                         for p in ps)
        size = b.get("file_size")
        vram = b.get("vram_bytes")
        layers = (f"{b['gpu_layers']}/{b['offloadable_layers']}"
                  if b.get("offloadable_layers") else "-")
        lines.append(f"{kind:<7} {_num(size / GiB if size else None, '.2f'):>6} "
                     f"{_mean_sd(b.get('prompt_tokens_per_second')):>17} "
                     f"{_mean_sd(b.get('generation_tokens_per_second')):>15}  {agg:<32} "
                     f"{_num(vram / GiB if vram is not None else None, '.2f'):>8}  {layers}")
    return lines


def smoke_table(report: dict[str, Any]) -> list[str]:
    c = report.get("config", {})
    lines = ["", f"smoke throughput: MATH-500, {c.get('n')} problems (loop: the first "
             f"{c.get('loop_n')}), exactly {c.get('max_tokens')} new tokens each",
             f"{'kind':<7} {'P auto':>6} {'mathq tok/s':>12} {'problems/h':>11} "
             f"{'loop tok/s':>11} {'problems/h':>11} {'mathq/loop':>10}"]
    reasons = []
    for kind, r in (report.get("results") or {}).items():
        s = (r or {}).get("smoke") or {}
        lp = (r or {}).get("loop") or {}
        ours = _per_hour(s.get("problems"), s.get("wall_seconds"))
        theirs = _per_hour(lp.get("problems"), lp.get("seconds"))
        ratio = ours / theirs if ours and theirs else None
        lines.append(f"{kind:<7} {_num(s.get('parallel'), 'd'):>6} "
                     f"{_num(s.get('generation_tokens_per_second')):>12} "
                     f"{_num(ours, ',.0f'):>11} "
                     f"{_num(lp.get('generation_tokens_per_second')):>11} "
                     f"{_num(theirs, ',.0f'):>11} {_num(ratio, '.2f'):>10}")
        choice = s.get("parallel_choice") or {}
        if choice.get("reason"):
            reasons.append(f"  {kind}: P = {choice.get('parallel')}: {choice['reason']}")
    if reasons:
        lines += ["--parallel auto chose:", *reasons]
    return lines


def phase_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "phases (seconds):"]
    for p in report.get("phases", []):
        detail = f"  {p['detail'].splitlines()[0]}" if p.get("detail") else ""
        lines.append(f"  {p['name']:<18} {p.get('status', '?'):<8} "
                     f"{_num(p.get('seconds'), '.1f'):>7}{detail}")
    lines.append(f"  total {report.get('elapsed_s', 0):.1f} s of a {report.get('budget_s', 0):.0f}"
                 " s budget")
    return lines


def render_text(report: dict[str, Any]) -> str:
    """Headline, speed table, smoke-throughput table and the phases' times."""
    notes = [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join([headline(report), *notes, *speed_table(report), *smoke_table(report),
                      *phase_lines(report)])
