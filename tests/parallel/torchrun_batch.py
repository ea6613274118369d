"""Several torchrun workers in one launch: each process of a torchrun launch imports torch and
megatron-core (about 5 s of CPU), which on the 2-core CI machine cost more than most of the
workers' own work. Test modules register their worker runs (``job``) at import; the first test
that asks for one (the ``torchrun_jobs`` fixture of tests/conftest.py) launches every registered
job of that process count whose module was collected, one after the other in the same
processes, each with its own output folder, ``sys.argv``, stdout and stderr.

A worker that raises, or runs past ``LAUNCH_TIMEOUT_S``, ends its launch (its traceback is that
job's failure); jobs that had not started are relaunched without it, so a failing job fails
only its own tests. A worker must leave no process group behind (``destroy_distributed``), as
it must under its own torchrun.

Run by torchrun, this file is the runner: ``torchrun_batch.py SPEC.json``.
"""

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

LAUNCH_TIMEOUT_S = 420   # per job; the 2-core machine is shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
JOBS = []                # every registered job, in registration (import) order
LAUNCHERS = []           # the session's launchers (tests/conftest.py reports their jobs' times)


class Job:
    """One worker run: ``worker`` (a script) with ``args`` under torchrun on ``nproc`` processes.
    ``{out}`` in an argument becomes the job's output folder; ``prepare(out_dir, launcher)``
    runs in the pytest process before the launch (``launcher(other_job)`` gives another job's
    results)."""

    def __init__(self, nproc: int, worker, *args, prepare=None, module: str = ""):
        self.nproc, self.worker, self.args, self.prepare = nproc, Path(worker), args, prepare
        self.module = module
        parts = [self.worker.stem, *(str(a) for a in args if "{out}" not in str(a))]
        self.name = re.sub(r"[^\w.=]+", "-", "-".join(parts))   # a folder name

    def __repr__(self) -> str:
        return f"Job({self.name}, nproc={self.nproc})"


def job(nproc: int, worker, *args, prepare=None) -> Job:
    """Register a worker run of the calling test module (see ``Job``)."""
    registered = Job(nproc, worker, *args, prepare=prepare,
                     module=sys._getframe(1).f_globals["__name__"])
    JOBS.append(registered)
    return registered


class Launched:
    """A finished job: its output folder and what its ranks printed (rank 0 first)."""

    def __init__(self, out_dir: Path, nproc: int, seconds: float):
        self.out_dir, self.nproc, self.seconds = out_dir, nproc, seconds
        self.stdout = "".join((out_dir / f"stdout{r}.txt").read_text() for r in range(nproc))

    def ranks(self, name: str = "rank{rank}.json") -> list:
        """The JSON file every rank wrote (``name`` with its rank), in rank order."""
        return [json.loads((self.out_dir / name.format(rank=r)).read_text())
                for r in range(self.nproc)]


class Launcher:
    """The session's launches (the ``torchrun_jobs`` fixture): ``launcher(job)`` is the job's
    ``Launched``, launching its batch first if it has not run."""

    def __init__(self, root: Path, modules: set):
        self.root, self.modules = root, modules
        self.results, self.errors = {}, {}
        LAUNCHERS.append(self)

    def summary(self) -> list:
        """One line per job run, slowest first: its seconds (the slowest rank) and name."""
        lines = [f"{r.seconds:7.1f}s  {j.nproc} processes  {j.name}"
                 for j, r in sorted(self.results.items(), key=lambda kv: -kv[1].seconds)]
        return lines + [f"  failed  {j.nproc} processes  {j.name}" for j in self.errors]

    def __call__(self, wanted: Job) -> Launched:
        if wanted not in self.results and wanted not in self.errors:
            self._launch([j for j in JOBS if j.nproc == wanted.nproc and j not in self.results
                          and j not in self.errors and (j.module in self.modules or j is wanted)])
        if wanted in self.errors:
            raise AssertionError(f"{wanted.name}: {self.errors[wanted]}")
        return self.results[wanted]

    def out_dir(self, j: Job) -> Path:
        return self.root / j.name

    def _launch(self, batch: list) -> None:
        ready = []
        for j in batch:
            out = self.out_dir(j)
            out.mkdir(parents=True, exist_ok=True)
            try:
                if j.prepare is not None:
                    j.prepare(out, self)
            except Exception as error:   # noqa: BLE001 - the job's tests report it
                self.errors[j] = f"prepare failed: {error!r}"
                continue
            ready.append(j)
        while ready:
            ready = self._run(ready)

    def _run(self, batch: list) -> list:
        """One launch of ``batch``; returns the jobs that did not start (to relaunch)."""
        import subprocess

        spec = self.root / f"batch{len(list(self.root.glob('batch*.json')))}.json"
        spec.write_text(json.dumps([
            {"name": j.name, "worker": str(j.worker.resolve()), "out_dir": str(self.out_dir(j)),
             "args": [str(a).replace("{out}", str(self.out_dir(j))) for a in j.args]}
            for j in batch]))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={batch[0].nproc}", __file__, str(spec)]
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output = process.communicate(timeout=LAUNCH_TIMEOUT_S * len(batch))[0]
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            output = process.communicate()[0] + "\n(launch timed out)"
        left = []
        for j in batch:
            out, ranks = self.out_dir(j), range(j.nproc)
            if all((out / f".done{r}").exists() for r in ranks):
                seconds = max(float((out / f".done{r}").read_text()) for r in ranks)
                self.results[j] = Launched(out, j.nproc, seconds)
            elif any((out / f".started{r}").exists() for r in ranks):
                errors = "".join((out / f"stderr{r}.txt").read_text()[-3000:]
                                 for r in ranks if (out / f"stderr{r}.txt").exists())
                self.errors[j] = f"failed (exit code {process.returncode}):\n{errors}\n" \
                                 f"launch output:\n{output[-3000:]}"
            else:
                left.append(j)
        if len(left) == len(batch):   # nothing started: the launch itself failed
            for j in left:
                self.errors[j] = f"the launch failed:\n{output[-6000:]}"
            return []
        return left


def _kill_tree(process) -> None:
    """SIGKILL to torchrun and every process below it (the workers have sessions of their own)."""
    import psutil
    try:
        parent = psutil.Process(process.pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _prefix_env_rendezvous(prefix: str) -> None:
    """Give the next process groups' env:// rendezvous the store prefix ``prefix``. torchrun's
    store outlives a job's process groups and a new default group reuses the old group names,
    so a worker that calls ``init_process_group`` itself would read the previous job's gloo
    addresses (megatron_transmamba's ``initialize_distributed`` adds a prefix of its own). The
    handler table is torch's private registry of rendezvous schemes."""
    import importlib

    from torch.distributed import PrefixStore

    # the module (torch.distributed.rendezvous, as an attribute, is its function)
    handlers = importlib.import_module("torch.distributed.rendezvous")._rendezvous_handlers
    env = _ENV_HANDLER.setdefault("env", handlers["env"])

    def handler(url, **kwargs):
        for store, rank, world_size in env(url, **kwargs):
            yield PrefixStore(prefix, store), rank, world_size

    handlers["env"] = handler


_ENV_HANDLER = {}


def _time_out(stderr: Path) -> None:
    with open(stderr, "a") as file:
        file.write(f"\ntimed out after {LAUNCH_TIMEOUT_S} s\n")
    os._exit(1)


def _run_job(spec: dict, rank: int, seed: int) -> None:
    """Run one worker as torchrun would (``__main__``, its folder first on sys.path), its
    output in the job's folder."""
    import runpy

    import torch

    out = Path(spec["out_dir"])
    (out / f".started{rank}").write_text("")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [spec["worker"], *spec["args"]]
    sys.path.insert(0, str(Path(spec["worker"]).parent))
    torch.manual_seed(seed)                   # the default generator as a fresh process has it
    _prefix_env_rendezvous(f"torchrun_batch/{spec['name']}")
    # a hang (a rank waiting in a collective) ends the launch: exit from another thread
    watchdog = threading.Timer(LAUNCH_TIMEOUT_S, _time_out, (out / f"stderr{rank}.txt",))
    watchdog.daemon = True
    watchdog.start()
    sys.stdout.flush(), sys.stderr.flush()
    fds = os.dup(1), os.dup(2)
    with open(out / f"stdout{rank}.txt", "w") as stdout, \
            open(out / f"stderr{rank}.txt", "w") as stderr:
        os.dup2(stdout.fileno(), 1), os.dup2(stderr.fileno(), 2)
        start = time.monotonic()
        try:
            runpy.run_path(spec["worker"], run_name="__main__")
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                raise
        finally:
            watchdog.cancel()
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(fds[0], 1), os.dup2(fds[1], 2)
            os.close(fds[0]), os.close(fds[1])
            sys.argv, sys.path[:] = saved_argv, saved_path
    if torch.distributed.is_initialized():
        raise RuntimeError(f"{spec['name']} left a process group behind")
    (out / f".done{rank}").write_text(f"{time.monotonic() - start:.1f}")


def main() -> None:
    import traceback

    import torch

    rank, seed = int(os.environ["RANK"]), torch.initial_seed()
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        try:
            _run_job(spec, rank, seed)
        except BaseException:
            text = traceback.format_exc()
            with open(Path(spec["out_dir"]) / f"stderr{rank}.txt", "a") as stderr:
                stderr.write(text)
            sys.stderr.write(f"rank {rank}: {spec['name']} failed\n{text}")
            sys.stderr.flush()
            os._exit(1)   # torchrun stops the other ranks; the pytest side relaunches the rest


if __name__ == "__main__":
    main()
