"""Per-rank process-group set-up and tear-down (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str


def gloo_interface(environ: Mapping[str, str]) -> dict[str, str]:
    """The side groups are gloo (checkpoint commits, the stop vote): where the cluster names
    NCCL's network interfaces (`NCCL_SOCKET_IFNAME=ib0,eth0`) and not gloo's, gloo takes the
    same ones, or it could pick an interface the other nodes cannot reach. NCCL's `^`
    (exclude) and `=` (exact) forms have no gloo equivalent and are left alone."""
    nccl = environ.get("NCCL_SOCKET_IFNAME", "")
    if not nccl or "GLOO_SOCKET_IFNAME" in environ or nccl[0] in "^=":
        return {}
    return {"GLOO_SOCKET_IFNAME": nccl}


def init(device: str, timeout_s: float | None = None) -> RankInfo:
    """Join the job's process group. Under torchrun the env:// variables are set; a single
    process without them gets a one-rank group, so every strategy runs unchanged. A collective
    that waits longer than `timeout_s` (dist.timeout_s) fails instead of hanging."""
    from orchestrator.common.lifeline import tie_rank_to_parent

    tie_rank_to_parent()
    os.environ.update(gloo_interface(os.environ))
    backend = "nccl" if device == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if "RANK" in os.environ and restart != "0" and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # A torchrun restart: the agent's store still holds the failed attempt's keys (the
        # ranks' gloo/NCCL addresses); a rank that read one would connect to a dead process.
        # Each attempt gets keys of its own.
        store = dist.PrefixStore(f"orchestrator/attempt{restart}", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timeout or datetime.timedelta(minutes=30)))
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    elif "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # One process, no launcher: DeepSpeed (and other libraries) read torchrun's variables
        # and assert on LOCAL_RANK, so set them as torchrun would for a one-rank job.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def node_name() -> str:
    """This rank's node (Slurm's node name when under srun)."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on all ranks."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shutdown() -> None:
    """Destroy the process group while the interpreter is fully alive."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def is_timeout(error: BaseException) -> bool:
    """A collective that gave up after the process group's timeout (gloo and NCCL word it
    differently; both say "timed out" / "Timeout")."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_timeout(error: BaseException, window_s: float = 15.0) -> str:
    """One line for a timed-out collective (`is_timeout`) that names the ranks that stopped
    responding.

    Every rank whose collective timed out says so in the rendezvous store (torchrun's TCP
    key-value store, which does not go through the stuck collective) and waits up to
    `window_s` for the others: the ranks that never say so are the stalled or dead ones."""
    import re
    import time

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    waited = re.search(r"(\d+)\s*ms", str(error))
    after = f" after {int(waited.group(1)) / 1000:g} s" if waited else ""
    if waited:  # the others time out about as long after their own last step
        window_s = min(window_s, int(waited.group(1)) / 1000)
    head = f"a collective on rank {rank} timed out{after} (dist.timeout_s)"
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world == 1 or not host or not port:
        return head
    try:
        store = dist.TCPStore(host, int(port), is_master=False,
                              timeout=datetime.timedelta(seconds=10))
        key = "orchestrator/timed_out/{}"
        store.set(key.format(rank), "1")
        deadline = time.monotonic() + window_s
        while True:
            silent = [r for r in range(world) if not store.check([key.format(r)])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except (RuntimeError, OSError, ValueError):  # the store went away with its host
        return head + "; the rendezvous store is gone too (rank 0's node or torchrun died)"
    if not silent:
        return head + " on every rank (a slow step or the network, not one stalled rank)"
    return (head + f"; stopped responding: rank{'s' if len(silent) > 1 else ''} "
            + ", ".join(map(str, silent)))
