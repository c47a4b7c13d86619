"""`action=export format=gguf`, read back by independent readers: transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`, which dequantizes with the `gguf` package and undoes
llama.cpp's layout itself) and the `gguf` package's reader.

Two short runs: gpt2_tiny with the byte tokenizer, llama_tiny (GQA) with a BPE trained on the
built-in corpus. Each checkpoint is exported as a Hugging Face model (the reference) and as GGUF
in f32, f16, bf16 and q8_0. The f32 file gives the reference's logits exactly (so every tensor
is where transformers expects it: names, GPT-2's transposes, Llama's q/k permutation); each
smaller type's error is above the one before it and under its bound. Measured in two sessions
on these models (max |logit| about 0.75): f16 1.8-3.5e-4, bf16 1.5-2.5e-3, q8_0 5.4-6.7e-3
(gpt2 and llama); the bounds are 1e-3, 1e-2 and 2e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.common.errors import ConfigError
from tests.conftest import make_job, run_ok

RUNS = {"gpt2": ["model=gpt2_tiny"],
        "llama": ["model=llama_tiny", "data=text", "data.tokenizer=bpe"]}
COMMON = ["train.steps=4", "checkpoint.every_steps=4", "cluster.gpus_per_node=1", "logging=none",
          "train.save_model=false"]
TYPES = (("f32", "none"), ("f16", "none"), ("bf16", "none"), ("f16", "q8_0"))
BOUND = {"f32": 1e-6, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}


def _export(run_dir: Path, *extra: str) -> Path:
    from orchestrator.run.checkpoint.export import export

    return export(make_job(["action=export", f"run_dir={run_dir}", *extra]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict[str, Path]]:
    out = {}
    for family, overrides in RUNS.items():
        run_dir = tmp_path_factory.mktemp(family)
        run_ok([*overrides, *COMMON], run_dir)
        files = {"hf": _export(run_dir), "run": run_dir}
        for dtype, quant in TYPES:
            files[quant if quant != "none" else dtype] = _export(
                run_dir, "format=gguf", f"dtype={dtype}", f"quant={quant}")
        out[family] = files
    return out


def _gguf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type == "gpt2":  # transformers maps GGUF's context length to n_ctx only
        config.n_positions = config.n_ctx
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                config=config).eval()


@pytest.mark.parametrize("family", RUNS)
def test_transformers_reads_each_type_back_within_its_tolerance(exported, family) -> None:
    from transformers import AutoModelForCausalLM

    files = exported[family]
    reference = AutoModelForCausalLM.from_pretrained(files["hf"]).eval()
    ids = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        errors = {kind: float((_gguf_model(files[kind])(ids).logits - want).abs().max())
                  for kind in BOUND}
    assert errors["f32"] <= BOUND["f32"], errors
    assert 0 < errors["f16"] <= BOUND["f16"], errors  # rounded, so not the f32 weights
    assert errors["f16"] < errors["bf16"] <= BOUND["bf16"], errors
    assert errors["f16"] < errors["q8_0"] <= BOUND["q8_0"], errors
    sizes = {kind: files[kind].stat().st_size for kind in BOUND}
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]


@pytest.mark.parametrize("family", RUNS)
def test_the_gguf_reader_shows_llama_cpps_keys_tensors_and_tokenizer(exported, family) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(exported[family]["q8_0"])
    fields = {name: f.contents() for name, f in reader.fields.items()}
    cfg = json.loads((exported[family]["hf"] / "config.json").read_text())
    assert fields["general.architecture"] == family
    required = ["context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count"]
    if family == "llama":
        required += ["attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                     "rope.dimension_count", "rope.freq_base"]
        assert fields["llama.attention.head_count_kv"] == cfg["num_key_value_heads"] == 2
    assert all(f"{family}.{key}" in fields for key in required)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg["vocab_size"] == 512
    if family == "gpt2":  # bytes: token i is byte i; one inert merge (llama.cpp needs one)
        assert fields["tokenizer.ggml.merges"] == ["<|begin_of_text|> <|endoftext|>"]
        assert (tokens[65], tokens[257]) == ("A", "<|endoftext|>")
        assert fields["tokenizer.ggml.eos_token_id"] == 257
    else:
        bpe = json.loads((exported[family]["run"] / "tokenizer.json").read_text())
        assert len(fields["tokenizer.ggml.merges"]) == len(bpe["model"]["merges"]) > 0
        eos = bpe["model"]["vocab"].get("<|endoftext|>") or next(
            t["id"] for t in bpe["added_tokens"] if t["content"] == "<|endoftext|>")
        assert fields["tokenizer.ggml.eos_token_id"] == eos
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert all(types[n] == GGMLQuantizationType.F32 for n in types if "norm" in n)
    if family == "gpt2":  # as llama.cpp's converter keeps it
        assert types["position_embd.weight"] == GGMLQuantizationType.F32
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert "output.weight" in types  # gpt2_tiny's tied head is written as llama.cpp reads it
    if family == "llama":  # d_ff 172 rows do not split into 32-value blocks: f16, as llama.cpp
        assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16


def test_the_bpe_tokenizer_round_trips(exported) -> None:
    """transformers' GGUF tokenizer encodes text as the run's own tokenizer does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = exported["llama"]["f16"]
    text = "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?  Yes!"
    ours = Tokenizer.from_file(str(exported["llama"]["run"] / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).ids


@pytest.mark.parametrize("family", RUNS)
def test_the_planned_size_is_the_files_tensor_data(exported, family) -> None:
    """What `action=export` prints before writing: the tensor bytes of each file, planned from
    the parameter shapes of the Hugging Face export (read here with safetensors), exactly."""
    from gguf import GGUFReader
    from safetensors import safe_open

    from orchestrator.run.checkpoint.gguf_export import planned_bytes

    with safe_open(str(exported[family]["hf"] / "model.safetensors"), "np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    for dtype, quant in TYPES:
        path = exported[family][quant if quant != "none" else dtype]
        data = path.stat().st_size - GGUFReader(path).data_offset
        assert data == planned_bytes(shapes, family, dtype, quant), (path.name, data)


def test_refusals_before_anything_is_written(exported, tmp_path) -> None:
    from tokenizers import Tokenizer, models

    from orchestrator.run.checkpoint.gguf_export import check_model, check_tokenizer

    run_dir = exported["gpt2"]["run"]
    with pytest.raises(ConfigError) as err:  # the same file again
        _export(run_dir, "format=gguf", "dtype=f16")
    assert str(err.value).startswith("config key 'run.overwrite' has value False; allowed: true "
                                     f"to replace {exported['gpt2']['f16']}")
    with pytest.raises(ConfigError) as err:
        check_model("t5")
    assert str(err.value) == ("config key 'format' has value 'gguf'; allowed: a model of the "
                              "llama or gpt2 family (this run's is t5); export format=hf instead")
    word = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(word))
    with pytest.raises(ConfigError) as err:
        check_tokenizer(word)
    assert str(err.value).startswith("config key 'format' has value 'gguf'; allowed: a "
                                     "byte-level BPE tokenizer with GPT-2's or Llama 3's "
                                     "pre-tokenizer (this one: WordLevel")


def test_hf_export_in_bf16(exported) -> None:
    from safetensors import safe_open

    run_dir = exported["gpt2"]["run"]
    model = _export(run_dir, "dtype=bf16", "run.overwrite=true")
    try:
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
        assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    finally:  # the module's float32 reference again
        _export(run_dir, "run.overwrite=true")


def test_the_hf_export_carries_its_tokenizer_and_end_of_text(exported) -> None:
    """AutoTokenizer reads the BPE run's export as the run's own tokenizer encodes, and both
    exports' config and generation config end text with the tokenizer's end of text (not the
    placeholder 0 the model was built with: the byte tokenizer's is 257)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    text = "The quick brown fox jumps over the lazy dog."
    model = exported["llama"]["hf"]
    ours = Tokenizer.from_file(str(exported["llama"]["run"] / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(model)
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).ids
    assert theirs.eos_token_id == ours.token_to_id("<|endoftext|>")
    for family, eos in (("llama", theirs.eos_token_id), ("gpt2", 257)):
        generation = GenerationConfig.from_pretrained(exported[family]["hf"])
        config = json.loads((exported[family]["hf"] / "config.json").read_text())
        assert generation.eos_token_id == config["eos_token_id"] == eos
