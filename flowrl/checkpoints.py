"""Checkpoints: model and optimizer state as plain tensors (loaded with weights_only=True),
progress as JSON. Nothing read from disk is unpickled."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from flowrl.planfile import ExperimentError


def save_checkpoint(run_dir: Path, plan, workers) -> Path:
    """checkpoints/checkpoint_NNNNNN/: model.pt, optimizer.pt (tensors, loaded with
    weights_only=True), progress.json. Written to a temporary directory, then renamed."""
    policy = workers.policy
    progress = plan.progress_state()
    name = f"checkpoint_{progress['training_iteration']:06d}"
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(policy.model.state_dict(), tmp / "model.pt")
    torch.save(policy.optimizer.state_dict(), tmp / "optimizer.pt")
    target = getattr(policy, "target_model", None)
    if target is not None:
        torch.save(target.state_dict(), tmp / "target_model.pt")
    progress["weights_version"] = policy.weights_version
    (tmp / "progress.json").write_text(json.dumps(progress))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(path: Path) -> Path:
    """The checkpoint directory itself, or the newest one under a run directory."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("checkpoint_*")) if (path / "checkpoints").is_dir() else []
    if not candidates:
        raise ExperimentError(f"{path}: no checkpoint found (expected checkpoints/checkpoint_*/model.pt)")
    return candidates[-1]


def _load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # a truncated or tampered file
        raise ExperimentError(f"{path}: cannot be read as a tensor checkpoint ({type(e).__name__}: {e})") from None


def restore_checkpoint(checkpoint: Path, plan, workers) -> None:
    policy = workers.policy
    try:
        policy.model.load_state_dict(_load_tensors(checkpoint / "model.pt"))
        policy.optimizer.load_state_dict(_load_tensors(checkpoint / "optimizer.pt"))
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, ExperimentError):
            raise
        raise ExperimentError(f"{checkpoint}: does not fit this plan's model ({str(e).splitlines()[0]})") from None
    try:
        progress = json.loads((checkpoint / "progress.json").read_text())
        policy.weights_version = int(progress["weights_version"])
        plan.restore_progress(progress)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{checkpoint / 'progress.json'}: unreadable ({type(e).__name__}: {e})") from None
    if (checkpoint / "target_model.pt").is_file():
        import copy

        policy.target_model = copy.deepcopy(policy.model).requires_grad_(False)
        policy.target_model.load_state_dict(_load_tensors(checkpoint / "target_model.pt"))
    workers.sync_weights()
