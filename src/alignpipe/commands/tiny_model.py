"""`alignpipe tiny-model --like qwen2|llama --out DIR [--text FILE]`: a tiny random-weight look-alike of a
real model family in hub layout, for trying alignpipe (and reporting bugs) offline; see tiny_model.py."""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import AlignpipeError
from alignpipe.models.tiny import FAMILIES, SHAPES, save_tiny_model
from alignpipe.runtime.threads import set_threads


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tiny-model", help="save a tiny random-weight look-alike of a model family")
    p.add_argument("--like", required=True, choices=sorted(FAMILIES), help="the family to copy")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--text", default=None, help="a text file to train the tokenizer on (default: a built-in one)")
    p.add_argument("--vocab-size", type=int, default=400)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                   help="the model's size: tiny (~40k parameters) or a real model's (random weights, bfloat16)")
    p.set_defaults(func=cmd_tiny_model)


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise AlignpipeError("text file not found", where=str(path), fix="give a plain text file for --text")
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise AlignpipeError("the text file is empty", where=str(path), fix="give a file with some text in it")
    return lines


def cmd_tiny_model(args) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlignpipeError("the output folder exists and is not empty", where=str(out),
                             fix="give a new folder, or remove this one first")
    texts = read_texts(Path(args.text)) if args.text else None
    set_threads()
    save_tiny_model(out, like=args.like, texts=texts, vocab_size=args.vocab_size, shape=args.shape)
    print(f"{out}: a {args.shape} {args.like} look-alike (random weights, tokenizer trained on "
          f"{args.text or 'the built-in text'}); use it as `model: {{path: {out}}}`")
    return 0
