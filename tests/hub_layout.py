"""Tiny models saved the way the hub stores real ones (config.json, model.safetensors, tokenizer files,
generation_config.json), so tests can drive the real-model path (`model: {path: <folder>}`) offline.

`qwen_like`: Qwen2 architecture, ChatML special tokens, EOS = <|endoftext|> (as in Qwen2.5 base), and
its own ChatML template without {% generation %} markers (as Qwen ships it).
`llama_like`: Llama architecture, Llama-3 special tokens, EOS = <|end_of_text|>, no pad token.
"""

from __future__ import annotations

import random
from pathlib import Path

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML as a base model ships it: no generation markers.
QWEN_OWN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def arithmetic(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer) triples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append((f"What is {a} plus {b}?", f"The answer is {a + b}.", f"Maybe {a + b + rng.randint(1, 5)}, or not."))
    return out


def corpus() -> list[str]:
    lines = [f"{q} {r} {w}" for q, r, w in arithmetic(300)]
    return lines + ["Probe system note. Probe question one? Probe answer one. user assistant system"] * 20


def build_tokenizer(specials: list[str], eos: str, pad: str | None, bos: str | None, template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
                                   chat_template=template, model_max_length=512)


def qwen_like_tokenizer():
    return build_tokenizer(QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>", bos=None,
                           template=QWEN_OWN_TEMPLATE)


def llama_like_tokenizer():
    from alignpipe.templates import LLAMA3

    own = LLAMA3.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return build_tokenizer(LLAMA_SPECIALS, eos="<|end_of_text|>", pad=None, bos="<|begin_of_text|>", template=own)


def save_tiny_model(folder: Path, arch: str = "qwen2") -> Path:
    """A random-weight model (~40k parameters) and its tokenizer, saved in hub layout under `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = qwen_like_tokenizer() if arch == "qwen2" else llama_like_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                 tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                 pad_token_id=tok.pad_token_id)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                               pad_token_id=tok.pad_token_id)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
