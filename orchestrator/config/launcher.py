"""Rules for the launcher keys, and what they derive: the stop signal and the torchrun flags
that pass it to the ranks (both sides use them: the launcher renders the commands, the ranks
listen for the signal), Slurm's time limit, the rendezvous, and the Kubernetes volume keys.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath

from orchestrator.common.errors import ConfigError, OrchestratorError
from orchestrator.config.schema import JobConfig

# torchrun's own default list, which it turns into a clean shutdown of its workers
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")

DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
SYSTEM_DIRS = [PurePosixPath(p) for p in ("/dev", "/proc", "/sys")]


TORCHRUN_MIN = (2, 9)  # torchrun's --signals-to-handle and --shutdown-timeout (torch 2.9)


def check_torch_version(version: str) -> None:
    """The torch the ranks run takes the torchrun flags the commands carry (`torchrun_flags`):
    torch 2.9 or newer. `version` as torch reports it, e.g. "2.13.0+cpu"."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and (int(found[1]), int(found[2])) < TORCHRUN_MIN:
        raise OrchestratorError(f"torch {version} here; orchestrator needs torch >= 2.9: every "
                                "launch passes torchrun --signals-to-handle and "
                                "--shutdown-timeout (checkpoint-and-stop on a signal), which "
                                "older torchrun refuses")


def stop_signal(job: JobConfig) -> str:
    """The signal that means "checkpoint and stop", e.g. "SIGUSR1": the one sbatch sends
    before the time limit under Slurm (`launcher.slurm.signal`, "[R:]USR1@120" -> SIGUSR1),
    else SIGUSR1."""
    spec = job.launcher.slurm.signal if job.launcher.name == "slurm" else None
    name = (spec or "USR1").split("@")[0].split(":")[-1].upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def torchrun_flags(job: JobConfig) -> list[str]:
    """torchrun's options that pass the stop signal on to the ranks and wait for their
    checkpoint before killing them."""
    handled = ",".join((*TORCHRUN_SIGNALS, stop_signal(job)))
    return [f"--signals-to-handle={handled}", f"--shutdown-timeout={job.fault.stop_timeout_s}"]


STOP_SIGNAL = re.compile(r"(R:)?(SIG)?(USR1|USR2)@([0-9]+)")


def slurm_seconds(limit: str) -> int | None:
    """A Slurm time limit ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") in
    seconds; None for anything else ("UNLIMITED", a typo sbatch will name)."""
    days, _, rest = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = rest.split(":")
    if not (days.isdigit() and all(x.isdigit() for x in parts) and 1 <= len(parts) <= 3):
        return None
    nums = [int(x) for x in parts]
    if "-" in limit:  # D-HH[:MM[:SS]]
        h, m, sec = (nums + [0, 0])[:3]
    else:  # MM, MM:SS or HH:MM:SS
        h, m, sec = [0, *nums] if len(nums) == 2 else ([0, nums[0], 0] if len(nums) == 1
                                                          else nums)
    return ((int(days) * 24 + h) * 60 + m) * 60 + sec


def _check_stop_signal(job: JobConfig) -> None:
    """`launcher.slurm.signal` goes to the job steps (torchrun passes it to the ranks, which
    checkpoint and stop): "B:" would send it to the batch shell alone, and the ranks would never
    see it; only USR1 and USR2 are free of other meanings to torchrun and Python. slurmctld
    checks time limits every 30 s and sends the warning when it is due within the next 30 s, so
    a lead within 30 s of the limit arrives as the job starts, before torchrun can take it."""
    spec = job.launcher.slurm.signal
    if spec is None:
        return
    found = STOP_SIGNAL.fullmatch(spec)
    if not found:
        raise ConfigError("launcher.slurm.signal", spec, "[R:]USR1@SECONDS or [R:]USR2@SECONDS "
                          "(the warning every rank gets before the time limit), or null")
    limit = slurm_seconds(job.launcher.slurm.time)
    if job.launcher.name == "slurm" and limit is not None and int(found[4]) + 30 >= limit:
        raise ConfigError("launcher.slurm.signal", spec, f"a lead under {limit - 30} s "
                          f"(launcher.slurm.time={job.launcher.slurm.time} less the 30 s "
                          "early Slurm may send it)")


def _loopback(host: str) -> bool:

    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def mount_path(job: JobConfig) -> PurePosixPath:
    """Check the k8s keys (ConfigError, one line; `validate` calls it before anything is
    written) and return where the claim is mounted.

    The rule: the ranks use the plan's absolute paths (<run_dir>/config.yaml, plan.json,
    metrics), so the claim's root is mounted at `launcher.k8s.mount_path` (default: the run
    dir's parent) in every pod, and the run dir must lie under it; on the claim it sits at its
    path relative to mount_path. Planning on a host that mounts the same volume at the same path
    puts the files there already; otherwise copy the run dir onto the claim before applying."""
    k, key = job.launcher.k8s, "launcher.k8s.mount_path"
    if len(k.pvc) > 253 or not DNS1123_SUBDOMAIN.fullmatch(k.pvc):
        raise ConfigError("launcher.k8s.pvc", k.pvc, "a PersistentVolumeClaim name (DNS-1123 "
                          "subdomain): lower-case letters, digits, '-' and '.', starting and "
                          "ending with a letter or digit, at most 253 characters")
    if not job.launcher.image.strip() or any(c.isspace() for c in job.launcher.image):
        raise ConfigError("launcher.image", job.launcher.image, "a container image reference "
                          "without spaces, e.g. registry.example.com/orchestrator:1.0")
    if k.shm_size is not None and not QUANTITY.fullmatch(k.shm_size):
        raise ConfigError("launcher.k8s.shm_size", k.shm_size,
                          "a Kubernetes quantity such as '16Gi' or '64G', or null for no limit")
    run_dir = PurePosixPath(job.run_dir)
    mount = PurePosixPath(k.mount_path) if k.mount_path is not None else run_dir.parent
    if (not mount.is_absolute() or ".." in mount.parts or mount == PurePosixPath("/")
            or any(mount == d or d in mount.parents for d in SYSTEM_DIRS)):
        raise ConfigError(key, k.mount_path, "an absolute directory other than /, /dev, /proc "
                          f"and /sys, containing the run dir {run_dir}")
    if mount != run_dir and mount not in run_dir.parents:
        raise ConfigError(key, k.mount_path, f"a directory containing the run dir {run_dir} "
                          "(the ranks read and write the plan's paths), or null for its parent")
    return mount


def check_launcher(job: JobConfig) -> None:
    """The launcher keys (one line, exit 2, before anything is written)."""
    c = job.cluster
    _check_stop_signal(job)
    if job.launcher.name == "k8s" and job.action == "run":
        raise ConfigError("action", "run", "'plan' with launcher=k8s (it renders a PyTorchJob "
                          "manifest for kubectl; it does not submit)")
    if c.nodes > 1 and job.launcher.name == "local" and job.action == "run":
        raise ConfigError("cluster.nodes", c.nodes, "1 with launcher=local (one machine)")
    if c.nodes > 1 and job.launcher.name == "torchrun" and _loopback(job.launcher.rdzv_host):
        raise ConfigError("launcher.rdzv_host", job.launcher.rdzv_host, "the first node's "
                          f"hostname or address for cluster.nodes={c.nodes} (on a loopback "
                          "address every node hosts its own rendezvous and none meet)")
    if job.launcher.name == "k8s":  # volume, image and shm keys
        mount_path(job)
    if not 0 < job.launcher.rdzv_port < 65536:
        raise ConfigError("launcher.rdzv_port", job.launcher.rdzv_port, "a port in 1..65535")
