"""PNG plots of a fitted sweep (matplotlib, Agg backend: no display needed).

``loss_vs_compute.png``: one panel per family, the finished runs' loss against training FLOPs
(one colour per model size), each size's fitted curve L(N, C / c(N)) and the compute-optimal
envelope. ``frontier.png``: N_opt(C), D_opt(C) (with the bootstrap's 95% band) and the loss on
the frontier, all families together.
"""

from __future__ import annotations

import math
import os

import numpy as np

from megatron_transmamba.scaling.fit import FlopsPerToken, LossLaw


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def plot_loss_vs_compute(rows: list[dict], fit: dict, path: str) -> str:
    plt = _pyplot()
    loss_column, params_column = fit["loss_column"], fit["params_column"]
    families = list(fit["families"])
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False,
                             sharey=True)
    for ax, family in zip(axes.flat, families):
        result = fit["families"][family]
        done = [r for r in rows if r["family"] == family and r["status"] == "done"
                and np.isfinite(r[loss_column])]
        sizes = sorted({r[params_column] for r in done})
        colors = plt.cm.viridis(np.linspace(0.05, 0.9, max(len(sizes), 1)))
        law = LossLaw(**result["law"]) if "law" in result else None
        cost = FlopsPerToken(**result["flops_per_token"]) if law else None
        for color, N in zip(colors, sizes):
            pts = [r for r in done if r[params_column] == N]
            C = np.array([r["flops"] for r in pts])
            ax.scatter(C, [r[loss_column] for r in pts], color=color, s=28, zorder=3,
                       label=f"N = {_si(N)}")
            if law:
                grid = np.logspace(math.log10(C.min()) - 0.4, math.log10(C.max()) + 0.4, 60)
                ax.plot(grid, law(N, grid / cost(N)), color=color, lw=1.2)
        if law:
            lo, hi = min(r["flops"] for r in done) / 3, max(r["flops"] for r in done) * 3
            pts = [p for p in result["frontier"]["points"] if lo <= p["flops"] <= hi]
            ax.plot([p["flops"] for p in pts], [p["loss"] for p in pts], "k--", lw=1.2,
                    label="compute-optimal")
            ax.set_title(f"{family}: E={law.E:.3g}, α={law.alpha:.3g}, β={law.beta:.3g}", fontsize=10)
        else:
            ax.set_title(f"{family} (not fitted: {result.get('skipped', '')})", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.grid(True, which="both", alpha=0.3)
        if done:
            ax.legend(fontsize=7)
        if done:
            losses = [r[loss_column] for r in done]
            pad = 0.15 * (max(losses) - min(losses) + 1e-3)
            ax.set_ylim(min(losses) - pad, max(losses) + pad)
    for ax in axes[:, 0]:
        ax.set_ylabel(loss_column.replace("_", " "))
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(fit: dict, path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for family, result in fit["families"].items():
        if "frontier" not in result:
            continue
        pts = result["frontier"]["points"]
        C = np.array([p["flops"] for p in pts])
        a, b = result["frontier"]["params_exponent"], result["frontier"]["tokens_exponent"]
        (line,) = axes[0].plot(C, [p["params"] for p in pts], label=f"{family} (N ~ C^{a:.2f})")
        axes[1].plot(C, [p["tokens"] for p in pts], color=line.get_color(), label=f"{family} (D ~ C^{b:.2f})")
        axes[2].plot(C, [p["loss"] for p in pts], color=line.get_color(), label=family)
        if "params_lo" in pts[0]:
            axes[0].fill_between(C, [p["params_lo"] for p in pts], [p["params_hi"] for p in pts],
                                 color=line.get_color(), alpha=0.15, lw=0)
            axes[1].fill_between(C, [p["tokens_lo"] for p in pts], [p["tokens_hi"] for p in pts],
                                 color=line.get_color(), alpha=0.15, lw=0)
        runs = result["data"]
        axes[0].scatter(runs["flops"], runs["params"], color=line.get_color(), s=10, alpha=0.5)
        axes[1].scatter(runs["flops"], runs["tokens"], color=line.get_color(), s=10, alpha=0.5)
    for ax, label in zip(axes, ("optimal parameters N_opt", "optimal tokens D_opt",
                                f"loss on the frontier ({fit['loss_column'].replace('_', ' ')})")):
        ax.set_xscale("log")
        if ax is not axes[2]:
            ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_title("compute-optimal model size (band: bootstrap 95%; dots: runs)", fontsize=9)
    axes[1].set_title("compute-optimal training tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(rows: list[dict], fit: dict, out_dir: str) -> list[str]:
    """Both plots into ``<out>/plots/``; returns their paths."""
    folder = os.path.join(os.path.abspath(out_dir), "plots")
    os.makedirs(folder, exist_ok=True)
    return [plot_loss_vs_compute(rows, fit, os.path.join(folder, "loss_vs_compute.png")),
            plot_frontier(fit, os.path.join(folder, "frontier.png"))]
