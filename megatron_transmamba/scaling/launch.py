"""Launch a planned sweep's unfinished runs: here (sequentially), or through generated scripts.

Local modes train one run after another and skip finished ones: ``inprocess`` calls the worker
in this process (fastest for tiny CPU runs), ``subprocess`` starts one Python process per run
(a crash cannot take the sweep down) and ``torchrun`` one local torchrun per run. ``slurm``
writes a job-array script with one task per unfinished run (each task a torchrun over the
task's nodes, requeued on preemption), and ``multinode`` a script to start on every node of a
cluster without a scheduler. Every path ends in ``megatron_transmamba.scaling.worker``, which
skips a finished run and resumes a started one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional

from megatron_transmamba.scaling.plan import PlannedRun
from megatron_transmamba.scaling.run_folder import DONE, write_text_atomic
from megatron_transmamba.scaling.sweep_file import SweepSpec
from megatron_transmamba.scaling.worker import INTERRUPTED, train_run

WORKER_MODULE = "megatron_transmamba.scaling.worker"
FAILED = "failed"
LOCAL_MODES = ("inprocess", "subprocess", "torchrun")


def select_runs(runs: list[PlannedRun], only: Optional[str] = None) -> list[PlannedRun]:
    """Unfinished runs, in plan order; with ``only`` (comma-separated globs), those whose name
    or family matches one of them (``transformer,mamba2`` or ``transformer-*-s2``)."""
    patterns = [p.strip() for p in only.split(",") if p.strip()] if only is not None else None
    return [r for r in runs if not r.folder.done and (patterns is None or any(
        fnmatch.fnmatch(r.name, p) or fnmatch.fnmatch(str(r.record.get("family", "")), p)
        for p in patterns))]


def check_only(runs: list[PlannedRun], only: Optional[str]) -> None:
    """Raise ValueError naming each glob of ``only`` that matches no run name or family."""
    if only is None:
        return
    names = [r.name for r in runs] + [str(r.record.get("family", "")) for r in runs]
    missing = [p.strip() for p in only.split(",")
               if not p.strip() or not fnmatch.filter(names, p.strip())]
    if missing:
        families = ", ".join(dict.fromkeys(str(r.record.get("family", "")) for r in runs))
        raise ValueError(f"--only {only!r}: {', '.join(repr(m) for m in missing)} matches no run "
                         f"or family (families: {families}; run names: `status`)")


def worker_command(run_dir: str, overrides: list[str] = (), python: str = sys.executable) -> list[str]:
    return [python, "-m", WORKER_MODULE, run_dir, *overrides]


def torchrun_command(run_dir: str, nproc_per_node: int, overrides: list[str] = (),
                     python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", WORKER_MODULE, run_dir, *overrides]


def launch_local(spec: SweepSpec, runs: list[PlannedRun], mode: str, overrides: list[str] = (),
                 max_runs: Optional[int] = None, log: Callable[[str], None] = print,
                 time_budget_s: Optional[float] = None) -> dict[str, str]:
    """Train ``runs`` one after another; returns {run name: done / interrupted / failed}.

    A failed run is reported (its error.txt and train.log say why) and the sweep goes on. With
    ``time_budget_s``, a run is not started when the time so far plus the longest run of this
    launch would pass the budget (a machine that is lent for a fixed time: a run cut off there
    would be lost); the runs left are reported and a later launch trains them."""
    if mode not in LOCAL_MODES:
        raise ValueError(f"launch mode {mode!r} is not local (expected one of {LOCAL_MODES})")
    world = spec.launch.world_size
    if mode in ("inprocess", "subprocess") and world != 1:
        raise ValueError(f"launch mode {mode!r} runs one process, but the sweep was planned for "
                         f"world size {world}; use 'torchrun', 'slurm' or 'multinode'")
    if mode == "torchrun" and spec.launch.nnodes != 1:
        raise ValueError("launch mode 'torchrun' is one node; use 'slurm' or 'multinode' for "
                         f"launch.nnodes={spec.launch.nnodes}")
    todo = runs[:max_runs] if max_runs is not None else runs
    statuses, launch_start, longest = {}, time.time(), 0.0
    for i, run in enumerate(todo, 1):
        if time_budget_s is not None and time.time() - launch_start + longest > time_budget_s:
            left = [r.name for r in todo[i - 1:]]
            log(f"time budget: {time.time() - launch_start:.0f} s of {time_budget_s:.0f} s used and "
                f"the longest run took {longest:.0f} s; not starting {len(left)}: {', '.join(left)}")
            break
        segments = run.folder.segments()
        resume = f" (resuming after step {segments[-1]['end_step']})" if segments else ""
        log(f"[{i}/{len(todo)}] {run.name}: training{resume}")
        start = time.time()
        if mode == "inprocess":
            status = _train_in_process(run, overrides)
        else:
            cmd = (worker_command(run.folder.path, overrides) if mode == "subprocess" else
                   torchrun_command(run.folder.path, spec.launch.nproc_per_node, overrides))
            with open(run.folder.log_path, "a") as out:
                code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
            status = DONE if run.folder.done else (INTERRUPTED if code == 0 else FAILED)
        statuses[run.name] = status
        detail = ""
        if status == DONE:
            detail = f", validation loss {run.folder.result()['valid_loss']:.4f}"
        elif status == FAILED:
            detail = f", see {run.folder.error_path if os.path.exists(run.folder.error_path) else run.folder.log_path}"
        longest = max(longest, time.time() - start)
        log(f"[{i}/{len(todo)}] {run.name}: {status} in {time.time() - start:.1f} s{detail}")
    return statuses


def _train_in_process(run: PlannedRun, overrides: list[str]) -> str:
    with open(run.folder.log_path, "a") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        try:
            return train_run(run.folder.path, overrides)
        except Exception:  # noqa: BLE001 -- recorded in error.txt; the sweep goes on
            return FAILED


def _runs_file(path: str, runs: list[PlannedRun]) -> None:
    write_text_atomic(path, "".join(r.folder.path + "\n" for r in runs))


def write_slurm_script(spec: SweepSpec, out_dir: str, runs: list[PlannedRun],
                       overrides: list[str] = (), workdir: Optional[str] = None) -> str:
    """``<out>/slurm/sweep.sbatch``: a job array, one task per run in ``runs`` (listed in
    ``<out>/slurm/runs.txt``). Returns the script's path."""
    if not runs:
        raise ValueError("no unfinished runs to submit")
    la, s = spec.launch, spec.launch.slurm
    folder = os.path.join(os.path.abspath(out_dir), "slurm")
    runs_file = os.path.join(folder, "runs.txt")
    _runs_file(runs_file, runs)
    gpus = la.nproc_per_node if s.gpus_per_node is None else s.gpus_per_node
    array = f"0-{len(runs) - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    directives = [f"--job-name={spec.name}", f"--array={array}", f"--nodes={la.nnodes}",
                  "--ntasks-per-node=1", f"--time={s.time}",
                  f"--output={os.path.join(folder, 'logs', '%A_%a.out')}", "--requeue"]
    if gpus:
        directives.append(f"--gpus-per-node={gpus}")
    for key in ("partition", "account", "qos", "mem"):
        if getattr(s, key):
            directives.append(f"--{key}={getattr(s, key)}")
    if s.cpus_per_task:
        directives.append(f"--cpus-per-task={s.cpus_per_task}")
    directives += list(s.sbatch)
    worker = f'-m {WORKER_MODULE} "$RUN_DIR"' + "".join(" " + shlex.quote(o) for o in overrides)
    lines = [
        "#!/bin/bash",
        f"# Sweep {spec.name}: {len(runs)} unfinished runs, one array task each (generated by",
        "# tools/scaling/sweep.py launch --mode slurm). A task whose run finished meanwhile exits at",
        "# once; a requeued (preempted) task resumes from the run's newest checkpoint.",
        *[f"#SBATCH {d}" for d in directives],
        "set -euo pipefail",
        f"cd {shlex.quote(os.path.abspath(workdir or os.getcwd()))}",
        *s.setup,
        f"RUN_DIR=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shlex.quote(runs_file)})",
        # awk reads every line: `head -n 1` can exit first and kill scontrol with SIGPIPE,
        # which pipefail turns into a failed job.
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\')',
        f"MASTER_PORT=$(({la.master_port} + SLURM_ARRAY_TASK_ID % 1000))",
        'echo "run $RUN_DIR on $SLURM_JOB_NODELIST"',
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"  torchrun --nnodes=\"$SLURM_NNODES\" --nproc_per_node={la.nproc_per_node} \\",
        '    --rdzv_id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" --rdzv_backend=c10d \\',
        '    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \\',
        f"    {worker}",
    ]
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    path = os.path.join(folder, "sweep.sbatch")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def write_multinode_script(spec: SweepSpec, out_dir: str, runs: list[PlannedRun],
                           overrides: list[str] = (), workdir: Optional[str] = None) -> str:
    """``<out>/multinode/launch.sh``: start it on every node with NODE_RANK and MASTER_ADDR set;
    the nodes train the runs one after another, together (needs a shared file system)."""
    if not runs:
        raise ValueError("no unfinished runs to launch")
    la = spec.launch
    folder = os.path.join(os.path.abspath(out_dir), "multinode")
    runs_file = os.path.join(folder, "runs.txt")
    _runs_file(runs_file, runs)
    extra = "".join(" " + shlex.quote(o) for o in overrides)
    lines = [
        "#!/bin/bash",
        f"# Sweep {spec.name}: {len(runs)} unfinished runs on {la.nnodes} nodes x {la.nproc_per_node} "
        "processes.",
        f"# On every node: NODE_RANK=<0..{la.nnodes - 1}> MASTER_ADDR=<node 0's address> bash {os.path.join(folder, 'launch.sh')}",
        "set -uo pipefail",
        ': "${NODE_RANK:?set NODE_RANK to this node\'s rank}"',
        ': "${MASTER_ADDR:?set MASTER_ADDR to node 0\'s address}"',
        f"PORT_BASE=${{MASTER_PORT:-{la.master_port}}}",
        f"cd {shlex.quote(os.path.abspath(workdir or os.getcwd()))}",
        "i=0",
        "while read -r RUN_DIR; do",
        "  i=$((i + 1))",
        '  if [ -f "$RUN_DIR/result.json" ]; then echo "skip $RUN_DIR (done)"; continue; fi',
        f"  torchrun --nnodes={la.nnodes} --nproc_per_node={la.nproc_per_node} --node_rank=\"$NODE_RANK\" \\",
        '    --master_addr="$MASTER_ADDR" --master_port=$((PORT_BASE + i % 1000)) \\',
        f"    -m {WORKER_MODULE} \"$RUN_DIR\"{extra} || echo \"$RUN_DIR failed (see its error.txt)\"",
        f"done < {shlex.quote(runs_file)}",
    ]
    path = os.path.join(folder, "launch.sh")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def submit_slurm(script: str) -> str:
    """``sbatch script``; returns sbatch's answer (the job id line)."""
    try:
        out = subprocess.run(["sbatch", script], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch is not on PATH: submit the script on the cluster's login node") from None
    return out.stdout.strip()
