"""Multi-process start-up: `jax.distributed.initialize` from flags, the environment, or nothing.

- Flags (coordinator "host:port", num_processes, process_id): a local multi-process CPU run, or a
  cluster without a scheduler jax knows.
- Environment: jax's own variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
  or a cluster jax detects by itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes).
- Neither, or one process: nothing to do, the run is single-process.

Must run before anything touches a jax backend (jax.devices(), an array op); afterwards
`jax.devices()` lists every process's devices and `jax.local_devices()` this process's own.
"""

from __future__ import annotations

import os

import jax


def _cluster_detected() -> bool:
    """Whether jax's auto-detection would find a multi-process environment."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:  # jax's cluster registry is not public API; a missing or changed one means "not detected".
        from jax._src import clusters
        return any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types if c.opt_in_only_method is False)
    except Exception:  # noqa: BLE001
        return False


def _is_initialized() -> bool:
    try:
        from jax._src import distributed as _d
        return _d.global_state.client is not None
    except Exception:  # noqa: BLE001
        return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: list[int] | None = None,
               timeout_s: int = 300) -> bool:
    """Join (or form) a multi-process jax runtime; True when one was initialised.

    coordinator: "host:port" of process 0's coordination service; num_processes: how many
      processes take part; process_id: this one's rank in [0, num_processes). Give all three, or
      none to read them from the environment / a detected cluster.
    With num_processes == 1, or without flags and without a detected cluster, this is a no-op.
    Calling it again after a successful initialisation is also a no-op.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("initialize: coordinator, num_processes and process_id go together; got "
                         f"coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}")
    if all(given):
        if not isinstance(coordinator, str) or coordinator.count(":") != 1 or not coordinator.split(":")[1].isdigit():
            raise ValueError(f"initialize: coordinator: expected 'host:port', got {coordinator!r}")
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"initialize: num_processes: expected a positive integer, got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"initialize: process_id: expected an integer in [0, {num_processes}), got {process_id!r}")
        if num_processes == 1:
            return False
    elif not _cluster_detected():
        return False
    if _is_initialized():
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    return True


def is_coordinator() -> bool:
    """True on process 0 (the one that prints, writes reports, owns shared files)."""
    return jax.process_index() == 0
