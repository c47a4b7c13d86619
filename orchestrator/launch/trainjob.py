"""Kubeflow Trainer v2's `TrainJob` (`trainer.kubeflow.org/v1alpha1`), rendered from the plan for
`kubectl apply` (`launcher=k8s`, `launcher.k8s.api=trainjob`, the default; `pytorchjob` keeps
the v1 PyTorchJob of k8s.py).

The TrainJob references a ClusterTrainingRuntime (`launcher.k8s.runtime`, by default the
`torch-distributed` one Kubeflow Trainer installs: a JobSet whose replicated job `node` runs
the container `node`) and overrides its trainer: image, command, env, `numNodes`,
`numProcPerNode` and the GPUs per node. The torch runtime injects `PET_NNODES`,
`PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR` and `PET_MASTER_PORT` into every node;
torchrun reads the ones its command line leaves out (see `k8s.command`, shared with the
PyTorchJob). The run-dir claim and the in-memory `/dev/shm` reach the pods through a runtime
patch (the Trainer API's way to add volumes to a runtime's pods). `launcher.k8s.queue` sets
Kueue's queue label; `launcher.k8s.secret` names the Kubernetes Secret the ranks' secrets
come from (`ORCHESTRATOR_SECRETS`): the manifest itself never holds one.

tests/unit/test_k8s.py checks the manifest against the TrainJob schema as the
`kubeflow-trainer-api` package (the models Kubeflow generates from the Trainer's OpenAPI spec;
the version pinned in pyproject.toml) defines it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.common.contract import SECRETS_ENV, TRAINJOB_MANIFEST
from orchestrator.common.plan import Plan
from orchestrator.config.schema import JobConfig
from orchestrator.launch.k8s import NoAliases, command, container_env, job_name, pod_volumes

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME_JOB = RUNTIME_CONTAINER = "node"  # the torch-distributed runtime's replicated job
PATCH_MANAGER = "orchestrator"  # who owns our runtime patch
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def render(plan: Plan, job: JobConfig) -> dict[str, Any]:
    k = job.launcher.k8s
    volumes, mounts = pod_volumes(job)
    env = container_env(plan)
    if k.secret is not None:
        env.append({"name": SECRETS_ENV, "valueFrom": {
            "secretKeyRef": {"name": k.secret, "key": SECRETS_ENV}}})
    trainer: dict[str, Any] = {
        "image": job.launcher.image, "command": command(plan, job), "env": env,
        "numNodes": plan.nnodes, "numProcPerNode": plan.nproc_per_node}
    if plan.device == "cuda":
        trainer["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": str(plan.nproc_per_node)}}
    pod = {"containers": [{"name": RUNTIME_CONTAINER, "volumeMounts": mounts}],
           "volumes": volumes}
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": RUNTIME_JOB, "template": {"spec": {"template": {
            "spec": pod}}}}]}}}}
    metadata: dict[str, Any] = {"name": job_name(plan.run_dir, plan.nnodes)}
    if k.queue is not None:
        metadata["labels"] = {QUEUE_LABEL: k.queue}
    return {
        "apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata,
        "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org",
                                "kind": "ClusterTrainingRuntime", "name": k.runtime},
                 "trainer": trainer, "runtimePatches": [patch]},
    }


def write_trainjob(plan: Plan, job: JobConfig) -> Path:
    path = Path(job.run_dir) / TRAINJOB_MANIFEST
    path.write_text(yaml.dump(render(plan, job), Dumper=NoAliases, sort_keys=False))
    return path
