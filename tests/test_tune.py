"""Ray Tune: search spaces in plan files, `flowrl tune` with grids, PBT and ASHA, and the trainable's
checkpoints and resources. One 4-CPU Ray for the module (two trials with a rollout worker each)."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from flowrl.cli import main
from flowrl.planfile import ExperimentError, load_experiments

BASE = {"train_batch_size": 256, "sgd_minibatch_size": 128, "num_sgd_iter": 2, "num_envs_per_worker": 4,
        "rollout_fragment_length": 32, "seed": 0}


def plan_file(tmp_path, config, stop="{training_iteration: 2}", name="sweep"):
    config = {**BASE, **config}
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        {name}:
          env: CartPole-v1
          run: PPO
          stop: {stop}
          config: {yaml.safe_dump(config, default_flow_style=True, sort_keys=False, width=1000).strip()}
        """))
    return path


def config_of(run_dir):
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["sweep"]["config"]


def rows_of(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def trial_dirs(tmp_path, name="sweep"):
    """The run directories of the one sweep under tmp_path/runs/<name>/, by trial index."""
    (sweep,) = [p for p in (tmp_path / "runs" / name).iterdir() if p.name != "latest"]
    return sorted(p for p in sweep.iterdir() if (p / "config.yaml").is_file()), sweep


@pytest.fixture(scope="module")
def ray4():
    """A 4-CPU Ray of this module's own; the session's 2-CPU one (tests/conftest.py) is shut down
    first and started again by the next test that asks for it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


# ---- search spaces in plan files (no Ray) --------------------------------------------------------
def test_flowrl_run_refuses_a_search_space_in_one_line(tmp_path, capsys):
    path = plan_file(tmp_path, {"lr": {"grid_search": [0.001, 0.0003]}})
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == (f"flowrl: error: {path}: experiment 'sweep': config.lr: {{grid_search: ...}} is "
                                       f"a Tune search space; run it with `flowrl tune {path}`\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config, message", [
    ({"lr": {"grid_search": [0.001, "fast"]}}, "config.lr: grid_search value 'fast': expected a number, got 'fast'"),
    ({"sgd_minibatch_size": {"choice": [64, 512]}},
     "config.sgd_minibatch_size: choice value 512: 512 exceeds train_batch_size 256"),
    ({"train_batch_size": {"grid_search": [256, 64]}},
     "config.sgd_minibatch_size: 128 exceeds train_batch_size 64 "
     "(with config.train_batch_size = 64 from its grid_search)"),
    ({"gamma": {"uniform": [0.9, 1.5]}}, "config.gamma: uniform value 1.5: must be in [0, 1], got 1.5"),
    ({"lr": {"loguniform": [0.0, 0.1]}}, "config.lr: loguniform: low must be > 0, got 0.0"),
    ({"lr": {"uniform": [0.1]}}, "config.lr: uniform: expected [low, high], two numbers, got [0.1]"),
    ({"num_sgd_iter": {"uniform": [1, 8]}},
     "config.num_sgd_iter: uniform samples fractional numbers, and num_sgd_iter takes an integer; use choice or "
     "grid_search"),
    ({"lr": {"grid_search": [0.1]}, "num_sgd_iter": {"grid_search": [1, 0]}},
     "config.num_sgd_iter: must be >= 1, got 0 (in the grid point num_sgd_iter=0, lr=0.1)"),
])
def test_flowrl_tune_checks_every_grid_point_and_domain_bound_in_one_line(tmp_path, capsys, config, message):
    path = plan_file(tmp_path, config)
    assert main(["tune", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == f"flowrl: error: {path}: experiment 'sweep': {message}\n"
    assert not (tmp_path / "runs").exists()


def test_the_example_sweep_loads_for_flowrl_tune_only():
    path = Path(__file__).resolve().parent.parent / "examples" / "ppo_cartpole_tune.yaml"
    (exp,) = load_experiments(path, search_spaces=True)
    assert exp.search_space == {"lr": {"grid_search": [0.001, 0.0003, 0.0001]}, "clip_param": {"uniform": [0.1, 0.3]}}
    with pytest.raises(ExperimentError, match="is a Tune search space; run it with `flowrl tune"):
        load_experiments(path)


def test_search_spaces_become_tune_domains_and_pbt_mutations(tmp_path):
    from ray import tune

    from flowrl.tune import param_space, pbt_mutations, trial_resources

    path = plan_file(tmp_path, {"lr": {"loguniform": [1e-4, 1e-2]}, "model": {"hidden": {"choice": [[32], [64]]}},
                                "train_batch_size": {"grid_search": [256, 512]}, "num_workers": 2})
    (exp,) = load_experiments(path, search_spaces=True)
    assert exp.config.lr == 1e-4 and exp.config.model["hidden"] == [32]  # each domain's first value
    space = param_space(exp)
    assert isinstance(space["lr"], tune.search.sample.Float) and (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-2)
    assert space["model"]["hidden"].categories == [[32], [64]]
    assert space["train_batch_size"] == {"grid_search": [256, 512]} and space["num_sgd_iter"] == 2
    mutations = pbt_mutations(exp)
    assert mutations["model"] == {"hidden": [[32], [64]]} and mutations["train_batch_size"] == [256, 512]
    assert isinstance(mutations["lr"], tune.search.sample.Float)
    # One bundle for the trial (its learner), one per rollout worker.
    assert trial_resources(type(exp.config), {"num_workers": 2, "num_cpus_per_worker": 0.5}).bundles == \
        [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert trial_resources(type(exp.config), {}).bundles == [{"CPU": 1.0}]
    # Laid out over the nodes as worker_placement_strategy says (SPREAD by default).
    assert trial_resources(type(exp.config), {"num_workers": 2}).strategy == "SPREAD"
    assert trial_resources(type(exp.config), {"worker_placement_strategy": "STRICT_PACK"}).strategy == "STRICT_PACK"
    assert trial_resources(type(exp.config), {"worker_placement_strategy": "DEFAULT"}).strategy == "PACK"


def test_flowrl_tune_with_an_address_ships_the_user_code_to_the_cluster(tmp_path, monkeypatch):
    # As flowrl run --address does (tests/test_cluster.py): the Ray job gets a runtime_env with
    # the directory of the user's env module. Nothing is joined: the executor is stood in for.
    import flowrl.executors
    from flowrl.tune import run_sweep

    (tmp_path / "my_sweep_env.py").write_text("import gymnasium as gym\n\n"
                                              "def make(**kw):\n    return gym.make('CartPole-v1')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = {}

    class Joined(Exception):
        pass

    class FakeRay:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def start(self):
            raise Joined

    monkeypatch.setattr(flowrl.executors, "RayExecutor", FakeRay)
    path = plan_file(tmp_path, {"lr": {"grid_search": [1e-3, 3e-4]}})
    path.write_text(path.read_text().replace("CartPole-v1", "my_sweep_env:make"))
    (exp,) = load_experiments(path, search_spaces=True)
    with pytest.raises(Joined):
        run_sweep(exp, tmp_path / "runs", address="127.0.0.1:6379")
    assert seen["address"] == "127.0.0.1:6379"
    assert seen["runtime_env"]["working_dir"] == str(tmp_path)
    with pytest.raises(Joined):
        run_sweep(exp, tmp_path / "runs")  # a local Ray sees the driver's files: nothing to ship
    assert seen["runtime_env"] is None


# ---- sweeps ------------------------------------------------------------------------------------------
def test_a_grid_of_two_trials_with_a_worker_each_runs_at_once_into_run_dirs_eval_reads(tmp_path, capsys, ray4):
    # 4 CPUs hold both trials' placement groups (learner + worker): their workers must be
    # placed inside them, or the second trial's worker would wait for ever.
    path = plan_file(tmp_path, {"lr": {"grid_search": [0.001, 0.0003]}, "num_workers": 1})
    assert main(["tune", str(path), "--output-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    runs, sweep = trial_dirs(tmp_path)
    assert len(runs) == 2 and (sweep / "tune").is_dir()
    for run in runs:
        rows = rows_of(run)
        assert [(r["training_iteration"], r["timesteps_total"]) for r in rows] == [(1, 256), (2, 512)]
        assert (run / "checkpoints" / "checkpoint_000002" / "model.pt").is_file()
    assert sorted(config_of(r)["lr"] for r in runs) == [0.0003, 0.001]
    # Both ran at once: each began before the other ended.
    starts = [(r / "config.yaml").stat().st_mtime for r in runs]
    ends = [(r / "metrics.jsonl").stat().st_mtime for r in runs]
    assert max(starts) < min(ends)
    assert out.splitlines()[1].split() == ["trial", "lr", "iter", "timesteps", "episode_return_mean"]
    best = (tmp_path / "runs" / "sweep" / "latest").resolve()
    assert best in runs and f"run dir {best}" in out.splitlines()[-1]
    assert main(["eval", str(runs[0]), "--episodes", "1"]) == 0
    assert main(["eval", str(tmp_path / "runs" / "sweep"), "--episodes", "1", "--json"]) == 0  # the best trial
    checkpoint = Path(json.loads(capsys.readouterr().out.splitlines()[-1])["checkpoint"])
    assert checkpoint.resolve() == best / "checkpoints" / "checkpoint_000002"


def test_pbt_exploits_another_trials_checkpoint_and_goes_on_from_its_counters(tmp_path, capsys, ray4):
    path = plan_file(tmp_path, {"lr": {"loguniform": [1e-4, 1e-2]}, "train_batch_size": {"grid_search": [256, 512]}},
                     stop="{training_iteration: 4}")
    assert main(["tune", str(path), "--output-dir", str(tmp_path / "runs"), "--scheduler", "pbt",
                 "--perturbation-interval", "2", "--quiet"]) == 0
    runs, sweep = trial_dirs(tmp_path)
    exploits = [json.loads(line) for line in (sweep / "tune" / "pbt_global.txt").read_text().splitlines()]
    assert exploits, "PBT never exploited"
    # [target trial, trial cloned, their iterations as Tune last saw them (stale for a paused
    # trial: the run directories say more), the clone's config, the target's new config]
    target_tag, clone_tag, _, _, _, new_config = exploits[0]
    assert target_tag != clone_tag
    by_index = {int(run.name.rsplit("_", 1)[1]): run for run in runs}
    target, clone = by_index[int(target_tag.split("_")[0])], by_index[int(clone_tag.split("_")[0])]
    clone_rows, target_rows = rows_of(clone), rows_of(target)
    # Both stop at their stop (iteration 4), the target's rows going on from the clone's checkpoint.
    assert [r["training_iteration"] for r in target_rows] == [1, 2, 3, 4]
    assert [r["training_iteration"] for r in clone_rows] == [1, 2, 3, 4]
    own_batch = target_rows[0]["timesteps_total"]
    assert own_batch != clone_rows[0]["timesteps_total"]  # the grid gave them 256 and 512
    # After the exploit, the target goes on from the clone's checkpoint at iteration 2: the
    # clone's env steps plus the new config's batch; not its own steps, and not from 0.
    after = target_rows[2]
    assert after["timesteps_total"] == clone_rows[1]["timesteps_total"] + new_config["train_batch_size"]
    assert after["timesteps_total"] != target_rows[1]["timesteps_total"] + own_batch
    assert after["lr"] == pytest.approx(new_config["lr"], rel=1e-12)  # the explored learning rate is applied
    assert target_rows[3]["timesteps_total"] == after["timesteps_total"] + new_config["train_batch_size"]
    config = config_of(target)
    assert config["lr"] == pytest.approx(new_config["lr"], rel=1e-12) and config["checkpoint_freq"] == 2


def test_asha_stops_the_trial_that_trails_at_its_rung(tmp_path, capsys, ray4):
    # One trial at a time, the good one first: at the rung (iteration 2) the one that barely learns
    # (lr 1e-7: 20.15 against 22.95 with seed 0) is below the cutoff and stopped.
    path = plan_file(tmp_path, {"lr": {"grid_search": [0.001, 1e-7]}, "train_batch_size": 512, "num_sgd_iter": 4},
                     stop="{training_iteration: 4}")
    assert main(["tune", str(path), "--output-dir", str(tmp_path / "runs"), "--scheduler", "asha", "--max-t", "4",
                 "--grace-period", "2", "--max-concurrent", "1", "--quiet"]) == 0
    runs, _ = trial_dirs(tmp_path)
    iterations = {config_of(r)["lr"]: len(rows_of(r)) for r in runs}
    assert iterations == {0.001: 4, 1e-7: 2}


def test_the_trainable_from_python_reports_self_describing_checkpoints_flowrl_restores(tmp_path, ray4):
    from ray import tune

    import flowrl
    import flowrl.tune

    # No output_dir: no run directory, the checkpoints live in Tune's storage alone. The env
    # comes in the trial's config, RLlib's habit.
    tuner = tune.Tuner(flowrl.tune.trainable("PPO", stop={"training_iteration": 2}),
                       param_space={**BASE, "env": "CartPole-v1", "checkpoint_freq": 1},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="py", verbose=0))
    (result,) = tuner.fit()
    assert result.error is None
    assert (result.metrics["training_iteration"], result.metrics["timesteps_total"]) == (2, 512)
    assert "run_dir" not in result.metrics and result.metrics["done"]
    saved = Path(result.checkpoint.path)
    assert sorted(p.name for p in saved.iterdir()) == ["algorithm.json", "model.pt", "optimizer.pt", "progress.json"]
    with flowrl.restore(saved) as algo:
        assert algo.iteration == 2 and algo.experiment.env == "CartPole-v1"
        assert algo.train()["timesteps_total"] == 768
