"""Checkpoints: model and optimizer state as plain tensors (loaded with weights_only=True),
progress as JSON. Nothing read from disk is unpickled."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from flowrl.planfile import ExperimentError


def save_checkpoint(run_dir: Path, plan, workers, describe: dict[str, Any] | None = None) -> Path:
    """run_dir/checkpoints/checkpoint_NNNNNN/, as `write_checkpoint` writes it."""
    name = f"checkpoint_{plan.progress_state()['training_iteration']:06d}"
    return write_checkpoint(Path(run_dir) / "checkpoints" / name, plan, workers, describe)


def write_checkpoint(final: Path, plan, workers, describe: dict[str, Any] | None = None) -> Path:
    """`final`/: model.pt, optimizer.pt (tensors, loaded with weights_only=True), progress.json,
    and algorithm.json (`describe`: plan, env and config, so that a checkpoint saved anywhere
    restores without its run directory). Written to a temporary directory beside it, then
    renamed over it."""
    progress = plan.progress_state()
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, versions = learner_state(workers)
    for stem, state in tensors.items():
        torch.save(state, tmp / f"{stem}.pt")
    buffer = getattr(plan, "replay_buffer", None)  # off-policy plans with checkpoint_replay_buffer: true
    if buffer is not None:
        buffer.save(tmp / "replay_buffer.npz")  # numpy arrays only; loaded with allow_pickle=False
    normalizer = workers.local_worker.normalizer  # the normalize preset's merged statistics
    if normalizer is not None:
        torch.save(normalizer.state_dict(), tmp / "normalize.pt")
    progress.update(versions)
    (tmp / "progress.json").write_text(json.dumps(progress))
    if describe is not None:
        (tmp / "algorithm.json").write_text(json.dumps(describe, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _policy_state(policy) -> dict[str, Any]:
    state = {"model": policy.model.state_dict(), "optimizer": policy.optimizer.state_dict()}
    target = getattr(policy, "target_model", None)
    if target is not None:
        state["target_model"] = target.state_dict()
    return state


def learner_state(workers) -> tuple[dict[str, Any], dict[str, Any]]:
    """The learner's state dicts by file ("model", "optimizer", "target_model") and its weights
    version(s) for progress.json. With several policies (multi-agent) each file holds
    {policy id: state dict}, and progress.json `policy_weights_versions` besides."""
    if not workers.is_multi_agent:
        return _policy_state(workers.policy), {"weights_version": workers.policy.weights_version}
    per_policy = {pid: _policy_state(p) for pid, p in workers.policies.items()}
    stems = dict.fromkeys(stem for state in per_policy.values() for stem in state)
    tensors = {stem: {pid: state[stem] for pid, state in per_policy.items() if stem in state} for stem in stems}
    versions = {pid: p.weights_version for pid, p in workers.policies.items()}
    return tensors, {"weights_version": max(versions.values()), "policy_weights_versions": versions,
                     "added_policies": workers.added_policies()}


def added_policies(progress: dict[str, Any], path: Path) -> dict[str, str]:
    """{policy id: the policy it copies} of the policies a multi-agent plan added while it ran
    (self-play snapshots), from a checkpoint's progress.json at `path`."""
    added = progress.get("added_policies") or {}
    if not (isinstance(added, dict) and all(isinstance(v, str) for v in added.values())):
        raise ExperimentError(f"{path}: added_policies is not a mapping of policy ids")
    return added


def load_learner_state(state: "CheckpointState", workers) -> None:
    """`load_policy_state` into the learner: its one policy, or each of its policies from
    that policy's part of every file."""
    if not workers.is_multi_agent:
        load_policy_state(state, workers.policy)
        return
    versions = state.progress.get("policy_weights_versions") or {}
    for pid, like in added_policies(state.progress, state.path / "progress.json").items():  # policies a plan added while it ran (self-play snapshots)
        if pid not in workers.policies:
            if like not in workers.policies:
                raise ExperimentError(f"{state.path}: added policy {pid!r} is a copy of {like!r}, which this "
                                      "plan has no policy of")
            workers.add_policy(pid, like)  # its weights are the checkpoint's, loaded below
    for pid, policy in workers.policies.items():
        if pid not in state.tensors["model"] or pid not in versions:
            raise ExperimentError(f"{state.path}: holds no policy {pid!r} (it has {', '.join(state.tensors['model'])})")
        part = {stem: tensors[pid] for stem, tensors in state.tensors.items() if isinstance(tensors, dict)
                and pid in tensors}
        load_policy_state(CheckpointState(state.path, part, {**state.progress, "weights_version": versions[pid]}),
                          policy)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The checkpoints of a run directory, oldest first (by iteration, not by name)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("checkpoint_*") if root.is_dir() else ():
        suffix = path.name[len("checkpoint_"):]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def is_checkpoint_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "model.pt").is_file() or (path.name.startswith("checkpoint_") and path.parent.name == "checkpoints")


def latest_checkpoint(path: Path) -> Path:
    """The checkpoint directory itself, or the newest one under a run directory (unread)."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    candidates = checkpoint_dirs(path)
    if not candidates:
        raise ExperimentError(f"{path}: no checkpoint found (expected checkpoints/checkpoint_*/model.pt)")
    return candidates[-1]


def newest_readable(run_dir: Path, read: Callable[[Path], Any]) -> tuple[Path, Any, ExperimentError | None]:
    """The newest checkpoint of `run_dir` that `read` reads, what it read, and why the newer ones
    could not be read (the newest's error; None when the newest was readable)."""
    candidates = checkpoint_dirs(run_dir)
    if not candidates:
        raise ExperimentError(f"{run_dir}: no checkpoint found (expected checkpoints/checkpoint_*/model.pt)")
    newest_error = None
    for checkpoint in reversed(candidates):
        try:
            return checkpoint, read(checkpoint), newest_error
        except ExperimentError as e:
            newest_error = newest_error or e
    older = "no older checkpoint is readable either" if len(candidates) > 1 else "there is no older checkpoint"
    raise ExperimentError(f"{newest_error}; {older}")


def _load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # a truncated or tampered file
        raise ExperimentError(f"{path}: cannot be read as a tensor checkpoint ({type(e).__name__}: {e})") from None


@dataclasses.dataclass
class CheckpointState:
    """Everything a checkpoint holds, read and checked, before any of it is applied."""
    path: Path
    tensors: dict[str, Any]  # file stem ("model", "optimizer", "target_model", ...) -> state dict
    progress: dict[str, Any]


def read_checkpoint(checkpoint: Path) -> CheckpointState:
    """Read every file of a checkpoint; an unreadable or missing one raises ExperimentError naming it."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ExperimentError(f"{checkpoint}: no such checkpoint directory")
    tensors = {"model": _load_tensors(checkpoint / "model.pt"), "optimizer": _load_tensors(checkpoint / "optimizer.pt")}
    for path in sorted(checkpoint.glob("*.pt")):
        if path.stem not in tensors:
            tensors[path.stem] = _load_tensors(path)
    path = checkpoint / "progress.json"
    try:
        progress = json.loads(path.read_text())
        int(progress["weights_version"]), int(progress["training_iteration"]), float(progress["time_total_s"])
        if not (isinstance(progress["counters"], dict) and isinstance(progress["episodes"], list)
                and isinstance(progress["state"], dict)):
            raise TypeError("counters, episodes or state of the wrong type")
    except FileNotFoundError:
        raise ExperimentError(f"{path}: missing from the checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return CheckpointState(checkpoint, tensors, progress)


def load_policy_state(state: CheckpointState, policy) -> None:
    """Model, optimizer and target network from a checkpoint into `policy`; one that does not fit
    the policy's model raises ExperimentError. The plan's progress is restored apart, once it runs."""
    checkpoint = state.path
    try:
        policy.model.load_state_dict(state.tensors["model"])
        policy.optimizer.load_state_dict(state.tensors["optimizer"])
        if "target_model" in state.tensors:
            if getattr(policy, "target_model", None) is None:  # made on first use; SAC's (its critics) exists
                import copy

                policy.target_model = copy.deepcopy(policy.model).requires_grad_(False)
            policy.target_model.load_state_dict(state.tensors["target_model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{checkpoint}: does not fit this plan's model ({str(e).splitlines()[0]})") from None
    policy.weights_version = int(state.progress["weights_version"])


def restore_progress(state: CheckpointState, plan, workers) -> None:
    """Counters, iteration and plan state from a checkpoint (and the replay buffer's rows when the
    plan keeps them in its checkpoints), then the weights to every worker."""
    plan.restore_progress(state.progress)
    normalizer = workers.local_worker.normalizer
    if normalizer is not None and "normalize" in state.tensors:
        load_normalizer(state.tensors["normalize"], normalizer, state.path / "normalize.pt")
    buffer, path = getattr(plan, "replay_buffer", None), state.path / "replay_buffer.npz"
    if buffer is not None and path.is_file():
        import zipfile

        try:
            buffer.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ExperimentError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    workers.sync_weights()


def load_normalizer(stats: dict[str, Any], normalizer, path: Path) -> None:
    """The normalize preset's statistics from a checkpoint's normalize.pt into `normalizer`."""
    try:
        normalizer.load_state_dict(stats)
    except (ValueError, TypeError) as e:
        raise ExperimentError(f"{path}: {e}") from None


def restore_checkpoint(checkpoint: Path, plan, workers) -> None:
    state = read_checkpoint(checkpoint)
    load_learner_state(state, workers)
    restore_progress(state, plan, workers)
