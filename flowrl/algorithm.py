"""The Algorithm: a plan built for an env and a config, trained one iteration at a time and
asked for actions in between (the seed's Trainer, RLlib's Algorithm).

    import flowrl
    with flowrl.build("PPO", env="CartPole-v1", config={"lr": 1e-3}) as algo:
        result = algo.train()                    # one iteration: the record metrics.jsonl holds
        algo.save("ckpt")                        # the checkpoint format of `flowrl run`
        action = algo.compute_single_action(obs)
    algo = flowrl.restore("ckpt")                # counters, optimizer and schedules go on

`flowrl run`, `flowrl train`, `flowrl.train` and the Ray Tune trainable are all loops over
`Algorithm.train`; the config is checked as a plan file's is (a bad key raises
flowrl.ConfigError naming it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

import flowrl
from flowrl.checkpoints import (CheckpointState, is_checkpoint_dir, load_learner_state, read_checkpoint,
                                restore_progress, save_checkpoint, write_checkpoint)
from flowrl.cluster import runtime_env_for
from flowrl.config import ConfigError
from flowrl.device import resolve_device
from flowrl.executors import make_executor
from flowrl.planfile import (Experiment, ExperimentConfigError, ExperimentError, _check_input, config_to_dict,
                             make_experiment)
from flowrl.trained import TrainedPolicy, checkpoint_at, run_description

__all__ = ["Algorithm", "build", "restore", "train"]


class Algorithm:
    """An experiment's plan, built and started: `train()` runs one iteration.

    With `output_dir` (or `run_dir`, an existing run directory to go on writing) it keeps a run
    directory as `flowrl run` does: config.yaml, metrics.jsonl, progress.csv, TensorBoard events,
    and a checkpoint every `checkpoint_freq` iterations. `checkpoint`, a CheckpointState, is
    applied before the first iteration: weights, optimizer, counters and plan state. Use it as a
    context manager, or call `stop()`: that closes the rollout workers (Ray actors included) and
    a Ray instance it started.
    """

    def __init__(self, exp: Experiment, executor: str = "local", address: str | None = None,
                 num_cpus: int | None = None, connect_timeout_s: float | None = None,
                 output_dir: str | os.PathLike | None = None, run_dir: Path | None = None,
                 checkpoint: CheckpointState | None = None):
        from flowrl.rollout import WorkerSet

        self.experiment = exp
        self.config = config = exp.config
        self.run_dir: Path | None = None
        self.last_checkpoint: Path | None = None
        self._metrics = None
        self._saved_at: int | None = None  # the iteration of the run directory's newest checkpoint
        self._stopped = False
        try:
            learner_device = resolve_device(config.learner_device, config.num_gpus)
        except ConfigError as e:  # CUDA asked for where there is none: one line naming the key
            raise ExperimentConfigError(f"{exp.source}: experiment {exp.name!r}", ConfigError(f"config.{e.key}",
                                                                                              e.message)) from None
        # Joining a cluster, the Ray job ships the user code the experiment names (flowrl.cluster).
        self._executor = make_executor("ray", address=address, num_cpus=num_cpus, connect_timeout_s=connect_timeout_s,
                                       runtime_env=runtime_env_for(exp.env, config, exp.plan_name) if address else None
                                       ) if executor == "ray" else make_executor(executor)
        worker_kwargs = config.worker_kwargs(exp.env)
        input_source = None
        if getattr(config, "input", None) == "external":  # a policy server for external applications
            from flowrl.connectors.external import ExternalInput

            input_source = ExternalInput.from_config(config, worker_kwargs)  # no env is made or stepped
        elif exp.env is None:  # an offline plan without an env: the policy is built from the dataset's spaces
            spaces = _check_input(exp.plan, config, None, exp.source)
            worker_kwargs.update(observation_space=spaces["obs"], action_space=spaces["actions"])
        self._output = None
        if config.output:
            from flowrl.connectors import DatasetWriter, MultiAgentDatasetWriter

            writer = MultiAgentDatasetWriter if getattr(config, "multiagent", None) is not None else DatasetWriter
            self._output = writer(config.output, format=config.output_format,
                                  max_rows_per_file=config.output_max_rows_per_file,
                                  compression=config.output_compression)
        self.workers = self.plan = None
        try:
            self.workers = WorkerSet(num_workers=config.num_workers, num_cpus_per_worker=config.num_cpus_per_worker,
                                     max_restarts=config.max_actor_restarts, output=self._output,
                                     actor_start_timeout_s=config.actor_start_timeout_s, input_source=input_source,
                                     placement_strategy=config.worker_placement_strategy,
                                     learner_device=learner_device, learner_num_threads=config.num_learner_threads,
                                     **worker_kwargs)
            if self.workers.is_multi_agent and self._output is not None:
                self._output.agent_names = self.workers.local_worker.agent_names  # agent_id indexes -> names
            self.plan = exp.plan.build(self.workers, config)
            self.plan.executor = self._executor
            # A checkpoint is applied in full (weights that fit the model, counters, replay
            # buffer) before anything in a run directory changes.
            if checkpoint is not None:
                load_learner_state(checkpoint, self.workers)
            self.plan.start()
            if checkpoint is not None:
                restore_progress(checkpoint, self.plan, self.workers)
        except BaseException:
            self.stop()
            raise
        if run_dir is None and output_dir is not None:
            from flowrl.experiment import new_run_dir  # the runner's module, which imports this one

            run_dir = new_run_dir(Path(output_dir), exp.name)
        if run_dir is not None:
            self.run_dir = Path(run_dir)
            if input_source is not None:
                input_source.run_dir = self.run_dir  # where a generated token is written
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(exp.resolved(), sort_keys=False))
            from flowrl.metrics_files import MetricsWriter

            self._metrics = MetricsWriter(self.run_dir)

    # ---- training ---------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Iterations trained so far (restored ones included)."""
        return self.plan.progress_state()["training_iteration"]

    def train(self) -> dict[str, Any]:
        """One iteration; its result record, as metrics.jsonl holds it. With a run directory the
        record is written there, and a checkpoint every `checkpoint_freq` iterations."""
        if self._stopped:
            raise RuntimeError("this Algorithm was stopped; build or restore a new one")
        result = self.plan.step()
        if self._metrics is not None:
            self._metrics.write(result)
        freq = self.config.checkpoint_freq
        if self.run_dir is not None and freq and result["training_iteration"] % freq == 0:
            self.save()
        return result

    # ---- checkpoints ------------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        """What algorithm.json holds: enough to build this Algorithm again."""
        exp = self.experiment
        return {"name": exp.name, "plan": exp.plan_name, "env": exp.env, "config": config_to_dict(self.config),
                "flowrl_version": flowrl.__version__}

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """A checkpoint, `flowrl run`'s: model.pt, optimizer.pt (tensors), progress.json. Into the
        run directory's checkpoints/checkpoint_NNNNNN/ (whose config.yaml describes it), or into
        `path` (a new or empty directory, or an earlier checkpoint, which it replaces) with
        algorithm.json beside (plan, env and config, as JSON), so that it restores on its own."""
        iteration = self.iteration
        if path is None:
            if self.run_dir is None:
                raise ValueError("save() needs a path: this Algorithm has no run directory (give output_dir)")
            if self._saved_at == iteration and self.last_checkpoint is not None:
                return self.last_checkpoint  # this iteration is saved already
            self.last_checkpoint = save_checkpoint(self.run_dir, self.plan, self.workers)
            self._saved_at = iteration
            return self.last_checkpoint
        target = Path(path).expanduser().resolve()
        if target.exists() and not (target.is_dir() and (is_checkpoint_dir(target) or not any(target.iterdir()))):
            raise ExperimentError(f"{path}: exists and is not a flowrl checkpoint; save into a new or empty directory")
        self.last_checkpoint = write_checkpoint(target, self.plan, self.workers, self.description())
        return self.last_checkpoint

    # ---- using the policy -------------------------------------------------------------------
    @property
    def policy(self):
        """The learner's policy (torch)."""
        return self.workers.policy

    def compute_single_action(self, obs: Any, explore: bool = False) -> Any:
        """The action for one observation: the most likely one, or a sample with `explore`."""
        return TrainedPolicy(self.policy, self.experiment.env, self.config.env_config,
                             **self.workers.evaluation_env()).compute_action(obs, explore)

    def evaluate(self, episodes: int = 10, seed: int = 0) -> dict[str, Any]:
        """Greedy episodes in fresh envs (seeds seed, seed + 1, ...): episode_return_mean, _min,
        _max, episode_len_mean and episodes, as the evaluation part of a result record."""
        from flowrl.operators.evaluation import episode_summary
        from flowrl.rollout import evaluate_policy

        if self.experiment.env is None:
            raise ExperimentError(f"{self.experiment.name}: trained from a dataset without an env; there is "
                                  "nothing to evaluate it in")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        returns, lengths = evaluate_policy(self.policy, self.experiment.env, self.config.env_config, episodes,
                                           seed, with_lengths=True, **self.workers.evaluation_env())
        return episode_summary(returns, lengths)

    # ---- closing ----------------------------------------------------------------------------
    def stop(self, flush_tensorboard: bool = True) -> None:
        """Close the plan (its threads, rollout workers and actors), the run directory's files
        and a Ray instance this Algorithm started. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.plan is not None:
            self.plan.close()
        if self._metrics is not None:
            # After a second Ctrl-C the TensorBoard writer may have been cut off mid-write;
            # waiting for its queue could then hang (flush_tensorboard=False).
            self._metrics.close(flush_tensorboard=flush_tensorboard)
        self._executor.close()
        if self.workers is not None:
            self.workers.local_worker.close()
        if self._output is not None:
            self._output.close()

    def __enter__(self) -> "Algorithm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f", run_dir={str(self.run_dir)!r}" if self.run_dir else ""
        return f"Algorithm({self.experiment.plan_name!r}, env={self.experiment.env!r}{where})"


# ---- the module-level API (flowrl.build, flowrl.restore, flowrl.train) -----------------------------
def build(plan: Any, env: str | None = None, config: dict[str, Any] | None = None, *, executor: str = "local",
          output_dir: str | os.PathLike | None = None, name: str | None = None, address: str | None = None,
          num_cpus: int | None = None, connect_timeout_s: float | None = None) -> Algorithm:
    """An Algorithm for `plan` (a name such as "PPO", "package.module:function", or a plan
    function) on `env`. `config` is checked as a plan file's `config:` is; a bad key raises
    flowrl.ConfigError naming it. With `output_dir` it keeps a run directory there,
    <output_dir>/<name>/<timestamp>/ (name: "<env>-<plan>" in lower case)."""
    exp = make_experiment(plan, env, config, name=name)
    return Algorithm(exp, executor, address, num_cpus, connect_timeout_s, output_dir=output_dir)


def restore(path: str | os.PathLike, *, plan: Any = None, config: dict[str, Any] | None = None,
            executor: str = "local", output_dir: str | os.PathLike | None = None, address: str | None = None,
            num_cpus: int | None = None, connect_timeout_s: float | None = None) -> Algorithm:
    """The Algorithm saved in `path`: a checkpoint (from `Algorithm.save` or `flowrl run`), a run
    directory (its newest readable checkpoint) or an experiment directory (its `latest` run).
    Weights, optimizer state, counters and plan state continue. The plan, env and config come
    from the checkpoint's algorithm.json, or from its run directory's config.yaml; `plan` gives
    the plan function for one that cannot be imported by name, and `config` keys override."""
    checkpoint, state = checkpoint_at(path, read_checkpoint)
    env, plan_name, saved_config, name = run_description(checkpoint)
    exp = make_experiment(plan if plan is not None else plan_name, env, {**saved_config, **(config or {})},
                          name=name)
    return Algorithm(exp, executor, address, num_cpus, connect_timeout_s, output_dir=output_dir, checkpoint=state)


def train(plan: Any, env: str | None = None, config: dict[str, Any] | None = None, *,
          stop: dict[str, Any] | None = None, output_dir: str | os.PathLike = "runs", executor: str = "local",
          name: str | None = None, quiet: bool = True, address: str | None = None, num_cpus: int | None = None,
          connect_timeout_s: float | None = None) -> dict[str, Any]:
    """Train until a stop condition holds (as `flowrl run` does: a run directory under
    `output_dir`, checkpoints, one summary line); the last result, with "stop_reason" and
    "run_dir". `stop` takes the keys of a plan file's stop (episode_return_mean, timesteps_total,
    time_total_s, training_iteration, evaluation/episode_return_mean)."""
    from flowrl.experiment import run_experiment

    exp = make_experiment(plan, env, config, stop, name=name, require_stop=True)
    return run_experiment(exp, Path(output_dir), executor, address, quiet, num_cpus=num_cpus,
                          connect_timeout_s=connect_timeout_s)

