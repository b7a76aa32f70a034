"""The report's three plots against bits per weight, as PNG and SVG, with matplotlib's Agg.

accuracy: each variant's MATH accuracy minus BF16's on the same problems with Newcombe's
paired 95 % interval (or, without a smoke-tested BF16, plain accuracy with Wilson
intervals). kld: mean KL divergence from BF16 on a log scale with its standard error, the
frontier drawn through the qualifying variants no other beats on both size and divergence.
speed: prompt processing and generation, side by side, ± sd.

Every variant is one marker at its file's bits per weight (log-2 axis); markers are never
joined across types. Kinds are told apart by shape and colour (stock: filled circles;
``-imat``: open diamonds; ``-tuned``: filled triangles; ``-imat-tuned``: open triangles pointing
down; BF16: a black square), the pick of each
size class is ringed and starred, and a variant that loses accuracy significantly is drawn
faded. A plot with nothing to show says so in its middle rather than drawing an empty frame;
a variant missing a figure is simply not drawn (never at zero).

Figures are 9.6 x 5 inches, written as PNG at 200 dpi (1920 px: sharp at 960 px on a 2x
screen) and as SVG without timestamps and with per-plot id salts, so reruns give the same
bytes and the three can be inlined in one HTML page without clashing ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.fsutil import atomic_outputs
from mathq.report.table import FULL_PRECISION, ReportData, VariantRow

PLOT_NAMES = ("accuracy", "kld", "speed")
TITLES = {"accuracy": "MATH accuracy against BF16 by bits per weight",
          "kld": "KL divergence from BF16 by bits per weight, with the frontier",
          "speed": "Tokens per second by bits per weight"}
COLORS = {"stock": "#1f5f99", "imatrix": "#c2572b", "tuned": "#2a8a4a",
          "imatrix-tuned": "#6b3fa0", "reference": "#1d1d1f",
          "frontier": "#8a8a8a", "pick": "#d4a20a", "zero": "#6b6b6b"}
_MARKERS = {"stock": ("o", True), "imatrix": ("D", False), "tuned": ("^", True),
            "imatrix-tuned": ("v", False), "reference": ("s", True)}
_KIND_LABELS = {"stock": "stock", "imatrix": "importance matrix (-imat)",
                "tuned": "tuned (-tuned)", "imatrix-tuned": "tuned with a matrix (-imat-tuned)",
                "reference": "BF16"}
FIGSIZE = (9.6, 5.0)
PNG_DPI = 200


@dataclass(frozen=True)
class Plot:
    """One plot's files and its title (the alt text of report.md)."""

    name: str
    title: str
    png: Path
    svg: Path
    points: int


def _kind(row: VariantRow) -> str:
    return "reference" if row.quant == FULL_PRECISION else row.kind


def _style_axis(ax: Any, rows: list[VariantRow]) -> None:
    ax.set_xscale("log", base=2)
    bpws = [r.bits_per_weight for r in rows if r.bits_per_weight]
    ticks = [t for t in (1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16, 32)
             if bpws and min(bpws) / 1.3 <= t <= max(bpws) * 1.3]
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xlim(min(bpws) / 1.25, max(bpws) * 1.25)
    ax.minorticks_off()
    ax.set_xlabel("bits per weight (log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} measured yet", transform=ax.transAxes, ha="center",
            va="center", color=COLORS["zero"])
    ax.set_xticks([])
    ax.set_yticks([])


def _point(ax: Any, row: VariantRow, x: float, y: float, yerr: list[list[float]], faded: bool,
           seen: set[str]) -> None:
    """One variant: its kind's marker with error bars, no line to any other point. An
    interval's bound computed in floating point may round a hair past its value (a Wilson
    bound at 100 %): such an error bar is drawn as zero, which matplotlib accepts."""
    yerr = [[max(0.0, v) for v in side] for side in yerr]
    kind = _kind(row)
    marker, filled = _MARKERS[kind]
    color = COLORS[kind]
    label = _KIND_LABELS[kind] if kind not in seen else None
    seen.add(kind)
    ax.errorbar([x], [y], yerr=yerr, fmt=marker, linestyle="none", color=color, capsize=4,
                markersize=8, mfc=color if filled else "white", mew=1.6,
                alpha=0.35 if faded else 1.0, label=label, zorder=3)


def _label(ax: Any, row: VariantRow, x: float, y: float, below: bool = False) -> None:
    ax.annotate(row.quant, (x, y), textcoords="offset points", xytext=(9, -4 if below else 3),
                fontsize=9, va="top" if below else "bottom", zorder=4)


def _ring_picks(ax: Any, data: ReportData, points: dict[str, tuple[float, float]],
                seen: set[str]) -> None:
    """A gold ring and a star around each size class's pick."""
    for pick in data.advice.picks if data.advice else ():
        if pick.quant in points:
            x, y = points[pick.quant]
            ax.plot([x], [y], marker="o", markersize=19, mfc="none", mec=COLORS["pick"],
                    mew=2.4, linestyle="none", zorder=2,
                    label="★ recommended" if "pick" not in seen else None)
            seen.add("pick")


def _faded(row: VariantRow) -> bool:
    return row.paired is not None and row.paired.significant_loss


def _accuracy(ax: Any, data: ReportData) -> int:
    ref = data.accuracy_reference or FULL_PRECISION
    paired = [r for r in data.rows if r.paired is not None and r.bits_per_weight]
    seen: set[str] = set()
    points: dict[str, tuple[float, float]] = {}
    if paired:
        ax.set_title(f"{data.model}: MATH accuracy minus {ref}'s, same problems (paired)")
        ax.set_ylabel(f"accuracy − {ref} (percentage points), 95 % CI")
        ax.axhline(0, color=COLORS["zero"], linewidth=1, linestyle="--",
                   label=f"{ref} ({100 * _ref_accuracy(data):.1f} %)" if _ref_accuracy(data)
                   is not None else ref)
        for r in paired:
            p = r.paired
            assert p is not None and r.bits_per_weight is not None
            y = 100 * p.difference
            _point(ax, r, r.bits_per_weight, y,
                   [[100 * (p.difference - p.low)], [100 * (p.high - p.difference)]],
                   _faded(r), seen)
            _label(ax, r, r.bits_per_weight, y, below=r.kind != "stock")
            points[r.quant] = (r.bits_per_weight, y)
        _ring_picks(ax, data, points, seen)
        _style_axis(ax, paired)
        ax.legend(loc="lower right", fontsize=8)
        return len(paired)
    rows = [r for r in data.rows if r.accuracy is not None and r.bits_per_weight]
    ax.set_title(f"{data.model}: MATH accuracy")
    ax.set_ylabel("MATH accuracy (%), Wilson 95 % CI")
    if not rows:
        _empty(ax, "MATH accuracy")
        return 0
    for r in rows:
        a = r.accuracy
        assert a is not None and r.bits_per_weight is not None
        _point(ax, r, r.bits_per_weight, 100 * a.value,
               [[100 * (a.value - a.low)], [100 * (a.high - a.value)]], False, seen)
        _label(ax, r, r.bits_per_weight, 100 * a.value, below=r.kind != "stock")
    if data.paper_accuracy is not None:
        ax.axhline(data.paper_accuracy, color=COLORS["imatrix"], linestyle="--", linewidth=1,
                   label=f"paper ({data.paper_accuracy:g} %)")
    _style_axis(ax, rows)
    ax.legend(loc="best", fontsize=8)
    return len(rows)


def _ref_accuracy(data: ReportData) -> float | None:
    ref = next((r for r in data.rows if r.quant == data.accuracy_reference), None)
    return ref.accuracy.value if ref is not None and ref.accuracy is not None else None


def _kld(ax: Any, data: ReportData) -> int:
    rows = [r for r in data.rows if r.bits_per_weight and r.mean_kld is not None
            and r.mean_kld > 0]
    ref = data.kld_reference or "reference"
    ax.set_title(f"{data.model}: KL divergence from {ref} on {data.kld_corpus or 'its text'}")
    ax.set_ylabel("mean KLD (nats/token, log scale), ± s.e.")
    if not rows:
        _empty(ax, "KL divergence")
        return 0
    ax.set_yscale("log")
    seen: set[str] = set()
    points: dict[str, tuple[float, float]] = {}
    for r in rows:
        assert r.mean_kld is not None and r.bits_per_weight is not None
        err = min(r.mean_kld_err or 0.0, 0.999 * r.mean_kld)
        _point(ax, r, r.bits_per_weight, r.mean_kld, [[err], [err]], _faded(r), seen)
        _label(ax, r, r.bits_per_weight, r.mean_kld, below=r.kind != "stock")
        points[r.quant] = (r.bits_per_weight, r.mean_kld)
    front = [points[q] for q in (data.advice.frontier if data.advice else ()) if q in points]
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.step(xs, ys, where="post", color=COLORS["frontier"], linestyle=":", linewidth=1.5,
                zorder=1, label="frontier (qualifying, undominated)")
    _ring_picks(ax, data, points, seen)
    if any(_faded(r) for r in rows):
        ax.plot([], [], marker="o", linestyle="none", color=COLORS["stock"], alpha=0.35,
                label="faded: loses accuracy vs BF16")
    _style_axis(ax, rows)
    ax.legend(loc="upper right", fontsize=8)
    return len(rows)


def _speed(axes: Any, data: ReportData) -> int:
    drawn = 0
    for ax, attr, label in ((axes[0], "prompt_tps", "prompt processing (pp512)"),
                            (axes[1], "generation_tps", "generation (tg128)")):
        ax.set_title(f"{label}")
        ax.set_ylabel("tokens per second, mean ± sd")
        rows = [r for r in data.rows if r.bits_per_weight and getattr(r, attr) is not None
                and getattr(r, attr).mean > 0]
        if not rows:
            _empty(ax, "speed")
            continue
        seen: set[str] = set()
        values = [getattr(r, attr).mean for r in rows]
        if max(values) / min(values) > 10:
            ax.set_yscale("log")
        for r in rows:
            v = getattr(r, attr)
            assert r.bits_per_weight is not None
            err = min(v.sd, 0.999 * v.mean)
            _point(ax, r, r.bits_per_weight, v.mean, [[err], [err]], False, seen)
            _label(ax, r, r.bits_per_weight, v.mean, below=r.kind != "stock")
        _style_axis(ax, rows)
        ax.legend(loc="best", fontsize=8)
        drawn += len(rows)
    return drawn


def plot_files(out_dir: Path) -> tuple[Path, ...]:
    """The files :func:`write_plots` writes into ``out_dir``: a PNG and an SVG per plot."""
    return tuple(Path(out_dir) / f"{name}.{ext}" for name in PLOT_NAMES for ext in ("png", "svg"))


def write_plots(data: ReportData, out_dir: Path,
                staged: Mapping[Path, Path] | None = None) -> tuple[Plot, ...]:
    """Draw the three plots into ``out_dir`` (PNG and SVG each). ``staged`` maps each of
    :func:`plot_files` to the temporary path to draw it into (from
    :func:`mathq.fsutil.atomic_outputs`, which the caller renames into place with its other
    files); without it the plots are written as one set of their own."""
    if staged is None:
        with atomic_outputs(*plot_files(out_dir)) as own:
            return write_plots(data, out_dir, own)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plots = []
    for name in PLOT_NAMES:
        with matplotlib.rc_context({"svg.hashsalt": f"mathq-{name}", "svg.fonttype": "none",
                                    "font.size": 10}):
            if name == "speed":
                fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=100)
                fig.suptitle(f"{data.model}: speed by bits per weight")
            else:
                fig, ax = plt.subplots(figsize=FIGSIZE, dpi=100)
                ax.margins(x=0.12, y=0.15)
            try:
                if name == "accuracy":
                    points = _accuracy(ax, data)
                elif name == "kld":
                    points = _kld(ax, data)
                else:
                    points = _speed(axes, data)
                fig.tight_layout()
                png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
                fig.savefig(staged[png], format="png", dpi=PNG_DPI,
                            metadata={"Software": None})
                fig.savefig(staged[svg], format="svg", metadata={"Date": None})
            finally:
                plt.close(fig)
        plots.append(Plot(name, TITLES[name], png, svg, points))
    return tuple(plots)


def png_width(dpi: int = PNG_DPI) -> int:
    """The PNGs' width in pixels."""
    return math.ceil(FIGSIZE[0] * dpi)
