"""The Kubernetes launcher: the rendered TrainJob (Kubeflow Trainer v2, the default) checked
against the TrainJob schema as Kubeflow's own generated models define it (kubeflow-trainer-api,
pinned in pyproject.toml), and the v1 PyTorchJob checked field by field (no API server here);
each one's torchrun command parsed by torch's own launcher under the env its controller
injects."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from orchestrator.common.errors import ConfigError
from orchestrator.common.plan import Plan
from orchestrator.config.schema import JobConfig
from orchestrator.launch import k8s
from orchestrator.planning.plan import make_plan
from tests.conftest import make_job, run_cli, run_ok

DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # PyTorchJob, Service names
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # volume and container names
GPU_JOB = ["+recipe=fsdp_zero3", "launcher=k8s", "action=plan", "cluster.device=cuda",
           "cluster.gpu=h100", "cluster.gpus_per_node=8", "cluster.nodes=2"]


def planned(tmp_path, overrides: list[str], device: str = "cuda") -> tuple[JobConfig, Plan]:
    job = make_job(overrides, run_dir=str(tmp_path / "runs" / "2024-05-01_12-00-00"))
    return job, make_plan(job, device, 64)


def check_manifest(m: dict[str, Any], plan: Plan, job: JobConfig) -> dict[str, Any]:
    """What `kubectl apply` and the training operator's webhook would reject, field by field.
    Returns the Master container."""
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    name = m["metadata"]["name"]
    assert DNS1035_LABEL.fullmatch(name), name
    # the operator names pods and services <name>-worker-<i>: still a 63-character label
    assert len(f"{name}-worker-{max(plan.nnodes - 2, 0)}") <= 63
    assert m["spec"]["nprocPerNode"] == str(plan.nproc_per_node)
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == ({"Master", "Worker"} if plan.nnodes > 1 else {"Master"})
    assert specs["Master"]["replicas"] == 1
    assert sum(s["replicas"] for s in specs.values()) == plan.nnodes
    for spec in specs.values():
        assert spec["restartPolicy"] in ("Never", "OnFailure", "Always", "ExitCode")
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert len(volumes) == len(pod["volumes"]) and all(map(DNS1123_LABEL.fullmatch, volumes))
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == job.launcher.image
        # torchrun starting nproc_per_node ranks of the recipe, against the plan's config
        cmd = c["command"]
        assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
        assert f"--nnodes={plan.nnodes}" in cmd
        assert f"--nproc-per-node={plan.nproc_per_node}" in cmd
        assert cmd[-3:] == ["-m", f"recipes.{job.train.task}", plan.config_path]
        assert not any(a.startswith(("--node-rank", "--master-addr", "--master-port"))
                       for a in cmd)  # per pod: from the operator's PET_* variables
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": job.launcher.rdzv_port,
                               "protocol": "TCP"}]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["ORCHESTRATOR_DEVICE"] == plan.device
        assert all(isinstance(v, str) for v in env.values())
        mounts = {mt["mountPath"]: mt["name"] for mt in c["volumeMounts"]}
        assert len(mounts) == len(c["volumeMounts"])
        assert all(mt["name"] in volumes for mt in c["volumeMounts"])  # every mount is declared
        shm = volumes[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory"
        runs = [(PurePosixPath(path), volumes[v]) for path, v in mounts.items()
                if "persistentVolumeClaim" in volumes[v]]
        ((mount, pvc),) = runs
        assert pvc["persistentVolumeClaim"]["claimName"] == job.launcher.k8s.pvc
        # the ranks use the plan's paths: the run dir must be on the shared volume
        run_dir = PurePosixPath(plan.run_dir)
        assert mount == run_dir or mount in run_dir.parents
        if plan.device == "cuda":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == plan.nproc_per_node
        else:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    return specs["Master"]["template"]["spec"]["containers"][0]


def test_gpu_manifest_runs_torchrun_with_shm_and_the_run_dir_volume(tmp_path) -> None:
    job, plan = planned(tmp_path, GPU_JOB)
    assert (plan.nnodes, plan.nproc_per_node, plan.device) == (2, 8, "cuda")
    manifest = k8s.render(plan, job)
    container = check_manifest(manifest, plan, job)
    assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    volumes = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    assert {"name": "run-dir", "persistentVolumeClaim": {"claimName": "orchestrator-runs"}} \
        in volumes
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in volumes  # no sizeLimit: none set
    # default mount: the run dir's parent, so <claim>/<run name> is the run dir in every pod
    assert {"name": "run-dir", "mountPath": str(tmp_path / "runs")} in container["volumeMounts"]
    assert manifest["metadata"]["name"] == "run-2024-05-01-12-00-00"


def test_rendered_command_under_the_operator_env_starts_the_planned_ranks(
        tmp_path, monkeypatch) -> None:
    """torch's own argument parser reads the PET_* variables the operator injects into Worker 0
    (node rank 1): a static rendezvous on the Master service, nodes x GPUs ranks."""
    from torch.distributed import run as torchrun

    job, plan = planned(tmp_path, GPU_JOB)
    worker = k8s.render(plan, job)["spec"]["pytorchReplicaSpecs"]["Worker"]
    cmd = worker["template"]["spec"]["containers"][0]["command"]
    operator_env = {  # training-operator v1.7+: envvar.go setPodEnv + master.go, Worker index 0
        "PET_MASTER_ADDR": "run-2024-05-01-12-00-00-master-0", "PET_MASTER_PORT": "29500",
        "MASTER_ADDR": "run-2024-05-01-12-00-00-master-0", "MASTER_PORT": "29500",
        "PET_NODE_RANK": "1", "RANK": "1", "WORLD_SIZE": "16", "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "8", "OMP_NUM_THREADS": "1", "PET_LOG_DIR": str(tmp_path / "logs")}
    for name, value in operator_env.items():
        monkeypatch.setenv(name, value)
    config, program, args = torchrun.config_from_args(torchrun.parse_args(cmd[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert config.rdzv_backend == "static"
    assert config.rdzv_endpoint == "run-2024-05-01-12-00-00-master-0:29500"
    assert config.rdzv_configs == {"rank": 1, "timeout": str(job.launcher.rdzv_timeout_s)}
    assert config.max_restarts == 0
    assert args == ["-u", "-m", f"recipes.{job.train.task}", plan.config_path]


def test_cpu_single_node_manifest(tmp_path) -> None:
    job, plan = planned(tmp_path, ["+recipe=ddp", "launcher=k8s", "action=plan",
                                   "cluster.device=cpu", "cluster.gpus_per_node=2"], "cpu")
    manifest = k8s.render(plan, job)
    check_manifest(manifest, plan, job)
    assert list(manifest["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_configured_claim_mount_path_and_shm_size(tmp_path) -> None:
    job, plan = planned(tmp_path, [*GPU_JOB, "launcher.k8s.pvc=team-runs.nfs",
                                   f"launcher.k8s.mount_path={tmp_path}",
                                   "launcher.k8s.shm_size=32Gi", "launcher.image=reg.io/o:1",
                                   "launcher.rdzv_port=23456"])
    manifest = k8s.render(plan, job)
    container = check_manifest(manifest, plan, job)
    pod = manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} \
        in pod["volumes"]
    assert {"name": "run-dir", "mountPath": str(tmp_path)} in container["volumeMounts"]
    assert container["image"] == "reg.io/o:1"


@pytest.mark.parametrize(("override", "key"), [
    ("launcher.k8s.pvc=Bad_PVC", "launcher.k8s.pvc"),
    ("launcher.k8s.pvc=-runs", "launcher.k8s.pvc"),
    ("launcher.k8s.pvc=" + "a" * 254, "launcher.k8s.pvc"),
    ("launcher.k8s.mount_path=/elsewhere", "launcher.k8s.mount_path"),
    ("launcher.k8s.mount_path=relative/runs", "launcher.k8s.mount_path"),
    ("launcher.k8s.mount_path=/", "launcher.k8s.mount_path"),
    ("launcher.k8s.shm_size=lots", "launcher.k8s.shm_size"),
    ("launcher.image='two words'", "launcher.image"),
])
def test_bad_k8s_values_are_config_errors(tmp_path, override, key) -> None:
    job, plan = planned(tmp_path, [*GPU_JOB, override])
    with pytest.raises(ConfigError) as e:
        k8s.render(plan, job)
    assert e.value.key == key and "\n" not in str(e)


def test_mount_path_under_dev_is_refused(tmp_path) -> None:
    job = make_job([*GPU_JOB, "launcher.k8s.mount_path=/dev"], run_dir="/dev/shm/runs/r1")
    with pytest.raises(ConfigError, match="launcher.k8s.mount_path"):
        k8s.render(make_plan(job, "cuda", 64), job)


@pytest.mark.parametrize(("run_name", "nnodes"), [
    ("2024-05-01_12-00-00", 2), ("My_Run.v2", 1), ("x" * 80, 300), ("___", 2), ("-a-", 2)])
def test_job_names_are_dns1035_and_leave_room_for_replica_names(run_name, nnodes) -> None:
    name = k8s.job_name(f"/runs/{run_name}", nnodes)
    assert DNS1035_LABEL.fullmatch(name), name
    assert len(f"{name}-worker-{max(nnodes - 2, 0)}") <= 63


def test_written_manifest_has_no_yaml_aliases(tmp_path) -> None:
    job, plan = planned(tmp_path, GPU_JOB)
    (tmp_path / "runs" / "2024-05-01_12-00-00").mkdir(parents=True)
    text = k8s.write_manifest(plan, job).read_text()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == k8s.render(plan, job)


def test_cli_plan_writes_the_manifest(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "k8s-run"
    old_api = [*GPU_JOB, "launcher.k8s.pvc=shared-runs", "launcher.k8s.api=pytorchjob"]
    run_ok(old_api, run_dir)
    manifest = yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    job = make_job(old_api, run_dir=str(run_dir))
    plan = make_plan(job, "cuda", 64)
    check_manifest(manifest, plan, job)
    assert manifest["metadata"]["name"] == "k8s-run"


def test_cli_bad_pvc_name_is_one_line_exit_2(tmp_path) -> None:
    proc = run_cli([*GPU_JOB, "launcher.k8s.pvc=Runs_PVC"], tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: config key 'launcher.k8s.pvc' has value 'Runs_PVC'; allowed: a "
                     "PersistentVolumeClaim name (DNS-1123 subdomain): lower-case letters, "
                     "digits, '-' and '.', starting and ending with a letter or digit, at most "
                     "253 characters"]
    assert "Traceback" not in proc.stderr
    # refused by validation, before config.yaml or plan.json is written
    assert not (tmp_path / "run" / "pytorchjob.yaml").exists()
    assert not (tmp_path / "run" / "plan.json").exists()


# -- Kubeflow Trainer v2: TrainJob -----------------------------------------------------------------

def valid_trainjob(manifest: dict[str, Any]) -> None:
    """What the Trainer's API server would reject: the manifest read by Kubeflow's own TrainJob
    model (generated from the Trainer's OpenAPI spec) comes back unchanged, so every field is
    one the schema has, of the type it wants (a field it does not know would be dropped)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest


def test_trainjob_references_the_torch_runtime_and_carries_the_plan(tmp_path) -> None:
    from orchestrator.launch import trainjob

    job, plan = planned(tmp_path, [*GPU_JOB, "launcher.k8s.queue=team-a",
                                   "launcher.k8s.secret=run-secrets"])
    m = trainjob.render(plan, job)
    valid_trainjob(m)
    assert (m["apiVersion"], m["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert m["metadata"] == {"name": "run-2024-05-01-12-00-00",
                             "labels": {"kueue.x-k8s.io/queue-name": "team-a"}}
    assert m["spec"]["runtimeRef"]["name"] == "torch-distributed"
    t = m["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 8)
    assert t["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert t["image"] == job.launcher.image and t["command"][-1] == plan.config_path
    assert {"name": "ORCHESTRATOR_SECRETS", "valueFrom": {"secretKeyRef": {
        "name": "run-secrets", "key": "ORCHESTRATOR_SECRETS"}}} in t["env"]
    (patch,) = m["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"  # the torch-distributed runtime's job and container
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "run-dir", "mountPath": str(tmp_path / "runs")}]}]
    assert {"name": "run-dir", "persistentVolumeClaim": {"claimName": "orchestrator-runs"}} \
        in pod["volumes"]


def test_trainjob_on_cpu_and_without_queue_or_secret_is_valid_too(tmp_path) -> None:
    from orchestrator.launch import trainjob

    job, plan = planned(tmp_path, ["+recipe=ddp", "launcher=k8s", "action=plan",
                                   "cluster.device=cpu", "cluster.gpus_per_node=2"], "cpu")
    m = trainjob.render(plan, job)
    valid_trainjob(m)
    assert "labels" not in m["metadata"] and "resourcesPerNode" not in m["spec"]["trainer"]
    assert not any(e["name"] == "ORCHESTRATOR_SECRETS" for e in m["spec"]["trainer"]["env"])
    with pytest.raises(AssertionError):  # the check itself: an unknown field is caught
        valid_trainjob({**m, "spec": {**m["spec"], "trainer": {**m["spec"]["trainer"],
                                                                "replicas": 2}}})


def test_trainjob_command_under_the_torch_runtime_env_starts_the_planned_ranks(
        tmp_path, monkeypatch) -> None:
    """The torch-distributed runtime injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and
    PET_MASTER_ADDR/PORT (the JobSet's node 0): torch's parser turns the command into a static
    rendezvous with nodes x GPUs ranks."""
    from torch.distributed import run as torchrun

    from orchestrator.launch import trainjob

    job, plan = planned(tmp_path, GPU_JOB)
    cmd = trainjob.render(plan, job)["spec"]["trainer"]["command"]
    runtime_env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
                   "PET_MASTER_ADDR": "run-2024-05-01-12-00-00-node-0-0.run-2024-05-01-12-00-00",
                   "PET_MASTER_PORT": "29400", "OMP_NUM_THREADS": "1",
                   "PET_LOG_DIR": str(tmp_path / "logs")}
    for name, value in runtime_env.items():
        monkeypatch.setenv(name, value)
    config, _, args = torchrun.config_from_args(torchrun.parse_args(cmd[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert config.rdzv_endpoint == f"{runtime_env['PET_MASTER_ADDR']}:29400"
    assert config.rdzv_configs["rank"] == 1
    assert args == ["-u", "-m", f"recipes.{job.train.task}", plan.config_path]


def test_cli_plan_writes_a_trainjob_by_default(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "k8s-run"
    run_ok(GPU_JOB, run_dir)
    manifest = yaml.safe_load((run_dir / "trainjob.yaml").read_text())
    valid_trainjob(manifest)
    assert not (run_dir / "pytorchjob.yaml").exists()
