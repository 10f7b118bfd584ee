"""Several processes (`accelerate launch`, `torchrun`): who writes, and waiting for each other.

Training itself is distributed by the trainers (transformers/TRL through accelerate); alignpipe only
has to keep its own files straight: the main process writes manifests and reports, everyone waits
for it at stage boundaries, and the process group is torn down at exit.

Rank and world size come from the launcher's environment (RANK, WORLD_SIZE), so asking costs nothing
and works before any process group exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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


def parameter_checksum(model) -> str:
    """sha256 over every parameter's name and float32 bytes."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
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
        "checksum": parameter_checksum(model),
        "global_step": step,
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{stage}-rank{record['rank']}.json").write_text(json.dumps(record, indent=2) + "\n")
