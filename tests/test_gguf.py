"""`alignpipe export --format gguf`: the GGUF read back by the `gguf` package (vocabulary, token types,
special tokens, chat template, end of turn, weights) for the Qwen2 and Llama look-alikes, and by llama.cpp
itself (llama-cpp-python, built from source): its own tokenisation of templated text equals the
transformers tokenizer's ids, its greedy tokens equal the transformers model's at f16 and q8_0, and so do
its logits at every position, within the weight type's rounding."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from alignpipe.cli import main
from alignpipe.serving.gguf_export import GGUFError, plain_template, write_gguf
from hub_layout import save_tiny_model
from test_serve import required, stage  # noqa: F401 - the trained Qwen2 stage (a module fixture)

(gguf,) = required("gguf")
MESSAGES = [[{"role": "system", "content": "Probe system note."}, {"role": "user", "content": "What is 2 plus 3?"}],
            [{"role": "user", "content": "What is 11 plus 4?"}, {"role": "assistant", "content": "The answer is 15."},
             {"role": "user", "content": "Probe question one?"}]]
# spaces, newlines, digits, punctuation and letters beyond the vocabulary's merges (bytes): where GGUF
# exports of byte-level BPE go wrong
TRICKY = "  What's   12345 plus 6?\n\n\tnaïve café — ok!! \u4e2d\u6587  end  "


def llama_cpp():
    """llama_cpp, or a skip (a failure under CI=true, where it must run: `make test` installs it)."""
    try:
        import llama_cpp
    except ImportError as err:
        why = f"llama-cpp-python is not installed ({err}); pip install -e '.[test]' builds it (cmake, g++)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return llama_cpp


def field(reader, key: str):
    return reader.fields[key].contents()


def exported(folder, tmp_path, quant: str, like: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    eot = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[like]
    path = tmp_path / f"{like}-{quant}.gguf"
    write_gguf(folder, path, quant, tok.chat_template, eot)
    return path, tok


def check_metadata(path, tok, like: str) -> None:
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == like
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = field(reader, "tokenizer.ggml.token_type")
    specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in tok.get_added_vocab()}
    assert all(types[i] == gguf.TokenType.CONTROL for i in specials)
    assert sum(t == gguf.TokenType.CONTROL for t in types) == len(specials)
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    eot = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[like]
    assert field(reader, "tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids(eot)
    template = field(reader, "tokenizer.chat_template")
    assert template == plain_template(tok.chat_template) and "generation %}" not in template
    assert field(reader, "tokenizer.ggml.pre") in ("qwen2", "llama-bpe", "gpt-2")


def check_weights(path, folder, quant: str) -> None:
    """Each GGUF tensor, dequantised, against the transformers weight (Llama's q/k are row-permuted)."""
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    embed = model.model.embed_tokens.weight.detach().numpy()
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    tol = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2}[quant]
    got = dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type).reshape(embed.shape)
    assert np.abs(got - embed).max() <= tol * max(1.0, np.abs(embed).max())
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(tensors["blk.0.attn_norm.weight"].data), norm)


@pytest.mark.parametrize("like", ["qwen2", "llama"])
def test_gguf_metadata_and_weights(like, tmp_path):
    folder = save_tiny_model(tmp_path / f"tiny-{like}", like)
    for quant in ("f32", "f16", "q8_0"):
        path, tok = exported(folder, tmp_path, quant, like)
        check_metadata(path, tok, like)
        check_weights(path, folder, quant)


def sharpened(folder):
    """The look-alike with 20x its q/k weights: random tiny weights attend almost uniformly, so a wrong rope
    or head layout would change nothing; sharp attention makes every position matter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    model.save_pretrained(str(folder))
    return model.eval()


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def greedy_cpp(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("like", ["qwen2", "llama"])
def test_llama_cpp_tokenizes_and_generates_as_transformers(like, tmp_path):
    lc = llama_cpp()
    folder = save_tiny_model(tmp_path / f"tiny-{like}", like)
    model = sharpened(folder)
    for quant in ("f16", "q8_0"):
        path, tok = exported(folder, tmp_path, quant, like)
        llm = lc.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=256, verbose=False, seed=0,
                       logits_all=True)  # eval keeps the logits in llm.scores
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in MESSAGES] + [TRICKY]
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)[
                "input_ids"], text
            assert llm.detokenize(tok(text, add_special_tokens=False)["input_ids"], special=True).decode() == text
        assert llm.token_eos() == tok.eos_token_id
        for text in texts[:2]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert greedy_cpp(llm, ids, 8) == greedy_hf(model, ids, 8), (quant, text)
            # and the logits at every position, within the weight type's rounding (measured here: f16 1e-2 of
            # their spread, q8_0 0.11; a Llama exported without un-permuting q's rows: 3.8 spreads)
            llm.reset()
            llm.eval(ids)
            with torch.no_grad():
                hf = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            diff = np.abs(np.asarray(llm.scores[: len(ids)]) - hf).max()
            assert diff <= {"f16": 0.05, "q8_0": 0.3}[quant] * hf.std(), (quant, diff, hf.std())
        llm.close()  # (llama-cpp-python 0.3.36 otherwise complains at interpreter exit)


def test_export_command_writes_gguf_and_modelfile(stage, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "export"
    assert main(["export", str(stage), str(out), "--format", "gguf", "--quant", "q8_0"]) == 0
    record = json.loads((out / "alignpipe_export.json").read_text())
    assert record["gguf"]["file"] == "sft-q8_0.gguf" and (out / "sft-q8_0.gguf").is_file()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./sft-q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile  # ChatML in Ollama's template language
    from transformers import AutoTokenizer

    check_metadata(out / "sft-q8_0.gguf", AutoTokenizer.from_pretrained(str(out)), "qwen2")

    # refused in one line, exit 2: a quantisation not written here
    capsys.readouterr()
    assert main(["export", str(stage), str(tmp_path / "other"), "--format", "gguf", "--quant", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--quant q4_k_m is not written here" in err
    assert not (tmp_path / "other").exists()


def test_unsupported_family_is_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    folder = save_tiny_model(tmp_path / "tiny", "llama")
    config = MistralConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    MistralForCausalLM(config).save_pretrained(str(folder))
    with pytest.raises(GGUFError, match="not mistral"):
        write_gguf(folder, tmp_path / "m.gguf", "f16", None, None)
