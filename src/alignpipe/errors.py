"""The one error type users see: a one-line message naming where the problem is and how to fix it."""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls (0x9b starts an escape sequence on many terminals), and the
# bidirectional overrides that reorder what is shown
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` with every character that a terminal would act on instead of show written as an escape
    (`\\x1b`, `\\u202e`): text from data files and run folders cannot move the cursor, clear the screen, set
    the window title or reorder a line. Newlines and tabs stay."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


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
        return terminal_safe(" ".join(text.split()))  # one line, always, and nothing a terminal acts on


class RecipeError(AlignpipeError):
    """A problem in a recipe file (syntax, unknown key, wrong type, bad reference)."""


class RunError(AlignpipeError):
    """A problem with a run folder (missing or incomplete parent, lock held, incompatible version)."""


class EvalError(AlignpipeError):
    """A problem with a stage's evaluation: its prompts file, a judge, an lm-eval task."""
