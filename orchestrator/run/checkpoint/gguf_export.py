"""GGUF for llama.cpp (`action=export format=gguf`), written with the `gguf` package (the writer
llama.cpp itself maintains) from an exported Hugging Face model directory, for the Llama and
GPT-2 families, as llama.cpp's own converter (convert_hf_to_gguf.py) lays them out:

- tensors renamed by gguf's own name map; GPT-2's Conv1D weights transposed to [out, in];
  Llama's q/k rows permuted from Hugging Face's rotary layout (halves) to llama.cpp's
  (interleaved pairs); a tied head written as `output.weight` too;
- 1-D tensors (norms, biases) in F32; the others in `dtype` (f32, f16, bf16) or Q8_0 (a tensor
  whose rows do not split into Q8_0's 32-value blocks stays in f16, as llama.cpp does);
- the tokenizer as llama.cpp's BPE ("gpt2" model): tokens, types, merges, special ids, the
  pre-tokenizer's name (gpt-2 or llama-bpe, told from the tokenizer's own pre-tokenizer), the
  chat template. A byte tokenizer (no vocabulary file) is a BPE without merges whose token i is
  byte i. Anything else is refused before a byte is written (`check_tokenizer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from orchestrator.common.errors import ConfigError
from orchestrator.data.tokenizer import EOS  # what our BPE ends documents with
from orchestrator.models.layout import embedding_name

FAMILIES = {"llama": "LLAMA", "gpt2": "GPT2"}  # our family -> gguf's MODEL_ARCH member
DTYPES = ("f32", "f16", "bf16")
QUANTS = ("none", "q8_0")
POSITIONS = "transformer.wpe.weight"  # GPT-2's position embedding: F32 in llama.cpp's files
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

BYTE_SPECIALS = {256: "<|begin_of_text|>", 257: EOS}  # the byte tokenizer's bos and eos ids
# a Llama 3 style pre-tokenizer: this regex split, then byte-level without its own regex
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"


def file_name(dtype: str, quant: str) -> str:
    return f"model-{quant if quant != 'none' else dtype}.gguf"


def _pre_tokenizer(tokenizer: dict[str, Any]) -> Optional[str]:
    """llama.cpp's name for the tokenizer's pre-tokenizer, when it is one llama.cpp knows."""
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and \
            str(steps[0].get("pattern", {}).get("Regex", "")).startswith(LLAMA3_SPLIT) and \
            steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        return "llama-bpe"
    return None


def check_model(family: str) -> None:
    """A family llama.cpp runs, as this writer lays it out."""
    if family not in FAMILIES:
        raise ConfigError("format", "gguf", f"a model of the {' or '.join(FAMILIES)} family "
                          f"(this run's is {family}); export format=hf instead")


def check_config(family: str, cfg: dict[str, Any]) -> None:
    """What this writer does not lay out as llama.cpp expects is refused, not written wrong:
    rotary scaling, q/k/v biases, a head size other than hidden / heads."""
    if family != "llama":
        return
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    heads = cfg["num_attention_heads"]
    why = (f"rotary scaling {kind!r}" if kind != "default" else
           "attention biases" if cfg.get("attention_bias") else
           f"head_dim {cfg['head_dim']} (not hidden / heads)"
           if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads) else None)
    if why:
        raise ConfigError("format", "gguf", f"a Llama without {why}, which this GGUF writer "
                          "does not lay out; export format=hf instead")


def check_tokenizer(path: Optional[Path]) -> Optional[dict[str, Any]]:
    """The tokenizer.json at `path` to write (None: the byte tokenizer), or a ConfigError saying
    why GGUF cannot hold it."""
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError("format", "gguf", f"a model with its tokenizer.json ({path} is "
                          "missing; GGUF carries the tokenizer)")
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or _pre_tokenizer(tokenizer) is None:
        raise ConfigError("format", "gguf", "a byte-level BPE tokenizer with GPT-2's or Llama "
                          f"3's pre-tokenizer (this one: {model.get('type')}, pre-tokenizer "
                          f"{(tokenizer.get('pre_tokenizer') or {}).get('type')}); export "
                          "format=hf instead")
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (its byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _vocab(tokenizer: Optional[dict[str, Any]], vocab_size: int, specials: dict[str, Any]
           ) -> tuple[list[str], list[int], list[str], int, int]:
    """(tokens by id, their llama.cpp types, merges, bos id, eos id) over the model's whole
    vocabulary (ids past the tokenizer's are UNUSED); `specials`: tokenizer_config.json's
    bos_token and eos_token (else GPT-2's end of text, which our BPE ends documents with)."""
    import gguf

    normal, control, unused = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL),
                                int(gguf.TokenType.UNUSED))
    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]
    types = [unused] * vocab_size
    if tokenizer is None:
        for i, ch in _bytes_to_unicode().items():
            tokens[i], types[i] = ch, normal
        for i, name in BYTE_SPECIALS.items():
            tokens[i], types[i] = name, control
        # llama.cpp refuses a BPE without merges; this one joins the two control tokens, which
        # byte-level pre-tokenization never produces, so it never applies
        return tokens, types, [" ".join(BYTE_SPECIALS.values())], 256, 257
    for token, i in tokenizer["model"]["vocab"].items():
        tokens[i], types[i] = token, normal
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = control if added.get("special") else normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    eos = tokens.index(specials.get("eos_token") or EOS)
    bos = tokens.index(specials["bos_token"]) if specials.get("bos_token") in tokens else eos
    return tokens, types, merges, bos, eos


def _add_tokenizer(writer: Any, model_dir: Path, tokenizer: Optional[dict[str, Any]],
                   vocab_size: int) -> None:
    config = model_dir / "tokenizer_config.json"
    specials = json.loads(config.read_text()) if config.is_file() else {}
    tokens, types, merges, bos, eos = _vocab(tokenizer, vocab_size, _names(specials))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer) if tokenizer else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    template = specials.get("chat_template")
    if template:
        writer.add_chat_template(template)


def _names(config: dict[str, Any]) -> dict[str, Any]:
    """bos_token / eos_token as strings (tokenizer_config.json may hold either form)."""
    out = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


def _add_metadata(writer: Any, family: str, cfg: dict[str, Any]) -> None:
    if family == "gpt2":
        writer.add_context_length(cfg["n_positions"])
        writer.add_embedding_length(cfg["n_embd"])
        writer.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        writer.add_block_count(cfg["n_layer"])
        writer.add_head_count(cfg["n_head"])
        writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        return
    heads = cfg["num_attention_heads"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    writer.add_vocab_size(cfg["vocab_size"])


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary rows (each head's first half, then its second) as llama.cpp's
    (the two halves interleaved pairwise), as llama.cpp's converter permutes q and k."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _tensors(family: str, cfg: dict[str, Any], state: dict[str, np.ndarray]
             ) -> list[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) in llama.cpp's layout, the tied head included."""
    out = []
    for name, w in state.items():
        if family == "gpt2" and name.endswith(GPT2_CONV1D):
            w = w.T
        elif family == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = _permute(w, cfg["num_attention_heads"])
        elif family == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = _permute(w, cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        out.append((name, np.ascontiguousarray(w)))
    if "lm_head.weight" not in state:  # tied: saved once, under the embedding's name
        out.append(("lm_head.weight", state[embedding_name(family)]))
    return out


def _encode(name: str, w: np.ndarray, dtype: str, quant: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes in its GGUF type, and the type: F32 for 1-D tensors and GPT-2's
    position embedding (as llama.cpp's converter keeps them), Q8_0 where rows split into its
    blocks, else `dtype`."""
    import gguf

    q = gguf.GGMLQuantizationType
    if w.ndim == 1 or name == POSITIONS:
        return w.astype(np.float32), q.F32
    kind = q.Q8_0 if quant == "q8_0" and w.shape[-1] % 32 == 0 else \
        {"f32": q.F32, "f16": q.F16, "bf16": q.BF16}[dtype]
    return gguf.quants.quantize(w.astype(np.float32), kind), kind


def planned_bytes(shapes: dict[str, tuple[int, ...]], family: str, dtype: str,
                  quant: str) -> int:
    """The tensor data a GGUF file of these parameter shapes holds (what `write_gguf` writes:
    a tied head twice, each tensor padded to 32 bytes); the header and tokenizer come on top."""
    shapes = dict(shapes)
    if "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes[embedding_name(family)]
    total = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        row = shape[0] if family == "gpt2" and name.endswith(GPT2_CONV1D) else shape[-1]
        if len(shape) == 1 or name == POSITIONS:
            size = 4 * n
        elif quant == "q8_0" and row % 32 == 0:
            size = n // 32 * 34  # a block: 32 int8 values and one f16 scale
        else:
            size = n * (4 if dtype == "f32" else 2)
        total += -(-size // 32) * 32
    return total


def write_gguf(model_dir: Path, family: str, out: Path, dtype: str, quant: str,
               byte_tokenizer: bool, name: str) -> Path:
    """`model_dir` (a save_pretrained directory) as one GGUF file at `out`, written whole or
    not at all."""
    import gguf
    from safetensors.numpy import load_file

    tokenizer = None if byte_tokenizer else check_tokenizer(model_dir / "tokenizer.json")
    cfg = json.loads((model_dir / "config.json").read_text())
    check_config(family, cfg)
    arch = getattr(gguf.MODEL_ARCH, FAMILIES[family])
    state: dict[str, np.ndarray] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update({k: v.astype(np.float32) for k, v in load_file(str(shard)).items()})
    tmp = out.with_name(out.name + ".tmp")
    try:
        _write(tmp, arch, family, cfg, state, model_dir, tokenizer, (name, dtype, quant))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write(tmp: Path, arch: Any, family: str, cfg: dict[str, Any], state: dict[str, np.ndarray],
           model_dir: Path, tokenizer: Optional[dict[str, Any]], what: tuple[str, str, str]
           ) -> None:
    import gguf

    name, dtype, quant = what
    names = gguf.get_tensor_name_map(arch, int(cfg.get("n_layer") or cfg["num_hidden_layers"]))
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    _add_metadata(writer, family, cfg)
    file_type = gguf.LlamaFileType
    writer.add_file_type(int(file_type.MOSTLY_Q8_0 if quant == "q8_0" else {
        "f32": file_type.ALL_F32, "f16": file_type.MOSTLY_F16,
        "bf16": file_type.MOSTLY_BF16}[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_dir, tokenizer, int(cfg["vocab_size"]))
    for hf_name, w in _tensors(family, cfg, state):
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError("format", "gguf", f"a model whose tensors llama.cpp names "
                              f"({hf_name} has no GGUF name)")
        data, kind = _encode(hf_name, w, dtype, quant)
        writer.add_tensor(new, data, raw_dtype=kind)  # the writer reads a block's bytes' shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
