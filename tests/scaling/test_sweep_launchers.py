"""SLURM job-array and multi-node scripts, checked by content and by running them against fake
srun / scontrol / torchrun commands (no scheduler here)."""

import os
import stat
import subprocess

import pytest
import yaml

from megatron_transmamba.scaling.launch import select_runs, write_multinode_script, write_slurm_script
from megatron_transmamba.scaling.plan import plan_sweep
from megatron_transmamba.scaling.run_folder import write_json_atomic
from megatron_transmamba.scaling.sweep_file import build_sweep
from megatron_transmamba.training.config import load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = os.path.join(REPO, "examples", "sweeps", "gpu_scaling.yaml")


@pytest.fixture
def fake_bin(tmp_path):
    """srun runs its command, scontrol names one host, torchrun appends its argv to calls.txt."""
    folder = tmp_path / "bin"
    folder.mkdir()
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": "#!/bin/bash\necho gpu-node-17\necho gpu-node-18\n",
        "torchrun": f'#!/bin/bash\necho "$@" >> {tmp_path}/calls.txt\n',
    }
    for name, text in scripts.items():
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def gpu_sweep(**launch):
    with open(GPU) as f:
        raw = yaml.safe_load(f)
    raw["launch"].update(launch)
    return build_sweep(raw)


def test_slurm_array_script_lists_unfinished_runs_and_runs_each_through_torchrun(tmp_path, fake_bin):
    spec = gpu_sweep(slurm={"partition": "gpu", "account": "lm-scaling", "time": "12:00:00",
                            "cpus_per_task": 8, "max_parallel": 16, "sbatch": ["--exclusive"],
                            "setup": [f"export PATH={fake_bin}:$PATH"]})
    out, runs = plan_sweep(spec, str(tmp_path / "sweep"))
    for run in runs[:2]:   # two runs finished earlier: not in the array
        write_json_atomic(run.folder.result_path, {"status": "done"})
    todo = select_runs(runs)
    script = write_slurm_script(spec, out, todo, workdir=REPO)
    text = open(script).read()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--job-name=gpu_scaling", "--array=0-57%16", "--nodes=1", "--ntasks-per-node=1",
                      "--gpus-per-node=1", "--time=12:00:00", "--partition=gpu", "--account=lm-scaling",
                      "--cpus-per-task=8", "--requeue", "--exclusive",
                      f"--output={out}/slurm/logs/%A_%a.out"):
        assert f"#SBATCH {directive}" in lines, directive
    assert f"cd {REPO}" in lines and f"export PATH={fake_bin}:$PATH" in lines
    assert lines.index(f"export PATH={fake_bin}:$PATH") < next(i for i, l in enumerate(lines) if "srun" in l)
    assert '-m megatron_transmamba.scaling.worker "$RUN_DIR"' in text
    assert "--rdzv_backend=c10d" in text and '--nnodes="$SLURM_NNODES" --nproc_per_node=1' in text
    listed = open(os.path.join(out, "slurm", "runs.txt")).read().split()
    assert listed == [r.folder.path for r in runs[2:]]
    assert all(os.path.isfile(os.path.join(p, "config.yaml")) for p in listed)
    assert subprocess.run(["bash", "-n", script]).returncode == 0

    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "x",
           "SLURM_ARRAY_JOB_ID": "991"}
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    call = open(tmp_path / "calls.txt").read().split()
    assert call[-3:] == ["-m", "megatron_transmamba.scaling.worker", runs[5].folder.path]
    assert "--rdzv_endpoint=gpu-node-17:29503" in call and "--rdzv_id=991_3" in call


def test_multi_node_script_and_configs_for_a_multi_process_sweep(tmp_path, fake_bin):
    spec = gpu_sweep(mode="multinode", nnodes=2, nproc_per_node=8)
    out, runs = plan_sweep(spec, str(tmp_path / "sweep"))
    cfg = load_run_config(runs[0].folder.config_path)
    # 16 ranks: global batch stays as configured; the relaunch resumes from the checkpoint
    assert runs[0].record["world_size"] == 16 and cfg.training.global_batch_size == 128
    assert cfg.checkpoint.save == runs[0].folder.checkpoint_dir and cfg.checkpoint.resume
    write_json_atomic(runs[1].folder.result_path, {"status": "done"})
    script = write_multinode_script(spec, out, runs[:3], ["--training.log_interval=7"], workdir=REPO)
    text = open(script).read()
    assert "--nnodes=2 --nproc_per_node=8 --node_rank=\"$NODE_RANK\"" in text
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "NODE_RANK": "1",
           "MASTER_ADDR": "10.0.0.5"}
    done = subprocess.run(["bash", script], env=env, check=True, capture_output=True, text=True)
    assert f"skip {runs[1].folder.path} (done)" in done.stdout
    calls = open(tmp_path / "calls.txt").read().splitlines()
    assert len(calls) == 2
    for call, run, port in zip(calls, (runs[0], runs[2]), (29501, 29503)):
        assert call.endswith(f"-m megatron_transmamba.scaling.worker {run.folder.path} --training.log_interval=7")
        assert f"--node_rank=1 --master_addr=10.0.0.5 --master_port={port}" in call


def test_local_modes_refuse_a_multi_process_plan(tmp_path):
    from megatron_transmamba.scaling.launch import launch_local

    spec = gpu_sweep(nproc_per_node=2)
    with pytest.raises(ValueError, match="world size 2"):
        launch_local(spec, [], "inprocess")
    spec = gpu_sweep(nnodes=2)
    with pytest.raises(ValueError, match="one node"):
        launch_local(spec, [], "torchrun")


def test_time_budget_is_refused_for_launchers_that_write_scripts(tmp_path, capsys):
    """--time-budget-s guards local launches; for slurm / multinode it would be ignored, so it is
    an error naming the option."""
    from megatron_transmamba.scaling.cli import main

    for mode in ("slurm", "multinode"):
        code = main(["launch", GPU, "--out", str(tmp_path / mode), "--mode", mode,
                     "--time-budget-s", "60"])
        assert code == 2
        assert "--time-budget-s applies to local launches" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / mode / mode)       # no script written
