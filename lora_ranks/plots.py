"""Plots and raw-data export for an analysis (matplotlib, Agg backend: no display needed).

Also the markdown of the UI summaries (plots embedded as data URIs, so that they render on a Prefect artifact
page without a file server).

Files written where ``analysis.OutputLayout`` puts them, under ``<root>/analysis_outputs/svd/``::

    plots/singular_values.png   # s_i / s_1 per module type, one line per layer, chosen ranks marked
    plots/cumulative_energy.png # kept energy vs rank per module type, with tau
    plots/rank_heatmap.png      # final rank, layer x module type
    raw_data/singular_values.npz  # one float64 array per module (key = module name), plus total energies
    raw_data/summary.csv        # one row per module: shape, ranks, energy kept, flags, method
    raw_data/summary.json       # the same as JSON
"""

from __future__ import annotations

# matplotlib is imported when a plot is drawn: the comparison tables and markdown summaries do without it.
import base64
import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._io import atomic_write, atomic_write_bytes, atomic_write_json
from .spectra import Spectrum, SpectrumKind

if TYPE_CHECKING:
    from .analysis.layout import OutputLayout
    from .config import RankConfig
    from .evidence.report import ComparisonRow

__all__ = ["write_plots", "write_raw_data", "write_fidelity_plot", "write_comparison_plot", "markdown_image",
           "analysis_summary_markdown", "comparison_markdown", "rank_table_rows", "write_sensitivity_plot",
           "write_curves_plot"]


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, target: Path) -> str:
    """Write ``fig`` to ``target`` atomically (110 dpi) and close it. The figure is laid out already (margins in
    inches, or tight_layout, which makes room for its suptitle): bbox_inches="tight" would draw it twice more (half
    the time of an analysis on a tiny model)."""
    atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)
    return str(target)


def _margins(fig, left: float, right: float, bottom: float, top: float, wspace: float, hspace: float) -> None:
    """Lay ``fig``'s grid of axes out with fixed margins, in inches (``wspace``/``hspace``: gaps between axes, in
    inches too). tight_layout measures every tick label to find them: on the analysis's panels of small axes that
    is as long as drawing the figure (0.8 of 2.5 CPU-seconds for a two-layer model's three plots)."""
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    axes_width = (width - left - right - (cols - 1) * wspace) / cols
    axes_height = (height - bottom - top - (rows - 1) * hspace) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace / axes_width, hspace=hspace / axes_height)


_SUMMARY_COLUMNS = ("module_type", "layer", "depth", "shape", "raw_rank", "saturated", "bounded_rank", "smoothed_rank",
                    "final_rank", "energy_retained", "zero_delta", "svd_method", "rel_error_bound", "total_energy")


def _module_rows(config: RankConfig) -> list[dict]:
    return [{"module": name, **record.model_dump(mode="json", include=set(_SUMMARY_COLUMNS))}
            for name, record in config.modules.items()]


def write_raw_data(layout: OutputLayout, config: RankConfig, spectra: Mapping[str, Spectrum]) -> dict[str, str]:
    """Write the singular values (npz) and per-module summary (CSV and JSON) where ``layout`` puts them; return their
    paths."""
    arrays = {name: s.singular_values for name, s in spectra.items()}
    arrays["__total_energy__"] = np.array([spectra[n].total_energy for n in spectra])
    arrays["__module_names__"] = np.array(list(spectra))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    paths = {"singular_values_npz": str(atomic_write_bytes(layout.singular_values_path, buffer.getvalue()))}
    rows = _module_rows(config)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
    paths["summary_csv"] = str(atomic_write_bytes(layout.summary_csv_path, text.getvalue().encode()))
    paths["summary_json"] = str(atomic_write_json(layout.summary_json_path, rows))
    return paths


def write_plots(layout: OutputLayout, config: RankConfig, spectra: Mapping[str, Spectrum]) -> dict[str, str]:
    """Write the three analysis plots (PNG, 110 dpi) where ``layout`` puts them; return their paths by name."""
    plt = _pyplot()
    paths = {kind: _save_png(_spectrum_figure(plt, kind, config, spectra), layout.plot_path(kind))
             for kind in ("singular_values", "cumulative_energy")}  # each figure saved and closed before the next
    paths["rank_heatmap"] = _save_png(_rank_heatmap(plt, config), layout.plot_path("rank_heatmap"))
    return paths


def _types_and_depths(config: RankConfig) -> tuple[list[str], list[int]]:
    """The config's module types (in module order) and layer depths (sorted): the plots' panels and rows."""
    modules = config.modules.values()
    return list(dict.fromkeys(m.module_type for m in modules)), sorted({m.depth for m in modules})


def _spectrum_figure(plt, kind: str, config: RankConfig, spectra: Mapping[str, Spectrum]):
    """One panel per module type, one line per layer (colour: depth): ``kind`` "singular_values" (s_i / s_1, log)
    or "cumulative_energy" (kept energy vs rank, with tau); chosen, signal and split-half ranks marked."""
    modules = config.modules
    tau = config.allocation_settings.energy_threshold
    types, depths = _types_and_depths(config)
    cmap = plt.get_cmap("viridis")
    ncols = min(4, len(types))
    nrows = -(-len(types) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, mtype in zip(axes.flat, types):
        for name, meta in modules.items():
            if meta.module_type != mtype or name not in spectra:
                continue
            s = spectra[name]
            color = cmap(depths.index(meta.depth) / max(1, len(depths) - 1))
            x = np.arange(1, len(s.singular_values) + 1)
            y = s.singular_values / s.singular_values[0] if kind == "singular_values" and s.singular_values[0] > 0 \
                else s.cumulative_energy() if kind == "cumulative_energy" else s.singular_values
            ax.plot(x, y, color=color, lw=1)
            for rank, marker, size in ((meta.final_rank, "o", 4),
                                       (meta.signal_rank, "x", 5),  # the noise floor: directions above it are signal
                                       (meta.split_half_rank, "+", 6)):  # directions two half-data fine-tunes share
                if rank and rank <= len(y):
                    ax.plot([rank], [y[rank - 1]], marker, color=color, ms=size)
            if (kind == "singular_values" and not meta.spectrum.weighted
                    and meta.noise_threshold and s.singular_values[0] > 0):
                ax.axhline(meta.noise_threshold / s.singular_values[0], color=color, lw=0.6, ls=":", alpha=0.6)
        ax.set_title(mtype, fontsize=9)
        ax.set_xlabel("index i", fontsize=8)
        if kind == "singular_values":
            ax.set_yscale("log")
            low, high = ax.get_ylim()
            if high > 100 * low:  # decades enough to read by: minor ticks took a third of the plots' time
                ax.yaxis.set_minor_locator(plt.NullLocator())
            ax.set_ylabel("s_i / s_1", fontsize=8)
        else:
            ax.axhline(tau, color="red", ls="--", lw=1)
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("energy kept (exact total)", fontsize=8)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    spectrum = next(iter(modules.values())).spectrum
    of = spectrum.matrix
    split = any(m.split_half_rank is not None for m in modules.values())
    title = (f"Singular values of {of} (dots: chosen rank; x: noise-floor signal rank"
             + ("; +: split-half rank" if split else "")
             + ("; dotted: noise floor" if not spectrum.weighted else "") + "; colour: depth)"
             if kind == "singular_values" else f"Cumulative energy of {of} (dashed: tau = {tau})")
    fig.suptitle(title, fontsize=10)
    _margins(fig, left=0.75, right=0.15, bottom=0.5, top=0.6, wspace=0.75, hspace=0.7)
    return fig


def _rank_heatmap(plt, config: RankConfig):
    """The final rank of every module, layer x module type."""
    modules = config.modules
    types, depths = _types_and_depths(config)
    grid = np.full((len(depths), len(types)), np.nan)
    for meta in modules.values():
        grid[depths.index(meta.depth), types.index(meta.module_type)] = meta.final_rank
    fig, ax = plt.subplots(figsize=(1.2 * len(types) + 2, 0.35 * len(depths) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(depths)), [str(d) for d in depths], fontsize=8)
    ax.set_ylabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="white" if v < np.nanmax(grid) * 0.6 else "black")
    fig.colorbar(image, ax=ax, label="LoRA rank")
    ax.set_title("Final LoRA rank per layer and module", fontsize=10)
    fig.tight_layout()
    return fig


def write_fidelity_plot(path: str | Path, points) -> str:
    """Trainable parameters vs mean KL to the fine-tuned model, one line per allocation method (PNG path)."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.2))
    for method, style in (("energy", "o-"), ("budget", "s--"), ("uniform", "^:")):
        series = sorted((p.trainable_parameters, p.mean_kl) for p in points if p.method == method)
        if series:
            ax.plot(*zip(*series), style, label=method)
    for p in points:
        if p.method == "energy":
            ax.annotate(f"tau={p.setting:g}", (p.trainable_parameters, p.mean_kl), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("LoRA trainable parameters")
    ax.set_ylabel("mean KL(fine-tuned || base + adapter), nats/token")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Fidelity of extracted adapters vs parameters", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, Path(path))


def write_comparison_plot(path: str | Path, rows: Sequence[ComparisonRow]) -> str:
    """Held-out loss (mean +- std over seeds) per allocation and init, as horizontal bars (PNG path)."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 1.2 + 0.42 * len(rows)))
    labels = [f"{r.allocation}, {r.init} ({_count(r.trainable_parameters)})" for r in rows]
    colors = {"warm": "#4477aa", "cold": "#999999", "full": "#cc6677"}
    ax.barh(labels, [r.loss_mean for r in rows], xerr=[r.loss_std for r in rows], capsize=4,
            color=[colors.get(r.init, "#4477aa") for r in rows])
    low = min(r.loss_mean - r.loss_std for r in rows)
    high = max(r.loss_mean + r.loss_std for r in rows)
    ax.set_xlim(max(0.0, low - 0.5 * (high - low) - 1e-3), high + 0.5 * (high - low) + 1e-3)
    ax.invert_yaxis()  # first row on top
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("held-out loss (nats/token)")
    ax.set_title("LoRAs at equal parameter budgets (trainable parameters in brackets)", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, Path(path))


def write_curves_plot(path: str | Path, rows: Sequence[ComparisonRow]) -> str:
    """Held-out loss against total FLOPs (preparation + training; log scale), one line per row with a curve (mean
    over seeds), one panel per budget (PNG path). A row's line starts at its preparation cost: a plain LoRA at 0."""
    with_curves = [r for r in rows if r.curve]
    budgets = sorted({r.budget_rank for r in with_curves}, key=lambda b: (b is None, b or 0))
    fig, axes = _pyplot().subplots(1, len(budgets), figsize=(6.0 * len(budgets), 4.4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for row in (r for r in with_curves if r.budget_rank == budget):
            points = [p for p in row.curve if p.total_flops is not None]  # unknown preparation: not drawn
            style = "--" if row.init == "cold" else ":" if row.init not in ("warm", "cold") else "-"
            ax.plot([p.total_flops for p in points], [p.loss for p in points], style, marker=".",
                    label=f"{row.method} ({row.init})")
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs (preparation + training)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"budget: uniform rank {budget}" if budget is not None else "the analysis' budget", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_png(fig, Path(path))


def _count(n: int | None) -> str:
    return f"{n:,}" if n is not None else "?"


def markdown_image(path: str | Path, alt: str) -> str:
    """A markdown image whose source is the PNG itself, as a base64 data URI."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"


def rank_table_rows(config: RankConfig) -> list[dict]:
    """One row per module: type, raw and final rank, energy kept, saturation (the UI's rank table)."""
    return [{"module": name, "type": m.module_type, "raw": m.raw_rank, "final": m.final_rank,
             "energy kept": round(m.energy_retained, 4), "saturated": m.saturated}
            for name, m in config.modules.items()]


def analysis_summary_markdown(config: RankConfig, config_path: str | Path, plots: Mapping[str, str]) -> str:
    """The analysis summary: counts, per-type ranks, SVD accuracy and timing, and every plot embedded."""
    meta, svd = config.analysis_metadata, config.analysis_metadata.svd
    pngs = {k: p for k, p in plots.items() if str(p).endswith(".png")}
    lines = [
        "# LoRA rank analysis", "",
        f"Config: `{Path(config_path).resolve()}`", "",
        f"Modules: {meta.n_modules}, saturated: {meta.n_saturated}, "
        f"compression ratio: {config.compression_ratio:.4%}, trainable: {config.trainable_parameters:,}", "",
        "| module type | median rank |", "|---|---|",
        *[f"| {t} | {r} |" for t, r in config.layer_ranks.items()], "",
        f"SVD: {', '.join(svd.methods)}, max relative error bound {svd.max_rel_error_bound:.1e}, "
        f"{svd.total_seconds:.2f} s of compute summed over matrices", "",
        "Plots: " + ", ".join(f"`{p}`" for p in pngs.values()), "",
        *[markdown_image(p, k) + "\n" for k, p in pngs.items()],
    ]
    return "\n".join(lines)


def comparison_markdown(rows: Sequence[ComparisonRow], plot: str | Path, curves: str | Path | None = None) -> str:
    """The comparison summary: held-out loss per allocation and init or peer (mean +- std over seeds), the paired
    difference to uniform ranks at the same budget and to PEFT's default LoRA, accuracy, compute, the gap closed to
    a full fine-tune, the bar chart and the loss-against-compute curves."""
    def paired(v) -> str:
        return f"{v.mean:+.4f} ± {v.se:.4f}" if v else ""

    def gap(r: ComparisonRow) -> str:
        return f"{100 * r.gap_closed:.0f}%" if r.gap_closed is not None else ""

    def accuracy(r: ComparisonRow) -> str:
        return f"{100 * r.accuracy_mean:.1f}% ± {100 * r.accuracy_se:.1f}" if r.accuracy_mean is not None else ""

    def flops(r: ComparisonRow) -> str:
        if r.train_flops is None:
            return ""
        prep = r.preparation_flops
        return f"{r.train_flops:.2e}" + (" + unknown" if prep is None else f" + {prep:.2e}" if prep else "")

    lines = ["# Allocations and peers at equal budget", "",
             "Paired differences are mean ± SE over seeds (negative: lower loss than the reference). FLOPs: "
             "training + preparation (``lora_ranks.evidence.compute``).", "",
             "| allocation | init / peer | parameters | lr | held-out loss | vs uniform | vs PEFT default | accuracy | "
             "FLOPs | gap closed |", "|---|---|---|---|---|---|---|---|---|---|",
             *[f"| {r.allocation} | {r.init} | {_count(r.trainable_parameters)} | {r.learning_rate or ''} | "
               f"{r.loss_mean:.4f} ± {r.loss_std:.4f} | {paired(r.vs_uniform)} | {paired(r.vs_default)} | "
               f"{accuracy(r)} | {flops(r)} | {gap(r)} |" for r in rows],
             "", markdown_image(plot, "comparison")]
    if curves is not None and Path(curves).is_file():
        lines += ["", "## Held-out loss against compute", "", markdown_image(curves, "curves")]
    return "\n".join(lines)


def allocation_fidelity_markdown(rows: Sequence[dict], ceiling_kl: float) -> str:
    """The compared configs' fidelity: KL of each extracted adapter to the fine-tuned model, per truncation, and its
    excess over the ceiling relative to uniform ranks' (plain truncation) at the same budget."""
    def ratio(r: dict) -> str:
        return f"{r['excess_ratio']:.2f}" if r.get("excess_ratio") is not None else ""

    return "\n".join(["# Fidelity of the compared configs", "",
                      f"KL(fine-tuned || base + extracted adapter), nats per token; ceiling (full-rank deltas on the "
                      f"adapted modules) {ceiling_kl:.4f}; excess / uniform's: < 1 is closer to the fine-tune.", "",
                      "| allocation | truncation | parameters | KL | excess / uniform's |", "|---|---|---|---|---|",
                      *[f"| {r['allocation']} | {r['truncation']} | {r['trainable_parameters']:,} | {r['kl']:.4f} | "
                        f"{ratio(r)} |" for r in rows]])


def write_sensitivity_plot(path: str | Path, sensitivity: Mapping[str, dict]) -> str:
    """Predicted vs measured KL of truncating one module at a time, one panel per spectrum (log-log; colour =
    depth), with Spearman's correlation in each title (PNG path).

    ``sensitivity``: spectrum kind -> {"spearman": float, "rows": [{"predicted", "measured_kl", "layer", ...}]}.
    """
    plt = _pyplot()
    kinds = list(sensitivity)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = sensitivity[kind]["rows"]
        layers = sorted({r["layer"] for r in rows})
        cmap = plt.get_cmap("viridis")
        for r in rows:
            ax.scatter(max(r["predicted"], 1e-12), max(r["measured_kl"], 1e-12),
                       color=cmap(layers.index(r["layer"]) / max(1, len(layers) - 1)), s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a narrow log range overlap
        ax.set_xlabel("predicted KL (Fisher)" if kind == SpectrumKind.FISHER else "predicted (discarded energy)", fontsize=8)
        ax.set_ylabel("measured KL, nats/token", fontsize=8)
        ax.set_title(f"{kind}: Spearman {sensitivity[kind]['spearman']:.2f}", fontsize=9)
    fig.suptitle("One module truncated to rank 2: predicted vs measured loss increase (colour: depth)", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, Path(path))
