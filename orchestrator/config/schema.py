"""The job schema: the one place where defaults live.

Hydra composes YAML on top of these dataclasses (registered as the structured base config
`orchestrator_schema`), and `orchestrator.config.load.to_job` turns the result into a `JobConfig`.
Fields that only accept a fixed set of values carry it in `metadata["choices"]`; validation
reads it from there so the error message and the schema can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from orchestrator.config.fields import choice
from orchestrator.config.host_schema import (
    ClusterConfig,
    LauncherConfig,
    LoggingConfig,
    PlanConfig,
    SearchConfig,
)


@dataclass
class ModelConfig:
    name: str = "gpt2_tiny"
    family: str = choice("gpt2", "gpt2", "llama", "bert", "t5")
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_kv_head: Optional[int] = None  # llama grouped-query attention; None = n_head
    d_ff: Optional[int] = None  # None = 4 * d_model (gpt2) or the llama default
    vocab_size: int = 512
    max_seq_len: int = 128
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_implementation: str = choice("sdpa", "sdpa", "eager")
    # a local Hugging Face model directory (e.g. an earlier run's <run_dir>/model) to start
    # from; its config.json decides the architecture. No hub downloads.
    pretrained_path: Optional[str] = None


@dataclass
class LoraConfig:
    # rank 0 = off (every weight trains); > 0 = freeze the model and train low-rank adapters
    # (peft) on target_modules; the saved model has them merged in, the adapter is kept too
    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty = peft's default per family


@dataclass
class PrecisionConfig:
    # bf16/fp16: mixed precision with fp32 master weights; bf16_pure: weights, grads and
    # optimizer state all bf16 (half the model-state memory, no fp32 master); fp8: bf16 mixed
    # precision whose linear layers multiply in float8 (torchao float8 training; CUDA GPUs of
    # compute capability >= 8.9, e.g. H100/H200/L4)
    name: str = choice("fp32", "fp32", "bf16", "fp16", "bf16_pure", "fp8")
    init_scale: float = 65536.0  # fp16 dynamic loss scaling: initial scale
    growth_interval: int = 2000  # fp16: steps without overflow before the scale doubles
    # FSDP2 only (its MixedPrecisionPolicy): the dtype parameters are all-gathered and computed
    # in, and the dtype gradients are reduce-scattered in; auto = the compute dtype, and fp32
    param_dtype: str = choice("auto", "auto", "fp32", "bf16", "fp16")
    reduce_dtype: str = choice("auto", "auto", "fp32", "bf16", "fp16")
    # quantization-aware training (quantization/qat.py): int8 = train with every linear weight
    # fake-quantized to int8 (symmetric, per output row; torchao QAT), convert at the end and
    # save the int8 model to <run_dir>/model with a before/after report; none = off
    qat: str = choice("none", "none", "int8")
    # fp8: which linears become float8: auto = torchao's size heuristic (small matmuls gain
    # nothing); all = every one with dimensions that are multiples of 16; never the head
    fp8_filter: str = choice("auto", "auto", "all")
    # fp8 under FSDP2: all-gather the float8 weights (half the bytes of bf16), with the scales
    # precomputed for the whole model after each optimizer step (torchao)
    fp8_all_gather: bool = False


@dataclass
class ParallelismConfig:
    name: str = "ddp"
    # torch = DDP (stage 0), DDP + ZeroRedundancyOptimizer (stage 1), FSDP2 (stages 2 and 3);
    # deepspeed = a DeepSpeed engine for every stage, its JSON generated from this config.
    backend: str = choice("torch", "torch", "deepspeed")
    # ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
    zero_stage: int = choice(0, 0, 1, 2, 3)
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size
    # HSDP (FSDP2, stages 2/3): shard within groups of world/R ranks (normally one node) and
    # replicate across the R groups, so parameter all-gathers stay inside a node; DeepSpeed
    # stage 3 gets the equivalent hierarchical partition (zero_hpz_partition_size = world/R)
    replicate_degree: int = 1
    # tensor parallelism (Llama): heads and MLP columns split over T consecutive ranks, with
    # sequence parallelism; FSDP2 shards over the world / T data-parallel ranks
    tensor_parallel: int = 1
    tp_across_nodes: bool = False  # let a tensor-parallel group span nodes
    # pipeline parallelism (Llama): the blocks in P stages; each step's batch runs as
    # pipeline_microbatches (None = 2 x P) under gpipe, 1f1b, or with V stages per rank
    # (pipeline_stages_per_rank; None = 2 for these, else 1) interleaved_1f1b, interleaved_zb
    # (zero bubble) or zbv (zero bubble, V-shaped: exactly 2 stages per rank)
    pipeline_parallel: int = 1
    pipeline_schedule: str = choice("1f1b", "1f1b", "gpipe", "interleaved_1f1b", "interleaved_zb",
                                    "zbv")
    pipeline_microbatches: Optional[int] = None
    pipeline_stages_per_rank: Optional[int] = None
    # context parallelism (Llama, CUDA): each sequence split over C ranks, attention as ring
    # attention (torch's context_parallel); FSDP2 shards over the data- and context-parallel ranks
    context_parallel: int = 1
    # auto: of the layouts that fit cluster.gpu (DDP, ZeRO-1/2/3, ZeRO-3 x TP, PP, PP x TP;
    # CPU offload last), each at its largest micro batch, the fastest by the plan's estimate
    auto: bool = False
    offload_optimizer: bool = False  # deepspeed: optimizer state and fp32 master on the CPU
    offload_params: bool = False  # deepspeed stage 3: parameters on the CPU
    # deepspeed: any other DeepSpeed config key, merged over the generated config and checked
    # by DeepSpeed's own config model before launch
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    path: str = MISSING
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = choice("synthetic", "synthetic", "text", "jsonl_sft", "jsonl_pref")
    seq_len: int = 64
    # text: a UTF-8 file; jsonl_sft: {"prompt", "response"} lines; jsonl_pref: {"prompt",
    # "chosen", "rejected"} lines (DPO); None = the built-in set
    path: Optional[str] = None
    # byte: 258 ids, no vocabulary file; bpe: byte-level BPE trained on the corpus at launch
    # (saved as <run_dir>/tokenizer.json) or loaded from tokenizer_path / the pretrained model;
    # hf: the local Hugging Face tokenizer directory (AutoTokenizer) at tokenizer_path
    tokenizer: str = choice("byte", "byte", "bpe", "hf")
    tokenizer_path: Optional[str] = None
    # text: the tokenized corpus (token file, document index, manifest), made by the launch or
    # action=prepare; None = <$ORCHESTRATOR_CACHE or ~/.cache/orchestrator>/data/<source>-<hash
    # of the sources and the tokenizer>
    cache_dir: Optional[str] = None
    num_proc: Optional[int] = None  # action=prepare: tokenizing processes; None = CPU count
    text_field: str = "text"  # a .jsonl/.json/.parquet/save_to_disk source: the text field
    # text: several sources sampled by weight, [{path: a, weight: 0.7}, {path: b, weight: 0.3}]
    # (a path is a file, glob, directory or datasets.save_to_disk directory); empty = data.path
    sources: list[SourceConfig] = field(default_factory=list)
    on_error: str = choice("raise", "raise", "skip")  # a bad record: stop there, or count it
    # DataLoader worker processes per rank reading the windows (0 = in the training process);
    # batches are pinned for the copy to the GPU on CUDA
    num_workers: int = 0
    # jsonl_sft / jsonl_pref: each prompt in the tokenizer's chat template (data.tokenizer=hf)
    chat_template: bool = False
    num_samples: int = 4096  # synthetic: sequences in the dataset
    branching: int = 4  # synthetic: successors per token in the seeded Markov chain
    shuffle: bool = True


@dataclass
class ObjectiveConfig:
    # auto = the family's own: causal (gpt2, llama), mlm (bert), span (t5), or dpo with
    # data=jsonl_pref; dpo = preference pairs against a frozen reference copy of the starting
    # model (causal LMs)
    name: str = choice("auto", "auto", "causal", "mlm", "span", "dpo")
    mlm_probability: float = 0.15  # mlm: share of positions selected (80/10/10 mask/random/keep)
    noise_density: float = 0.15  # span: share of tokens hidden in spans
    mean_span_length: float = 3.0  # span: mean span length
    dpo_beta: float = 0.1  # dpo: strength of the pull towards the reference (KL weight)


@dataclass
class EvalConfig:
    # share of the dataset (its last samples) kept out of training, for evaluate and every_steps
    holdout: float = 0.0
    max_batches: int = 50  # evaluate and every_steps: micro batches per rank at most
    # pretrain: loss, perplexity and token accuracy on the held-out share every N optimizer
    # steps (logged as val/loss, val/perplexity, val/accuracy at that step); 0 = off
    every_steps: int = 0
    # data=text: evaluate on this source (file, glob, directory or dataset, prepared like
    # data.path) instead of the held-out share
    path: Optional[str] = None


@dataclass
class GenerateConfig:
    prompts: list[str] = field(default_factory=lambda: ["The "])
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut


@dataclass
class QuantizeConfig:
    # int8 post-training quantization (torchao) of a trained causal LM's linear layers, one
    # process: int8_weight_only = int8 weights with an fp32 scale per output row (dequantized in
    # the matmul); int8_dynamic = also each token's activations to int8 at run time (an int8
    # matmul). +recipe=quantize saves the quantized model; on evaluate/generate the loaded model
    # is quantized before use. none = off
    method: str = choice("none", "none", "int8_weight_only", "int8_dynamic")


@dataclass
class ProfileConfig:
    # [first, last]: torch.profiler traces of training steps first..last on every rank
    # (<run_dir>/profile/rank<N>.json, Chrome/Perfetto format); [] = off. Those steps are
    # logged on their own, marked `profiled`, without tokens/s.
    steps: list[int] = field(default_factory=list)
    memory: bool = False  # also the allocator's events (on CUDA: a memory snapshot .pickle)


@dataclass
class TrainConfig:
    task: str = choice("pretrain", "pretrain", "evaluate", "generate",
                       "quantize")  # program in recipes/
    steps: int = 20
    micro_batch_size: int = 4
    grad_accum_steps: Optional[int] = None  # None = derived from global_batch_size (or 1)
    global_batch_size: Optional[int] = None  # None = micro_batch_size * grad_accum * dp size
    seed: int = 1234
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each transformer block (DDP, ZeRO-1, FSDP2)
    save_model: bool = True  # write the trained model to <run_dir>/model (HF format)
    log_every: int = 1
    # stop the run with one clear line when the loss becomes NaN or inf (checked on logged
    # steps, where the losses reach the host anyway)
    stop_on_nonfinite: bool = True
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adamw", "sgd")
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    # torch's optimizer kernel: fused (every tensor in one kernel, on CPU and CUDA), foreach
    # (multi-tensor ops) or for_loop (one tensor at a time: what torch picks by itself for CPU
    # and for FSDP2's DTensor parameters); auto = fused, but for_loop under torch's fp16 loss
    # scaler (torch 2.13's fused step fails on the scaler's found-inf flag with FSDP2)
    implementation: str = choice("auto", "auto", "fused", "foreach", "for_loop")
    schedule: str = choice("cosine", "cosine", "constant")
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr


@dataclass
class DebugConfig:
    crash_at_step: Optional[int] = None  # raise inside the training loop (fault-path testing)
    # raise: an exception (the rank's error path); sigkill: the rank dies at once, as on a
    # node failure. Either only in the job's first attempt (not after a fault.max_restarts one)
    crash_mode: str = choice("raise", "raise", "sigkill")
    crash_rank: int = 0
    step_delay_s: float = 0.0  # sleep this long in every step (slow-job testing: signals, limits)
    memory_probe_step: int = 2  # step at which each rank measures its model-state bytes
    # fp16 overflow testing: this step's backward runs on the loss times inf, so every gradient
    # is non-finite and the loss scaler must skip the step (the logged loss stays finite)
    inf_grad_at_step: Optional[int] = None


@dataclass
class CheckpointConfig:
    # every N optimizer steps (and after the last) save a sharded checkpoint to
    # <run_dir>/checkpoints/step-<N> (torch.distributed.checkpoint: no rank-0 gather); 0 = none
    every_steps: int = 0
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after a new commit
    # DCP's async_save (torch strategies but ZeRO-1): the state is copied to host memory and
    # written in the background (the next optimizer step waits for the copy) and committed at
    # the next checkpoint or at the end. Costs one more copy of the rank's state in host memory
    async_save: bool = False


@dataclass
class FaultConfig:
    # torchrun restarts every rank after one fails, up to N times; the ranks then resume from
    # the newest complete checkpoint (with resume=auto)
    max_restarts: int = 0
    # on the stop signal (launcher.slurm.signal; SIGUSR1 locally) torchrun waits this long for
    # the ranks' checkpoint before it kills them
    stop_timeout_s: int = 120


@dataclass
class RunConfig:
    # re-use a run directory that holds an earlier, finished run of ours: its files are
    # removed first. Without it such a directory is refused (never a silent mix of two runs);
    # a directory that is not ours is always refused.
    overwrite: bool = False


@dataclass
class DistConfig:
    # a collective that waits longer than this fails (naming the rank it waited for) instead
    # of hanging forever on a stalled or dead rank; generous, since the first step of a big
    # model (compilation, allocator warm-up) can be slow
    timeout_s: float = 1800.0


@dataclass
class JobConfig:
    # status / cancel act on an earlier run: `action=status run_dir=runs/...`
    # export: a Hugging Face model or a GGUF file from a run's checkpoint
    # (`action=export run_dir=... [step=N] [format=gguf dtype=f16 quant=q8_0]`)
    # report: PNG charts + report.md of a run or sweep dir, in <run_dir>/report/
    # search: an Optuna study whose trials are runs (`search=NAME`: configs/search/NAME.yaml)
    action: str = choice("run", "run", "plan", "validate", "status", "cancel", "export",
                         "prepare", "report", "search")
    run_dir: str = ""  # filled from hydra.run.dir at the entry point (status/cancel/export: given)
    step: Optional[int] = None  # action=export: the checkpoint's step (None = the newest)
    # action=export: hf (a save_pretrained directory) or gguf (one file for llama.cpp, Llama and
    # GPT-2 families); dtype of the weights written: None = the trained float32 for hf, f16 for
    # gguf (llama.cpp's own default); quant: gguf's q8_0 for the matrices
    format: str = choice("hf", "hf", "gguf")
    dtype: Optional[str] = choice(None, None, "f32", "f16", "bf16")
    quant: str = choice("none", "none", "q8_0")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    search: SearchConfig = field(default_factory=SearchConfig)  # action=search
    # auto: continue from the newest complete checkpoint in the run dir, if there is one;
    # never: start fresh (a run dir holding checkpoints then needs run.overwrite=true);
    # or the path of a checkpoint directory (checkpoints/step-N) to start from
    resume: str = "auto"

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.gpus_per_node

    @property
    def dpo_beta(self) -> Optional[float]:
        """β when the objective is DPO (the model is then paired with a frozen reference)."""
        pairs = self.objective.name == "auto" and self.data.name == "jsonl_pref"
        return self.objective.dpo_beta if self.objective.name == "dpo" or pairs else None
