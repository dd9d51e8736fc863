"""Multi-process runs: one Python process per host (or several on one machine), one program over all of
their devices.

    dsv3 train ... --coordinator-address HOST:PORT --num-processes N --process-id I   # explicit
    dsv3 train ...            # under SLURM (srun), Open MPI (mpirun), a Cloud TPU pod slice: joined itself

``initialize`` joins the run (``jax.distributed.initialize``) before anything touches a JAX backend:
with explicit flags, or, with none, when JAX detects a cluster environment of more than one process
(Cloud TPU VMs, SLURM, Open MPI, Kubernetes). A single process needs nothing and joins nothing. The
cross-process collectives of the CPU backend are gloo, so the same command runs on a laptop
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``, two processes on ``127.0.0.1``).

Failures: a process that cannot join within ``init_timeout`` seconds (``--init-timeout``, default 300)
exits with status 2 and one line saying whether nothing answered at the coordinator's address or not all
processes came (JAX itself would abort with a misleading "another task died"). A process that dies
stops the others. JAX's coordination service marks it dead after
``heartbeat_timeout`` seconds without a heartbeat (default ``DEFAULT_HEARTBEAT_S``, ``--heartbeat-timeout``
or ``DSV3_HEARTBEAT_TIMEOUT``) and every other process exits (SIGABRT, exit status 134) with JAX's line
``Terminating process because the JAX distributed service detected fatal errors`` naming the task that
stopped (``The following tasks are unhealthy (stopped sending heartbeats): 1``: task = process id) or
the coordinator (``Failed to send RPC to coordination service``: process 0 died). A coordinator that
cannot be reached within ``init_timeout`` seconds, a process id outside ``[0, N)`` or a process count that
disagrees with the run's raise ``DistributedError`` naming the fix.

Small host-side exchanges between the processes (the tokenizer trained by process 0, every process's
data-iterator state for a checkpoint) go through the coordination service's key-value store
(``broadcast``, ``allgather``, ``barrier``): no XLA program is compiled for them.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import socket
import sys
import threading
import warnings
from typing import Any, Callable, Optional

from .errors import Dsv3Error

DEFAULT_HEARTBEAT_S = 30      # JAX's default is 100 s; a dead peer should not keep a test (or a pod) waiting
DEFAULT_INIT_TIMEOUT_S = 300  # how long a process waits for the coordinator and the others to come up
KV_TIMEOUT_MS = 30 * 60 * 1000  # host exchanges wait for the slowest process (it may be compiling)


class DistributedError(Dsv3Error, RuntimeError):
    """A multi-process run could not be joined (unreachable coordinator, bad process id or count)."""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not an integer number of seconds (fix: e.g. {name}=30).") from None


def cluster_environment():
    """The cluster environment JAX would join by itself (a ``jax._src.clusters.ClusterEnv`` subclass:
    Cloud TPU, SLURM, Open MPI, Kubernetes), or ``None``. Touches no backend."""
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - a JAX without cluster detection
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            with warnings.catch_warnings():  # e.g. "Kubernetes detected, but the kubernetes package ..."
                warnings.simplefilter("ignore")
                if env.is_env_present():
                    return env
        except Exception:  # noqa: BLE001 - a detector that fails means "not this environment"
            continue
    return None


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator-address {address!r} is not HOST:PORT (fix: e.g. "
                               "--coordinator-address 10.0.0.1:8476, the address of process 0's host and a free port).")


def _reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _check_port_free(address: str) -> None:
    """Process 0 binds the coordinator's port on every interface: fail early when it is taken."""
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedError(f"port {port} of --coordinator-address {address} is in use on this host, "
                                       "where process 0 runs the coordinator (fix: choose a free port).") from None


def _watchdog(seconds: int, address: Optional[str], me: str, n: Optional[int], pid: Optional[int], prog: str):
    """Exit (status 2, one line) when joining takes longer than ``seconds``: JAX would abort later with
    "another task died", which is not what happened. Returns the event that disarms it."""
    joined = threading.Event()

    def run():
        if joined.wait(seconds):
            return
        if pid not in (None, 0) and address and not _reachable(address):
            why = (f"nothing answers at {address} (process 0 runs the coordinator there: it is not running, or "
                   "the address/port is wrong or blocked)")
        else:
            why = f"not all {n or 'the'} processes joined at {address or 'the coordinator'}"
        print(f"{prog}: {me} could not join the multi-process run within {seconds} s: {why} (fix: start every "
              "process with the same --coordinator-address HOST:PORT and --num-processes, each with its own "
              "--process-id 0..N-1; raise --init-timeout when they start far apart).", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    threading.Thread(target=run, name="dsv3-join-watchdog", daemon=True).start()
    return joined


def is_initialized() -> bool:
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover
        return False
    return distributed.global_state.client is not None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, heartbeat_timeout: Optional[int] = None,
               init_timeout: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
               prog: str = "dsv3") -> int:
    """Join a multi-process run; returns the number of processes (1: nothing was joined).

    Explicit arguments (the ``--coordinator-address/--num-processes/--process-id`` flags) need all three
    unless a cluster environment supplies the rest; with none, a detected cluster environment of more
    than one process is joined. Must run before anything initialises a JAX backend (``jax.devices()``,
    ``jax.process_count()``, any computation)."""
    import jax
    from jax._src import xla_bridge

    if is_initialized():
        return jax.process_count()
    heartbeat = heartbeat_timeout or _env_int("DSV3_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_S)
    init_timeout = init_timeout or _env_int("DSV3_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S)
    given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
             "--process-id": process_id}
    env = cluster_environment()
    if any(v is not None for v in given.values()):
        if num_processes is not None and num_processes < 1:
            raise DistributedError(f"--num-processes {num_processes}: must be at least 1.")
        if num_processes == 1 and process_id in (None, 0):
            return 1
        if process_id is not None and (process_id < 0 or num_processes is not None and process_id >= num_processes):
            raise DistributedError(f"--process-id {process_id} is not in [0, --num-processes={num_processes}) "
                                   f"(fix: number the processes 0..N-1, one each).")
        missing = [k for k, v in given.items() if v is None]
        if missing and env is None:
            raise DistributedError(f"a multi-process run needs {', '.join(given)}; {', '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} missing (fix: pass all three to every "
                                   "process, e.g. --coordinator-address 127.0.0.1:8476 --num-processes 2 "
                                   "--process-id 0 for the first of two).")
        if coordinator_address is not None:
            _check_address(coordinator_address)
            if process_id == 0:
                _check_port_free(coordinator_address)
    else:
        if env is None:
            return 1
        try:
            if env.get_process_count() <= 1:
                return 1
        except Exception:  # noqa: BLE001 - an environment that cannot say how many processes: run alone
            return 1
    if xla_bridge.backends_are_initialized():
        raise DistributedError("a JAX backend was initialised before the process joined the multi-process run "
                               "(fix: call dsv3_jax.distributed.initialize before any JAX computation or "
                               "jax.devices()/jax.process_count()).")
    try:  # cross-process collectives of the CPU backend (the default in recent JAX; explicit for older ones)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001
        pass
    where = coordinator_address or (env.__name__ if env is not None else "the cluster's coordinator")
    me = f"process {process_id if process_id is not None else '?'} of {num_processes or '?'}"
    joined = _watchdog(init_timeout, coordinator_address, me, num_processes, process_id, prog)
    try:  # (JAX's own deadline comes later: the watchdog reports what went wrong)
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=init_timeout + 30, heartbeat_timeout_seconds=heartbeat,
                                   shutdown_timeout_seconds=max(heartbeat, 10))
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError, ValueError, RuntimeError
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DistributedError(
            f"{me} could not join the run at {where} within {init_timeout} s: {first[:300]} (fix: start every "
            "process with the same --coordinator-address HOST:PORT (process 0's host; the port free there and "
            "reachable from every host) and the same --num-processes, each with its own --process-id; or raise "
            "--init-timeout when processes start far apart).") from None
    finally:
        joined.set()
    n, i = jax.process_count(), jax.process_index()
    if num_processes is not None and n != num_processes:
        raise DistributedError(f"process {i} was started with --num-processes {num_processes}, but the run at "
                               f"{where} has {n} processes (fix: pass the same --num-processes to every process).")
    if log is not None and i == 0:
        log(f"joined a run of {n} processes at {where} ({jax.device_count()} devices, "
            f"{jax.local_device_count()} per process; a process that stops sending heartbeats for "
            f"{heartbeat} s stops the run)")
    return n


def initialize_from_args(args, log: Optional[Callable[[str], None]] = None) -> int:
    """``initialize`` with the CLI flags of ``dsv3_jax.cli.common.add_distributed_args``."""
    return initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None), heartbeat_timeout=getattr(args, "heartbeat_timeout", None),
                      init_timeout=getattr(args, "init_timeout", None), log=log,
                      prog=getattr(args, "prog", "dsv3"))


# ---- who am I ----------------------------------------------------------------------------------
def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, the tokenizer and checkpoint metadata."""
    return process_index() == 0


# ---- host-side exchanges (the coordination service's key-value store) ---------------------------
_counter = itertools.count()


def _client():
    from jax._src import distributed
    return distributed.global_state.client


def _key(name: str) -> str:
    # every process makes the same exchanges in the same order, so the n-th exchange has the same key
    return f"dsv3/{next(_counter)}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def broadcast(value: Any, name: str = "broadcast") -> Any:
    """``value`` of process 0 (JSON-able, or ``bytes``) on every process."""
    if process_count() == 1:
        return value
    key, client = _key(name), _client()
    if is_primary():
        client.key_value_set_bytes(key, b"B" + value if isinstance(value, bytes) else b"J" + json.dumps(value).encode())
        return value
    data = client.blocking_key_value_get_bytes(key, KV_TIMEOUT_MS)
    return data[1:] if data[:1] == b"B" else json.loads(data[1:].decode())


def allgather(value: Any, name: str = "allgather") -> list:
    """Every process's ``value`` (JSON-able), in process order, on every process."""
    n = process_count()
    if n == 1:
        return [value]
    key, client = _key(name), _client()
    client.key_value_set_bytes(f"{key}/{process_index()}", json.dumps(value).encode())
    return [json.loads(client.blocking_key_value_get_bytes(f"{key}/{i}", KV_TIMEOUT_MS).decode()) for i in range(n)]


def barrier(name: str = "barrier", timeout_s: Optional[float] = None) -> None:
    """Wait until every process gets here."""
    if process_count() == 1:
        return
    _client().wait_at_barrier(_key(name), int(timeout_s * 1000) if timeout_s else KV_TIMEOUT_MS)


def host_value(tree):
    """A pytree of (possibly multi-process) arrays as numpy on this host: arrays whose data is not all
    here are gathered from the processes that hold it (a collective: every process must call it)."""
    import jax
    import numpy as np

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x
    return jax.tree.map(get, tree)


__all__ = ["initialize", "initialize_from_args", "is_initialized", "cluster_environment", "DistributedError",
           "process_index", "process_count", "is_primary", "broadcast", "allgather", "barrier", "host_value",
           "DEFAULT_HEARTBEAT_S", "DEFAULT_INIT_TIMEOUT_S"]
