"""`alignpipe export runs/<name>/<stage> OUT`: a standalone model folder that plain transformers loads.

A LoRA stage saved only its adapter; export loads its base (the parent stage, recursively, or the
recipe's model), merges the adapter into it and saves weights (safetensors), tokenizer and chat
template. Then it reloads OUT with `AutoModelForCausalLM.from_pretrained` and compares its logits
with the unmerged adapter model's on probe prompts, reporting the largest difference; beyond the
tolerance the export fails. A full-weights stage is exported (and checked) the same way.

Merging into a quantised base would round the adapter's update into 4/8-bit weights, so export
refuses unless `--dequantize` says to load the base unquantised (in `--dtype`) and merge there.
"""

from __future__ import annotations

# Heavy imports (torch, transformers) stay inside the functions that use them: the CLI starts without them.
import dataclasses
import json
from pathlib import Path

from alignpipe.errors import AlignpipeError
from alignpipe.models import loading as modeling
from alignpipe.models.stage_model import model_spec, stage_manifest
from alignpipe.recipe.kinds import is_scorer_manifest
from alignpipe.runfolder.manifests import manifest_hash, read_manifest
from alignpipe.runtime.threads import set_threads

PROBES = ["what is 3 plus 4?", "reverse the word cat.", "Hello! Who are you?"]
PROBE_ANSWER = "The answer is"  # a few assistant tokens too, so the check covers generated positions


class ExportError(AlignpipeError):
    """The export was refused, or its output does not reproduce the stage's model."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="merge a stage's LoRA adapter and save a standalone model")
    p.add_argument("stage_dir", help="a stage folder, runs/<recipe name>/<stage>")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dequantize", action="store_true",
                   help="the base was loaded quantised: load it unquantised in --dtype and merge there")
    p.add_argument("--dtype", default=None, help="dtype to load and save in (default: the recipe's; float32 on CPU)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest acceptable |logit difference| (default 1e-3 in float32, 5e-2 otherwise)")
    p.add_argument("--format", choices=("transformers", "gguf"), default="transformers",
                   help="gguf: also write OUT/<stage>-<quant>.gguf for llama.cpp and an Ollama Modelfile")
    p.add_argument("--quant", default="f16", help="GGUF weight type: f32, f16 (default), bf16 or q8_0")
    from alignpipe.commands.chat import code_flags

    code_flags(p)
    p.set_defaults(func=cmd_export)


def quantised_base(manifest: dict, spec) -> str | None:
    """How the stage's base was quantised ('4-bit', '8-bit', a checkpoint's quant method), or None."""
    if spec.load_in_4bit:
        return "4-bit (model.load_in_4bit)"
    if spec.load_in_8bit:
        return "8-bit (model.load_in_8bit)"
    from alignpipe.runfolder.manifests import read_named_file

    path = spec.path
    text = read_named_file(Path(path) / "config.json") if path else None  # bounded: named by the run folder
    try:
        quant = json.loads(text).get("quantization_config") if text else None
    except (ValueError, AttributeError, RecursionError):
        quant = None
    if quant:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else quant
        return f"pre-quantised checkpoint ({method})"
    return None


def probe_logits(model, tokenizer) -> list:
    """Logits of each probe conversation (one at a time: no padding in the comparison)."""
    import torch

    dev = next(model.parameters()).device
    out = []
    for prompt in PROBES:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True) + PROBE_ANSWER
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)
        with torch.no_grad():
            out.append(model(input_ids=ids).logits.float().cpu())
    return out


def cmd_export(args) -> int:
    from transformers import AutoModelForCausalLM

    set_threads()
    stage_dir, out = Path(args.stage_dir), Path(args.out)
    if args.format == "gguf":
        import importlib.util

        from alignpipe.serving.gguf_export import QUANTS, GGUFError

        if importlib.util.find_spec("gguf") is None:
            raise GGUFError("--format gguf needs the gguf package, which is not installed", key="--format",
                            fix="pip install -e '.[serve]'")

        if args.quant not in QUANTS:
            raise GGUFError(f"--quant {args.quant} is not written here", key="--quant",
                            fix=f"use one of {', '.join(QUANTS)}; for other types run llama.cpp's llama-quantize "
                                "on the f16 file")

    if is_scorer_manifest(read_manifest(stage_dir)):
        raise ExportError("a reward stage's model/ is already standalone (score head merged in)",
                          where=str(stage_dir / "model"), fix="copy that folder; load it with "
                          "AutoModelForSequenceClassification or alignpipe.reward.artifact.load_reward_model")
    manifest = stage_manifest(stage_dir)
    spec = model_spec(manifest, stage_dir, args)
    quant = quantised_base(manifest, spec)
    if quant and not args.dequantize:
        raise ExportError(f"the stage's base model is quantised: {quant}; merging the adapter into quantised "
                          "weights would round its update away", where=str(stage_dir),
                          fix="pass --dequantize (optionally --dtype bfloat16) to merge into an unquantised "
                              "copy of the base")
    if quant and quant.startswith("pre-quantised"):
        raise ExportError(f"cannot dequantise a {quant}: its full-precision weights are not available",
                          where=str(stage_dir), fix="export from a recipe whose model.path has unquantised weights")
    if quant or args.dtype:  # --dequantize: load the same weights unquantised
        spec = dataclasses.replace(spec, load_in_4bit=False, load_in_8bit=False, dtype=args.dtype or spec.dtype)
    if out.exists() and any(out.iterdir()):
        raise ExportError("the output folder exists and is not empty", where=str(out),
                          fix="give a new folder, or remove this one first")

    # --- the model as the stage uses it (adapter unmerged), then merged and saved
    adapter = modeling.is_adapter(modeling.checkpoint_dir(stage_dir))
    model = modeling.load_stage_model(stage_dir, spec, merge=False).eval()
    tokenizer = modeling.load_tokenizer(stage_dir / "model", spec)
    reference = probe_logits(model, tokenizer)
    merged = model.merge_and_unload() if adapter else model
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))  # tokenizer files + chat_template.jinja

    # --- reload with plain transformers and compare
    dtype = modeling.resolve_dtype(spec.dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
    again = probe_logits(reloaded, tokenizer)
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, again))
    import torch

    tolerance = args.tolerance if args.tolerance is not None else (1e-3 if dtype == torch.float32 else 5e-2)
    record = {"source": str(stage_dir.resolve()), "stage": manifest.get("stage"), "kind": manifest.get("kind"),
              "source_manifest_sha256": manifest_hash(stage_dir), "lora_merged": adapter,
              "dequantized_from": quant, "dtype": str(dtype).replace("torch.", ""), "probes": PROBES,
              "max_abs_logit_diff": diff, "tolerance": tolerance}
    (out / "alignpipe_export.json").write_text(json.dumps(record, indent=2) + "\n")
    what = "merged LoRA adapter into its base" if adapter else "copied full weights"
    print(f"{out}: {what}; max |logit difference| vs the stage's model on {len(PROBES)} probe prompts: {diff:.3g}"
          + (f" (the stage trained on a {quant} base; compared with the adapter on the unquantised base)"
             if quant else ""))
    if diff > tolerance:
        raise ExportError(f"the exported model's logits differ from the stage's by up to {diff:.3g} "
                          f"(tolerance {tolerance:g})", where=str(out),
                          fix="do not use this export; report it with the stage's manifest")
    if args.format == "gguf":
        export_gguf(out, manifest, tokenizer, args.quant)
    return 0


def export_gguf(out: Path, manifest: dict, tokenizer, quant: str) -> None:
    """OUT/<stage>-<quant>.gguf from the folder just written and checked, and OUT/Modelfile for Ollama."""
    from alignpipe.serving.gguf_export import modelfile, write_gguf
    from alignpipe.recipe.templates import END_OF_TURN

    template_name = (manifest.get("recipe_settings") or {}).get("chat_template")
    end_of_turn = END_OF_TURN.get(template_name or "") or tokenizer.eos_token
    name = f"{manifest.get('stage', 'model')}-{quant}.gguf"
    what = write_gguf(out, out / name, quant, tokenizer.chat_template, end_of_turn)
    (out / "Modelfile").write_text(modelfile(name, template_name, end_of_turn))
    record = json.loads((out / "alignpipe_export.json").read_text())
    (out / "alignpipe_export.json").write_text(json.dumps({**record, "gguf": {"file": name, **what}}, indent=2) + "\n")
    print(f"{out / name}: {what['architecture']}, {quant}, {what['tokens']} tokens, pre-tokenizer {what['pre_tokenizer']}"
          f"; {out / 'Modelfile'} for Ollama")
