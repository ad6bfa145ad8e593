"""examples/train_on_pod.py runs on 8 simulated devices in-process, and as two jax.distributed
CPU processes on localhost whose losses match one process driving all 8 devices."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_on_pod.py"
SMALL = ["--d-model", "32", "--n-layers", "2", "--batch-size", "8", "--seq-len", "16"]


@pytest.mark.slow  # compiles a sharded train step: ~6 s on an idle 2-core machine, far more when shared
def test_train_on_pod_runs_sharded_in_process(capsys):
    spec = importlib.util.spec_from_file_location("train_on_pod", SCRIPT)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    history = ex.main(["--mesh", "fsdp=4,tensor=2", "--steps", "2", *SMALL])
    out = capsys.readouterr().out
    assert "mesh fsdp=4,tensor=2 (fsdp_tp)" in out
    assert len(history) == 2 and all(np.isfinite(history))
    assert history[1] < history[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, devices, timeout=420):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _history(proc, timeout=420):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["history"]


@pytest.mark.slow  # three processes each compile the step: about a minute on 2 cores
def test_two_processes_match_one_process():
    common = ["--mesh", "data=2,fsdp=4", "--steps", "3", "--json", *SMALL]
    port = _free_port()
    procs = [_run([*common, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                  devices=4) for i in range(2)]
    outs = [p.communicate(timeout=420)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es), 8 devices" in outs[0]
    two = json.loads([line for line in outs[0].splitlines() if line.startswith("{")][-1])["history"]
    one = _history(_run(common, devices=8))
    assert len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5)
