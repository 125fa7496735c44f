"""One program's sandbox process, seen from the evaluator: start it, feed it, wait, kill, collect, clean up."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from layerprune.evaluation.code_exec.modes import Sandbox, SandboxError
from layerprune.evaluation.code_exec.pids_cgroup import PidsCgroup

CHILD_SCRIPT = Path(__file__).with_name("child.py")
MARKER_VARIABLE = "LAYERPRUNE_SANDBOX"  # in every program's environment: how the fallback finds leftovers
FILES_MAX = 4096  # inodes of the namespace tmpfs: many empty files cost kernel memory the size cap misses
TAIL_BYTES = 4096
STARTED = b"\0"  # as in child.py: the program was exec'd


class _Output:
    """The last TAIL_BYTES of what the program prints; the rest is read and dropped, so it cannot block."""

    def __init__(self, fd: int):
        self.fd, self.tail, self.open = fd, b"", True
        os.set_blocking(fd, False)

    def read(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                self.tail = (self.tail + chunk)[-TAIL_BYTES:]
        except BlockingIOError:
            return
        self.open = False  # end of file: every process holding the pipe is gone

    def last_line(self) -> str:
        lines = [line.strip() for line in self.tail.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""


class SandboxProcess:
    """One program's sandbox process: spawn, feed the source, wait with a deadline, kill, collect."""

    def __init__(self, source: str, limits: dict, sandbox: Sandbox, folder: str, env: dict,
                 cgroup: PidsCgroup | None):
        status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        config = {"stage": "guard", "unshare": list(sandbox.unshare or ()), "evaluator_pid": os.getpid(),
                  "status_fd": status_w, "folder": folder, "python": sys.executable, "env": env,
                  "limits": {**limits, "inodes": FILES_MAX,
                             "processes": limits["processes"] + 1}}  # + its parent, in the same user namespace
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CHILD_SCRIPT), json.dumps(config)],
                cwd=folder if not sandbox.unshare else "/", env=env, stdin=subprocess.PIPE, stdout=out_w,
                stderr=out_w, pass_fds=(status_w,), start_new_session=True,
            )
        finally:
            os.close(out_w)
            os.close(status_w)
        self.status_fd, self.output = status_r, _Output(out_r)
        if cgroup:  # before it has its source, so before it can fork
            try:
                cgroup.add(self.process.pid)
            except OSError as err:
                self.finish()
                raise SandboxError(f"cannot use the pids cgroup {cgroup.folder}: {err}") from None
        self.source = source.encode("utf-8")
        os.set_blocking(self.process.stdin.fileno(), False)
        self.cpu_s = 0.0

    def _feed(self) -> None:
        try:
            sent = os.write(self.process.stdin.fileno(), self.source)
        except BlockingIOError:
            return
        except BrokenPipeError:
            sent = len(self.source)
        self.source = self.source[sent:]
        if not self.source:
            self.process.stdin.close()

    def _exited(self) -> bool:
        # WNOWAIT: it stays a zombie, so its pid, which is also its process group's id, cannot be reused yet.
        return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def _collect(self) -> None:
        """Kill what is left in its process group, then reap it (waiting if it is still running)."""
        sigkill(self.process.pid, group=True)
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        self.cpu_s = usage.ru_utime + usage.ru_stime  # its parent waited for the program: this includes it

    def wait(self, deadline: float) -> bool:
        """Pump source in and output out until the process ends (True) or the deadline passes (False)."""
        while not self._exited():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poll = select.poll()  # not select(): the evaluator may hold more than 1024 files
            if self.output.open:
                poll.register(self.output.fd, select.POLLIN)
            if not self.process.stdin.closed:
                poll.register(self.process.stdin.fileno(), select.POLLOUT)
            events = dict(poll.poll(1000 * min(left, 0.05 if self.output.open else 0.01)))
            if not self.process.stdin.closed and self.process.stdin.fileno() in events:
                self._feed()
            if self.output.fd in events:
                self.output.read()
        return True

    def kill(self) -> None:
        """Kill the program (the namespace's pid 1) first: its parent exits only after the kernel has ended
        everything in the namespace, and hands on the SIGKILL. Then, or if that fails, the process group."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            sigkill(int(child))
        if children:
            self.wait(time.monotonic() + 2.0)

    def finish(self) -> tuple[bytes, str]:
        """Reap it; then (status pipe contents, last line of output)."""
        if not self.process.stdin.closed:
            self.process.stdin.close()
        if self.process.returncode is None:
            self._collect()
        self.output.read()
        os.close(self.output.fd)
        os.set_blocking(self.status_fd, False)
        try:
            status = os.read(self.status_fd, 4096)
        except BlockingIOError:
            status = b""
        os.close(self.status_fd)
        return status, self.output.last_line()


def sigkill(pid: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def sweep(marker: str) -> None:
    """Fallback: kill every process whose environment still carries this program's marker."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    for _ in range(10):  # a process may fork while we look: look until a pass finds none
        found = False
        for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
            try:
                environ = Path(entry.path, "environ").read_bytes() if entry.name.isdigit() else b""
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                sigkill(int(entry.name))
                found = True
        if not found:
            return


def folder_bytes(folder: str) -> int:
    """What its files take (their sizes; directories count too)."""
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
