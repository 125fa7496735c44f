"""What a program may use, and what became of it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per program
    memory_bytes: int = 1 << 30  # address space per process (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file it may write (RLIMIT_FSIZE)
    disk_bytes: int = 64 << 20  # all its files together: the tmpfs size, or checked afterwards in the fallback
    # processes and threads at once: its pids cgroup, and RLIMIT_NPROC in its user namespace (binds all but root)
    processes: int = 32

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1

    def describe(self) -> str:
        return (f"{self.timeout_s:g} s wall / {self.cpu_s} s CPU, {self.memory_bytes >> 20} MiB address space, "
                f"{self.file_bytes >> 20} MiB per file and {self.disk_bytes >> 20} MiB in all, "
                f"{self.processes} processes, no core dumps")

    def as_dict(self) -> dict:
        return {"timeout_s": self.timeout_s, "cpu_s": self.cpu_s, "memory_bytes": self.memory_bytes,
                "file_bytes": self.file_bytes, "disk_bytes": self.disk_bytes, "processes": self.processes}


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # the last line of output (the exception) for failures, "" when passed
    returncode: int | None

    @property
    def passed(self) -> bool:
        return self.status == "passed"
