"""Models and tokenizers: built from a config (pretraining), loaded from a hub id / local folder,
or loaded from a stage's checkpoint (full weights, or a LoRA adapter over its recorded base)."""

from __future__ import annotations

# Heavy imports (torch, tokenizers, transformers, peft) stay inside the functions that use them: the CLI starts
# without them.
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from alignpipe.data.sources import offline_setting, probe_hub
from alignpipe.errors import AlignpipeError
from alignpipe.models.template_checks import add_stop_token
from alignpipe.recipe.schema import ModelInit, ModelSpec
from alignpipe.runfolder.versions import base_of

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def device() -> "torch.device":
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str) -> "torch.dtype":
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise AlignpipeError(f"unknown dtype {name!r}", key="model.dtype",
                             fix="use auto, float32, bfloat16 or float16") from None


# --- from scratch -------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, special_tokens: list[str], chat_template: str,
                    bos_token: str | None = None):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers (pad/eos set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token=bos_token, chat_template=chat_template,
        model_max_length=2048, padding_side="right",
    )


def build_model(init: ModelInit, tokenizer) -> "PreTrainedModel":
    """A randomly initialised Llama-architecture model sized by `init`, for `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_hidden_layers,
        num_attention_heads=init.num_attention_heads,
        num_key_value_heads=init.num_key_value_heads or init.num_attention_heads,
        max_position_embeddings=init.max_position_embeddings,
        tie_word_embeddings=init.tie_word_embeddings,
        rope_theta=init.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


# --- from a hub id / folder ---------------------------------------------------------------------


def load_kwargs(spec: ModelSpec) -> dict:
    """Keyword arguments for `from_pretrained` that follow the recipe's safety and precision settings."""
    kwargs = {"dtype": resolve_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code,
              "use_safetensors": None if spec.allow_pickle else True}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.attn_implementation:
        if spec.attn_implementation.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
            raise AlignpipeError(f"attn_implementation {spec.attn_implementation} needs the flash-attn package",
                                 key="model.attn_implementation",
                                 fix="pip install flash-attn --no-build-isolation (CUDA), or use sdpa")
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.load_in_4bit or spec.load_in_8bit:
        _require_quantization(spec)
        from transformers import BitsAndBytesConfig

        if spec.load_in_4bit:  # QLoRA's settings: NF4, double quantisation, compute in the model's dtype
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"])
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return kwargs


def _require_quantization(spec: ModelSpec) -> None:
    import torch

    what = "load_in_4bit" if spec.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise AlignpipeError(f"{what} needs a CUDA GPU (bitsandbytes), and there is none here", key=f"model.{what}",
                             fix=f"set model.{what}: false on this machine (e.g. --set model.{what}=false)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AlignpipeError(f"{what} needs bitsandbytes, which is not installed", key=f"model.{what}",
                             fix="pip install -e '.[quant]' (or .venv/bin/pip install bitsandbytes)")


def _hub_access(path: str | Path) -> tuple[dict, str | None]:
    """Extra `from_pretrained` arguments for `path`, and why the hub cannot be reached (None: it can, or
    `path` is a local folder). Unreachable: read the local cache only, which fails at once instead of
    after the hub client's retries."""
    if Path(path).expanduser().is_dir():
        return {}, None

    offline = offline_setting()
    if offline:  # explicit: the hub client reads the variable once, at import
        return {"local_files_only": True}, f"{offline} is set"
    unreachable = probe_hub()
    return ({"local_files_only": True}, unreachable) if unreachable else ({}, None)


def _load_error(what: str, path, err: OSError, hub_problem: str | None, fix: str) -> AlignpipeError:
    if hub_problem:
        return AlignpipeError(f"cannot load {what} {path}: it is not a local folder, the Hugging Face hub is not "
                              f"reachable ({hub_problem}) and it is not in the local cache", key="model.path",
                              fix="download it on a connected machine first (it is cached under ~/.cache/huggingface"
                                  "), or point model.path at a local folder")
    return AlignpipeError(f"cannot load {what} from {path}: {str(err).splitlines()[0]}", key="model.path", fix=fix)


def load_tokenizer(path: str | Path, spec: ModelSpec | None = None):
    from transformers import AutoTokenizer

    spec = spec or ModelSpec()
    extra, hub_problem = _hub_access(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code,
                                            revision=spec.revision, **extra)
    except OSError as err:
        raise _load_error("tokenizer", path, err, hub_problem,
                          "give an existing local folder, or a hub id while the hub is reachable") from None
    if tok.pad_token is None:  # many base models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(path: str | Path, spec: ModelSpec, model_class=None) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    cls = model_class or AutoModelForCausalLM
    extra, hub_problem = _hub_access(path)
    try:
        return cls.from_pretrained(str(path), **load_kwargs(spec), **extra)
    except OSError as err:
        raise _load_error("model", path, err, hub_problem,
                          "give an existing local folder with safetensors weights, or a hub id while the hub is "
                          "reachable (set model.allow_pickle: true only for trusted .bin weights)") from None
    except SafetensorError as err:  # a damaged weights file: its header does not parse
        raise AlignpipeError(f"cannot load model from {path}: its safetensors weights are damaged "
                             f"({str(err).splitlines()[0][:160]})", where=str(path),
                             fix="restore the folder from a copy, or rebuild it") from None


# --- from a stage checkpoint ---------------------------------------------------------------------


def spec_from_manifest(manifest: dict, where: str = "manifest.json", trust_remote_code: bool = False,
                       allow_pickle: bool = False) -> ModelSpec:
    """The recipe's model settings as a stage recorded them (dtype, quantisation, revision), except the two
    that run code: `trust_remote_code` and `allow_pickle` come only from the caller (the recipe being run, or
    a command-line flag), never from a run folder, which anyone could have edited or sent."""
    import dataclasses

    from alignpipe.recipe.parse import from_dict

    raw = (manifest.get("recipe_settings") or {}).get("model") or {}
    spec = from_dict(ModelSpec, raw, where, "recipe_settings.model") if raw else ModelSpec()
    return dataclasses.replace(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)



def checkpoint_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "model"


def is_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / "adapter_config.json").is_file()


def load_stage_model(stage_dir: Path, spec: ModelSpec, model_class=None, merge: bool = True):
    """The causal LM a stage produced. A LoRA stage saved only its adapter; its manifest records the
    base it was trained on (a parent stage folder or the recipe's model), which is loaded first. Each stage's
    files are checked against the hash its manifest recorded first (runs.verify_model_files)."""
    from alignpipe.runfolder.manifests import verify_model_files

    verify_model_files(stage_dir)
    model_dir = checkpoint_dir(stage_dir)
    if not is_adapter(model_dir):
        return load_pretrained(model_dir, spec, model_class)
    from peft import PeftModel

    base_ref = base_of(stage_dir)  # a stage folder (current or in its history), or the recipe's model
    if isinstance(base_ref, Path):
        base = load_stage_model(base_ref, spec, model_class)
    else:
        base = load_pretrained(base_ref, spec, model_class)
    config = None
    if model_class is not None:  # e.g. a reward model's body from a causal-LM adapter: apply it to the body
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(model_dir))
        config.task_type = None  # a plain PeftModel: the adapter's layer names are the same under any head
    model = PeftModel.from_pretrained(base, str(model_dir), config=config)
    if model_class is None:  # the base's config still stops where documents end: stop where turns end
        _stop_at_stage_eos(model, model_dir, spec)
    return model.merge_and_unload() if merge else model


def _stop_at_stage_eos(model, model_dir: Path, spec: ModelSpec) -> None:
    """Mirror the stage tokenizer's EOS (the template's end of turn, see template_checks) onto a model whose
    config came from its base: an adapter stores no config, so without this the reloaded (and exported)
    model keeps the base's EOS (e.g. Qwen's <|endoftext|>) and plain `generate` runs past every turn."""
    if not (Path(model_dir) / "tokenizer_config.json").is_file():
        return

    add_stop_token(model, load_tokenizer(model_dir, spec).eos_token_id)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())

