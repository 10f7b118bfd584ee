"""Resumable PPO training state, written atomically.

A checkpoint is a folder `checkpoints/update-N/` holding the trainable weights (LoRA adapter or all
LM weights, plus the value head), the optimizer and LR-scheduler state, the KL controller and the
update index. It is written under a temporary name and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the new one, never half of one.

No RNG state is stored: every update reseeds torch from (seed, update index, process), so
the random stream after resuming at update N is the one an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

PREFIX = "update-"


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (requires_grad), by name, as CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back in place; the set of names must match exactly."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def save(root: Path, update: int, policy: nn.Module, optimizer, scheduler, kl_ctl, keep: int = 2) -> Path:
    """Write checkpoint `update` under `root` atomically; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{update}"
    tmp = root / f".tmp-{PREFIX}{update}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(trainable_state(policy), tmp / "trainable.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"update": update, "kl_controller": kl_ctl.state_dict()}))
    for f in tmp.iterdir():  # on disk before the rename makes them the checkpoint
        _fsync(f)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in sorted(complete(root), key=_index)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Checkpoint folders that were fully written (renamed into place)."""
    if not root.is_dir():
        return []
    return [p for p in root.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()]


def newest(root: Path) -> Path | None:
    found = complete(root)
    return max(found, key=_index) if found else None


def load(path: Path, policy: nn.Module, optimizer, scheduler, kl_ctl) -> int:
    """Restore a checkpoint into the live objects; returns the number of updates it had done."""
    load_trainable_state(policy, torch.load(path / "trainable.pt", weights_only=True))
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    meta = json.loads((path / "state.json").read_text())
    kl_ctl.load_state_dict(meta["kl_controller"])
    return int(meta["update"])


def _index(p: Path) -> int:
    return int(p.name[len(PREFIX):])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
