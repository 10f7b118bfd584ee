"""The CLI as a child process that kills itself at the end of a chosen trainer step (tests of resume and re-run)."""

# Runs the CLI, dying by SIGKILL at the end of trainer step $KILL_AT_STEP. The callback is added through
# the trainer's public add_callback; nothing in training is replaced.
KILLER = r"""
import os, signal, sys
from transformers import Trainer, TrainerCallback

KILL_AT = int(os.environ.get("KILL_AT_STEP", "0"))
SIGNAL = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))  # SIGINT: what Ctrl-C sends
if SIGNAL == signal.SIGINT:  # as in a terminal: a shell's background job would start with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT:
            os.kill(os.getpid(), SIGNAL)


_init = Trainer.__init__


def _init_and_arm(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(KillAt())


Trainer.__init__ = _init_and_arm
from alignpipe.cli import main

sys.exit(main(sys.argv[1:]))
"""
