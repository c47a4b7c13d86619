"""int8 post-training quantization (PTQ) of a trained causal LM with torchao, on one process.

`quantize_model` replaces the weight of every linear layer by a torchao `Int8Tensor` (int8 data,
one fp32 scale and one int8 zero point per output row; symmetric per row): `int8_weight_only`
dequantizes it inside the matmul, `int8_dynamic` also quantizes each token's activations to int8
and multiplies in int8. torchao only quantizes `nn.Linear`, so GPT-2's `Conv1D` layers (the same
affine map with the weight stored transposed) are first swapped for `nn.Linear`s: the logits are
bit-identical. A head tied to the input embedding stays tied and fp32: quantizing it would untie
it and keep an int8 copy beside the fp32 embedding, a bigger model than before.

A quantized model is saved as its config.json, the int8 tensors flattened into plain ones by
torchao's safetensors helpers (`transformers`' save_pretrained cannot read their storage), a
marker naming the method and the torchao version, and the tokenizer files of the model it came
from; `load_quantized` reads it back (run/setup.py, wherever `model.pretrained_path` is
loaded). The checks before launch are in checks.py, the planned size in int8.py (no torch).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.common.quiet import quiet_torchao
from orchestrator.models.storage import storage_bytes, wrapper_subclass
from orchestrator.quantization.int8 import MARKER, METHODS, WEIGHTS

# what a source model directory holds besides its weights and config: its tokenizer files,
# generation config, ... are copied beside the quantized weights
_NOT_COPIED = (".safetensors", ".bin", ".index.json", ".pt")


def torchao() -> Any:
    """torchao, imported quietly (`common.quiet.quiet_torchao`: on a CPU torch it logs the C++
    extensions of its CUDA wheel that do not load; int8 PTQ needs none of them)."""
    quiet_torchao()
    import torchao as module

    return module


def _config(method: str) -> Any:
    torchao()
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if method not in METHODS:  # validate() refuses it first; kept for direct callers
        raise ValueError(f"unknown quantization method {method!r}; one of {METHODS}")
    return (Int8WeightOnlyConfig() if method == "int8_weight_only"
            else Int8DynamicActivationInt8WeightConfig())


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> int:
    """Swap every transformers `Conv1D` (GPT-2: y = x W + b, W stored (in, out)) for the
    `nn.Linear` with the transposed weight and the same bias; returns how many were swapped."""
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def _targets(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """torchao's filter: every nn.Linear but a head that shares the input embedding's weight."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def target(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and id(module.weight) not in embeddings

    return target


def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize `model` in place with `method` (METHODS); returns the linear layers quantized."""
    from torchao.quantization import quantize_

    config = _config(method)
    conv1d_to_linear(model)
    target = _targets(model)
    layers = sum(target(m, name) for name, m in model.named_modules())
    quantize_(model, config, filter_fn=target)
    return layers


def is_quantized(t: torch.Tensor) -> bool:
    """Whether `t` is a torchao int8 tensor (its data lives in inner tensors)."""
    return wrapper_subclass(t) and hasattr(t, "qdata")


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, layers) of the weights of the model's linear layers (nn.Linear and Conv1D, but a
    head tied to the input embedding): fp32, or int8 data + scale + zero point when quantized,
    measured from the tensors themselves."""
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights = {id(m.weight): m.weight for m in model.modules()
               if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) not in embeddings}
    return storage_bytes({"w": weights.values()})["w"], len(weights)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all the model's parameters (tied ones once), as they are stored."""
    return storage_bytes({"w": model.parameters()})["w"]


def save_quantized(model: nn.Module, out: str | Path, method: str, source: str | None,
                   extra: Callable[[Path], None] | None = None) -> Path:
    """Write the quantized `model` to the directory `out` (created whole or not at all): its
    config.json, the weights (torchao's flattened int8 tensors) in safetensors, the marker and
    the tokenizer files of `source`, the directory it was loaded from; `extra(directory)` adds
    files before the marker (QAT: the run's own tokenizer)."""
    from safetensors.torch import save_file

    ao = torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if source:
            for f in sorted(Path(source).iterdir()):
                if f.is_file() and not f.name.endswith(_NOT_COPIED) and f.name != MARKER:
                    shutil.copy(f, tmp / f.name)
        model.config.save_pretrained(tmp)  # after the copy: this model's own config
        aliases = _alias_names(model)  # a tied weight is saved once; loading re-ties it
        state = {k: v for k, v in model.state_dict().items() if k not in aliases}
        tensors, metadata = flatten_tensor_state_dict(state)
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)
        if extra is not None:
            extra(tmp)
        (tmp / MARKER).write_text(json.dumps({  # last: a directory with it is complete
            "method": method, "torchao": ao.__version__, "torch": torch.__version__,
            "source": source, "linear_layers": linear_weight_bytes(model)[1]}, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _alias_names(model: nn.Module) -> set[str]:
    """The names under which a tied parameter appears after its first (GPT-2's lm_head.weight)."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if first[id(p)] != name}


def load_quantized(path: str | Path) -> nn.Module:
    """The model `save_quantized` wrote to `path`: built from its config.json (random weights
    first, so non-persistent buffers such as Llama's rotary frequencies are computed), GPT-2's
    Conv1D swapped for nn.Linear, then every weight replaced by the saved one (int8 ones as
    torchao tensors) and tied weights tied again."""
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file

    torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                     trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    conv1d_to_linear(model)
    aliases = _alias_names(model)  # before loading: assign=True replaces the parameters
    weights = path / WEIGHTS
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state, leftover = unflatten_tensor_state_dict(load_file(str(weights)), metadata)
    if leftover:
        raise ValueError(f"{weights}: tensors torchao could not restore: {sorted(leftover)[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) - aliases or unexpected:
        raise ValueError(f"{weights} does not fit its config.json: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
