"""Running an experiment to its stop: the loop of `flowrl run` over Algorithm.train (flowrl.algorithm
builds the plan, keeps the run directory and writes checkpoints), with progress, Ctrl-C and resume.

The other jobs of a run live in their own modules and are re-exported here: plan files
(`flowrl.planfile`), checkpoints (`flowrl.checkpoints`), metrics files (`flowrl.metrics_files`),
the progress line (`flowrl.progress`) and trained policies (`flowrl.trained`).
"""

from __future__ import annotations

import datetime
import itertools
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from flowrl.algorithm import Algorithm
from flowrl.checkpoints import (CheckpointState, is_checkpoint_dir, latest_checkpoint, newest_readable,
                                read_checkpoint, restore_checkpoint, save_checkpoint)
from flowrl.executors import find_run_error
from flowrl.planfile import (Experiment, ExperimentError, FlowrlWarning, load_experiments, make_experiment,
                             parse_overrides, result_value, stop_reason)
from flowrl.progress import Progress, _clock, _GracefulInterrupt, progress_line
from flowrl.trained import TrainedPolicy, load_policy, plan_defaults, read_run_config, resolve_run_path

__all__ = ["Algorithm", "Experiment", "ExperimentError", "FlowrlWarning", "TrainedPolicy", "latest_checkpoint",
           "load_experiments", "load_policy", "make_experiment", "new_run_dir", "parse_overrides", "plan_defaults",
           "read_run_config", "resolve_run_path", "restore_checkpoint", "result_value", "resume_point",
           "run_experiment", "save_checkpoint", "stop_reason"]


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def claim_dir(parent: Path, stem: str | None = None) -> Path:
    """A new directory parent/<stem, or the time>[_N]/. mkdir claims a name atomically, so launches
    in the same second (other processes included) each get their own."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = stem or _timestamp()
    for suffix in itertools.count():
        path = parent / (f"{stem}_{suffix}" if suffix else stem)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue  # another launch took this name first


def point_latest(parent: Path, target: str) -> None:
    """parent/latest -> target (a relative path). A new link renamed over the old one: `latest` is
    never missing or half made."""
    tmp = parent / f".latest-{os.getpid()}-{threading.get_ident()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, parent / "latest")
    except OSError:
        tmp.unlink(missing_ok=True)  # a convenience only


def new_run_dir(output_dir: Path, name: str) -> Path:
    """A fresh runs/<name>/<timestamp>[_N]/, and runs/<name>/latest pointing to it."""
    parent = Path(output_dir) / name
    run_dir = claim_dir(parent)
    point_latest(parent, run_dir.name)
    return run_dir


def resume_point(exp: Experiment, path: Path) -> tuple[Path, CheckpointState]:
    """The run directory and checkpoint that `--resume PATH` continues, read in full and checked
    against the run's config.yaml. PATH is a run directory (its newest checkpoint), one of its
    checkpoints, or an experiment directory (its `latest`). Nothing is written."""
    path = resolve_run_path(path)
    run_dir = path.parent.parent if is_checkpoint_dir(path) else path
    env, plan_name, _ = read_run_config(run_dir)
    if env != exp.env or str(plan_name).lower() != exp.plan_name.lower():
        source = f"{exp.source}: " if exp.source != "<python>" else ""
        raise ExperimentError(f"--resume {path}: the run trained {plan_name} on {env}, but {source}experiment "
                              f"{exp.name!r} is {exp.plan_name} on {exp.env}")
    if is_checkpoint_dir(path):
        return run_dir, read_checkpoint(path)
    checkpoint, state, skipped = newest_readable(run_dir, read_checkpoint)
    if skipped is not None:
        raise ExperimentError(f"{skipped}; the newest readable checkpoint is {checkpoint} "
                              f"(--resume {checkpoint} continues from it)")
    return run_dir, state


def run_experiment(exp: Experiment, output_dir: Path, executor_kind: str = "local", address: str | None = None,
                   quiet: bool = False, resume_dir: Path | None = None, stream: TextIO | None = None,
                   num_cpus: int | None = None, connect_timeout_s: float | None = None) -> dict[str, Any]:
    """Train until a stop condition holds; return the last result (with "stop_reason" and
    "run_dir"). A fault that stops the run (flowrl.executors.RunError) gets `checkpoint`: the one
    written for it. The loop over `Algorithm.train`, with a progress line, Ctrl-C handling and a
    summary line."""
    # A resume is checked in full (checkpoint readable, same plan and env, weights that fit the
    # model) before anything in the run directory changes.
    run_dir, resumed = resume_point(exp, Path(resume_dir)) if resume_dir is not None else (None, None)
    algo = Algorithm(exp, executor_kind, address, num_cpus, connect_timeout_s, output_dir=output_dir,
                     run_dir=run_dir, checkpoint=resumed)
    run_dir = algo.run_dir
    progress = Progress(stream or sys.stdout, quiet)
    result: dict[str, Any] = {}
    reason = None
    with _GracefulInterrupt(progress) as interrupt:
        try:
            while not reason:
                result = algo.train()
                interrupt.armed = True  # from now on a first Ctrl-C finishes the iteration
                progress.update(progress_line(exp.name, result))
                reason = stop_reason(exp.stop, result)
                if interrupt.requested:
                    raise KeyboardInterrupt
            algo.save()
        except KeyboardInterrupt:
            if result:
                algo.save()  # nothing lost: resume with --resume RUN_DIR
                progress.finish(f"{exp.name}: interrupted; checkpoint saved in {run_dir}")
            else:
                progress.finish(f"{exp.name}: interrupted before the first iteration ended; no checkpoint written")
            raise
        except Exception as e:
            fault = find_run_error(e)
            if fault is not None and result:  # an env or actor fault: nothing lost either
                fault.checkpoint = algo.save()
            raise
        finally:
            algo.stop(flush_tensorboard=not interrupt.forced)
    result["stop_reason"] = reason
    result["run_dir"] = str(run_dir)
    ret = result.get("episode_return_mean")
    evaluation = result_value(result, "evaluation/episode_return_mean")
    eval_text = f", greedy evaluation return {evaluation:.2f}" if evaluation is not None else ""
    progress.finish(f"{exp.name}: done at iteration {result['training_iteration']} ({reason}); "
                    f"{result['timesteps_total']:,} env steps in {_clock(result['time_total_s'])}, "
                    f"episode_return_mean {'n/a' if ret is None else f'{ret:.2f}'}{eval_text}; run dir {run_dir}")
    return result
