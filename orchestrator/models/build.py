"""Models built from Hugging Face `transformers` config classes: decoder-only causal LMs (GPT-2,
Llama), encoder-only masked LMs (BERT) and encoder-decoders (T5).

Random initialisation under a fixed seed; `param_specs` builds the same model on the meta
device so the planner can count parameters and shard shapes without allocating anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from orchestrator.config.schema import LoraConfig, ModelConfig
from orchestrator.models.specs import ROOT_GROUP, ParamSpec

Loader = Callable[[str], nn.Module]  # a model directory's reader other than from_pretrained



def hf_config(cfg: ModelConfig):  # noqa: ANN201 - a transformers PretrainedConfig
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    common = dict(vocab_size=cfg.vocab_size, bos_token_id=0, eos_token_id=0,
                  tie_word_embeddings=cfg.tie_embeddings)
    if cfg.family == "gpt2":
        hf = GPT2Config(
            n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head, n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, **common,
        )
    elif cfg.family == "llama":
        extra = {"intermediate_size": cfg.d_ff} if cfg.d_ff else {}
        hf = LlamaConfig(
            num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head or cfg.n_head,
            max_position_embeddings=cfg.max_seq_len, attention_dropout=cfg.dropout,
            pad_token_id=0, **extra, **common,
        )
    elif cfg.family == "bert":
        hf = BertConfig(
            num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model,
            num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff or 4 * cfg.d_model,
            max_position_embeddings=cfg.max_seq_len, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, pad_token_id=0, **common,
        )
    elif cfg.family == "t5":
        hf = T5Config(
            num_layers=cfg.n_layer, num_decoder_layers=cfg.n_layer, d_model=cfg.d_model,
            num_heads=cfg.n_head, d_kv=cfg.d_model // cfg.n_head,
            d_ff=cfg.d_ff or 4 * cfg.d_model, dropout_rate=cfg.dropout,
            decoder_start_token_id=0, pad_token_id=0, **common,
        )
    else:  # validate() rejects this first; kept for direct callers
        raise ValueError(f"unknown model family {cfg.family!r}")
    hf._attn_implementation = cfg.attn_implementation
    return hf


def _model_class(family: str):  # noqa: ANN202 - a transformers auto/model class
    import transformers

    # by name: transformers imports a model's code on first access, a second per family
    name = {"bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration"}.get(
        family, "AutoModelForCausalLM")
    return getattr(transformers, name)


def _instantiate(cfg: ModelConfig, weights: bool = False, load: Loader | None = None
                 ) -> nn.Module:
    """The model from our config, or from `pretrained_path` (its config; its weights too when
    `weights`). Never the directory's own code: trust_remote_code=False everywhere (an
    `auto_map` in its config.json is refused before launch, see models/check.py). `load` reads
    the weights instead of `from_pretrained` (an int8 model's own format)."""
    import transformers

    cls = _model_class(cfg.family)
    if cfg.pretrained_path:
        if weights and load is not None:
            model = load(cfg.pretrained_path)
        elif weights:
            model = cls.from_pretrained(cfg.pretrained_path, local_files_only=True,
                                        torch_dtype=torch.float32, trust_remote_code=False)
        else:
            hf = transformers.AutoConfig.from_pretrained(cfg.pretrained_path,
                                                         local_files_only=True,
                                                         trust_remote_code=False)
            model = (cls.from_config(hf, trust_remote_code=False)
                     if cls is transformers.AutoModelForCausalLM else cls(hf))
    else:
        hf = hf_config(cfg)
        model = cls.from_config(hf) if cls is transformers.AutoModelForCausalLM else cls(hf)
    if cfg.family in ("gpt2", "llama"):
        model.loss_type = "ForCausalLM"  # shifted next-token cross-entropy, named explicitly
    return model


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu",
                load: Loader | None = None) -> nn.Module:
    """A randomly initialised model (the same seed gives the same weights on every rank), or
    the one saved at `model.pretrained_path` (read by `load` when given). On the meta device:
    the same structure, no storage and no weights read (the strategy materialises it and fills
    it from rank 0). LoRA, the DPO reference and the other model converters are applied after
    (transforms/converters.py)."""
    torch.manual_seed(seed)
    if cfg.pretrained_path and str(device) != "meta":
        return _instantiate(cfg, weights=True, load=load).to(device)
    with torch.device(device):
        return _instantiate(cfg)


def _adapt(model: nn.Module, lora: LoraConfig | None, dpo_beta: float | None) -> nn.Module:
    """LoRA adapters (peft), then the DPO reference pairing, as configured: the converters
    that change the parameters (transforms/converters.py applies them in the same order), so
    the planner counts the shapes the ranks build."""
    if lora is not None and lora.rank > 0:
        from orchestrator.models.lora import apply_lora

        model = apply_lora(model, lora)
    if dpo_beta is not None:
        from orchestrator.models.preference import PreferenceModel

        model = PreferenceModel(model, dpo_beta)
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers (the FSDP wrapping unit): every list of `n_layer` modules, so an
    encoder-decoder contributes both stacks."""
    n = model.config.num_hidden_layers
    blocks, stacks = [], []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{s}.") for s in stacks)  # e.g. T5Block.layer
        if isinstance(module, nn.ModuleList) and len(module) == n and not inside:
            stacks.append(name)
            blocks.extend(module)
    if not blocks:
        raise ValueError(f"no list of {n} blocks in {type(model).__name__}")
    return blocks


def param_specs(cfg: ModelConfig, lora: LoraConfig | None = None,
                dpo_beta: float | None = None) -> list[ParamSpec]:
    """Unique parameters (tied weights once), in `model.parameters()` order, frozen ones
    marked (LoRA base weights, the DPO reference)."""
    with torch.device("meta"):
        model = _adapt(_instantiate(cfg), lora, dpo_beta)
    owner: dict[int, str] = {}
    for i, block in enumerate(transformer_blocks(model)):
        for p in block.parameters():
            owner[id(p)] = f"block.{i}"
    out = model.get_output_embeddings()
    head = out.weight if out is not None else None
    rows = linear_rows(model)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        ParamSpec(name, tuple(p.shape), owner.get(id(p), ROOT_GROUP), head=p is head,
                  trainable=p.requires_grad, out_features=rows.get(id(p), 0),
                  lookup=id(p) in lookups and p is not head)
        for name, p in model.named_parameters()
    ]


def linear_rows(model: nn.Module) -> dict[int, int]:
    """id(weight) -> output features, for the weight of every linear layer (nn.Linear, or
    GPT-2's Conv1D, whose weight is stored transposed) that is not also an embedding's weight
    (a head tied to the input embedding): the weights int8 quantization replaces."""
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    rows = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) not in embeddings:
            rows[id(m.weight)] = m.out_features if isinstance(m, nn.Linear) else m.nf
    return rows
