"""Scaling-law sweeps: a sweep file -> run folders -> training -> one CSV -> Chinchilla fits and
the compute-optimal frontier -> plots (docs/scaling.md).

Modules, in pipeline order: ``sweep_file`` (the YAML format), ``plan`` (grid expansion and
model shapes from one size knob), ``run_folder`` (a run's files and state), ``worker`` (train one
run: skip, resume, write results atomically), ``launch`` (local, SLURM and multi-node launchers),
``collect`` (results.csv), ``fit`` (L(N, D) = E + A/N^alpha + B/D^beta, bootstrap, frontier),
``plot`` (PNGs), ``study`` (a comparison of models at one size: loss curves, tables and plots,
docs/paper_study.md) and ``cli`` (what ``tools/scaling/sweep.py`` runs). Parameter and FLOP counts
come from ``megatron_transmamba.flops``.
"""
