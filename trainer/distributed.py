"""Process-group plumbing for multi-process training under ``torchrun``.

A run is distributed when torchrun (or any launcher that sets the same variables) started it:
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are in the environment and ``WORLD_SIZE > 1``. Otherwise
every function here is a no-op for a single process (rank 0 of 1), so single-process training
takes exactly the code path it always did. The backend follows the device: NCCL for CUDA, gloo
for CPU; under torchrun with CUDA every rank uses ``cuda:LOCAL_RANK``.

Collectives that carry structured values (JSON, digests) go through uint8 tensors, never pickle.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dagc.errors import ConfigError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True when the process was started by torchrun with more than one process in the job.

    Raises ConfigError if the launcher's variables are present but malformed.
    """
    if not all(v in os.environ for v in ENV_VARS):
        return False
    return _env_int("WORLD_SIZE") > 1


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={raw!r} is negative; launch with torchrun")
    return value


def local_device(name: str) -> torch.device:
    """The device this process trains on for a configured device name ('cpu', 'cuda', 'cuda:N').

    Under torchrun, CUDA means ``cuda:LOCAL_RANK`` (an explicit index is ignored: one GPU per
    process, chosen by the launcher); otherwise the name as given. Raises ConfigError when the
    node has fewer GPUs than processes.
    """
    if name.startswith("cuda") and launched():
        local, count = _env_int("LOCAL_RANK"), torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"torchrun started more processes on this node than it has CUDA GPUs "
                              f"(LOCAL_RANK={local}, {count} GPU(s)); use --nproc-per-node {count} or fewer")
        return torch.device("cuda", local)
    return torch.device(name)


def init(device: torch.device) -> bool:
    """Join the torchrun job's process group if there is one and it is not joined yet.

    Takes the device this process trains on (NCCL for CUDA, gloo for CPU). Returns True if this
    call created the process group, False for a single process or a group that already exists
    (created by an earlier call or by the caller). A group this module creates stays for the
    life of the process and is left at exit (`teardown`): the default group cannot be created a
    second time in one process under torchrun (the new group would read the old one's addresses
    from the launcher's store). MASTER_ADDR / MASTER_PORT come from torchrun.
    """
    if not launched() or is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(teardown)
    return True


def teardown() -> None:
    """Leave the process group if there is one (no-op otherwise)."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0."""
    if is_initialized():
        return dist.get_rank()
    return _env_int("RANK") if launched() else 0


def world_size() -> int:
    """Processes in the job: the process group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE") if launched() else 1


def is_main() -> bool:
    """True on the process that writes files and reports (rank 0)."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend ('gloo', 'nccl'), or None for a single process."""
    return dist.get_backend() if is_initialized() else None


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite every tensor, in place, with rank ``src``'s value (no-op for a single process).

    Takes tensors in the same order on every rank (e.g. a module's buffers).
    """
    if not is_initialized():
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in tensors:
            # Collectives need dense contiguous tensors on the backend's device; channels-last
            # weights or CPU tensors under NCCL go through a copy.
            if t.is_contiguous() and t.device == dev:
                dist.broadcast(t, src)
            else:
                tmp = t.detach().contiguous().to(dev)
                dist.broadcast(tmp, src)
                t.copy_(tmp)


def _bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_comm_device()) if data else \
        torch.zeros(0, dtype=torch.uint8, device=_comm_device())


def broadcast_json(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-serialisable ``value`` on every rank (itself for a single process)."""
    if not is_initialized():
        return value
    dev = _comm_device()
    payload = json.dumps(value).encode() if rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    buf = _bytes_tensor(payload) if rank() == src else torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data`` (all of the same length, e.g. digests), in rank order."""
    if not is_initialized():
        return [data]
    local = _bytes_tensor(data)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return [bytes(p.cpu().tolist()) for p in parts]


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (the same keys, in the same order, on every rank);
    ``values`` unchanged for a single process."""
    if not is_initialized():
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.cpu().tolist()))


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and exact bytes, in name order.
    Takes e.g. `network_tensors` of a network or a loaded checkpoint's tensors; the ranks of a job
    compare these digests to check that they hold the same model."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
