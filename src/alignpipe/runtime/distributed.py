"""Several processes (`accelerate launch`, `torchrun`): who writes, and waiting for each other.

Training itself is distributed by the trainers (transformers/TRL through accelerate); alignpipe only
has to keep its own files straight: the main process writes manifests and reports, everyone waits
for it at stage boundaries, and the process group is torn down at exit.

Rank and world size come from the launcher's environment (RANK, WORLD_SIZE), so asking costs nothing
and works before any process group exists.
"""

from __future__ import annotations

# Heavy imports (torch, accelerate) stay inside the functions that use them: the CLI starts without them.
import hashlib
import json
import os
from pathlib import Path

from alignpipe.errors import RecipeError

# Set to a folder: after training, each process writes <stage>-rank<r>.json there with a hash of its
# parameters (tests use it to prove the ranks ended identical).
CHECKSUM_ENV = "ALIGNPIPE_DEBUG_PARAM_CHECKSUM"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        # without cpu=True on a GPU-less machine each process believes it is alone and nothing waits;
        # the first call initialises the process group (gloo on CPU)
        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def destroy() -> None:
    """Tear down the process group, if one was started (no waiting: a failed process must not hang)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_on_cpu(trainer, where: str = "", stage: str = "") -> bool:
    """Turn on the FSDP the launcher asked for, when the processes run on CPUs; True if it did.

    `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP and the FSDP_* variables, but
    accelerate 1.15 selects FSDP only on top of a multi-device GPU-like type (`AcceleratorState.__init__`):
    processes on CPUs form a gloo group as MULTI_CPU and train as plain DDP, the FSDP config silently unused.
    torch's `fully_shard` itself runs on gloo, so the trainer's state is set to FSDP (with the plugin
    built from the launcher's variables) before `train()` prepares the model; the trainer then shards,
    all-gathers and saves a full state dict as it does on GPUs.
    """
    import torch

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return False
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return False
    if hasattr(trainer.model, "peft_config"):  # refused before training: this path is tested on full models only

        raise RecipeError("FSDP on CPU processes trains full models only, and this stage has LoRA", where=where,
                          key=f"stages.{stage}.lora" if stage else "",
                          fix="remove the stage's lora: block, or launch with recipes/accelerate/ddp.yaml")
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    # each later AcceleratorState() copies the type back from PartialState's shared state: set both
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


def gathered(model):
    """`model` with whole tensors: a model sharded by FSDP2 comes back as a plain copy on every process
    (its parameters all-gathered; every process must call this), any other model as it is. For code that
    saves or scores a trained model itself instead of through the trainer (the reward stage)."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return model
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # fully_shard swaps the model's class for FSDP<class>(FSDPModule, <class>): build the class it wraps
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # buffers are not sharded; non-persistent ones (rotary
        owner, _, leaf = name.rpartition(".")   # frequencies) are in no state dict
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.train(model.training)


def parameter_checksum(model) -> str:
    """sha256 over every parameter's name and float32 bytes (a sharded parameter is gathered whole first:
    under FSDP every process must call this)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        p = p.detach()
        if hasattr(p, "full_tensor"):  # a DTensor (FSDP2): this process holds one shard
            p = p.full_tensor()
        h.update(name.encode())
        h.update(p.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dump_parameter_checksum(stage: str, wrapped, model, step: int) -> None:
    """With ALIGNPIPE_DEBUG_PARAM_CHECKSUM set: record this process's view of the trained model (`model`,
    trained as `wrapped`, e.g. DDP) after `step` steps / updates, in `<stage>-rank<r>.json`."""
    folder = os.environ.get(CHECKSUM_ENV)
    if not folder:
        return
    import torch.distributed as dist

    record = {
        "stage": stage,
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "wrapped_as": type(wrapped).__name__,
        "sharded": any(hasattr(p, "full_tensor") for p in model.parameters()),
        "checksum": parameter_checksum(model),
        "global_step": step,
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{stage}-rank{record['rank']}.json").write_text(json.dumps(record, indent=2) + "\n")
