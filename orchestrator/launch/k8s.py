"""Kubernetes (render only): a Kubeflow `PyTorchJob` manifest from the plan, for `kubectl apply`
(`launcher.k8s.api=pytorchjob`; the default TrainJob is trainjob.py, which shares the command,
volumes and env built here).

One pod per node (Master = node 0, Worker = nodes 1..N-1). Each pod runs torchrun, which starts
the plan's `nproc_per_node` ranks; the training operator (v1.7 or later) tells it which node it
is and where node 0 listens. Every pod mounts the run dir from a PersistentVolumeClaim at the
plan's own path, and /dev/shm from memory.

The manifest never holds a secret: secret-named variables are left out of the pods' env, and
config.yaml / deepspeed.json on the claim hold secrets redacted (common/secrets.py). Ranks that
need one (e.g. DeepSpeed's comet api_key) must get ORCHESTRATOR_SECRETS (`secret_env`) from a
Kubernetes Secret added to the pod spec by whoever applies the manifest.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from orchestrator.common.contract import K8S_MANIFEST
from orchestrator.common.plan import Plan
from orchestrator.common.secrets import is_secret_key
from orchestrator.config.launcher import mount_path, torchrun_flags
from orchestrator.config.schema import JobConfig
from orchestrator.planning.plan import rank_command

MANIFEST = K8S_MANIFEST
CONTAINER = "pytorch"  # the operator finds the training container (and its port) by this name
PORT_NAME = "pytorchjob-port"  # ... and the master port by this name, for PET_MASTER_PORT
SHM_VOLUME, RUN_VOLUME = "dshm", "run-dir"
# A PVC name is a DNS-1123 subdomain (Kubernetes' IsDNS1123Subdomain).


def job_name(run_dir: str, nnodes: int) -> str:
    """The run dir's name as a PyTorchJob name. The operator's webhook wants a DNS-1035 label
    (a letter first), and names pods and services `<name>-worker-<i>`, which must fit in 63."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", PurePosixPath(run_dir).name.lower()))
    name = name.strip("-") or "orchestrator"
    if not name[0].isalpha():
        name = f"run-{name}"
    room = 63 - len(f"-worker-{max(nnodes - 2, 0)}")
    return name[:room].rstrip("-")



def command(plan: Plan, job: JobConfig) -> list[str]:
    """torchrun in each pod, starting `nproc_per_node` ranks of the recipe.

    The operator (kubeflow training-operator v1.7+, pkg/controller.v1/pytorch/envvar.go and
    master.go) injects into every pod PET_NODE_RANK (0 on Master, i + 1 on Worker i),
    PET_MASTER_ADDR (the `<job>-master-0` service), PET_MASTER_PORT (the Master container's
    `pytorchjob-port`), PET_NNODES (replicas) and PET_NPROC_PER_NODE (spec.nprocPerNode), plus
    WORLD_SIZE = replicas x nprocPerNode, RANK and MASTER_ADDR/PORT. torchrun reads every option
    it declares with `action=env` from PET_<DEST> when the option is not on the command line
    (torch/distributed/argparse_util.py), so --node-rank, --master-addr and --master-port come
    from the pod, and the static rendezvous (torch/distributed/run.py: get_rdzv_endpoint, and
    rank = node_rank) connects node i to node 0. --nnodes and --nproc-per-node are given
    explicitly from the plan (the command line wins over PET_*), as is --rdzv-backend=static, so
    a stray PET_RDZV_BACKEND cannot change the rendezvous. torchrun then sets RANK, WORLD_SIZE,
    LOCAL_RANK and MASTER_ADDR/PORT for each rank it starts, replacing the pod-level values that
    would otherwise make one process per pod wait for nodes x GPUs peers.
    """
    return ["python", "-m", "torch.distributed.run", f"--nnodes={plan.nnodes}",
            f"--nproc-per-node={plan.nproc_per_node}", "--rdzv-backend=static",
            f"--rdzv-conf=timeout={job.launcher.rdzv_timeout_s}",
            f"--max-restarts={job.fault.max_restarts}", *torchrun_flags(job),
            *rank_command(job, plan.config_path)]


def pod_volumes(job: JobConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volume mounts) every pod gets: the in-memory /dev/shm (NCCL and DataLoader
    workers share memory through it; Docker's default is 64 MB) and the run-dir claim."""
    shm: dict[str, Any] = {"medium": "Memory"}
    if job.launcher.k8s.shm_size is not None:
        shm["sizeLimit"] = job.launcher.k8s.shm_size
    volumes = [{"name": SHM_VOLUME, "emptyDir": shm},
               {"name": RUN_VOLUME, "persistentVolumeClaim": {"claimName": job.launcher.k8s.pvc}}]
    mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"},
              {"name": RUN_VOLUME, "mountPath": str(mount_path(job))}]
    return volumes, mounts


def container_env(plan: Plan) -> list[dict[str, Any]]:
    """The plan's environment, secret-named variables left out."""
    return [{"name": k, "value": v} for k, v in sorted(plan.env.items()) if not is_secret_key(k)]


def render(plan: Plan, job: JobConfig) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if plan.device == "cuda":
        resources = {"limits": {"nvidia.com/gpu": plan.nproc_per_node}}
    volumes, mounts = pod_volumes(job)
    container = {"name": CONTAINER, "image": job.launcher.image, "command": command(plan, job),
                 "env": container_env(plan),
                 "ports": [{"name": PORT_NAME, "containerPort": job.launcher.rdzv_port,
                            "protocol": "TCP"}],
                 "resources": resources, "volumeMounts": mounts}

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"spec": {"containers": [container], "volumes": volumes}}}

    specs = {"Master": replicas(1)}
    if plan.nnodes > 1:
        specs["Worker"] = replicas(plan.nnodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": job_name(plan.run_dir, plan.nnodes)},
        "spec": {"nprocPerNode": str(plan.nproc_per_node), "pytorchReplicaSpecs": specs},
    }


def write_manifest(plan: Plan, job: JobConfig) -> Path:
    manifest = render(plan, job)
    path = Path(job.run_dir) / MANIFEST
    # yaml.safe_dump would write the shared container and volumes as anchors and aliases
    path.write_text(yaml.dump(manifest, Dumper=NoAliases, sort_keys=False))
    return path


class NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True
