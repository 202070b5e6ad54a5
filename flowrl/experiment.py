"""Running an experiment: a run directory, the plan on its executor, metrics, checkpoints.

The other jobs of a run live in their own modules and are re-exported here: plan files
(`flowrl.planfile`), checkpoints (`flowrl.checkpoints`), metrics files (`flowrl.metrics_files`),
the progress line (`flowrl.progress`) and trained policies (`flowrl.trained`).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from flowrl.checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint
from flowrl.executors import make_executor
from flowrl.metrics_files import MetricsWriter
from flowrl.planfile import (Experiment, ExperimentError, _check_input, load_experiments, parse_overrides,
                             result_value, stop_reason)
from flowrl.progress import Progress, _clock, _GracefulInterrupt, progress_line
from flowrl.trained import TrainedPolicy, load_policy, plan_defaults, read_run_config

__all__ = ["Experiment", "ExperimentError", "TrainedPolicy", "latest_checkpoint", "load_experiments", "load_policy",
           "new_run_dir", "parse_overrides", "plan_defaults", "read_run_config", "restore_checkpoint",
           "result_value", "run_experiment", "save_checkpoint", "stop_reason"]


def new_run_dir(output_dir: Path, name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = output_dir / name / stamp
    suffix = 1
    while run_dir.exists():
        run_dir = output_dir / name / f"{stamp}_{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    latest = output_dir / name / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    except OSError:
        pass  # a convenience only
    return run_dir


def run_experiment(exp: Experiment, output_dir: Path, executor_kind: str = "local", address: str | None = None,
                   quiet: bool = False, resume_dir: Path | None = None, stream: TextIO | None = None,
                   num_cpus: int | None = None) -> dict[str, Any]:
    """Train until a stop condition holds; return the last result (with "stop_reason")."""
    from flowrl.rollout import WorkerSet

    config = exp.config
    if resume_dir is not None:
        checkpoint = latest_checkpoint(resume_dir)
        run_dir = Path(resume_dir)
    else:
        checkpoint = None
        run_dir = new_run_dir(Path(output_dir), exp.name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(exp.resolved(), sort_keys=False))
    executor = make_executor("ray", address=address, num_cpus=num_cpus) if executor_kind == "ray" else \
        make_executor("local")
    worker_kwargs = config.worker_kwargs(exp.env)
    if exp.env is None:  # an offline plan without an env: the policy is built from the dataset's spaces
        spaces = _check_input(exp.plan, config, None, exp.source)
        worker_kwargs.update(observation_space=spaces["obs"], action_space=spaces["actions"])
    output = None
    if config.output:
        from flowrl.connectors import DatasetWriter

        output = DatasetWriter(config.output, config.output_format, config.output_max_rows_per_file,
                               config.output_compression)
    workers = WorkerSet(num_workers=config.num_workers, num_cpus_per_worker=config.num_cpus_per_worker,
                        max_restarts=config.max_actor_restarts, output=output, **worker_kwargs)
    plan = exp.plan.build(workers, config)
    plan.executor = executor
    metrics = MetricsWriter(run_dir)
    progress = Progress(stream or sys.stdout, quiet)
    result: dict[str, Any] = {}
    reason = None
    with _GracefulInterrupt(progress) as interrupt:
        try:
            with plan:
                if checkpoint is not None:
                    restore_checkpoint(checkpoint, plan, workers)
                while True:
                    result = plan.step()
                    metrics.write(result)
                    progress.update(progress_line(exp.name, result))
                    reason = stop_reason(exp.stop, result)
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    if config.checkpoint_freq and result["training_iteration"] % config.checkpoint_freq == 0 \
                            and not reason:
                        save_checkpoint(run_dir, plan, workers)
                    if reason:
                        break
                save_checkpoint(run_dir, plan, workers)
        except KeyboardInterrupt:
            if result:
                save_checkpoint(run_dir, plan, workers)  # nothing lost: resume with --resume RUN_DIR
            progress.finish(f"{exp.name}: interrupted; checkpoint saved in {run_dir}")
            raise
        finally:
            # After a second Ctrl-C the TensorBoard writer may have been cut off mid-write;
            # waiting for its queue could then hang, so only our own files are closed.
            metrics.close(flush_tensorboard=not interrupt.forced)
            executor.close()
            workers.local_worker.close()
            if output is not None:
                output.close()
    result["stop_reason"] = reason
    result["run_dir"] = str(run_dir)
    ret = result.get("episode_return_mean")
    evaluation = result_value(result, "evaluation/episode_return_mean")
    eval_text = f", greedy evaluation return {evaluation:.2f}" if evaluation is not None else ""
    progress.finish(f"{exp.name}: done at iteration {result['training_iteration']} ({reason}); "
                    f"{result['timesteps_total']:,} env steps in {_clock(result['time_total_s'])}, "
                    f"episode_return_mean {'n/a' if ret is None else f'{ret:.2f}'}{eval_text}; run dir {run_dir}")
    return result
