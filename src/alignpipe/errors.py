"""The one error type users see: a one-line message naming where the problem is and how to fix it."""

from __future__ import annotations


class AlignpipeError(Exception):
    """A user-facing error. The CLI prints it as one line and exits 2, with no traceback.

    `where` is the file (and optionally `:line:col`), `key` the dotted key path inside it,
    `fix` what the user should do. Any of them may be empty.
    """

    def __init__(self, what: str, *, where: str = "", key: str = "", fix: str = "") -> None:
        self.what, self.where, self.key, self.fix = what, where, key, fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        head = ": ".join(p for p in (self.where, self.key) if p)
        text = f"{head}: {self.what}" if head else self.what
        if self.fix:
            text += f"; fix: {self.fix}"
        return " ".join(text.split())  # one line, always


class RecipeError(AlignpipeError):
    """A problem in a recipe file (syntax, unknown key, wrong type, bad reference)."""


class RunError(AlignpipeError):
    """A problem with a run folder (missing or incomplete parent, lock held, incompatible version)."""


class EvalError(AlignpipeError):
    """A problem with a stage's evaluation: its prompts file, a judge, an lm-eval task."""
