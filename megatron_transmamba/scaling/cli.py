"""The sweep command line (``tools/scaling/sweep.py``): plan, launch, status, collect, fit, plot,
or ``run`` for all of them; ``study`` and ``report`` for a comparison of models at one size.

    python tools/scaling/sweep.py run examples/sweeps/tiny_cpu.yaml
    python tools/scaling/sweep.py launch examples/sweeps/gpu_scaling.yaml --mode slurm --submit
    python tools/scaling/sweep.py fit runs/sweeps/tiny_cpu --bootstrap 200
    python tools/scaling/sweep.py study examples/sweeps/paper_study_cpu.yaml --only transformer,mamba2
    python tools/scaling/sweep.py report runs/sweeps/paper_study_cpu

SWEEP is a sweep file, or the output folder of a planned sweep (it holds a copy, sweep.yaml).
``launch`` and ``run`` pass ``--section.key=value`` arguments to every run they start, for that
launch only (``--training.exit_at_step=20`` stops each run early, as a preemption would).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from megatron_transmamba.scaling import collect as collect_mod
from megatron_transmamba.scaling import launch as launch_mod
from megatron_transmamba.scaling.plan import (PlannedRun, default_output_dir, expand, plan_sweep,
                                              write_plan)
from megatron_transmamba.scaling.run_folder import RunFolder, read_json, write_json_atomic
from megatron_transmamba.scaling.sweep_file import LAUNCH_MODES, SweepSpec, load_sweep


def _open(sweep: str, out: str | None) -> tuple[SweepSpec, str]:
    if os.path.isdir(sweep):
        copy = os.path.join(sweep, "sweep.yaml")
        if not os.path.exists(copy):
            raise ValueError(f"{sweep}: a folder without sweep.yaml (give the sweep file, or a planned "
                             "sweep's output folder)")
        return load_sweep(copy), os.path.abspath(out or sweep)
    spec = load_sweep(sweep)
    return spec, os.path.abspath(out or default_output_dir(spec))


def _planned(out_dir: str) -> list[PlannedRun]:
    plan = read_json(os.path.join(out_dir, "plan.json"))
    if plan is None:
        raise ValueError(f"{out_dir}: no plan.json; run `plan` (or `launch`, `run`) first")
    return [PlannedRun(r["name"], RunFolder(os.path.join(out_dir, "runs", r["name"])), {}, r)
            for r in plan["runs"]]


def _counts(runs: list[PlannedRun]) -> str:
    counts = Counter(r.folder.status() for r in runs)
    return ", ".join(f"{counts[k]} {k}" for k in ("done", "started", "failed", "pending") if counts[k])


def cmd_plan(args, spec: SweepSpec, out_dir: str) -> int:
    out_dir, runs = plan_sweep(spec, out_dir)
    print(f"sweep {spec.name}: {len(runs)} runs in {out_dir} ({_counts(runs)})")
    print(f"{'family':<14}{spec.size.knob:>7}{'pattern':>16}{'hidden':>8}{'params':>12}"
          f"{'FLOPs/token':>13}{'budget':>10}{'iters':>9}{'tokens':>17}{'FLOPs':>10}")
    seen = set()
    for r in runs:
        rec = r.record
        key = (rec["family"], rec["size"], rec["budget"])
        if key in seen:
            continue
        seen.add(key)
        print(f"{rec['family']:<14}{rec['size']:>7}{rec['layer_pattern'][:15]:>16}{rec['hidden_size']:>8}"
              f"{rec['params']:>12,}{rec['flops_per_token']:>13.3g}{rec['budget']:>10.3g}"
              f"{rec['train_iters']:>9}{rec['tokens']:>17,}{rec['flops']:>10.3g}")
    total = sum(r.record["flops"] for r in runs)
    line = f"total training FLOPs: {total:.3g}"
    if args.peak_tflops:
        hours = total / (args.peak_tflops * 1e12 * args.mfu) / 3600
        line += (f"; at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s per device: "
                 f"{hours:.3g} device-hours")
    print(line)
    return 0


def cmd_launch(args, spec: SweepSpec, out_dir: str) -> int:
    runs = expand(spec, out_dir)
    launch_mod.check_only(runs, args.only)     # before anything is written
    write_plan(spec, out_dir, runs)
    mode = args.mode or spec.launch.mode
    todo = launch_mod.select_runs(runs, args.only)
    if args.max_runs is not None:
        todo = todo[:args.max_runs]
    if args.time_budget_s is not None and mode in ("slurm", "multinode"):
        print(f"error: --time-budget-s applies to local launches; launch.mode={mode!r} writes "
              "a script whose runs the scheduler times", file=sys.stderr)
        return 2
    print(f"sweep {spec.name}: {len(runs)} runs ({_counts(runs)}); launching {len(todo)} ({mode})")
    if mode == "slurm":
        if not todo:
            return 0
        script = launch_mod.write_slurm_script(spec, out_dir, todo, args.overrides)
        print(f"wrote {script}")
        print(launch_mod.submit_slurm(script) if args.submit else f"submit with: sbatch {script}")
        return 0
    if mode == "multinode":
        if not todo:
            return 0
        script = launch_mod.write_multinode_script(spec, out_dir, todo, args.overrides)
        print(f"wrote {script}\non every node: NODE_RANK=<rank> MASTER_ADDR=<node 0> bash {script}")
        return 0
    statuses = launch_mod.launch_local(spec, todo, mode, args.overrides,
                                       time_budget_s=args.time_budget_s)
    counts = Counter(statuses.values())
    print(f"launched {len(statuses)}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          if statuses else "nothing to train: every run is done")
    return 1 if counts.get(launch_mod.FAILED) else 0


def cmd_status(args, spec: SweepSpec, out_dir: str) -> int:
    runs = _planned(out_dir)
    for r in runs:
        status = r.folder.status()
        result = r.folder.result() or {}
        segments = r.folder.segments()
        detail = (f"valid loss {result['valid_loss']:.4f}" if result else
                  f"at step {segments[-1]['end_step']}/{r.record['train_iters']}" if segments else "")
        print(f"{r.name:<48}{status:>9}  {detail}")
    print(f"{len(runs)} runs: {_counts(runs)}")
    return 0


def cmd_collect(args, spec: SweepSpec, out_dir: str) -> int:
    path, rows = collect_mod.collect(out_dir, _planned(out_dir))
    print(f"wrote {path} ({sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs done)")
    return 0


def cmd_fit(args, spec: SweepSpec, out_dir: str) -> int:
    from megatron_transmamba.scaling.fit import fit_sweep

    cmd_collect(args, spec, out_dir)
    rows = collect_mod.read_results(os.path.join(out_dir, "results.csv"))
    result = fit_sweep(rows, args.loss, args.params, args.bootstrap, args.seed)
    path = os.path.join(out_dir, "fit.json")
    write_json_atomic(path, result)
    print(f"wrote {path}: {result['law']} on {args.loss}, N = {args.params}")
    for family, f in result["families"].items():
        if "law" not in f:
            print(f"  {family}: {f['skipped']}")
            continue
        law, std = f["law"], f.get("bootstrap", {}).get("std", {})
        terms = "  ".join(f"{k}={law[k]:.4g}" + (f"±{std[k]:.2g}" if k in std else "")
                          for k in ("E", "A", "B", "alpha", "beta"))
        print(f"  {family} ({f['n_runs']} runs): {terms}; N_opt ~ C^{f['frontier']['params_exponent']:.3f}, "
              f"D_opt ~ C^{f['frontier']['tokens_exponent']:.3f}")
    return 0


def cmd_plot(args, spec: SweepSpec, out_dir: str) -> int:
    from megatron_transmamba.scaling.plot import plot_sweep

    fit = read_json(os.path.join(out_dir, "fit.json"))
    if fit is None:
        raise ValueError(f"{out_dir}: no fit.json; run `fit` first")
    rows = collect_mod.read_results(os.path.join(out_dir, "results.csv"))
    for path in plot_sweep(rows, fit, out_dir):
        print(f"wrote {path}")
    return 0


def cmd_run(args, spec: SweepSpec, out_dir: str) -> int:
    code = cmd_launch(args, spec, out_dir)
    if (args.mode or spec.launch.mode) not in launch_mod.LOCAL_MODES:
        print("runs were not trained here: collect, fit and plot once they finish")
        return code
    cmd_fit(args, spec, out_dir)
    cmd_plot(args, spec, out_dir)
    return code


def cmd_study(args, spec: SweepSpec, out_dir: str) -> int:
    from megatron_transmamba.scaling.study import check_study

    mode = args.mode or spec.launch.mode
    if mode not in launch_mod.LOCAL_MODES:
        raise ValueError(f"launch mode {mode!r}: study trains here ({', '.join(launch_mod.LOCAL_MODES)}); "
                         "on a cluster use `launch`, then `report` once the runs finish")
    runs = expand(spec, out_dir)               # checked before anything is written
    notes = check_study(runs)
    launch_mod.check_only(runs, args.only)
    write_plan(spec, out_dir, runs)
    for note in notes:
        print(f"note: {note}")
    todo = launch_mod.select_runs(runs, args.only)
    if args.max_runs is not None:
        todo = todo[:args.max_runs]
    print(f"study {spec.name}: {len(runs)} runs ({_counts(runs)}); training {len(todo)} ({mode})")
    statuses = launch_mod.launch_local(spec, todo, mode, args.overrides,
                                       time_budget_s=args.time_budget_s)
    counts = Counter(statuses.values())
    if statuses:
        print(f"trained {len(statuses)}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    cmd_report(args, spec, out_dir)
    return 1 if counts.get(launch_mod.FAILED) else 0


def cmd_report(args, spec: SweepSpec, out_dir: str) -> int:
    from megatron_transmamba.scaling.study import write_report

    runs = _planned(out_dir)
    collect_mod.collect(out_dir, runs)
    paths = write_report(spec, out_dir, runs)
    with open(paths[0]) as f:                  # the table by model, for the log
        text = f.read()
    print(text[text.index("## By model"):text.index("## By run")].strip())
    print(f"{_counts(runs)} of {len(runs)} runs; wrote " + ", ".join(os.path.relpath(p, out_dir)
                                                                    for p in paths) + f" in {out_dir}")
    return 0


COMMANDS = {"plan": cmd_plan, "launch": cmd_launch, "status": cmd_status, "collect": cmd_collect,
            "fit": cmd_fit, "plot": cmd_plot, "run": cmd_run, "study": cmd_study,
            "report": cmd_report}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"plan": "expand the grid into run folders (idempotent)",
             "launch": "train the unfinished runs, or write a SLURM / multi-node script",
             "status": "state of every run", "collect": "write results.csv",
             "fit": "collect, then fit each family's loss law and frontier (fit.json)",
             "plot": "PNG plots from results.csv and fit.json",
             "run": "plan, launch, collect, fit and plot",
             "study": "compare models of one size: plan, train the unfinished runs, report",
             "report": "a study's CSV, markdown table and loss curves from the finished runs"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("sweep", help="sweep file (YAML) or a planned sweep's output folder")
        p.add_argument("--out", help="output folder (default: the sweep's output_dir, or "
                                     "runs/sweeps/<name>)")
        if name == "plan":
            p.add_argument("--peak-tflops", type=float, help="print device-hours at this peak")
            p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU (default 0.4)")
        if name in ("launch", "run", "study"):
            p.add_argument("--mode", choices=LAUNCH_MODES, help="override launch.mode")
            p.add_argument("--only", help="only runs whose name or family matches one of these "
                                          "comma-separated globs (transformer,mamba2-*-s1)")
            p.add_argument("--max-runs", type=int, help="launch at most this many runs")
            p.add_argument("--time-budget-s", type=float,
                           help="local modes: start no run that would end past this many seconds, "
                                "going by the longest run of this launch")
        if name in ("launch", "run"):
            p.add_argument("--submit", action="store_true", help="slurm: sbatch the script")
        if name in ("fit", "run"):
            p.add_argument("--loss", default="valid_loss",
                           choices=("valid_loss", "train_loss", "final_train_loss"))
            p.add_argument("--params", default="params", choices=("params", "non_embedding_params"),
                           help="N of the law: all parameters (Chinchilla) or without the vocabulary "
                                "matrices (Kaplan)")
            p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (0: none)")
            p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if bad or (extra and args.command not in ("launch", "run", "study")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)} (run overrides are "
                     "--section.key=value, for launch, run and study)")
    args.overrides = extra
    try:
        spec, out_dir = _open(args.sweep, args.out)
        return COMMANDS[args.command](args, spec, out_dir)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
