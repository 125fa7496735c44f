"""The sandboxes there are: namespaces, or the fallback (which one this machine allows is found by a probe
program, in the package itself: the probe runs a program)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from layerprune.errors import LayerpruneError


class SandboxError(LayerpruneError):
    """The sandbox itself could not start a program (not the program's fault)."""


@dataclass(frozen=True)
class Sandbox:
    """How programs run: `unshare` is the namespace command, or None for the fallback (`reason` says why);
    `cgroups` is where each program gets a pids cgroup, or None."""

    unshare: tuple[str, ...] | None
    folder: str = ""  # namespaces: where the program's tmpfs is mounted, inside its mount namespace
    cgroups: str | None = None
    reason: str = ""

    @property
    def name(self) -> str:
        return "namespaces" if self.unshare else "fallback"

    @property
    def limits_processes(self) -> bool:
        # RLIMIT_NPROC never binds kernel uid 0, not even as root of a user namespace
        return bool(self.cgroups) or (bool(self.unshare) and os.geteuid() != 0)

    def warning(self) -> str:
        """One line on what this mode does not contain ("" when it contains all that namespaces can)."""
        if self.unshare:
            return "" if self.limits_processes else ("WARNING: code execution as root without a pids cgroup: "
                                                     "the number of processes a program starts is not limited")
        return (f"WARNING: code execution without namespaces ({self.reason}): programs can read this user's "
                "files and other processes' environments, use the network, write outside their folder, signal "
                "this user's processes" + ("" if self.cgroups else
                                           ", start any number of processes and leave behind ones that drop "
                                           "their environment"))


def namespace_sandbox(cgroups: str | None = None) -> Sandbox | str:
    """The namespace sandbox (not yet tried), or why there is none."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "no unshare command"
    # The tmpfs hides what lies beneath it: never a folder holding this interpreter or its packages.
    needed = [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix)]
    folder = next((f for f in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(f)
                   and not any(p == f or p.startswith(f + "/") for p in needed)), None)
    if folder is None:
        return "python lives in /tmp, /var/tmp and /dev/shm: no folder to mount over"
    command = (unshare, "--user", "--map-root-user", "--pid", "--mount", "--net", "--ipc", "--")
    return Sandbox(command, folder, cgroups)
