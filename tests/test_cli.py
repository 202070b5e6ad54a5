"""The flowrl command line: runs, run directories, checkpoints, and one-line errors on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.cli import main

ROOT = Path(__file__).resolve().parent.parent

SMALL = """
tiny:
  env: CartPole-v1
  run: PPO
  stop: {{timesteps_total: {steps}}}
  config: {{train_batch_size: 256, sgd_minibatch_size: 128, num_sgd_iter: 2, num_envs_per_worker: 4,
           rollout_fragment_length: 32, checkpoint_freq: 1, seed: 0}}
"""


def write(tmp_path, text, name="plan.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_run_writes_the_run_directory(tmp_path, capsys):
    plan = write(tmp_path, SMALL.format(steps=1024))
    assert run_cli("run", plan, "--output-dir", tmp_path / "runs") == 0
    run_dir = (tmp_path / "runs" / "tiny" / "latest").resolve()
    assert {"config.yaml", "metrics.jsonl", "progress.csv", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4]
    for key in ("timesteps_total", "episode_return_mean", "episode_len_mean", "time_total_s", "env_steps_per_s",
                "total_loss", "policy_loss", "vf_loss"):
        assert key in rows[-1]
    assert rows[-1]["timesteps_total"] == 1024
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["tiny"]
    assert resolved["plan"] == "PPO" and resolved["config"]["lr"] == 3e-4 and resolved["config"]["gamma"] == 0.99
    assert (run_dir / "progress.csv").read_text().splitlines()[0].startswith("training_iteration,")
    out = capsys.readouterr().out
    assert "tiny: done at iteration 4 (timesteps_total 1024 >= 1024)" in out
    checkpoint = run_dir / "checkpoints" / "checkpoint_000004"
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_eval_prints_mean_return_and_json(tmp_path, capsys):
    run_cli("run", write(tmp_path, SMALL.format(steps=512)), "--output-dir", tmp_path / "runs", "--quiet")
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "tiny" / "latest"
    assert run_cli("eval", run_dir, "--episodes", "2", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 2 and result["episode_return_mean"] > 0
    assert run_cli("eval", run_dir / "checkpoints" / "checkpoint_000002", "--episodes", "1") == 0
    assert "greedy episodes on CartPole-v1" in capsys.readouterr().out


def test_resume_continues_counters_optimizer_and_iterations(tmp_path, capsys):
    plan = write(tmp_path, SMALL.format(steps=512))
    run_cli("run", plan, "--output-dir", tmp_path / "runs", "--quiet")
    run_dir = (tmp_path / "runs" / "tiny" / "latest").resolve()
    optimizer_before = torch.load(run_dir / "checkpoints" / "checkpoint_000002" / "optimizer.pt", weights_only=True)
    assert run_cli("run", plan, "--resume", run_dir, "--set", "stop.timesteps_total=1024", "--quiet") == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["timesteps_total"] for r in rows] == [256, 512, 768, 1024]
    assert rows[2]["weights_version"] == 3 and rows[2]["time_total_s"] > rows[1]["time_total_s"]
    optimizer_after = torch.load(run_dir / "checkpoints" / "checkpoint_000004" / "optimizer.pt", weights_only=True)
    steps_before = optimizer_before["state"][0]["step"].item()
    assert optimizer_after["state"][0]["step"].item() == steps_before * 2  # Adam's step count went on


def test_plans_lists_builtin_plans_with_defaults(capsys):
    assert run_cli("plans") == 0
    out = capsys.readouterr().out
    for text in ("PPO:", "A2C:", "APPO:", "  clip_param: 0.2", "  num_sgd_iter: 10"):
        assert text in out


def test_plot_writes_a_png(tmp_path, capsys):
    run_cli("run", write(tmp_path, SMALL.format(steps=512)), "--output-dir", tmp_path / "runs", "--quiet")
    out = tmp_path / "curve.png"
    assert run_cli("plot", tmp_path / "runs" / "tiny" / "latest", "-o", out) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_plan_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert run_cli("run", "examples/custom_plan.yaml", "--output-dir", tmp_path / "runs", "--quiet",
                   "--set", "stop.timesteps_total=2048") == 0
    assert "cartpole-reinforce: done" in capsys.readouterr().out


# ---- bad input: one line naming file, experiment and key; exit 2; nothing created ----------------
BAD = [
    ("x: [", "plan.yaml: not valid YAML (line 1)"),
    ("- a\n- b", "plan.yaml: expected a mapping of experiment names"),
    ("e: {env: CartPole-v1, run: PPO, stopp: {timesteps_total: 10}}",
     "experiment 'e': stopp: unknown key; did you mean 'stop'?"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {lamda_: 0.9}}",
     "experiment 'e': config.lamda_: unknown key; did you mean 'lambda_'?"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {num_worker: 1}}",
     "experiment 'e': config.num_worker: unknown key; did you mean 'num_workers'?"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {lr: abc}}",
     "experiment 'e': config.lr: expected a number, got 'abc'"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {gamma: 2}}",
     "experiment 'e': config.gamma: must be in [0, 1], got 2.0"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {sgd_minibatch_size: 4096}}",
     "experiment 'e': config.sgd_minibatch_size: 4096 exceeds train_batch_size 2048"),
    ("e: {env: CartPole-v2, run: PPO, stop: {timesteps_total: 10}}",
     "experiment 'e': env: unknown env 'CartPole-v2'; did you mean 'CartPole-v1'?"),
    ("e: {env: CartPole-v1, run: PPPO, stop: {timesteps_total: 10}}",
     "experiment 'e': run: unknown plan 'PPPO'; did you mean 'PPO'?"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timestep_total: 10}}",
     "experiment 'e': stop.timestep_total: unknown stop key; did you mean 'timesteps_total'?"),
    ("e: {env: CartPole-v1, run: PPO}", "experiment 'e': stop: missing"),
    ("e: {env: CartPole-v1, run: APPO, stop: {timesteps_total: 10}, config: {num_workers: 0}}",
     "experiment 'e': config.num_workers: APPO samples asynchronously and needs num_workers >= 1"),
    ("e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {model: {hiden: [8]}}}",
     "experiment 'e': config.model.hiden: unknown key; did you mean 'hidden'?"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_plan_files_give_one_line_and_exit_2(tmp_path, capsys, text, message):
    plan = write(tmp_path, text)
    assert run_cli("run", plan, "--output-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flowrl: error: ") and str(plan) in err, err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_override_and_missing_file(tmp_path, capsys):
    plan = write(tmp_path, SMALL.format(steps=256))
    assert run_cli("run", plan, "--set", "config.lr") == 2
    assert "--set 'config.lr': expected KEY=VALUE" in capsys.readouterr().err
    assert run_cli("run", plan, "--set", "config.lr=-1") == 2
    assert "config.lr: must be > 0" in capsys.readouterr().err
    assert run_cli("run", tmp_path / "nope.yaml") == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_bad_checkpoints_and_run_dirs(tmp_path, capsys):
    assert run_cli("eval", tmp_path) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    run_cli("run", write(tmp_path, SMALL.format(steps=256)), "--output-dir", tmp_path / "runs", "--quiet")
    capsys.readouterr()
    checkpoint = (tmp_path / "runs" / "tiny" / "latest" / "checkpoints" / "checkpoint_000001").resolve()
    data = (checkpoint / "model.pt").read_bytes()
    (checkpoint / "model.pt").write_bytes(data[: len(data) // 2])
    assert run_cli("eval", checkpoint) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint / 'model.pt'}: cannot be read as a tensor checkpoint" in err and err.count("\n") == 1


def test_pickled_checkpoint_is_refused(tmp_path, capsys):
    run_cli("run", write(tmp_path, SMALL.format(steps=256)), "--output-dir", tmp_path / "runs", "--quiet")
    checkpoint = (tmp_path / "runs" / "tiny" / "latest" / "checkpoints" / "checkpoint_000001").resolve()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Payload()}, checkpoint / "model.pt")
    capsys.readouterr()
    assert run_cli("eval", checkpoint) == 2
    assert not (tmp_path / "pwned").exists()
    assert "cannot be read as a tensor checkpoint" in capsys.readouterr().err


def test_console_script_bad_input_has_no_traceback(tmp_path):
    plan = write(tmp_path, "e: {env: CartPole-v1, run: PPO, stop: {timesteps_total: 10}, config: {lr: abc}}")
    proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "run", str(plan)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    import signal
    import time

    plan = write(tmp_path, SMALL.format(steps=10_000_000).replace("checkpoint_freq: 1", "checkpoint_freq: 0"))
    proc = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "run", str(plan), "--output-dir",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait for the first iteration
            if "iter" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "stopping after this iteration" in rest and "interrupted; checkpoint saved" in rest
    assert list((tmp_path / "runs" / "tiny" / "latest" / "checkpoints").glob("checkpoint_*/model.pt"))


def test_same_plan_file_runs_on_the_ray_executor(tmp_path, capsys, ray_session):
    plan = write(tmp_path, SMALL.format(steps=1024).replace("seed: 0", "seed: 0, num_cpus_per_worker: 0.5"))
    assert run_cli("run", plan, "--executor", "ray", "--num-workers", "2", "--output-dir", tmp_path / "runs",
                   "--quiet") == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "latest" / "metrics.jsonl").open()]
    # 2 workers x 4 envs x 32 steps = one 256-row train batch per iteration
    assert rows[-1]["timesteps_total"] == 1024 and rows[-1]["weights_version"] == len(rows) == 4
    resolved = yaml.safe_load((tmp_path / "runs" / "tiny" / "latest" / "config.yaml").read_text())
    assert resolved["tiny"]["config"]["num_workers"] == 2


def test_several_experiments_in_one_file_run_in_turn(tmp_path, capsys):
    text = SMALL.format(steps=256) + SMALL.format(steps=512).replace("tiny:", "second:").replace("run: PPO", "run: A2C") \
        .replace(", sgd_minibatch_size: 128, num_sgd_iter: 2", "").replace("train_batch_size: 256", "lr: 0.001")
    assert run_cli("run", write(tmp_path, text), "--output-dir", tmp_path / "runs", "--quiet") == 0
    out = capsys.readouterr().out
    assert out.index("tiny: done") < out.index("second: done")
    assert (tmp_path / "runs" / "second" / "latest" / "metrics.jsonl").exists()


def test_ray_workers_import_a_user_env_from_the_working_directory(tmp_path, capsys, monkeypatch, ray_session):
    monkeypatch.chdir(ROOT)
    plan = write(tmp_path, """
countdown:
  env: tests.test_rollouts:CountdownEnv
  run: PPO
  stop: {timesteps_total: 512}
  config: {num_envs_per_worker: 2, rollout_fragment_length: 64, train_batch_size: 256, sgd_minibatch_size: 128,
           num_cpus_per_worker: 0.5, env_config: {length: 4}}
""")
    assert run_cli("run", plan, "--executor", "ray", "--num-workers", "2", "--output-dir", tmp_path / "runs",
                   "--quiet") == 0
    assert "episode_return_mean 4.00" in capsys.readouterr().out
