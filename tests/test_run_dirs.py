"""Run directories and checkpoints: refused resumes change nothing, resuming from a checkpoint,
unreadable checkpoints, racing launches, progress.csv columns, and the command line around them
(eval paths, plot on partial metrics, closed pipes, missing env packages, colours from Ray)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

from flowrl import experiment
from flowrl.cli import main
from flowrl.experiment import load_experiments
from flowrl.metrics_files import MetricsWriter

ROOT = Path(__file__).resolve().parent.parent

PLAN = """
tiny:
  env: {env}
  run: {run}
  stop: {{timesteps_total: {steps}}}
  config: {{num_envs_per_worker: 4, rollout_fragment_length: 32, checkpoint_freq: 1, seed: 0{extra}}}
"""
PPO_BATCHES = ", train_batch_size: 256, sgd_minibatch_size: 128, num_sgd_iter: 2"


def plan_file(tmp_path, steps=512, run="PPO", env="CartPole-v1", extra="", name="plan.yaml"):
    """A one-experiment plan file; PPO with 256-step iterations."""
    path = tmp_path / name
    path.write_text(PLAN.format(steps=steps, run=run, env=env, extra=(PPO_BATCHES if run == "PPO" else "") + extra))
    return path


def run_cli(*argv):
    return main([str(a) for a in argv])


def snapshot(directory):
    """Every file under `directory`, by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-iteration PPO run (checkpoints 1 and 2); tests work on copies of it."""
    base = tmp_path_factory.mktemp("trained")
    assert run_cli("run", plan_file(base), "--output-dir", base / "runs", "--quiet") == 0
    return (base / "runs" / "tiny" / "latest").resolve()


@pytest.fixture
def run_dir(trained_run, tmp_path, capsys):
    """A private copy of the trained run at runs/tiny/<stamp>, with runs/tiny/latest."""
    copy = tmp_path / "runs" / "tiny" / trained_run.name
    shutil.copytree(trained_run, copy)
    (copy.parent / "latest").symlink_to(copy.name)
    capsys.readouterr()
    return copy


def corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- a refused resume changes nothing ------------------------------------------------------------
def _wrong_plan(tmp_path, run_dir):
    return plan_file(tmp_path, run="A2C", name="a2c.yaml"), run_dir, "the run trained PPO on CartPole-v1"


def _wrong_env(tmp_path, run_dir):
    return plan_file(tmp_path, env="Acrobot-v1", name="acrobot.yaml"), run_dir, "is PPO on Acrobot-v1"


def _model_does_not_fit(tmp_path, run_dir):
    return (plan_file(tmp_path, extra=", model: {hidden: [8]}", name="small.yaml"), run_dir,
            "checkpoint_000002: does not fit this plan's model")


def _corrupt_newest(tmp_path, run_dir):
    corrupt(run_dir / "checkpoints" / "checkpoint_000002" / "model.pt")
    older = run_dir / "checkpoints" / "checkpoint_000001"
    return plan_file(tmp_path), run_dir, f"the newest readable checkpoint is {older} (--resume {older} continues"


def _corrupt_progress_of_explicit_checkpoint(tmp_path, run_dir):
    checkpoint = run_dir / "checkpoints" / "checkpoint_000001"
    (checkpoint / "progress.json").write_text("{\"training_iteration\": ")
    return plan_file(tmp_path), checkpoint, "checkpoint_000001/progress.json: unreadable"


@pytest.mark.parametrize("case", [_wrong_plan, _wrong_env, _model_does_not_fit, _corrupt_newest,
                                  _corrupt_progress_of_explicit_checkpoint])
def test_a_refused_resume_changes_no_byte_of_the_run_dir(tmp_path, run_dir, capsys, case):
    plan, resume, message = case(tmp_path, run_dir)
    before = snapshot(run_dir)
    assert run_cli("run", plan, "--resume", resume, "--quiet", "--set", "stop.timesteps_total=1024") == 2
    err = capsys.readouterr().err
    assert err.startswith("flowrl: error: ") and err.count("\n") == 1 and message in err, err
    assert snapshot(run_dir) == before  # config.yaml, metrics, progress.csv, events, checkpoints
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == sorted([run_dir.name, "latest"])


def test_eval_of_the_run_still_works_after_a_refused_resume(tmp_path, run_dir, capsys):
    assert run_cli("run", plan_file(tmp_path, run="A2C"), "--resume", run_dir, "--quiet") == 2
    assert run_cli("eval", run_dir, "--episodes", "1") == 0
    assert "greedy episodes on CartPole-v1" in capsys.readouterr().out


# ---- resuming from one checkpoint of a run -------------------------------------------------------
def test_resume_from_a_checkpoint_dir_continues_its_run(tmp_path, run_dir, capsys):
    checkpoint = run_dir / "checkpoints" / "checkpoint_000001"
    assert run_cli("run", plan_file(tmp_path, steps=768), "--resume", checkpoint, "--quiet") == 0
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.pt", "optimizer.pt", "progress.json"]
    rows = rows_of(run_dir)
    # iterations 1, 2 of the first run, then 2, 3 again from checkpoint 1's counters
    assert [(r["training_iteration"], r["timesteps_total"]) for r in rows] == [(1, 256), (2, 512), (2, 512),
                                                                              (3, 768)]
    assert (run_dir / "checkpoints" / "checkpoint_000003" / "model.pt").is_file()
    assert f"run dir {run_dir}" in capsys.readouterr().out


def test_resume_of_an_experiment_dir_continues_its_latest_run(tmp_path, run_dir):
    assert run_cli("run", plan_file(tmp_path, steps=768), "--resume", run_dir.parent, "--quiet") == 0
    assert [r["training_iteration"] for r in rows_of(run_dir)] == [1, 2, 3]


# ---- an unreadable newest checkpoint -------------------------------------------------------------
def test_resume_names_the_newest_readable_checkpoint_which_resumes(tmp_path, run_dir, capsys):
    newest = run_dir / "checkpoints" / "checkpoint_000002"
    corrupt(newest / "optimizer.pt")
    plan = plan_file(tmp_path, steps=768)
    assert run_cli("run", plan, "--resume", run_dir, "--quiet") == 2
    err = capsys.readouterr().err
    older = run_dir / "checkpoints" / "checkpoint_000001"
    assert f"{newest / 'optimizer.pt'}: cannot be read as a tensor checkpoint" in err
    assert f"the newest readable checkpoint is {older}" in err
    assert run_cli("run", plan, "--resume", older, "--quiet") == 0
    assert [r["training_iteration"] for r in rows_of(run_dir)][-2:] == [2, 3]


def test_eval_falls_back_to_the_newest_readable_checkpoint_with_one_warning(run_dir, capsys):
    newest = run_dir / "checkpoints" / "checkpoint_000002"
    corrupt(newest / "model.pt")
    assert run_cli("eval", run_dir, "--episodes", "1", "--json") == 0
    out, err = capsys.readouterr()
    older = run_dir / "checkpoints" / "checkpoint_000001"
    assert err.startswith(f"flowrl: warning: {newest / 'model.pt'}: cannot be read as a tensor checkpoint (")
    assert err.count("\n") == 1 and err.endswith(f"; using the newest readable checkpoint, {older}\n")
    assert json.loads(out)["checkpoint"] == str(older)


def test_eval_with_no_readable_checkpoint_says_so(run_dir, capsys):
    for checkpoint in (run_dir / "checkpoints").iterdir():
        corrupt(checkpoint / "model.pt")
    assert run_cli("eval", run_dir) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint_000002/model.pt: cannot be read" in err
    assert err.rstrip().endswith("no older checkpoint is readable either")


# ---- run directories of launches in the same second ----------------------------------------------
def test_launches_in_the_same_second_each_get_their_own_run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "_timestamp", lambda: "2025-01-01_00-00-00")
    for attempt in range(3):  # the race is real: without atomic mkdir a round of 8 fails about always
        output = tmp_path / f"attempt{attempt}"
        barrier = threading.Barrier(8)
        made, errors = [], []

        def launch():
            barrier.wait()
            try:
                made.append(experiment.new_run_dir(output, "exp"))
            except Exception as e:  # noqa: BLE001 - any error is the failure under test
                errors.append(e)

        threads = [threading.Thread(target=launch) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        names = sorted(p.name for p in made)
        assert names == ["2025-01-01_00-00-00"] + [f"2025-01-01_00-00-00_{i}" for i in range(1, 8)]
        latest = output / "exp" / "latest"
        assert latest.is_symlink() and os.readlink(latest) in names
        assert sorted(p.name for p in (output / "exp").iterdir()) == sorted(names + ["latest"])  # no temp links


# ---- progress.csv keeps every key ----------------------------------------------------------------
def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_progress_csv_keeps_keys_that_appear_later_and_stays_aligned_on_resume(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write({"training_iteration": 1, "timesteps_total": 10})
    writer.write({"training_iteration": 2, "timesteps_total": 20, "evaluation": {"episode_return_mean": 5.5}})
    writer.close()
    assert read_csv(tmp_path / "progress.csv") == [
        {"training_iteration": "1", "timesteps_total": "10", "evaluation/episode_return_mean": ""},
        {"training_iteration": "2", "timesteps_total": "20", "evaluation/episode_return_mean": "5.5"}]
    resumed = MetricsWriter(tmp_path)  # keys in another order, one new
    resumed.write({"evaluation": {"episode_return_mean": 7.0}, "timesteps_total": 30, "training_iteration": 3})
    resumed.write({"timesteps_total": 40, "training_iteration": 4, "kl_coeff": 0.25})
    resumed.close()
    assert (tmp_path / "progress.csv").read_text().splitlines()[0] == \
        "training_iteration,timesteps_total,evaluation/episode_return_mean,kl_coeff"
    assert read_csv(tmp_path / "progress.csv")[2:] == [
        {"training_iteration": "3", "timesteps_total": "30", "evaluation/episode_return_mean": "7.0", "kl_coeff": ""},
        {"training_iteration": "4", "timesteps_total": "40", "evaluation/episode_return_mean": "", "kl_coeff": "0.25"}]
    assert not list(tmp_path.glob(".progress.csv*"))


# ---- config.yaml keeps integer stop values -------------------------------------------------------
def test_integer_stop_values_stay_integers_in_config_yaml(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 100000, episode_return_mean: 475.5}}")
    exp, = load_experiments(path)
    text = yaml.safe_dump(exp.resolved(), sort_keys=False)
    assert "timesteps_total: 100000\n" in text and "episode_return_mean: 475.5\n" in text
    assert type(exp.stop["timesteps_total"]) is int
    assert experiment.stop_reason(exp.stop, {"timesteps_total": 100000}) == "timesteps_total 100000 >= 100000"


def test_the_run_dir_config_yaml_has_integer_stop_values(run_dir):
    stop = yaml.safe_load((run_dir / "config.yaml").read_text())["tiny"]["stop"]
    assert stop == {"timesteps_total": 512} and type(stop["timesteps_total"]) is int


# ---- output into a closed pipe -------------------------------------------------------------------
def test_output_into_a_closed_pipe_stops_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "plans"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert err == b"" and proc.returncode == 141


def test_plans_piped_into_head_has_an_empty_stderr():
    proc = subprocess.run(f"'{sys.executable}' -m flowrl.cli plans | head -1", shell=True, capture_output=True,
                          cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=60)
    assert proc.stdout == b"PPO:\n" and proc.stderr == b""


# ---- flowrl plot on empty or partly written metrics ----------------------------------------------
def metrics_dir(tmp_path, name, text):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "metrics.jsonl").write_text(text)
    return directory


ROW = '{{"training_iteration": {i}, "timesteps_total": {steps}, "episode_return_mean": {ret}}}\n'


def test_plot_of_empty_metrics_is_one_line_and_exit_2(tmp_path, capsys):
    empty = metrics_dir(tmp_path, "empty", "")
    assert run_cli("plot", empty, "-o", tmp_path / "curve.png") == 2
    err = capsys.readouterr().err
    assert err == f"flowrl: error: no data to plot: {empty / 'metrics.jsonl'}: no rows yet\n"
    assert not (tmp_path / "curve.png").exists()
    no_returns = metrics_dir(tmp_path, "no_returns", ROW.format(i=1, steps=100, ret="null"))
    assert run_cli("plot", no_returns, "-o", tmp_path / "curve.png") == 2
    assert "no_returns/metrics.jsonl: no episode_return_mean yet" in capsys.readouterr().err


def test_plot_skips_a_truncated_last_line_with_a_warning(tmp_path, capsys):
    text = ROW.format(i=1, steps=100, ret=9.5) + ROW.format(i=2, steps=200, ret=12.0)
    running = metrics_dir(tmp_path, "running", text + '{"training_iteration": 3, "timeste')
    assert run_cli("plot", running, "-o", tmp_path / "curve.png") == 0
    assert capsys.readouterr().err == (f"flowrl: warning: {running / 'metrics.jsonl'}: line 3: incomplete (a run "
                                       "still writing it?); left out\n")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_the_file_line_of_a_bad_line(tmp_path, capsys):
    text = ROW.format(i=1, steps=100, ret=9.5) + '{"training_iteration": 2,\n' + ROW.format(i=3, steps=300, ret=1)
    bad = metrics_dir(tmp_path, "bad", text)
    assert run_cli("plot", bad, "-o", tmp_path / "curve.png") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flowrl: error: {bad / 'metrics.jsonl'}: line 2: not JSON") and err.count("\n") == 1


def test_plot_leaves_out_an_empty_run_with_a_warning(tmp_path, capsys):
    good = metrics_dir(tmp_path, "good", ROW.format(i=1, steps=100, ret=9.5))
    empty = metrics_dir(tmp_path, "empty", "")
    assert run_cli("plot", good, empty, "-o", tmp_path / "curve.png") == 0
    assert capsys.readouterr().err == f"flowrl: warning: {empty / 'metrics.jsonl'}: no rows yet; left out of the plot\n"


# ---- flowrl eval paths ---------------------------------------------------------------------------
def test_eval_of_a_missing_path_says_so(tmp_path, capsys):
    assert run_cli("eval", tmp_path / "runs" / "nope") == 2
    assert capsys.readouterr().err == f"flowrl: error: {tmp_path / 'runs' / 'nope'}: no such file or directory\n"
    (tmp_path / "notes.txt").write_text("")
    assert run_cli("eval", tmp_path / "notes.txt") == 2
    assert capsys.readouterr().err == (f"flowrl: error: {tmp_path / 'notes.txt'}: not a directory; expected a run, "
                                       "checkpoint or experiment directory\n")


def test_eval_of_an_experiment_dir_uses_its_latest_run(run_dir, capsys):
    assert run_cli("eval", run_dir.parent, "--episodes", "1") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run_dir.parent / 'latest' / 'checkpoints' / 'checkpoint_000002'}: 1 greedy episodes")
    (run_dir.parent / "latest").unlink()
    assert run_cli("eval", run_dir.parent) == 2
    assert capsys.readouterr().err == (f"flowrl: error: {run_dir.parent}: an experiment directory without a `latest` "
                                       f"run; give one of its runs, such as {run_dir}\n")


# ---- env families whose package is missing -------------------------------------------------------
@pytest.mark.parametrize("env, module, message", [
    ("ALE/Pong-v5", "ale_py", "env: 'ALE/Pong-v5' needs ale-py (pip install 'flowrl[atari]')"),
    ("HalfCheetah-v5", "mujoco", "env: 'HalfCheetah-v5' needs mujoco (pip install 'flowrl[mujoco]')"),
    ("minari:D4RL/door/human-v2", "minari",
     "env: 'minari:D4RL/door/human-v2' needs minari (pip install 'flowrl[minari]')"),
    ("MinAtar/Breakout-v1", "minatar", "env: 'MinAtar/Breakout-v1' needs minatar (pip install 'flowrl[minatar]')"),
])
def test_an_env_whose_package_is_missing_names_what_to_install(tmp_path, capsys, monkeypatch, env, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError, installed or not
    plan = plan_file(tmp_path, env=env)
    assert run_cli("run", plan, "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err == f"flowrl: error: {plan}: experiment 'tiny': {message}\n"
    assert not (tmp_path / "runs").exists()


def test_mujoco_and_ale_py_are_absent_here_and_their_ids_still_say_what_to_install(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("mujoco") or importlib.util.find_spec("ale_py"):
        pytest.skip("mujoco or ale-py is installed")
    assert run_cli("run", plan_file(tmp_path, env="Hopper-v5"), "--output-dir", tmp_path / "runs") == 2
    assert "'Hopper-v5' needs mujoco (pip install 'flowrl[mujoco]')" in capsys.readouterr().err


def test_a_minari_dataset_given_as_env_is_pointed_to_config_input(tmp_path, capsys):
    pytest.importorskip("minari")
    assert run_cli("run", plan_file(tmp_path, env="minari:D4RL/door/human-v2"), "--output-dir", tmp_path) == 2
    assert "is a Minari dataset, not an env: give it as config.input" in capsys.readouterr().err


# ---- no colour codes from Ray in redirected output -----------------------------------------------
class ExplodingEnv(gym.Env):
    """Raises in its sixth step, so the remote worker's RayTaskError reaches the driver."""

    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t > 5:
            raise RuntimeError("the env exploded")
        return np.zeros(1, np.float32), 1.0, False, False, {}


def test_ray_error_text_in_redirected_output_has_no_colour_codes(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("""
boom:
  env: tests.test_run_dirs:ExplodingEnv
  run: PPO
  stop: {timesteps_total: 512}
  config: {train_batch_size: 64, sgd_minibatch_size: 32, num_sgd_iter: 1, rollout_fragment_length: 32,
           num_envs_per_worker: 1, num_workers: 1, num_cpus_per_worker: 0.5, max_actor_restarts: 0}
""")
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "run", str(plan), "--executor", "ray",
                               "--num-cpus", "1", "--output-dir", str(tmp_path / "runs")], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT, timeout=300)
    output = log.read_bytes()
    assert proc.returncode != 0 and b"the env exploded" in output  # Ray's error text reached the file
    assert b"\x1b[" not in output, output.decode(errors="replace")[-2000:]


def test_colour_codes_in_any_message_are_dropped_when_output_is_not_a_terminal(monkeypatch, capsys):
    from flowrl import cli

    monkeypatch.setenv("RAY_COLOR_PREFIX", "")  # restored (unset) after the test
    monkeypatch.delenv("RAY_COLOR_PREFIX")

    def colourful(args):
        print("\x1b[36mray::RolloutWorker.sample()\x1b[39m (pid=1)")
        print("\x1b[1m\x1b[32mbright\x1b[0m", file=sys.stderr)
        return 0

    monkeypatch.setattr(cli, "_plans", colourful)
    assert run_cli("plans") == 0
    assert capsys.readouterr() == ("ray::RolloutWorker.sample() (pid=1)\n", "bright\n")
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
