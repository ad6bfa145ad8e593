"""XLA's CPU buffers on transparent huge pages: the `zoo` command restarts itself once with
glibc's `glibc.malloc.hugetlb=1` tunable.

Why: on CPU, every execution of a compiled step allocates its temporaries afresh. Above 32 MiB
glibc serves them with a new `mmap` (its threshold cannot be raised further) and returns them
with `munmap`, so each step touches every page of a fresh mapping: a compare-sized sweep step
(127 MiB of temporaries) took ~32k page faults per step, a third of its CPU time in the kernel.
With the tunable, glibc advises the kernel to back such mappings with 2 MiB pages where the
kernel's THP mode is `madvise` (the common default): 15x fewer faults and 25-40% faster steps
on this 2-core machine, same numbers out (docs/compare.md, "Compilation and allocation").

Tunables are read when a process starts, so they cannot be set from inside it: the console
entry point re-executes the same command line with the tunable added, before JAX is imported.
Nothing happens off Linux, when the tunable is already set, or when ZOO_HUGEPAGES=0.
`zoo.cli.main` itself (what tests call in-process) never re-executes.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
#: Set to 0 to keep the allocator as it is (and skip the restart).
OPT_OUT = "ZOO_HUGEPAGES"


def _hugetlb(tunables: str) -> str | None:
    """The value given to glibc.malloc.hugetlb in a GLIBC_TUNABLES string (the last one), or None."""
    values = [t.split("=", 1)[1] for t in tunables.split(":") if t.startswith("glibc.malloc.hugetlb=")]
    return values[-1] if values else None


def active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with glibc's huge-page tunable on (Linux only)."""
    env = os.environ if environ is None else environ
    return sys.platform.startswith("linux") and _hugetlb(env.get("GLIBC_TUNABLES", "")) not in (None, "0")


def restart_env(environ: Mapping[str, str], platform: str = sys.platform) -> dict[str, str] | None:
    """The environment to restart with, or None when no restart is wanted (not Linux, opted out,
    or any glibc.malloc.hugetlb setting already chosen: the user's choice stands)."""
    if not platform.startswith("linux") or environ.get(OPT_OUT) == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _hugetlb(tunables) is not None:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def restart_with_hugepages() -> None:
    """Replace this process by the same command line with the tunable set (returns only when no
    restart is wanted). Call before importing JAX: nothing of this process survives."""
    env = restart_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv is the interpreter's own command line (`python /venv/bin/zoo ...`, `python -m zoo.cli ...`).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
