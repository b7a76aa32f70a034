"""The report's three plots against file size, as PNG and SVG, with matplotlib's Agg backend.

accuracy: MATH accuracy with Wilson 95 % bars, the reference's interval shaded and the
published figure dashed. kld: mean KL divergence on a log scale with its standard error
and the advice's bound. speed: prompt and generation tokens per second (log scale, ± sd).
A plot with nothing to show says so in its middle rather than drawing an empty frame; a
variant missing a figure is simply not drawn (never drawn at zero). Variants made with an
importance matrix are drawn as open diamonds, labelled below the point, so they stand apart
from their plain sibling of (almost) the same size.

SVGs are written without timestamps and with per-plot id salts, so reruns give the same
bytes and the three can be inlined in one HTML page without clashing ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.fsutil import atomic_output
from mathq.report.table import ReportData, VariantRow

PLOT_NAMES = ("accuracy", "kld", "speed")
_COLORS = {"main": "#1f5f99", "second": "#c2572b", "ref": "#6b6b6b"}


@dataclass(frozen=True)
class Plot:
    """One plot's files and its title (the alt text of report.md)."""

    name: str
    title: str
    png: Path
    svg: Path
    points: int


def _figure(unit: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.1, y=0.12)  # room for the point labels at the edges
    ax.set_xlabel(f"file size ({unit})")
    return fig, ax


def _label_points(ax: Any, xs: list[float], ys: list[float], rows: list[VariantRow]) -> None:
    for x, y, row in zip(xs, ys, rows, strict=True):
        below = row.made_with_imatrix  # its plain sibling's label sits above
        ax.annotate(row.quant, (x, y), textcoords="offset points",
                    xytext=(7, -3 if below else 2), fontsize=8, va="top" if below else "bottom")


def _imatrix_style(rows: list[VariantRow]) -> tuple[list[VariantRow], list[VariantRow]]:
    """Rows without and with an importance matrix, drawn as two series."""
    return ([r for r in rows if not r.made_with_imatrix],
            [r for r in rows if r.made_with_imatrix])


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} measured yet", transform=ax.transAxes, ha="center",
            va="center", color=_COLORS["ref"])
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy(ax: Any, data: ReportData) -> int:
    rows = [r for r in data.rows if r.size_bytes is not None and r.accuracy is not None]
    ax.set_title(f"{data.model}: MATH accuracy vs size")
    ax.set_ylabel("MATH accuracy (%), 95 % CI")
    if not rows:
        _empty(ax, "MATH accuracy")
        return 0
    xs = [data.size_in_unit(r) for r in rows]
    ys = [100 * r.accuracy.value for r in rows]
    lo = [100 * (r.accuracy.value - r.accuracy.low) for r in rows]
    hi = [100 * (r.accuracy.high - r.accuracy.value) for r in rows]
    ref = next((r for r in rows if r.quant == data.accuracy_reference), None)
    if ref is not None:
        ax.axhspan(100 * ref.accuracy.low, 100 * ref.accuracy.high, color=_COLORS["ref"],
                   alpha=0.12, label=f"{ref.quant} interval")
    if data.paper_accuracy is not None:
        ax.axhline(data.paper_accuracy, color=_COLORS["second"], linestyle="--", linewidth=1,
                   label=f"paper ({data.paper_accuracy:g} %)")
    for group, fmt, label in zip(_imatrix_style(rows), ("o", "D"),
                                 ("measured", "with importance matrix"), strict=True):
        idx = [rows.index(r) for r in group]
        if idx:
            ax.errorbar([xs[i] for i in idx], [ys[i] for i in idx],
                        yerr=[[lo[i] for i in idx], [hi[i] for i in idx]], fmt=fmt,
                        color=_COLORS["main"], capsize=4, label=label,
                        mfc="none" if fmt == "D" else None)
    _label_points(ax, xs, ys, rows)
    ax.legend(loc="best", fontsize=8)
    return len(rows)


def _kld(ax: Any, data: ReportData, bound: float) -> int:
    rows = [r for r in data.rows if r.size_bytes is not None and r.mean_kld is not None
            and r.mean_kld > 0]
    ref = data.kld_reference or "reference"
    ax.set_title(f"{data.model}: KL divergence from {ref} vs size")
    ax.set_ylabel("mean KLD (nats/token, log scale)")
    if not rows:
        _empty(ax, "KL divergence")
        return 0
    xs = [data.size_in_unit(r) for r in rows]
    ys = [r.mean_kld for r in rows]
    errs = [min(r.mean_kld_err or 0.0, 0.999 * r.mean_kld) for r in rows]
    ax.set_yscale("log")
    for group, fmt, label in zip(_imatrix_style(rows), ("o", "D"),
                                 ("mean KLD ± s.e.", "with importance matrix"), strict=True):
        idx = [rows.index(r) for r in group]
        if idx:
            ax.errorbar([xs[i] for i in idx], [ys[i] for i in idx],
                        yerr=[errs[i] for i in idx], fmt=fmt, color=_COLORS["main"],
                        capsize=4, label=label, mfc="none" if fmt == "D" else None)
    ax.axhline(bound, color=_COLORS["second"], linestyle="--", linewidth=1,
               label=f"advice bound ({bound:g})")
    _label_points(ax, xs, ys, rows)
    ax.legend(loc="best", fontsize=8)
    return len(rows)


def _speed(ax: Any, data: ReportData) -> int:
    ax.set_title(f"{data.model}: speed vs size")
    ax.set_ylabel("tokens per second (log scale)")
    drawn = 0
    for attr, label, color in (("prompt_tps", "prompt (pp512)", _COLORS["main"]),
                               ("generation_tps", "generation (tg128)", _COLORS["second"])):
        rows: list[VariantRow] = [r for r in data.rows if r.size_bytes is not None
                                  and getattr(r, attr) is not None and getattr(r, attr).mean > 0]
        if not rows:
            continue
        xs = [data.size_in_unit(r) for r in rows]
        ys = [getattr(r, attr).mean for r in rows]
        errs = [min(getattr(r, attr).sd, 0.999 * getattr(r, attr).mean) for r in rows]
        ax.errorbar(xs, ys, yerr=errs, fmt="o-", color=color, capsize=4, label=label)
        _label_points(ax, xs, ys, rows)
        drawn += len(rows)
    if not drawn:
        _empty(ax, "speed")
        return 0
    ax.set_yscale("log")
    ax.legend(loc="best", fontsize=8)
    return drawn


def write_plots(data: ReportData, out_dir: Path, kld_bound: float) -> tuple[Plot, ...]:
    """Draw the three plots into ``out_dir`` (PNG and SVG each, written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    titles = {"accuracy": "MATH accuracy vs file size", "kld": "KL divergence vs file size",
              "speed": "Tokens per second vs file size"}
    plots = []
    for name in PLOT_NAMES:
        with matplotlib.rc_context({"svg.hashsalt": f"mathq-{name}", "svg.fonttype": "none",
                                    "font.size": 9}):
            fig, ax = _figure(data.size_unit[0])
            try:
                if name == "accuracy":
                    points = _accuracy(ax, data)
                elif name == "kld":
                    points = _kld(ax, data, kld_bound)
                else:
                    points = _speed(ax, data)
                fig.tight_layout()
                png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
                with atomic_output(png) as tmp:
                    fig.savefig(tmp, format="png", metadata={"Software": None})
                with atomic_output(svg) as tmp:
                    fig.savefig(tmp, format="svg", metadata={"Date": None})
            finally:
                plt.close(fig)
        plots.append(Plot(name, titles[name], png, svg, points))
    return tuple(plots)
