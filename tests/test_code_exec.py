"""The code-execution sandbox against hostile programs, in each mode this machine offers: namespaces (with and
without a pids cgroup), the fallback, and the fallback with a pids cgroup. Each test states the exact outcome;
docs/safety.md points here."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from layerprune.evaluation import code_exec
from layerprune.evaluation.code_exec import Limits, Sandbox, run_python, sandbox_mode
from layerprune.evaluation.code_exec.pids_cgroup import find_base

QUICK = Limits(timeout_s=1.0)
SRC = Path(code_exec.__file__).parents[3]  # the folder holding the layerprune package


@pytest.fixture(params=["namespaces", "namespaces-only", "fallback", "fallback+cgroup"])
def sandbox(request) -> Sandbox:
    if request.param.startswith("namespaces"):
        detected = sandbox_mode()
        if not detected.unshare:
            pytest.skip(f"no namespaces here: {detected.reason}")
        if request.param == "namespaces-only":  # no pids cgroup whose kill-all could hide a namespace gap
            return dataclasses.replace(detected, cgroups=None)
        return detected
    if request.param == "fallback+cgroup":
        base = find_base()
        if base is None:
            pytest.skip("no writable pids cgroup here (usually needs root)")
        return Sandbox(None, cgroups=str(base), reason="test")
    return Sandbox(None, reason="test")


def namespaces_only(sandbox: Sandbox) -> None:
    if not sandbox.unshare:
        pytest.skip("the fallback does not contain this (docs/safety.md)")


def processes_with(marker: str) -> list[int]:
    """Pids (in our /proc) of live processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                    found.append(int(entry.name))
        except OSError:
            pass
    return found


def wait_until(condition, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# An evaluator in its own process: /proc/<pid>/environ shows the environment a process was started with, so
# a variable must be there at start to be a real target; and the test can kill this evaluator.
EVALUATOR = """
import json, sys, types
from pathlib import Path
for name in ("layerprune", "layerprune.evaluation"):  # their __init__ imports torch: not needed here
    package = types.ModuleType(name)
    package.__path__ = [str(Path(sys.argv[1], *name.split(".")))]
    sys.modules[name] = package
from layerprune.evaluation import code_exec
fields = json.loads(sys.argv[2])
sandbox = code_exec.Sandbox(**{**fields, "unshare": fields["unshare"] and tuple(fields["unshare"])})
result = code_exec.run_python(sys.stdin.read(), code_exec.Limits(timeout_s=float(sys.argv[3])), sandbox=sandbox)
print(json.dumps(result.__dict__))
"""


def start_evaluator(sandbox: Sandbox, source: str, timeout_s: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", EVALUATOR, str(SRC), json.dumps(dataclasses.asdict(sandbox)), str(timeout_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    process.stdin.write(source)
    process.stdin.close()
    return process


# ------------------------------------------------------------------ ordinary programs


def test_passing_and_failing_programs_give_correct_results(sandbox):
    assert run_python("assert sum([1, 2]) == 3\n", QUICK, sandbox=sandbox).passed
    wrong = run_python("assert sum([1, 2]) == 4\n", QUICK, sandbox=sandbox)
    assert (wrong.status, wrong.detail, wrong.returncode) == ("failed", "AssertionError", 1)
    slow = run_python("while True:\n    pass\n", Limits(timeout_s=0.5), sandbox=sandbox)
    assert slow.status == "timed out"


# ------------------------------------------------------------------ hostile programs


def test_the_evaluators_environment_is_out_of_reach(sandbox, monkeypatch):
    token = f"fake-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("TOKEN", token)  # the evaluator below starts with it
    probe = (
        "import os, sys\n"
        f"token = {token.encode()!r}\n"
        "def leaks(pid):\n"
        "    try:\n"
        "        return token in open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError:\n"
        "        return False\n"
        "everywhere = [p for p in os.listdir('/proc') if p.isdigit() and leaks(p)]\n"
        "print(sorted(os.environ), leaks(os.getppid()), leaks(1), everywhere)\n"
        "sys.exit(1)\n"
    )
    evaluator = start_evaluator(sandbox, probe, timeout_s=5.0)
    detail = json.loads(evaluator.stdout.read())["detail"]
    assert evaluator.wait(timeout=10) == 0
    names = "['HOME', 'LANG', 'LAYERPRUNE_SANDBOX', 'PATH', 'TMPDIR']"
    if sandbox.unshare:  # no process it can see carries the token: its own /proc shows only itself
        assert detail == f"{names} False False []"
    else:  # its parent's environment is clean; the evaluator's own is readable (docs/safety.md)
        assert detail.startswith(f"{names} False ")


def test_a_double_forked_new_session_does_not_outlive_its_program(sandbox):
    marker = f"marker-{uuid.uuid4().hex}"
    for ending, expected in (("time.sleep(30)", "timed out"), ("sys.exit(0)", "passed")):
        program = (
            "import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
            "    os._exit(0)\n"
            "time.sleep(0.3)\n"
            f"{ending}\n"
        )
        assert run_python(program, QUICK, sandbox=sandbox).status == expected
        assert processes_with(marker) == []


def test_a_process_that_drops_its_environment_and_session_is_still_caught(sandbox):
    marker = f"marker-{uuid.uuid4().hex}"
    program = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execve(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}], {{}})\n"
        "time.sleep(0.3)\n"
    )
    assert run_python(program, QUICK, sandbox=sandbox).passed
    survivors = processes_with(marker)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    if sandbox.unshare or sandbox.cgroups:
        assert survivors == []
    else:  # the documented gap of the plain fallback: nothing marks it as the program's any more
        assert len(survivors) == 1


def test_killing_its_parent_fails_the_program_and_spares_the_evaluator(sandbox):
    # With namespaces the program is pid 1 and getppid() is 0, so this is kill(0): its own process group.
    result = run_python("import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(0.5)\n", QUICK, sandbox=sandbox)
    assert (result.status, result.detail, result.returncode) == ("failed", "killed by signal 9", -9)
    assert run_python("pass\n", QUICK, sandbox=sandbox).passed  # and we are still here to run the next one


def test_kill_everything_reaches_only_its_own_namespace(sandbox):
    namespaces_only(sandbox)  # in the fallback, kill(-1) reaches every process of this user: not tried here
    result = run_python("import os, signal\nos.kill(-1, signal.SIGKILL)\n", QUICK, sandbox=sandbox)
    assert result.detail == "ProcessLookupError: [Errno 3] No such process"  # nobody to signal but itself


def test_files_under_the_per_file_limit_cannot_pass_the_total(sandbox):
    limits = Limits(timeout_s=2.0, file_bytes=1 << 20, disk_bytes=1 << 20)
    write = "open({!r}, 'wb').write(b'x' * (700 << 10))\n"
    assert run_python(write.format("a"), limits, sandbox=sandbox).passed
    program = write.format("a") + write.format("b")
    result = run_python(program, limits, sandbox=sandbox)
    assert result.status == "failed"
    if sandbox.unshare:  # the tmpfs is full; /dev/shm is the same tmpfs
        assert result.detail == "OSError: [Errno 28] No space left on device"
        shm = run_python(write.format("/dev/shm/a") + write.format("b"), limits, sandbox=sandbox)
        assert shm.detail == "OSError: [Errno 28] No space left on device"
    else:  # counted afterwards, program.py included
        assert result.detail == f"wrote {(1400 << 10) + len(program)} bytes in all, over the {1 << 20}-byte limit"
    big = run_python("open('a', 'wb').write(b'x' * (2 << 20))\n", Limits(timeout_s=2.0, file_bytes=1 << 20),
                     sandbox=sandbox)
    assert big.detail == "OSError: [Errno 27] File too large"  # and the per-file limit still holds


def test_its_folder_is_gone_afterwards(sandbox):
    before = set(Path(tempfile.gettempdir()).glob("layerprune-exec-*"))
    canary = f"canary-{uuid.uuid4().hex}"
    result = run_python(f"import os, sys\nopen({canary!r}, 'w').write('x')\nsys.exit(os.path.abspath({canary!r}))\n",
                        QUICK, sandbox=sandbox)
    assert result.status == "failed" and result.detail.endswith(canary)
    assert not Path(result.detail).exists()  # with namespaces, a path on a tmpfs only it could see
    assert set(Path(tempfile.gettempdir()).glob("layerprune-exec-*")) == before


def test_its_folder_and_processes_go_when_the_evaluator_dies(sandbox):
    marker = f"marker-{uuid.uuid4().hex}"
    program = (f"import os, sys\nopen('canary', 'w').write('x')\n"
               f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n")
    cgroups = Path(sandbox.cgroups) if sandbox.cgroups else None
    before = set(cgroups.glob("layerprune-*")) if cgroups else set()
    evaluator = start_evaluator(sandbox, program, timeout_s=20.0)
    try:
        assert wait_until(lambda: processes_with(marker), seconds=10)
        (pid,) = processes_with(marker)
        folder = Path(os.readlink(f"/proc/{pid}/cwd"))
        assert (folder / "canary").exists() == (not sandbox.unshare)  # ours is in another mount namespace
    finally:
        evaluator.kill()
        evaluator.wait()
        evaluator.stdout.close()
    assert wait_until(lambda: not processes_with(marker))
    assert not (folder / "canary").exists()
    if not sandbox.unshare:
        assert wait_until(lambda: not folder.exists())
    if cgroups:  # its pids cgroup stays behind, empty, until the next run removes it (a minute on)
        for left in set(cgroups.glob("layerprune-*")) - before:
            assert wait_until(lambda: (left / "cgroup.procs").read_text() == "")  # once the dead are reaped
            left.rmdir()


def test_process_count_is_limited(sandbox):
    if not sandbox.limits_processes:
        pytest.skip("no pids cgroup here, and RLIMIT_NPROC does not bind root or the fallback (docs/safety.md)")
    program = ("import os, time\nfor _ in range(12):\n    if os.fork() == 0:\n        time.sleep(5)\n"
               "        os._exit(0)\n")
    result = run_python(program, Limits(timeout_s=2.0, processes=8), sandbox=sandbox)
    assert (result.status, result.detail) == ("failed", "BlockingIOError: [Errno 11] Resource temporarily unavailable")
    assert run_python("import os\nif os.fork() == 0:\n    os._exit(0)\nos.wait()\n",
                      Limits(timeout_s=2.0, processes=8), sandbox=sandbox).passed


# ------------------------------------------------------------------ namespaces only


def test_the_project_is_read_only(sandbox):
    namespaces_only(sandbox)
    target = Path(__file__).with_name(f".sandbox-probe-{uuid.uuid4().hex}")
    result = run_python(f"open({str(target)!r}, 'w')\n", QUICK, sandbox=sandbox)
    assert result.detail == f"OSError: [Errno 30] Read-only file system: {str(target)!r}"
    assert not target.exists()


def test_there_is_no_network(sandbox):
    namespaces_only(sandbox)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                            QUICK, sandbox=sandbox)
    assert result.detail == "OSError: [Errno 101] Network is unreachable"


def test_it_sees_only_itself_and_holds_no_capabilities(sandbox):
    namespaces_only(sandbox)
    probe = ("import os, sys\nstatus = open('/proc/self/status').read()\n"
             "caps = [line.split()[1] for line in status.splitlines() if line.startswith(('CapEff', 'CapBnd'))]\n"
             "sys.exit(repr((os.getpid(), os.getppid(), [p for p in os.listdir('/proc') if p.isdigit()], caps)))\n")
    result = run_python(probe, QUICK, sandbox=sandbox)
    assert result.detail == repr((1, 0, ["1"], ["0000000000000000", "0000000000000000"]))
