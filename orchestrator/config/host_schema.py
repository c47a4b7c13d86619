"""The launcher's part of the job schema: where the job runs (cluster, launcher, Slurm,
Kubernetes), what the plan assumes, how it is logged, and a search over runs. Defaults live
here as in config/schema.py, which composes them into `JobConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.config.fields import choice


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 2  # processes per node (CPU ranks when device is cpu)
    # auto = cuda when cluster.gpu names one, or (launcher=local) a GPU is visible; else cpu
    device: str = choice("auto", "auto", "cpu", "cuda")
    # the accelerator to plan for (orchestrator/config/gpus.py); none = unknown / CPU
    gpu: str = choice("none", "none", "v100", "a100_40gb", "a100_80gb", "h100", "h100_pcie",
                      "h200", "l4")
    gpu_hour_usd: Optional[float] = None  # price of one GPU-hour, for the cost estimate
    # each GPU's network bandwidth to other nodes, Gbit/s one way (InfiniBand NDR: 400): the
    # plan's communication time on more than one node
    network_gbps: float = 400.0


@dataclass
class PlanConfig:
    mfu: float = 0.4  # assumed model FLOPs utilisation for time and cost estimates
    budget_flops: Optional[float] = None  # if set: the compute-optimal N and D for this budget
    memory_overhead: float = 0.10  # allowance for buffers and fragmentation, x model+activations


@dataclass
class SlurmConfig:
    partition: Optional[str] = None  # None = the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    # CPUs of the one task per node (torchrun and its ranks); None = all CPUs of a node of
    # the partition (asked of sinfo when rendering; without Slurm tools there: --exclusive)
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. "64G"; None = the partition default
    exclusive: bool = False
    constraint: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--reservation=r1"]
    # sbatch --signal: Slurm sends this signal this many seconds before the time limit; every
    # rank then finishes its step, saves a checkpoint and stops (checkpoint/stop.py). It must
    # leave time for one step and one save. None = no warning signal
    signal: Optional[str] = "USR1@120"
    # after such a stop the job requeues itself (scontrol requeue) and resumes in its run dir
    requeue: bool = True
    wait: bool = False  # block until the job ends (sweeps and tests)
    poll_s: float = 2.0


@dataclass
class K8sConfig:
    # Every pod mounts this PersistentVolumeClaim (ReadWriteMany when nodes > 1): the ranks read
    # <run_dir>/config.yaml and plan.json and write metrics and checkpoints at the plan's paths.
    pvc: str = "orchestrator-runs"
    # Where the claim's root appears in every pod; None = the run dir's parent. The run dir must
    # lie under it, and sits on the claim at its path relative to mount_path.
    mount_path: Optional[str] = None
    shm_size: Optional[str] = None  # sizeLimit of the in-memory /dev/shm, e.g. "32Gi"; None = none
    # trainjob: Kubeflow Trainer v2's TrainJob (trainer.kubeflow.org/v1alpha1, on JobSet), what
    # new clusters run; pytorchjob: the training operator's v1 PyTorchJob (deprecated upstream)
    api: str = choice("trainjob", "trainjob", "pytorchjob")
    runtime: str = "torch-distributed"  # trainjob: the ClusterTrainingRuntime it references
    queue: Optional[str] = None  # trainjob: Kueue's LocalQueue (the queue-name label)
    # trainjob: the Kubernetes Secret whose key ORCHESTRATOR_SECRETS holds the ranks' secrets
    secret: Optional[str] = None


@dataclass
class LauncherConfig:
    # local: this machine; torchrun: print each node's command (manual clusters);
    # slurm: sbatch a script rendered from the plan; k8s: render a PyTorchJob (action=plan)
    name: str = choice("local", "local", "torchrun", "slurm", "k8s")
    rdzv_host: str = "127.0.0.1"  # multi-node rendezvous endpoint host (torchrun; k8s: the
    # training operator's master service)
    rdzv_port: int = 29500  # k8s: the Master container's port, where the rank-0 pod listens
    rdzv_timeout_s: int = 900
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    image: str = "orchestrator:latest"  # k8s: container image holding this project
    k8s: K8sConfig = field(default_factory=K8sConfig)


@dataclass
class WandbConfig:
    mode: str = choice("offline", "offline", "online", "disabled")
    project: str = "orchestrator"
    entity: Optional[str] = None
    name: Optional[str] = None  # None = the run directory's name
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    name: str = "wandb_offline"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    metrics_file: str = "metrics.jsonl"
    progress: bool = True  # rank-0 progress bar with loss, tokens/s and ETA


@dataclass
class SearchConfig:
    # the space: override key -> sweep in the Hydra Optuna sweeper's syntax, e.g.
    # optim.lr: tag(log, interval(1e-5, 1e-2)); train.micro_batch_size: choice(4, 8)
    params: dict[str, Any] = field(default_factory=dict)
    trials: int = 8  # finished trials the study runs to (those in its journal count)
    parallel: int = 1  # trials in flight at once; when one ends the next starts
    metric: str = "val/loss"  # the logged value a trial is judged by: its last one
    direction: str = choice("minimize", "minimize", "maximize")
    sampler: str = choice("tpe", "tpe", "random", "grid", "cmaes")
    # stop a trial early when its metric, as logged so far, is worse than the others' were at
    # that step (median), or by successive halving (asha) or hyperband; it then stops after
    # the same step on every rank, with a checkpoint (the stop signal), and counts as PRUNED
    pruner: str = choice("median", "median", "asha", "hyperband", "none")
    warmup_trials: int = 2  # median: trials that finish before any is pruned
    study: Optional[str] = None  # the study's name; None = the study dir's name
    # where the study lives: None = Optuna's JournalStorage file in the study dir (no server);
    # or a database URL for Optuna's RDBStorage (sqlite:///path/study.db, postgresql://...),
    # without a password (the database's own client config holds it, e.g. ~/.pgpass)
    storage: Optional[str] = None
    # refuse a study whose planned bound (trials x the costliest trial) is over this
    budget_gpu_hours: Optional[float] = None
    # metric: search.params for search.metric; throughput: the layout search (planning/
    # layouts.py), each parallel layout that fits run for train.steps and judged by its median
    # tokens/s after its first step (search=layout sets the keys it needs)
    objective: str = choice("metric", "metric", "throughput")
    layouts: list[str] = field(default_factory=list)  # throughput: these rungs only (empty: all)
    # throughput: the memory a rank may plan to use, MiB; None = the planned GPU's (cluster.gpu)
    device_memory_mb: Optional[float] = None
    name: str = "none"  # the configs/search/ file selected (search=NAME)
