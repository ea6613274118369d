"""Train one sweep run from its folder: the process every launcher starts.

    python -m megatron_transmamba.scaling.worker RUNS/<run> [--section.key=value ...]
    torchrun --nproc_per_node=8 -m megatron_transmamba.scaling.worker RUNS/<run>

A finished run (``result.json`` present) exits at once, so re-submitting a whole sweep only
trains what is left. Otherwise the run config resumes from the newest checkpoint in the run's
folder. Each training process that ends normally appends a segment (steps, seconds, losses, and
the training seconds at each validation) to ``segments.jsonl``; when the segments reach ``train_iters``, rank 0 writes ``result.json``
atomically. Overrides after the folder apply to this launch only (e.g. ``--training.exit_at_step=50``
to stop early, as a preemption would); they are not written to ``config.yaml``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import sys
import time
import traceback

from megatron_transmamba.scaling.run_folder import RunFolder, write_json_atomic, write_text_atomic

TRAIN_LOSS_TAIL = 100
"""Training losses of the last this-many steps of a segment are kept in segments.jsonl."""

SKIPPED, DONE, INTERRUPTED = "skipped", "done", "interrupted"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _latest_checkpoint_step(save: str | None) -> int:
    from megatron_transmamba.training.checkpoint import checkpoint_dirs
    found = checkpoint_dirs(save) if save else []
    return found[-1][0] if found else 0


def train_run(run_dir: str, overrides: list[str] = ()) -> str:
    """Train (or resume, or skip) the run in ``run_dir``; returns skipped / done / interrupted.

    A failure writes ``error.txt`` (rank 0) and re-raises."""
    folder = RunFolder(run_dir)
    if folder.done:
        return SKIPPED
    if not os.path.exists(folder.config_path):
        raise FileNotFoundError(f"{folder.config_path}: not a planned run (run `sweep.py plan` first)")
    rank0 = _rank() == 0
    if rank0 and os.path.exists(folder.error_path):
        os.unlink(folder.error_path)
    try:
        from megatron_transmamba.training.config import load_run_config
        from megatron_transmamba.training.pretrain import pretrain

        cfg = load_run_config(folder.config_path, list(overrides))
        started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        result = pretrain(cfg)
        if not rank0:
            return DONE
        steps = sorted(result.train_losses)
        end_step = steps[-1] if steps else _latest_checkpoint_step(cfg.checkpoint.save)
        tail = steps[-TRAIN_LOSS_TAIL:]
        elapsed, cumulative = 0.0, {}
        for step in sorted(result.step_seconds):
            elapsed += result.step_seconds[step]
            cumulative[step] = elapsed
        folder.append_segment({
            "started_at": started_at, "start_step": steps[0] - 1 if steps else end_step,
            "end_step": end_step, "steps": len(steps), "seconds": result.seconds,
            "train_seconds": sum(result.step_seconds.values()),
            "tokens_per_step": result.tokens_per_step, "num_parameters": result.num_parameters,
            "train_losses": {str(s): result.train_losses[s] for s in tail},
            "valid_losses": {str(s): v for s, v in result.valid_losses.items()},
            # training seconds of this segment (optimizer steps, not evaluation or start-up)
            # up to each validation: the time axis of a loss curve
            "valid_train_seconds": {str(s): cumulative.get(s, 0.0) for s in result.valid_losses},
        })
        return finalize(folder, cfg.training.train_iters)
    except BaseException:
        if rank0:
            write_text_atomic(folder.error_path, traceback.format_exc())
        raise


def finalize(folder: RunFolder, train_iters: int) -> str:
    """Write ``result.json`` once the segments reach ``train_iters``; returns done / interrupted."""
    segments = folder.segments()
    if not segments or max(s["end_step"] for s in segments) < train_iters:
        return INTERRUPTED
    train_losses, valid_losses = {}, {}
    for s in segments:
        train_losses.update({int(k): v for k, v in s["train_losses"].items()})
        valid_losses.update({int(k): v for k, v in s["valid_losses"].items()})
    if train_iters not in valid_losses:
        raise RuntimeError(f"{folder.name}: training reached step {train_iters} but no segment "
                           "recorded the final validation loss (the process was killed after its "
                           f"last checkpoint); delete {folder.checkpoint_dir} to retrain")
    last = [train_losses[s] for s in sorted(train_losses) if s <= train_iters]
    tail = last[-max(1, min(20, math.ceil(0.1 * train_iters))):]
    record = folder.record()
    tokens_per_step = segments[-1]["tokens_per_step"]
    steps_timed = sum(s["steps"] for s in segments)
    train_seconds = sum(s["train_seconds"] for s in segments)
    tokens_per_second = steps_timed * tokens_per_step / train_seconds if train_seconds > 0 else math.nan
    result = {
        "name": folder.name, "status": "done", "train_iters": train_iters,
        "tokens": train_iters * tokens_per_step,
        "final_train_loss": train_losses.get(train_iters, math.nan),
        "train_loss": sum(tail) / len(tail),
        "valid_loss": valid_losses[train_iters],
        "initial_valid_loss": valid_losses.get(0, math.nan),
        "num_parameters_trainer": segments[-1]["num_parameters"],
        "wall_seconds": sum(s["seconds"] for s in segments),
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_per_second,
        "model_flops_per_second": tokens_per_second * record.get("flops_per_token", math.nan),
        "segments": len(segments),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(folder.result_path, result)
    if not record.get("keep_checkpoints", True) and os.path.isdir(folder.checkpoint_dir):
        shutil.rmtree(folder.checkpoint_dir, ignore_errors=True)
    return DONE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder of a planned sweep (<sweep>/runs/<run>)")
    args, overrides = parser.parse_known_args(argv)
    start = time.time()
    status = train_run(args.run_dir, overrides)
    if _rank() == 0:
        print(f"{os.path.basename(os.path.abspath(args.run_dir))}: {status} "
              f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
