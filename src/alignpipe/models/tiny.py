"""Tiny look-alikes of real model families, saved the way the hub stores them (config.json,
model.safetensors, tokenizer files, generation_config.json): `alignpipe tiny-model --like qwen2 --out DIR`.

Random weights (~40k parameters) and a byte-level BPE tokenizer trained on a given text, with the
family's special tokens, EOS and its own chat template, so that bring-your-own-model runs, bug
reports and tests can take the real-model path (`model: {path: DIR}`) offline and in seconds.

`qwen2`: Qwen2 architecture, ChatML special tokens, EOS = <|endoftext|> (as Qwen2.5 base ships), its
ChatML template without {% generation %} markers.
`llama`: Llama architecture, Llama-3 special tokens, EOS = <|end_of_text|>, no pad token, the Llama-3
template without markers.
"""

from __future__ import annotations

# Heavy imports (tokenizers, transformers, torch) stay inside the functions that use them: the CLI starts without them.
import random
from dataclasses import dataclass
from pathlib import Path

from alignpipe.recipe.templates import LLAMA3

# The model's shape (everything but the vocabulary, which is the tokenizer's unless the shape names one).
# `tiny`: ~40k parameters. `qwen2.5-0.5b`: Qwen2.5-0.5B's published config (494M parameters, 151,936-row
# embedding tied to the head), for measuring real-shape speed and memory with random weights (benchmarks/gpu_check.py).
SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=True),
}

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML as a base model ships it: no generation markers.
QWEN_OWN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """What a look-alike copies of a real family: its special tokens and how its tokenizer uses them."""

    specials: tuple[str, ...]
    eos: str
    pad: str | None
    bos: str | None
    architecture: str  # the transformers model_type


FAMILIES = {
    "qwen2": Family(tuple(QWEN_SPECIALS), eos="<|endoftext|>", pad="<|endoftext|>", bos=None, architecture="qwen2"),
    "llama": Family(tuple(LLAMA_SPECIALS), eos="<|end_of_text|>", pad=None, bos="<|begin_of_text|>",
                    architecture="llama"),
}


def own_template(like: str) -> str:
    """The family's chat template as its base models ship it (no {% generation %} markers)."""
    if like == "qwen2":
        return QWEN_OWN_TEMPLATE

    return LLAMA3.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def arithmetic(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer) triples: the default tokenizer text, and handy test data."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append((f"What is {a} plus {b}?", f"The answer is {a + b}.", f"Maybe {a + b + rng.randint(1, 5)}, or not."))
    return out


def default_texts() -> list[str]:
    lines = [f"{q} {r} {w}" for q, r, w in arithmetic(300)]
    return lines + ["Probe system note. Probe question one? Probe answer one. user assistant system"] * 20


def build_tokenizer(like: str = "qwen2", texts: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts` with the family's special tokens, EOS and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[like]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or default_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=family.eos, pad_token=family.pad,
                                   bos_token=family.bos, chat_template=own_template(like), model_max_length=512)


def save_tiny_model(folder: Path, like: str = "qwen2", texts: list[str] | None = None, vocab_size: int = 400,
                    seed: int = 0, shape: str = "tiny") -> Path:
    """A random-weight model of family `like` and its tokenizer, saved in hub layout under `folder`. `shape`
    (SHAPES) sets the model's size; a shape with its own vocabulary keeps it (rows past the tokenizer's are
    never used, as in real checkpoints whose embedding is padded), and is built and saved in bfloat16, as
    such checkpoints ship."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(like, texts, vocab_size)
    sizes = {"vocab_size": len(tok), **SHAPES[shape], "eos_token_id": tok.eos_token_id,
             "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    config = (Qwen2Config if FAMILIES[like].architecture == "qwen2" else LlamaConfig)(**sizes)
    model_class = Qwen2ForCausalLM if FAMILIES[like].architecture == "qwen2" else LlamaForCausalLM
    if shape == "tiny":
        model = model_class(config)
    else:  # hundreds of millions of random weights: drawn on the GPU when there is one, kept in bfloat16
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = model_class(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                               pad_token_id=tok.pad_token_id)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
