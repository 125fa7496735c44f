"""The child side of code_exec: run as `python -I -S child.py CONFIG`, standard library only.

CONFIG is a JSON object; the program's source arrives on stdin. Two stages, one process:
  guard   the evaluator's direct child, in its own session. It asks to die with the evaluator
          (PR_SET_PDEATHSIG), then with namespaces execs `unshare --user --pid --mount --net --ipc
          child.py {stage: parent}`, which lands in the next stage in the same process.
  parent  forks the program and waits for it, handing on its exit status (or dying of its signal).
          With namespaces the fork is pid 1 of the new PID namespace: it mounts its own /proc, makes every
          mount read-only, mounts a size-limited tmpfs as its folder and execs the program, which stays
          pid 1, so that when it ends (or its parent dies: PR_SET_PDEATHSIG) the kernel kills all it started.
Setup errors go to CONFIG["status_fd"], which closes when the program is exec'd: a program cannot fake one.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys

PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
# Per-mount flags a user namespace may not clear: a read-only remount must repeat them.
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
              "relatime": 1 << 21, "strictatime": 1 << 24}
SETUP_FAILED = 125
STARTED = b"\0"  # written to the status pipe just before the program is exec'd

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):  # elsewhere: no parent-death signal, no capabilities to drop
        return
    _check(_libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text):
        return None if text is None else text.encode()

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def mount_points() -> list[tuple[str, list[str]]]:
    """(path, per-mount options) of every mount, each path once (stacked mounts: the top one is reached)."""
    seen, points = set(), []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...).
            path = fields[4].decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")
            if path not in seen:
                seen.add(path)
                points.append((path, fields[5].decode().split(",")))
    return points


def make_everything_read_only() -> None:
    for path, options in mount_points():
        if "ro" not in options:
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for option in options:
                flags |= KEPT_FLAGS.get(option, 0)
            _mount(None, path, None, flags)


def drop_capabilities(required: bool) -> None:
    """After this, exec yields no capabilities even as (namespace) root, and set-uid files grant nothing: the
    program cannot undo the read-only mounts, mount anything, or leave the namespaces' limits. Only a process
    holding CAP_SETPCAP can shrink its bounding set: in the fallback that means root, and others have nothing
    to drop."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if not os.path.exists("/proc/sys/kernel/cap_last_cap") and not required:
        return
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            if required:
                raise
            return


def set_limits(limits: dict, processes: bool) -> None:
    def cap(kind: int, soft: int, hard: int | None = None) -> None:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))

    cap(resource.RLIMIT_AS, limits["memory_bytes"])
    # SIGXCPU at the soft limit reads as a timeout; pid 1 ignores it, so the hard limit a second later kills.
    cap(resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1)
    cap(resource.RLIMIT_FSIZE, limits["file_bytes"])
    cap(resource.RLIMIT_CORE, 0)
    if processes:  # counted per user; in its fresh user namespace that is this program alone
        cap(resource.RLIMIT_NPROC, limits["processes"])


def enter_namespace_folder(config: dict) -> None:
    """As pid 1 of the new namespaces: its own /proc, everything read-only, a size-limited tmpfs as its folder
    and as /dev/shm (where multiprocessing keeps its semaphores): one tmpfs, so one limit for both."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    make_everything_read_only()
    limits, folder = config["limits"], config["folder"]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and folder != "/dev/shm" else folder
    _mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={limits['disk_bytes']},nr_inodes={limits['inodes']},mode=0700")
    if shm != folder:
        inside = os.path.join(shm, ".folder")
        os.mkdir(inside, 0o700)
        _mount(inside, folder, None, MS_BIND)


def exec_program(config: dict, source: bytes, namespaces: bool) -> None:
    """Become the program: its folder as cwd, no stdin, the limits, a minimal environment."""
    folder = config["folder"]
    with open(os.path.join(folder, "program.py"), "wb") as f:
        f.write(source)
    os.chdir(folder)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    set_limits(config["limits"], processes=namespaces)
    drop_capabilities(required=namespaces)
    os.set_inheritable(config["status_fd"], False)
    os.write(config["status_fd"], STARTED)
    python = config["python"]
    os.execve(python, [python, "-I", "-B", "program.py"], config["env"])


def report_and_exit(status_fd: int, err: BaseException) -> None:
    try:
        os.write(status_fd, f"{type(err).__name__}: {err}".encode())
    finally:
        os._exit(SETUP_FAILED)


def die_with_parent(sig: int, parent: int | None = None, alive: int | None = None) -> None:
    """Receive `sig` when the parent ends; if it already has (pid changed, or the `alive` pipe's far end
    closed), end now instead of running on unwatched."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if (parent is not None and os.getppid() != parent) or (alive is not None and select.select([alive], [], [], 0)[0]):
        os._exit(SETUP_FAILED)


def parent(config: dict, source: bytes) -> None:
    namespaces = bool(config["unshare"])
    status_fd = config["status_fd"]
    alive_r, alive_w = os.pipe()  # closes when this process ends: the child's check that we still run
    pid = os.fork()
    if pid == 0:
        try:
            os.close(alive_w)
            if namespaces:
                die_with_parent(signal.SIGKILL, alive=alive_r)
                enter_namespace_folder(config)
            os.close(alive_r)
            exec_program(config, source, namespaces)
        except BaseException as err:  # noqa: BLE001 - anything here is a setup failure to report
            report_and_exit(status_fd, err)
    os.close(status_fd)  # the program must not reach it (fallback: /proc/<ppid>/fd)
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # die the same way, so the evaluator reads the program's signal
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def remove_tree(folder: str) -> None:
    """Remove a folder the program wrote, read-only folders included (also used by the evaluator side)."""

    def unlock(function, path, _exc):  # the program may have left read-only folders
        try:
            os.chmod(os.path.dirname(path), 0o700)
            function(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=unlock)


def guard(config: dict) -> None:
    if config["unshare"]:
        die_with_parent(signal.SIGKILL, parent=config["evaluator_pid"])  # kept across the exec of unshare
        inner = json.dumps({**config, "stage": "parent"})
        os.execv(config["unshare"][0], [*config["unshare"], sys.executable, "-I", "-S", os.path.abspath(__file__),
                                         inner])

    def evaluator_died(signum, frame):
        # Fallback: nobody else will clean up. Remove the folder, then end this process group (us included).
        remove_tree(config["folder"])
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, evaluator_died)
    die_with_parent(signal.SIGTERM, parent=config["evaluator_pid"])
    parent(config, sys.stdin.buffer.read())


def main() -> None:
    config = json.loads(sys.argv[1])
    try:
        if config["stage"] == "guard":
            guard(config)
        else:
            die_with_parent(signal.SIGKILL, parent=config["evaluator_pid"])
            parent(config, sys.stdin.buffer.read())
    except BaseException as err:  # noqa: BLE001 - reported to the evaluator as a setup failure
        report_and_exit(config["status_fd"], err)


if __name__ == "__main__":
    main()
