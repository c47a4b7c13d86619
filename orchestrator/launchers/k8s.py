"""Kubernetes (render only): a Kubeflow `PyTorchJob` manifest from the plan, for `kubectl apply`.

One pod per node; the training operator injects the rendezvous (MASTER_ADDR/PORT, WORLD_SIZE,
node rank) and runs `torchrun` with `nprocPerNode` processes in each pod.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.plan import Plan
from orchestrator.schema import JobConfig

MANIFEST = "pytorchjob.yaml"


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:63].strip("-")
    return name or "orchestrator"


def render(plan: Plan, job: JobConfig) -> dict[str, Any]:
    program = ["python", "-m", f"recipes.{job.train.task}", plan.config_path]
    resources: dict[str, Any] = {}
    if plan.device == "cuda":
        resources = {"limits": {"nvidia.com/gpu": plan.nproc_per_node}}
    container = {"name": "pytorch", "image": job.launcher.image, "command": program,
                 "env": [{"name": k, "value": v} for k, v in sorted(plan.env.items())],
                 "resources": resources}

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"spec": {"containers": [container]}}}

    specs = {"Master": replicas(1)}
    if plan.nnodes > 1:
        specs["Worker"] = replicas(plan.nnodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": _dns_name(Path(plan.run_dir).name)},
        "spec": {"nprocPerNode": str(plan.nproc_per_node), "pytorchReplicaSpecs": specs},
    }


def write_manifest(plan: Plan, job: JobConfig) -> Path:
    path = Path(job.run_dir) / MANIFEST
    path.write_text(yaml.safe_dump(render(plan, job), sort_keys=False))
    return path
