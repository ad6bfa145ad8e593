"""The `zoo` command's restart with glibc's huge-page tunable (zoo/hugepages.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zoo import hugepages


def test_restart_env_adds_the_tunable_once_and_respects_the_users_choice():
    env = hugepages.restart_env({"PATH": "/bin"}, "linux")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = hugepages.restart_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.restart_env(env, "linux") is None  # already restarted: no loop
    assert hugepages.restart_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux") is None
    assert hugepages.restart_env({"ZOO_HUGEPAGES": "0"}, "linux") is None
    assert hugepages.restart_env({}, "darwin") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_active_reads_the_last_setting():
    assert hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0"})
    assert not hugepages.active({})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_restart_replaces_the_process_with_the_same_command_line():
    script = ("import sys; from zoo import hugepages; hugepages.restart_with_hugepages(); "
              "print(hugepages.active(), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ZOO_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", script, "a", "b"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True ['a', 'b']"  # printed once: by the restarted process only
