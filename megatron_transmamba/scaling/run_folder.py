"""One sweep run's folder: its files, its state, and atomic writes.

    <sweep>/runs/<run>/
      config.yaml      the resolved run config (what the trainer reads; reproducible by hand with
                       examples/pretrain.py --config)
      run.json         the plan's record: family, knob value, budget, seed, parameters, FLOPs
      checkpoints/     the trainer's checkpoints (checkpoint.resume is on: a relaunch resumes)
      segments.jsonl   one line per training process that ended normally (a fresh start or a
                       resume): steps, seconds, losses
      result.json      the completion marker: written once, atomically (temp file + rename), after
                       the last step; a run with it is never trained again
      error.txt        the traceback of the last failed attempt
      train.log        the trainer's output
"""

from __future__ import annotations

import json
import os
import tempfile

PENDING, STARTED, FAILED, DONE = "pending", "started", "failed", "done"


def write_text_atomic(path: str, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a reader
    (or a crash) sees the old file or the whole new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # mkstemp's 0600 would hide results from others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunFolder:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.name = os.path.basename(self.path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config_path(self) -> str:
        return self.file("config.yaml")

    @property
    def checkpoint_dir(self) -> str:
        return self.file("checkpoints")

    @property
    def result_path(self) -> str:
        return self.file("result.json")

    @property
    def error_path(self) -> str:
        return self.file("error.txt")

    @property
    def log_path(self) -> str:
        return self.file("train.log")

    def record(self) -> dict:
        return read_json(self.file("run.json")) or {}

    def result(self) -> dict | None:
        return read_json(self.result_path)

    @property
    def done(self) -> bool:
        return self.result() is not None

    def segments(self) -> list[dict]:
        path = self.file("segments.jsonl")
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
        return out

    def append_segment(self, segment: dict) -> None:
        with open(self.file("segments.jsonl"), "a") as f:
            f.write(json.dumps(segment) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def has_progress(self) -> bool:
        """Anything a re-plan must not silently overwrite: results, checkpoints or segments."""
        ckpt = self.checkpoint_dir
        return (self.done or os.path.exists(self.file("segments.jsonl"))
                or (os.path.isdir(ckpt) and any(n.startswith("iter_") for n in os.listdir(ckpt))))

    def status(self) -> str:
        if self.done:
            return DONE
        if os.path.exists(self.error_path):
            return FAILED
        return STARTED if self.has_progress() else PENDING
