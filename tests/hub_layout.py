"""Tiny models saved in hub layout for the real-model tests: the package's own builder
(`alignpipe.models.tiny`, also `alignpipe tiny-model`), under the names the tests use."""

from __future__ import annotations

from pathlib import Path

from alignpipe.models.tiny import (  # noqa: F401 - re-exported for the tests
    LLAMA_SPECIALS,
    QWEN_OWN_TEMPLATE,
    QWEN_SPECIALS,
    arithmetic,
    build_tokenizer,
)
from alignpipe.models.tiny import save_tiny_model as _save


def qwen_like_tokenizer():
    return build_tokenizer("qwen2")


def llama_like_tokenizer():
    return build_tokenizer("llama")


def save_tiny_model(folder: Path, arch: str = "qwen2") -> Path:
    """A random-weight model (~40k parameters) and its tokenizer, saved in hub layout under `folder`."""
    return _save(folder, like=arch)
