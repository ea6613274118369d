"""Checkpoints of multi-process runs (torchrun, gloo, CPU, float32).

- Resharding: a TP = 2 x PP = 2 run (4 processes) saves at step 3 and goes on to step 6; its
  step-3 checkpoint resumes at TP = 1 x PP = 1 x DP = 4 and TP = 2 x DP = 2 (same launch) and at
  TP = 1 x PP = 1 in this process. Steps 4-6 must repeat the run that kept its layout within
  LOSS_TOL = 1e-5 (measured: at most 4.8e-7, one float32 ulp of a loss of 5.5, from the other
  reduction order of TP / DP sums).
- Surviving crashes (DP = 2, 2 processes, 12 steps, a checkpoint every 2): a job is killed with
  SIGKILL (torchrun and every process below it) after a checkpoint; the next one resumes from the newest
  complete checkpoint and is stopped with SIGTERM sent to torchrun, which must leave a complete
  checkpoint; a third finishes the run. Every loss equals the uninterrupted run's bitwise.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

import torchrun_batch  # noqa: E402
from checkpoint_common import TRAIN_ITERS, copy_checkpoint, raw_config, run_config  # noqa: E402
from megatron_transmamba.training import checkpoint as ckpt  # noqa: E402

WORKER = Path(__file__).with_name("checkpoint_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 420          # the 2-core machine is shared; unloaded, a launch takes 10-25 s
LOSS_TOL = 1e-5
CHAIN_STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo/CPU launches")


def torchrun(nproc: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(WORKER), *map(str, args)]


def launch(nproc: int, *args) -> subprocess.CompletedProcess:
    """Run the worker under torchrun to the end; fail with its output's tail if it fails."""
    result = subprocess.run(torchrun(nproc, *args), cwd=REPO_ROOT, env=ENV, capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def read_ranks(out_dir: Path, tag: str, nproc: int) -> list:
    return [json.loads((out_dir / f"{tag}rank{rank}.json").read_text()) for rank in range(nproc)]


def losses(run: dict) -> dict:
    return {int(step): loss for step, loss in run["losses"].items()}


class Job:
    """A torchrun launch whose output is read while it runs."""

    def __init__(self, command: list):
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float = LAUNCH_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}:\n{self.output()[-6000:]}")

    def finish(self, timeout_s: float = LAUNCH_TIMEOUT_S) -> int:
        code = self.proc.wait(timeout=timeout_s)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        """SIGKILL to torchrun and all its descendants (the workers run in sessions of their
        own, so the process group is not enough), as a scheduler killing the job would."""
        import psutil
        try:
            parent = psutil.Process(self.proc.pid)
            processes = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def output(self) -> str:
        return "".join(self.lines)


def chain_config(out_dir: Path, launcher=None) -> Path:
    """The YAML run config of the DP = 2 job of ``chain`` (CHAIN_STEPS steps, saves in
    ``out_dir``/ckpt)."""
    config = out_dir / "run.yaml"
    config.write_text(yaml.safe_dump(raw_config(out_dir / "data_cache", out_dir / "ckpt",
                                                train_iters=CHAIN_STEPS)))
    return config


RESHARD = torchrun_batch.job(4, WORKER, "reshard", "{out}")
CHAIN_REFERENCE = torchrun_batch.job(2, WORKER, "run", "{out}", "{out}/run.yaml", "ref-",
                                     "--checkpoint.save=null", prepare=chain_config)


@pytest.fixture(scope="module")
def reshard(torchrun_jobs):
    run = torchrun_jobs(RESHARD)
    return run.out_dir, run.stdout, run.ranks("reshard-rank{rank}.json")


def test_checkpoint_saved_at_tp2_pp2_loads_at_other_layouts(reshard, tmp_path):
    out_dir, stdout, ranks = reshard
    assert "layout TP=2 x PP=2 x DP=1 = 4 ranks" in stdout
    assert "layout TP=1 x PP=1 x DP=4 = 4 ranks" in stdout
    assert "layout TP=2 x PP=1 x DP=2 = 4 ranks" in stdout
    assert "RNG states not restored: the layout changed (tensor_model_parallel_size 2 -> 1, " \
           "pipeline_model_parallel_size 2 -> 1, data_parallel_size 1 -> 4)" in stdout
    from megatron_transmamba.training.pretrain import pretrain
    copy_checkpoint(out_dir / "tp2_pp2", 3, tmp_path / "tp1")
    single = pretrain(run_config(out_dir / "data_cache", tmp_path / "tp1", resume=True))
    assert single.layout["world_size"] == 1 and single.resumed_from.endswith("iter_0000003")
    worst = 0.0
    for rank, runs in enumerate(ranks):
        reference = losses(runs["tp2_pp2"])
        assert sorted(reference) == list(range(1, TRAIN_ITERS + 1))
        assert (runs["tp2_pp2"]["layout"]["tensor_model_parallel_size"],
                runs["tp2_pp2"]["layout"]["pipeline_model_parallel_size"]) == (2, 2)
        resumed = {"tp1_dp4": losses(runs["tp1_dp4"]), "tp2_dp2": losses(runs["tp2_dp2"]),
                   "tp1_single": single.train_losses}
        assert (runs["tp1_dp4"]["layout"]["data_parallel_size"],
                runs["tp2_dp2"]["layout"]["data_parallel_size"]) == (4, 2)
        for name, run in resumed.items():
            assert sorted(run) == [4, 5, 6], (rank, name)
            for step, loss in run.items():
                worst = max(worst, abs(loss - reference[step]))
                assert loss == pytest.approx(reference[step], abs=LOSS_TOL), (rank, name, step)
    print(f"largest loss difference after resharding: {worst:.2e}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, torchrun_jobs):
    """Reference, killed, SIGTERM-stopped and finishing runs of the same DP = 2 job."""
    out_dir = tmp_path_factory.mktemp("chain")
    save = out_dir / "ckpt"
    config = chain_config(out_dir)
    runs = {"reference": torchrun_jobs(CHAIN_REFERENCE).ranks("ref-rank{rank}.json")}

    killed = Job(torchrun(2, "run", out_dir, config, "killed-"))
    killed.wait_for(r"saved .*iter_0000004")
    killed.kill()                                       # SIGKILL to torchrun and its workers
    runs["killed_output"] = killed.output()
    runs["after_kill"] = [step for step, _ in ckpt.checkpoint_dirs(str(save))]

    stopped = Job(torchrun(2, "run", out_dir, config, "stopped-", "--checkpoint.resume=true"))
    start = int(stopped.wait_for(r"resuming from step (\d+)").group(1))
    stopped.wait_for(rf"step +{start + 1} \| loss")
    stopped.proc.send_signal(signal.SIGTERM)            # to torchrun, which passes it on
    runs["stopped_code"] = stopped.finish()
    runs["stopped_output"] = stopped.output()
    runs["stopped"] = read_ranks(out_dir, "stopped-", 2)

    launch(2, "run", out_dir, config, "final-", "--checkpoint.resume=true")
    runs["final"] = read_ranks(out_dir, "final-", 2)
    runs["save"] = save
    return runs


def test_killed_job_resumes_exactly_from_its_newest_complete_checkpoint(chain):
    assert not list(Path(chain["save"]).parent.glob("killed-rank*.json"))   # it never finished
    assert chain["after_kill"] and chain["after_kill"][-1] >= 4
    start = chain["after_kill"][-1]
    assert start < CHAIN_STEPS, "the killed job finished before the kill: nothing was tested"
    for rank in range(2):
        reference = losses(chain["reference"][rank])
        assert sorted(reference) == list(range(1, CHAIN_STEPS + 1))
        stopped, final = losses(chain["stopped"][rank]), losses(chain["final"][rank])
        assert chain["stopped"][rank]["resumed_from"].endswith(f"iter_{start:07d}")
        assert min(stopped) == start + 1 and max(final) == CHAIN_STEPS
        assert sorted({**stopped, **final}) == list(range(start + 1, CHAIN_STEPS + 1))
        for step, loss in {**stopped, **final}.items():
            assert loss == reference[step], f"rank {rank} step {step}: resume is not exact"


def test_sigterm_leaves_a_complete_checkpoint(chain):
    assert "stopping (SIGTERM)" in chain["stopped_output"], chain["stopped_output"][-4000:]
    stopped = chain["stopped"][0]
    assert stopped["stop_reason"] == "SIGTERM"
    last = max(losses(stopped))
    assert last < CHAIN_STEPS, "the job finished before SIGTERM arrived: nothing was tested"
    path = str(Path(chain["save"]) / f"iter_{last:07d}")
    assert stopped["saved"][-1] == path
    assert ckpt.verify(path) == [] and ckpt.read_info(path)["step"] == last
    assert chain["final"][0]["resumed_from"] == path
