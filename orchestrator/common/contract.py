"""What the launcher and the ranks agree on, defined once: the files of a run directory and the
environment variables the launcher sets for the ranks. Both sides import these names; neither
spells the strings itself (docs/architecture.md lists them with who writes and who reads each).
"""

from __future__ import annotations

from pathlib import Path

# -- files in a run directory -----------------------------------------------------------------
CONFIG_YAML = "config.yaml"  # the resolved job, secrets redacted: launcher writes, ranks read
OVERRIDES_TXT = "overrides.txt"  # the command line's overrides (secrets redacted), one a line
PLAN_JSON = "plan.json"  # the Plan (common/plan.py): launcher writes, rank 0 compares with it
DEEPSPEED_JSON = "deepspeed.json"  # the generated DeepSpeed config, secrets redacted
SLURM_RECORD = "slurm_job.json"  # the submitted Slurm job: id, log, script (launch/slurm.py)
SBATCH_SCRIPT = "job.sbatch"  # the rendered sbatch script
K8S_MANIFEST = "pytorchjob.yaml"  # the rendered Kubeflow PyTorchJob (launcher.k8s.api)
TRAINJOB_MANIFEST = "trainjob.yaml"  # the rendered Kubeflow Trainer v2 TrainJob
ATTEMPT_JSON = "attempt.json"  # how this attempt ended, by rank 0 (run/checkpoint/stop.py)
WANDB_RUN_JSON = "wandb_run.json"  # the W&B run's id, mode and directory, by rank 0
RUN_MARKER = ".orchestrator_run.json"  # marks a run directory as ours (launch/rundir.py)
RUN_LOCK = ".lock"  # held (flock) by the launch that owns the run directory
QUANTIZE_JSON = "quantize.json"  # int8 PTQ/QAT report: bytes and perplexity before and after
MEMORY_DIR = "memory"  # memory/rank<N>.json: model-state bytes each rank measured
# in a search trial's run dir once the search pruned it: its stop is final (the sbatch script
# does not requeue it); the controller (launch/trials.py) writes it, the script reads it
SEARCH_TRIAL_JSON = "search_trial.json"
PROFILE_DIR = "profile"  # profile/rank<N>.json: train.profile's Chrome traces (run/profiling.py)
# the metrics file's name is a setting (`logging.metrics_file`, default in config/schema.py):
# every reader finds it through `metrics_path`


def metrics_path(run_dir: str | Path, metrics_file: str) -> Path:
    """The run's metrics file: `logging.metrics_file`, a file name inside the run directory."""
    return Path(run_dir) / metrics_file


def memory_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / MEMORY_DIR / f"rank{rank}.json"


def profile_trace(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"rank{rank}.json"


# -- environment variables the launcher sets for the ranks ------------------------------------
DEVICE_ENV = "ORCHESTRATOR_DEVICE"  # cpu | cuda: the device the plan chose
SECRETS_ENV = "ORCHESTRATOR_SECRETS"  # JSON [[path, value], ...]: secrets config.yaml lacks
CONFIG_SHA_ENV = "ORCHESTRATOR_CONFIG_SHA256"  # SHA-256 of the config.yaml this launch wrote
TOKEN_ENV = "ORCHESTRATOR_LAUNCH_TOKEN"  # marks every process of one launch (common/lifeline)
CACHE_ENV = "ORCHESTRATOR_CACHE"  # the cache root (common/files.py); both sides read it

# -- the per-rank programs: train.task -> the module torchrun runs (`python -m MODULE CONFIG`) --
RECIPES = {
    "pretrain": "recipes.pretrain",  # pre-training, fine-tuning, SFT, DPO
    "evaluate": "recipes.evaluate",
    "generate": "recipes.generate",
    "quantize": "recipes.quantize",
}
