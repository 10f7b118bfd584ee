"""A transformers folder (as `alignpipe export` writes it) as one GGUF file for llama.cpp and Ollama,
written with the `gguf` package (llama.cpp's own Python library for the format, on PyPI) rather than
llama.cpp's `convert_hf_to_gguf.py`: that script is not on PyPI (it lives in the llama.cpp repository,
with a `gguf` of the same commit), while the library gives the writer, the tensor names of each
architecture and the quantisers. What it covers: the Llama and Qwen2 architectures, byte-level BPE
vocabularies whose pre-tokenizer llama.cpp knows by name, weights in f32, f16, bf16 or q8_0; the
tokenizer, its special tokens, the chat template and the end-of-turn token go into the metadata.
Anything else is refused in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from alignpipe.errors import AlignpipeError

QUANTS = ("f32", "f16", "bf16", "q8_0")
ARCHES = {"llama": "LLAMA", "qwen2": "QWEN2"}
# the pre-tokenizer regexes of tokenizer.json that llama.cpp knows, by the name it knows them by
PRE_TOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "qwen2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)|\\s+": "llama-bpe",
}
_MARKERS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class GGUFError(AlignpipeError):
    """The model, its tokenizer or the asked quantisation cannot be written as GGUF here."""


def plain_template(template: str) -> str:
    """The chat template without alignpipe's {% generation %} markers, which only transformers knows."""
    return _MARKERS.sub("", template)


# --- the tokenizer ----------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's name for this byte-level BPE pre-tokenizer ('gpt-2', 'qwen2', 'llama-bpe')."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space")):
        name = PRE_TOKENIZERS.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise GGUFError(f"its pre-tokenizer is not one llama.cpp knows ({json.dumps(pre)[:120]})", where=where,
                    fix="GGUF export covers byte-level BPE with GPT-2's, Qwen2's or Llama 3's pre-tokenizer")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def read_vocab(tok, where: str, n_vocab: int) -> Vocab:
    """Tokens in id order (padded to the model's embedding rows), their types, merges, pre-tokenizer.

    Read from the tokenizer as transformers loaded it, not from tokenizer.json: for some families
    transformers builds its own pipeline (a Qwen2 tokenizer gets Qwen2's pre-tokenizer whatever the file
    says), and llama.cpp must split text as transformers does, not as the file would."""
    import gguf

    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"the tokenizer is {model.get('type')}, not byte-level BPE", where=where,
                        fix="GGUF export covers byte-level BPE vocabularies (GPT-2, Qwen2, Llama 3 style)")
    if (data.get("normalizer") or {}).get("type") not in (None, "NFC"):
        raise GGUFError(f"its normalizer {data['normalizer'].get('type')} has no llama.cpp counterpart", where=where)
    pre = pre_tokenizer_name(data, where)
    by_id = {i: t for t, i in model["vocab"].items()}
    kinds = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise GGUFError(f"the tokenizer has ids up to {max(by_id)} but the model only {n_vocab} rows", where=where)
    tokens, types = [], []
    for i in range(n_vocab):  # rows no token uses (padding) get a placeholder the tokenizer never produces
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, [int(t) for t in types], merges, pre)


# --- the weights ------------------------------------------------------------------------------------


def unpermute_rope(w, heads: int):
    """Llama's q/k rows from transformers' rotate-half order to the interleaved order llama.cpp's LLAMA
    architecture rotates (Qwen2 is loaded with NeoX-style rope and keeps them)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(name: str, data, quant: str):
    """(array as written, its GGML type): 1-D tensors (norms, biases) stay f32, as llama.cpp expects."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    data = data.astype(np.float32)
    if data.ndim == 1 or quant == "f32":
        return data, T.F32
    if quant == "q8_0" and data.shape[-1] % 32 != 0:  # q8_0 blocks are 32 wide: such a row stays f16
        return data.astype(np.float16), T.F16
    kind = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    return quantize(data, kind), kind


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if kind != "default":
        raise GGUFError(f"rope scaling ({kind}) is not written by this exporter", key="config.json",
                        fix="export a model without rope scaling, or use llama.cpp's convert_hf_to_gguf.py")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def write_gguf(folder: Path, out: Path, quant: str, template: str | None, end_of_turn: str | None) -> dict:
    """Write `folder` (config.json, safetensors, tokenizer.json) as the GGUF file `out`; returns what went in."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if quant not in QUANTS:
        raise GGUFError(f"--quant {quant} is not written here", key="--quant",
                        fix=f"use one of {', '.join(QUANTS)}; for other types run llama.cpp's llama-quantize on "
                            "the f16 file")
    config = AutoConfig.from_pretrained(str(folder))
    if config.model_type not in ARCHES:
        raise GGUFError(f"GGUF export covers {', '.join(ARCHES)} models, not {config.model_type}",
                        where=str(folder / "config.json"), fix="export to transformers and convert with llama.cpp's "
                                                               "convert_hf_to_gguf.py")
    arch = getattr(gguf.MODEL_ARCH, ARCHES[config.model_type])
    theta = rope_theta(config)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = read_vocab(tok, str(folder / "tokenizer.json"), n_vocab)

    heads, kv_heads, layers = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(folder.name)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    ids = special_ids(tok, end_of_turn)
    for key, value in ids.items():
        getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]))
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(plain_template(template))

    names = gguf.get_tensor_name_map(arch, layers)
    for hf_name, data in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"no GGUF name for tensor {hf_name}", where=str(folder), fix="report this model's layout")
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            data = unpermute_rope(data, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            data = unpermute_rope(data, kv_heads)
        array, kind = stored(name, data, quant)
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": config.model_type, "quant": quant, "pre_tokenizer": vocab.pre, "tokens": n_vocab,
            **{f"{k}_token_id": v for k, v in ids.items()}}


def special_ids(tok, end_of_turn: str | None) -> dict[str, int]:
    """bos / eos / pad ids of the tokenizer, and eot: the template's end-of-turn token (else the EOS)."""
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    ids = {k: v for k, v in ids.items() if isinstance(v, int)}
    eot = tok.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    if isinstance(eot, int) and eot != tok.unk_token_id:
        ids["eot"] = eot
    elif "eos" in ids:
        ids["eot"] = ids["eos"]
    return ids


# --- Ollama ----------------------------------------------------------------------------------------

# the built-in templates in Ollama's Go template language (Ollama does not run Jinja)
OLLAMA_TEMPLATES = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "llama3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "embedded": "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>",
}


def modelfile(gguf_name: str, template_name: str | None, end_of_turn: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it: `ollama create NAME -f Modelfile`."""
    lines = ["# written by alignpipe export --format gguf; ollama create <name> -f Modelfile", f"FROM ./{gguf_name}"]
    go = OLLAMA_TEMPLATES.get(template_name or "")
    if go:
        lines.append(f'TEMPLATE """{go}"""')
    else:
        lines.append(f"# the recipe's chat template ({template_name}) has no Ollama translation here: Ollama reads "
                     "tokenizer.chat_template from the GGUF only for templates it recognises; write a TEMPLATE")
    if end_of_turn:
        lines.append(f'PARAMETER stop "{end_of_turn}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
