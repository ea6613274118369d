"""Collect a sweep's runs into one CSV: the plan's record and the result of every run.

One row per planned run, in plan order, with its status (pending / started / failed / done);
the result columns are empty until a run is done. ``params`` and ``flops`` come from
``megatron_transmamba.flops`` (the same counts the trainer's MFU uses), ``tokens`` from the
optimizer steps actually taken.
"""

from __future__ import annotations

import csv
import io
import math
import os

from megatron_transmamba.scaling.plan import PlannedRun
from megatron_transmamba.scaling.run_folder import write_text_atomic

COLUMNS = (
    "name", "family", "status", "knob", "size", "budget_kind", "budget", "seed",
    "layer_pattern", "depth", "num_layers", "hidden_size", "ffn_hidden_size", "heads", "seq_length",
    "params", "non_embedding_params", "flops_per_token", "tokens_per_step", "train_iters", "tokens",
    "flops", "valid_loss", "train_loss", "final_train_loss", "initial_valid_loss", "wall_seconds",
    "train_seconds", "tokens_per_second", "model_flops_per_second", "segments",
)
TEXT_COLUMNS = {"name", "family", "status", "knob", "budget_kind", "layer_pattern"}


def collect(out_dir: str, runs: list[PlannedRun]) -> tuple[str, list[dict]]:
    """Write ``<out>/results.csv``; returns its path and the rows."""
    rows = []
    for run in runs:
        row = {**run.record, "status": run.folder.status()}
        result = run.folder.result()
        if result:
            row.update({k: v for k, v in result.items() if k in COLUMNS and k != "status"})
        rows.append({k: row.get(k, "") for k in COLUMNS})
    path = os.path.join(os.path.abspath(out_dir), "results.csv")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[k]) for k in COLUMNS])
    write_text_atomic(path, text.getvalue())
    return path, rows


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def read_results(path: str) -> list[dict]:
    """Rows of a results CSV with numbers parsed (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key not in TEXT_COLUMNS:
                row[key] = float(value) if value != "" else math.nan
    return rows
