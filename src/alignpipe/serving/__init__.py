"""Serving a trained stage: `alignpipe serve` (an OpenAI-compatible HTTP server, server.py, over the
generation path of `alignpipe generate`, engine.py, behind access.py's rules) and `alignpipe export
--format gguf` (gguf_export.py: a GGUF file for llama.cpp / Ollama, plus a Modelfile)."""
