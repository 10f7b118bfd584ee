"""Models and tokenizers: loading them (`loading`), checking their chat templates (`template_checks`) and the
tiny model the tests and the CPU recipes train (`tiny`)."""
