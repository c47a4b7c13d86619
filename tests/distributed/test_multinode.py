"""Multi-node launch without Slurm: the plan's per-node torchrun commands, run as two "nodes" on
this machine with c10d rendezvous on 127.0.0.1; and the k8s manifest rendered from a plan."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import yaml

from orchestrator.common.records import read_metrics
from tests.conftest import REPO, free_port, run_cli, run_ok
from tests.distributed.checks import losses, max_diff_from_reference


def test_two_torchrun_nodes_on_localhost_train_together(tmp_path) -> None:
    port = free_port()
    proc = run_ok(["+recipe=fsdp_zero3", "launcher=torchrun", "cluster.nodes=2",
                    "cluster.gpus_per_node=1", f"launcher.rdzv_port={port}", "logging=none",
                    # this host's name, as a real cluster's first node would give it (a loopback
                    # address is refused for more than one node)
                    f"launcher.rdzv_host={socket.gethostname()}"],
                   tmp_path)
    assert "run on each node" in proc.stdout and not (tmp_path / "metrics.jsonl").exists()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [c.count("--node-rank=1") for c in plan["commands"]] == [0, 1]
    env = {**os.environ, **plan["env"]}
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in plan["commands"]]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    (start,) = read_metrics(tmp_path / "metrics.jsonl", events=True)
    assert start["world_size"] == 2
    # two one-rank nodes hold the 2-rank reference's global batch (micro batch 4 each): the
    # losses are the independent plain loop's (ZeRO-3's reduction order: measured 4.8e-7)
    assert len(losses(tmp_path)) == 20 and max_diff_from_reference(tmp_path) <= 1e-5


def test_k8s_manifest_is_a_pytorchjob_for_the_plan(tmp_path) -> None:
    run_ok(["+recipe=fsdp_zero3", "launcher=k8s", "cluster.nodes=3", "launcher.k8s.api=pytorchjob",
            "cluster.gpus_per_node=8", "cluster.gpu=h100", "action=plan"], tmp_path)
    job = yaml.safe_load((tmp_path / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] + specs["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == "8"
    (container,) = specs["Worker"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["command"][-1] == str(tmp_path / "config.yaml")
    assert all(c.isalnum() or c == "-" for c in job["metadata"]["name"])
    run = run_cli(["+recipe=fsdp_zero3", "launcher=k8s"], tmp_path / "run")
    assert run.returncode == 2 and "launcher=k8s" in run.stderr
