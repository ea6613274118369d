"""A quality study: models of one shape trained on the same tokens with the same schedule,
compared by their validation loss curves (docs/paper_study.md).

A study is a sweep file (``sweep_file``) with one size, one token budget and one family per
model, each with its own ``seeds`` where a comparison hinges on it.
``tools/scaling/sweep.py study`` plans it (``check_study`` first: every run must log its
validation loss during training, not only at the end), trains the unfinished runs of the
selection (``--only``) and writes the report; ``report`` rewrites the report from whatever runs
have finished. The report reads only the run folders: ``run.json`` (shape, parameters, tokens),
``config.yaml``, ``result.json`` (final losses, throughput, times) and ``segments.jsonl`` (every
validation loss with the training seconds up to it, ``worker.py``):

    study.csv                        one row per run: model, seed, parameters, tokens, final
                                     validation loss, the loss at 1/4 and 1/2 of the tokens,
                                     tokens/s, training and wall seconds, its config
    curves.csv                       every logged validation loss: run, step, tokens, seconds
    study.md                         by model (mean over seeds and their spread) and by run
    plots/valid_loss_vs_tokens.png   one line per run, one colour per model
    plots/valid_loss_vs_time.png     the same against training seconds (optimizer steps only)

The loss at a fraction of the tokens is the logged value at that step, or the linear
interpolation between the two logged steps around it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Optional

import yaml

from megatron_transmamba.scaling.plan import PlannedRun
from megatron_transmamba.scaling.run_folder import DONE, RunFolder, write_text_atomic
from megatron_transmamba.scaling.sweep_file import SweepSpec

FRACTIONS = {"quarter": 0.25, "half": 0.5}
MIN_EVALS = 4
"""A run must log its validation loss at least this many times after step 0."""
COLUMNS = (
    "model", "seed", "run", "status", "layer_pattern", "transpoint_schedule", "transpoints",
    "params", "tokens", "train_iters", "valid_loss", "valid_loss_at_quarter",
    "valid_loss_at_half", "initial_valid_loss", "tokens_per_second", "train_seconds",
    "wall_seconds", "config",
)
CURVE_COLUMNS = ("run", "model", "seed", "step", "tokens", "train_seconds", "valid_loss")
SAME_SETUP = (("training", "train_iters"), ("training", "global_batch_size"),
              ("training", "lr"), ("training", "min_lr"), ("training", "lr_decay_style"),
              ("training", "lr_warmup_iters"), ("model", "seq_length"),
              ("model", "hidden_size"), ("data", "data_path"), ("data", "valid_data_path"))


def _config(run: PlannedRun) -> dict:
    if run.config:
        return run.config
    try:
        with open(run.folder.config_path) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        return {}


def check_study(runs: list[PlannedRun]) -> list[str]:
    """Raise ValueError (one line) for a run whose validation loss is not logged often enough
    for a curve; return :func:`study_notes`."""
    if not runs:
        raise ValueError("the study has no runs")
    for run in runs:
        t = _config(run)["training"]
        if t["eval_interval"] * MIN_EVALS > t["train_iters"]:
            raise ValueError(
                f"run {run.name}: training.eval_interval={t['eval_interval']} logs the validation "
                f"loss {t['train_iters'] // t['eval_interval']} times in "
                f"training.train_iters={t['train_iters']} steps; the study needs at least "
                f"{MIN_EVALS} (set base.training.eval_interval to at most "
                f"{t['train_iters'] // MIN_EVALS})")
    return study_notes(runs)


def study_notes(runs: list[PlannedRun]) -> list[str]:
    """Notes on the comparison: models that are the same model, and setups (tokens, batch, LR
    schedule, length, width, data) that differ between models."""
    first: dict[str, dict] = {}
    models: dict[str, dict] = {}
    for run in runs:
        family = run.record["family"]
        if family not in first:
            first[family] = _config(run)
            # the model as built: the schedule's name aside, its TransPoints per layer
            model = {k: v for k, v in first[family].get("model", {}).items()
                     if k not in ("transpoint_schedule", "transpoint_values")}
            models[family] = {**model, "transpoints": run.record.get("transpoints")}
    notes, families = [], list(first)
    for i, a in enumerate(families):
        for b in families[i + 1:]:
            if models[a] == models[b] and first[a].get("training") == first[b].get("training"):
                notes.append(f"{a} and {b} train the same model (layers "
                             f"{models[a].get('layer_pattern')}, TransPoints "
                             f"{models[a]['transpoints']}) the same way: a difference between "
                             "them is run-to-run noise")
    for section, key in SAME_SETUP:
        values = {f: first[f].get(section, {}).get(key) for f in families}
        if len({repr(v) for v in values.values()}) > 1:
            notes.append(f"{section}.{key} differs between models: "
                         + ", ".join(f"{f} {v}" for f, v in values.items()))
    return notes


def loss_curve(folder: RunFolder) -> list[tuple[int, float, Optional[float]]]:
    """(step, validation loss, training seconds up to that step or None), in step order, over
    the run's segments (a resumed segment's seconds continue those before it)."""
    points: dict[int, tuple[float, Optional[float]]] = {}
    offset = 0.0
    for segment in sorted(folder.segments(), key=lambda s: s.get("start_step", 0)):
        seconds = segment.get("valid_train_seconds") or {}
        for key, loss in segment.get("valid_losses", {}).items():
            points[int(key)] = (loss, offset + seconds[key] if key in seconds else None)
        offset += segment.get("train_seconds", 0.0)
    return [(step, loss, seconds) for step, (loss, seconds) in sorted(points.items())]


def loss_at(curve: list[tuple[int, float, Optional[float]]], step: float) -> float:
    """The logged loss at ``step``, or the linear interpolation between its neighbours; NaN
    outside the logged steps."""
    for (s0, l0, _), (s1, l1, _) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return l0 if s1 == s0 else l0 + (l1 - l0) * (step - s0) / (s1 - s0)
    return curve[0][1] if curve and curve[0][0] == step else math.nan


def study_rows(out_dir: str, runs: list[PlannedRun]) -> list[dict]:
    """One row per planned run (COLUMNS, plus ``curve``); result columns are NaN until done."""
    rows = []
    for run in runs:
        rec, result = run.record, run.folder.result() or {}
        curve = loss_curve(run.folder) if result else []
        iters = rec["train_iters"]
        row = {
            "model": rec["family"], "seed": rec["seed"], "run": run.name,
            "status": run.folder.status(), "layer_pattern": rec["layer_pattern"],
            "transpoint_schedule": rec.get("transpoint_schedule") or "",
            "transpoints": " ".join(str(p) for p in rec.get("transpoints", [])),
            "params": rec["params"], "tokens": rec["tokens"], "train_iters": iters,
            "valid_loss": result.get("valid_loss", math.nan),
            "initial_valid_loss": result.get("initial_valid_loss", math.nan),
            "tokens_per_second": result.get("tokens_per_second", math.nan),
            "train_seconds": result.get("train_seconds", math.nan),
            "wall_seconds": result.get("wall_seconds", math.nan),
            "config": os.path.relpath(run.folder.config_path, out_dir),
            "tokens_per_step": rec["tokens_per_step"], "curve": curve,
        }
        for name, fraction in FRACTIONS.items():
            row[f"valid_loss_at_{name}"] = loss_at(curve, fraction * iters) if curve else math.nan
        rows.append(row)
    return rows


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def _csv(columns, rows) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[k]) for k in columns])
    return text.getvalue()


def _curve_rows(rows: list[dict]) -> list[dict]:
    return [{"run": r["run"], "model": r["model"], "seed": r["seed"], "step": step,
             "tokens": step * r["tokens_per_step"],
             "train_seconds": math.nan if seconds is None else seconds, "valid_loss": loss}
            for r in rows for step, loss, seconds in r["curve"]]


def _loss(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _count(x: float, digits: int = 0) -> str:
    return "-" if math.isnan(x) else f"{x:,.{digits}f}"


def _transpoint_text(row: dict) -> str:
    if "T" not in row["layer_pattern"]:
        return "-"
    values = sorted({int(p) for p in row["transpoints"].split()})
    shown = ", ".join(map(str, values)) if len(values) <= 8 else \
        f"{', '.join(map(str, values[:3]))}, ..., {values[-1]}"
    return f"{row['transpoint_schedule']}: {shown}"


def markdown(spec: SweepSpec, rows: list[dict], notes: list[str], configs: dict) -> str:
    """The report: setup, a table by model (mean over seeds, spread, difference to the first
    model), a table by run, what did not finish, and notes."""
    done = [r for r in rows if r["status"] == DONE]
    models = list(dict.fromkeys(r["model"] for r in rows))
    reference = models[0]
    lines = [f"# Quality study: {spec.name}", ""]
    lines.append(f"{len(done)} of {len(rows)} runs done.")
    if rows:
        r, config = rows[0], configs.get(rows[0]["run"], {})
        t, model, data = (config.get(k, {}) for k in ("training", "model", "data"))
        valid = (f"{', '.join(data['valid_data_path'])} (data.valid_seed {data.get('valid_seed')})"
                 if data.get("valid_data_path") else f"the data.split {data.get('split')} of the data")
        lines += ["", f"Setup (the first run; the notes list what differs): hidden "
                  f"{model.get('hidden_size')}, T = {model.get('seq_length')}, {r['tokens']:,} "
                  f"tokens ({r['train_iters']} steps of {r['tokens_per_step']:,}), lr "
                  f"{t.get('lr')} -> {t.get('min_lr')} {t.get('lr_decay_style')} after "
                  f"{t.get('lr_warmup_iters')} warmup steps; validation every "
                  f"{t.get('eval_interval')} steps, {t.get('eval_iters')} micro-batches of "
                  f"{t.get('micro_batch_size')}, on {valid}. Losses in nats per token."]
    lines += ["", "## By model", "",
              f"| model | layers | TransPoints | params | seeds | final val loss | seed spread | "
              f"vs {reference} | at 1/4 | at 1/2 | tokens/s | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    reference_loss = _mean([r["valid_loss"] for r in done if r["model"] == reference])
    for name in models:
        group = [r for r in done if r["model"] == name]
        first = next(r for r in rows if r["model"] == name)
        losses = [r["valid_loss"] for r in group]
        mean = _mean(losses)
        spread = f"{max(losses) - min(losses):.4f}" if len(losses) > 1 else "-"
        delta = mean - reference_loss
        lines.append(
            f"| {name} | `{first['layer_pattern']}` | {_transpoint_text(first)} | "
            f"{first['params'] / 1e6:.2f}M | {len(group)} | {_loss(mean)} | {spread} | "
            f"{'-' if math.isnan(delta) else f'{delta:+.4f}'} | "
            f"{_loss(_mean([r['valid_loss_at_quarter'] for r in group]))} | "
            f"{_loss(_mean([r['valid_loss_at_half'] for r in group]))} | "
            f"{_count(_mean([r['tokens_per_second'] for r in group]))} | "
            f"{_count(_mean([r['train_seconds'] for r in group]))} |")
    lines += ["", "## By run", "",
              "| run | model | seed | final val loss | at 1/4 | at 1/2 | initial | tokens/s | "
              "train s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        lines.append(f"| {r['run']} | {r['model']} | {r['seed']} | {_loss(r['valid_loss'])} | "
                     f"{_loss(r['valid_loss_at_quarter'])} | {_loss(r['valid_loss_at_half'])} | "
                     f"{_loss(r['initial_valid_loss'])} | {_count(r['tokens_per_second'])} | "
                     f"{_count(r['train_seconds'], 1)} | {_count(r['wall_seconds'], 1)} |")
    unfinished = [r for r in rows if r["status"] != DONE]
    if unfinished:
        lines += ["", "## Not finished", ""]
        lines += [f"- {r['run']}: {r['status']}" for r in unfinished]
    lines += ["", "## Notes", "",
              "- seed spread: max - min of the final validation loss over a model's seeds; "
              "train s: seconds of optimizer steps (no start-up, no evaluation); wall s: the "
              "whole training processes.",
              "- plots: `plots/valid_loss_vs_tokens.png`, `plots/valid_loss_vs_time.png`; every "
              "logged point: `curves.csv`."]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], x: str, path: str) -> str:
    """Validation loss against ``x`` (``tokens`` or ``seconds``), a line per finished run, one
    colour per model and one line style per seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    styles = ("-", "--", ":", "-.")
    tops, lows = [], []
    for r in rows:
        if r["status"] != DONE or not r["curve"]:
            continue
        seeds = sorted({q["seed"] for q in rows if q["model"] == r["model"]})
        points = [(step * r["tokens_per_step"] if x == "tokens" else seconds, loss)
                  for step, loss, seconds in r["curve"] if x == "tokens" or seconds is not None]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[r["model"]],
                ls=styles[seeds.index(r["seed"]) % len(styles)], marker="o", ms=2.5, lw=1.3,
                label=f"{r['model']} (seed {r['seed']})")
        later = [loss for step, loss, _ in r["curve"] if step >= r["train_iters"] / 8]
        tops.append(max(later or [points[-1][1]]))
        lows.append(min(p[1] for p in points))
    if tops:
        pad = 0.05 * (max(tops) - min(lows) + 1e-3)
        ax.set_ylim(min(lows) - pad, max(tops) + pad)   # the first 1/8 of training falls off
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("training tokens" if x == "tokens" else
                  "training time (s, optimizer steps only)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"validation loss vs {'tokens' if x == 'tokens' else 'training time'}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(spec: SweepSpec, out_dir: str, runs: list[PlannedRun]) -> list[str]:
    """study.csv, curves.csv, study.md and the two plots from the run folders; returns their
    paths (the markdown's first)."""
    out_dir = os.path.abspath(out_dir)
    rows = study_rows(out_dir, runs)
    configs = {r.name: _config(r) for r in runs}
    notes = study_notes(runs)
    paths = {name: os.path.join(out_dir, name) for name in ("study.md", "study.csv", "curves.csv")}
    write_text_atomic(paths["study.md"], markdown(spec, rows, notes, configs))
    write_text_atomic(paths["study.csv"], _csv(COLUMNS, rows))
    write_text_atomic(paths["curves.csv"], _csv(CURVE_COLUMNS, _curve_rows(rows)))
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    return [*paths.values(),
            plot_curves(rows, "tokens", os.path.join(plots, "valid_loss_vs_tokens.png")),
            plot_curves(rows, "seconds", os.path.join(plots, "valid_loss_vs_time.png"))]
