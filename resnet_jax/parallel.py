"""Device mesh, batch sharding and multi-host start-up: the one place that knows about devices.

Data parallelism is expressed with a 1-D ``Mesh(("data",))``: the batch is sharded along ``data``, the train
state replicated, and ``jax.jit`` inserts the all-reduces. Because the model computes BatchNorm statistics with
a plain mean over the (global, sharded) batch axis, those statistics are global across devices and hosts, which
is what ``pmap`` with ``axis_name`` gave, without ``pmap``. The same code runs on 1 CPU, 8 GPUs or a pod.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import socket
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` when several processes are configured; return whether it was started.

    Arguments override the environment (``RESNET_JAX_COORDINATOR``, ``RESNET_JAX_NUM_PROCESSES``,
    ``RESNET_JAX_PROCESS_ID``). With none of them set this is a no-op (one process). The address ``"auto"``
    lets JAX read the cluster's own environment (SLURM, Open MPI, Cloud TPU pods, ...), so a launcher that
    starts one copy of the same command per process needs no per-process flags. It is opt-in: a single
    process started inside a cluster allocation must not wait for peers that will never come.
    """
    address = coordinator_address or os.environ.get("RESNET_JAX_COORDINATOR")
    count = num_processes if num_processes is not None else _env_int("RESNET_JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("RESNET_JAX_PROCESS_ID")
    if address == "auto":
        if count is not None or index is not None:
            raise ValueError("coordinator address 'auto' takes the process count and id from the cluster; "
                             "do not also set them")
        _initialize(address)
        return jax.process_count() > 1
    if address is None and count is None and index is None:
        return False
    if count == 1 and index in (None, 0) and address is None:  # one process of one: nothing to coordinate
        return False
    if address is None or count is None or index is None:
        raise ValueError("multi-process training needs all three of coordinator address, process count and "
                         f"process id; got address={address!r}, count={count!r}, id={index!r}")
    if count < 1 or not 0 <= index < count:  # ignored for one process, it had run alone whatever it was told
        raise ValueError(f"process id {index} of {count} processes is impossible: ids run from 0 to the count - 1 "
                         "(each process of the run gets its own); check the launcher's process count and id")
    if count > 1:
        _initialize(address, count, index)
    return count > 1


def _initialize(address: str, count: int | None = None, index: int | None = None) -> None:
    """``jax.distributed.initialize``, once per program (a second ``train`` in the same script, a sweep, finds
    it started), with its failures said in one sentence that names the address."""
    if _distributed_started():
        if count is not None and (jax.process_count(), jax.process_index()) != (count, index):
            raise ValueError(f"this program already runs as process {jax.process_index()} of "
                             f"{jax.process_count()}; a later run in it cannot be process {index} of {count}")
        return
    kwargs = {} if address == "auto" else dict(coordinator_address=address, num_processes=count, process_id=index)
    if index == 0 and not _backends_started():  # started: jax refuses to join anyway, and says why (below)
        _check_port_free(address)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:  # jax's JaxRuntimeError is one too
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "before any JAX" in first:
            raise ValueError("multi-process training must start before the program's first JAX computation "
                             "initialises a single-process backend; start training (or call "
                             "jax.distributed.initialize) before any other JAX call") from err
        where = f"{address} as process {index} of {count}" if kwargs else "the cluster's coordinator"
        raise ValueError(f"could not join the multi-process run at {where} ({first}); process 0 listens at that "
                         f"address, so it must be process 0's host and the port must be free") from err


def _check_port_free(address: str) -> None:
    """Process 0 runs the coordinator service, which listens on the address's port on every interface. When that
    port is taken (a run still going, a process still holding it), jax 0.10's service ends the whole process
    with SIGSEGV before it can raise anything; asking the kernel first turns that into a sentence. (Another
    program may still take the port between this check and the service's start: then the crash remains.)"""
    port = address.rpartition(":")[2]
    if not port.isdigit():
        raise ValueError(f"the coordinator address must be host:port, got {address!r}")
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT is no obstacle
        probe.bind(("", int(port)))
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            return  # not ours to judge (a privileged port, no IPv4): the service says what it finds
        raise ValueError(f"port {port} of the coordinator address {address} is already in use on this host "
                         "(another run, or a process still holding it); process 0 must listen there, so choose "
                         "a free port for every process's coordinator address") from err
    finally:
        probe.close()


def _backends_started() -> bool:
    """Whether this program has already computed on a single-process backend (jax's own test before joining)."""
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def _distributed_started() -> bool:
    started = getattr(jax.distributed, "is_initialized", None)
    if started is not None:
        return bool(started())
    from jax._src import distributed  # jax < 0.5 has no public test

    return distributed.global_state.client is not None


def process_strings(text: str) -> list[str]:
    """Every process's ``text``, in process order (what one process sees of the others' settings)."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def process_failures(reason: str | None) -> list[tuple[int, str]]:
    """``(process index, reason)`` of every process that found something wrong (``reason`` not None), known to
    all of them, so that they all act alike: a check that fails on one host only must stop every host."""
    return [(i, r) for i, r in enumerate(process_strings(reason or "")) if r]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:  # int()'s own message named neither the variable nor what it is for
        raise ValueError(f"the environment variable {name}={value!r} must be a whole number") from None


def make_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all (global) devices."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_multiple(mesh: Mesh) -> int:
    """What every global batch must be a multiple of to split evenly over the devices and the processes."""
    return math.lcm(mesh.devices.size, jax.process_count())


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = "batch_size", parts: int = 1) -> None:
    """Fail before compiling when a batch (``name`` says which), cut into ``parts`` equal micro-batches
    (gradient accumulation), cannot be split evenly over devices and processes. The suggestion is a value of
    the batch itself, the one setting: for micro-batches it named a micro-batch size, which cannot be set."""
    multiple = batch_multiple(mesh) * parts
    if global_batch_size % multiple:
        suggestion = max(multiple, global_batch_size // multiple * multiple)
        micro = f" in {parts} micro-batches (grad_accum_steps)" if parts > 1 else ""
        raise ValueError(f"{name} {global_batch_size}{micro} must split evenly over the devices "
                         f"({mesh.devices.size}) and processes ({jax.process_count()}): a multiple of {multiple}; "
                         f"try {name}={suggestion}")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local slice of the batch into one global array sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (e.g. the train state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def sync_processes(name: str) -> None:
    """Barrier: every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool, mesh: Mesh) -> jax.Array:
    """Whether ``flag`` is set on any process, as a replicated scalar every process can read.

    Dispatched asynchronously like a train step, so a caller that reads the previous call's result keeps the
    devices busy while all processes still act on the same value at the same point.
    """
    local = np.full((len(mesh.local_devices),), flag, np.int32)
    global_flags = jax.make_array_from_process_local_data(batch_sharding(mesh), local)
    return _any(global_flags, replicated(mesh))


@functools.partial(jax.jit, static_argnums=1)
def _any(flags: jax.Array, out_sharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(flags.max() > 0, out_sharding)
