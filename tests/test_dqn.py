"""DQN: the Q-learning loss against answers worked out by hand, the Q-network and its policy,
the operators it adds to (TrainOneStep's per-row arrays, UpdateTargetNetwork's Polyak option),
and the plan end to end: learning on the local executor, remote workers on Ray, checkpoints,
`flowrl eval`, and one-line errors on bad input."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

import flowrl
from flowrl.cli import main
from flowrl.experiment import load_experiments, run_experiment
from flowrl.operators import TrainOneStep, UpdateTargetNetwork
from flowrl.plan import Plan
from flowrl.plans.dqn import huber, q_learning_loss
from flowrl.progress import progress_line
from flowrl.policy import register_model
from flowrl.policy import NatureCNN
from flowrl.q_policy import QNetwork, QPolicy
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Stream

ROOT = Path(__file__).resolve().parent.parent


# ---- the loss, by hand -----------------------------------------------------------------------
def test_huber_is_quadratic_inside_one_and_linear_outside():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.2, 1.0, 2.5])
    expected = [2.5, 0.5, 0.125, 0.0, 0.02, 0.5, 2.0]
    assert huber(x).tolist() == pytest.approx(expected, abs=1e-7)


# Two rows, two actions. Row 0 continues (n-step discount 0.9), row 1 terminated.
Q_VALUES = [[1.0, 2.0], [0.5, -1.0]]       # Q(s_t, .); a_t = 1, 0  ->  Q(s_t, a_t) = 2.0, 0.5
Q_NEXT_ONLINE = [[0.0, 3.0], [1.0, 0.0]]   # argmax: 1, 0
Q_NEXT_TARGET = [[4.0, 1.0], [2.0, 5.0]]   # its own argmax: 0, 1


def _loss(double_q, weights=(1.0, 0.5)):
    q_values = torch.tensor(Q_VALUES, requires_grad=True)
    loss, td_error = q_learning_loss(q_values, torch.tensor([1, 0]),
                                     torch.tensor(Q_NEXT_ONLINE) if double_q else None, torch.tensor(Q_NEXT_TARGET),
                                     rewards=torch.tensor([1.0, 0.0]), discounts=torch.tensor([0.9, 0.81]),
                                     terminateds=torch.tensor([False, True]), weights=torch.tensor(weights))
    loss.backward()
    return loss, td_error, q_values.grad


def test_double_q_loss_by_hand():
    loss, td_error, grad = _loss(double_q=True)
    # a* = (1, 0) from the online net, scored by the target: Q_target(s', a*) = (1.0, 2.0)
    # y = (1 + 0.9 * 1.0, 0 + 0.81 * 0 * 2.0) = (1.9, 0.0); delta = (2.0 - 1.9, 0.5 - 0.0) = (0.1, 0.5)
    assert td_error.tolist() == pytest.approx([0.1, 0.5], abs=1e-6)
    # huber = (0.005, 0.125), weighted by (1, 0.5): mean(0.005, 0.0625) = 0.03375
    assert loss.item() == pytest.approx(0.03375, abs=1e-7)
    # dL/dQ(s, a) = w * huber'(delta) / N at the actions taken, 0 elsewhere
    assert grad.flatten().tolist() == pytest.approx([0.0, 0.05, 0.125, 0.0], abs=1e-7)


def test_plain_dqn_loss_takes_the_target_networks_max_by_hand():
    loss, td_error, _ = _loss(double_q=False, weights=(1.0, 1.0))
    # y = (1 + 0.9 * max(4, 1), 0) = (4.6, 0); delta = (-2.6, 0.5); huber = (2.1, 0.125)
    assert td_error.tolist() == pytest.approx([-2.6, 0.5], abs=1e-6)
    assert loss.item() == pytest.approx((2.1 + 0.125) / 2, abs=1e-6)


def test_dqn_loss_under_prioritized_replay_gives_each_replayed_rows_td_error():
    import copy

    from flowrl.operators.replay import ReplayBuffer
    from flowrl.plans.dqn import DQNConfig, dqn_loss

    policy = QPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), {"hidden": [8]}, seed=0)
    policy.target_model = copy.deepcopy(policy.model)
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(64, prioritized=True, seed=0)
    buffer.add(SampleBatch({"obs": rng.standard_normal((64, 4)).astype(np.float32), "actions": rng.integers(0, 2, 64),
                            "rewards": np.ones(64, np.float32), "new_obs": rng.standard_normal((64, 4)).astype(np.float32),
                            "terminateds": rng.random(64) < 0.2}))
    batch = buffer.sample(16).to_torch()
    config = DQNConfig(prioritized_replay=True, double_q=False)
    loss, stats = dqn_loss(policy, batch, config)
    assert isinstance(stats["td_error"], np.ndarray) and stats["td_error"].shape == (16,)
    assert (stats["batch_indexes"] == batch["batch_indexes"].numpy()).all()
    with torch.no_grad():
        q = policy.model(batch["obs"]).gather(1, batch["actions"].long()[:, None]).squeeze(1)
        y = batch["rewards"] + batch["discounts"] * (~batch["terminateds"]) * policy.target_model(batch["new_obs"]).max(1).values
    assert np.allclose(stats["td_error"], (q - y).numpy(), atol=1e-6)
    assert "td_error" not in dqn_loss(policy, batch, DQNConfig())[1]  # uniform replay: no per-row arrays


# ---- the Q-network and its policy --------------------------------------------------------------
def test_dueling_head_gives_q_whose_mean_over_actions_is_the_value():
    torch.manual_seed(0)
    net = QNetwork(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(3), 3, {"hidden": [8], "dueling": True})
    obs = torch.randn(5, 4)
    features = net.encoder(obs)
    q = net(obs)
    assert torch.allclose(q.mean(-1), net.value(features).squeeze(-1), atol=1e-6)
    assert torch.allclose(q - q.mean(-1, keepdim=True), net.advantage(features) -
                          net.advantage(features).mean(-1, keepdim=True), atol=1e-6)
    plain = QNetwork(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(3), 3, {"hidden": [8], "dueling": False})
    assert plain.value is None and plain(obs).shape == (5, 3)


def test_q_network_reads_uint8_images_with_the_nature_cnn():
    space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    net = QNetwork(space, gym.spaces.Discrete(6), 6, {})
    assert isinstance(net.encoder, NatureCNN)
    q = net(torch.zeros(2, 84, 84, 4, dtype=torch.uint8))
    assert q.shape == (2, 6) and q.dtype == torch.float32


def test_custom_q_model_by_registered_name():
    class Constant(torch.nn.Module):
        def __init__(self, observation_space, action_space, num_outputs, model_config):
            super().__init__()
            self.q = torch.nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))

        def forward(self, obs):
            return self.q.expand(len(obs), 3)

    register_model("constant_q", Constant)
    policy = QPolicy(gym.spaces.Box(-1, 1, (2,)), gym.spaces.Discrete(3), {"custom_model": "constant_q"}, epsilon=0.0)
    assert policy.compute_actions(np.zeros((4, 2), np.float32)).actions.tolist() == [1, 1, 1, 1]


def test_epsilon_greedy_acts_greedily_at_0_and_uniformly_at_1():
    policy = QPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(3, start=1), seed=0, epsilon=0.0)
    obs = np.random.default_rng(0).standard_normal((4000, 4)).astype(np.float32)
    greedy = policy.model(torch.as_tensor(obs)).argmax(1).numpy()
    out = policy.compute_actions(obs)
    assert (out.actions == greedy).all() and (out.env_actions == greedy + 1).all()
    policy.epsilon = 1.0
    counts = np.bincount(policy.compute_actions(obs).actions, minlength=3)
    assert (np.abs(counts / len(obs) - 1 / 3) < 0.03).all()
    assert (policy.compute_actions(obs, explore=False).actions == greedy).all()  # evaluation ignores epsilon


def test_epsilon_travels_with_the_weights():
    learner = QPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=0, epsilon=0.3)
    worker = QPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=1, epsilon=1.0)
    worker.set_weights(learner.get_weights(), version=7)
    assert worker.epsilon == pytest.approx(0.3) and worker.weights_version == 7
    obs = torch.randn(3, 4)
    assert torch.equal(worker.model(obs), learner.model(obs))


# ---- operators -------------------------------------------------------------------------------
def test_train_one_step_passes_per_row_arrays_through_in_training_order():
    workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    batch = SampleBatch({"obs": np.zeros((8, 4), np.float32), "row": np.arange(8)})

    def loss(policy, b):
        value = policy.model(b["obs"])[1].mean()
        return value, {"value": value, "row": b["row"].numpy() * 10, "td_error": b["row"].numpy().astype(float)}

    op = TrainOneStep(workers, loss, num_sgd_iter=1, sgd_minibatch_size=3, seed=0)
    with Plan(Stream.from_iterable([batch]).then(op)) as plan:
        result = plan.step()
    # Minibatches of 3, 3, 2 in a shuffled order: the arrays are joined in that order, row for row.
    assert isinstance(result["row"], np.ndarray) and sorted(result["row"].tolist()) == list(range(0, 80, 10))
    assert (result["row"] == 10 * result["td_error"]).all()
    assert isinstance(result["value"], float)


def test_update_target_network_polyak_by_hand():
    workers = WorkerSet(env="CartPole-v1", rollout_fragment_length=4, seed=0)
    policy = workers.policy
    op = UpdateTargetNetwork(workers, every_steps=1, tau=0.25)
    with Plan(Stream.from_iterable(range(2)).then(op)) as plan:
        plan.start()
        op.setup(plan.ctx)
        online = next(iter(policy.model.parameters()))
        target = next(iter(policy.target_model.parameters()))
        with torch.no_grad():
            online.fill_(1.0)
            target.fill_(5.0)
        plan.ctx.counters["num_env_steps_trained"] = 10
        op(None)        # 0.25 * 1 + 0.75 * 5 = 4
        assert torch.allclose(target, torch.full_like(target, 4.0))
        plan.ctx.counters["num_env_steps_trained"] = 20
        op(None)        # 0.25 * 1 + 0.75 * 4 = 3.25
        assert torch.allclose(target, torch.full_like(target, 3.25))
    with pytest.raises(ValueError, match="tau"):
        UpdateTargetNetwork(workers, every_steps=1, tau=2.0)


def test_evaluation_plays_episodes_side_by_side_as_it_would_one_by_one():
    from flowrl.policy import TorchPolicy
    from flowrl.rollout import evaluate_policy

    policy = TorchPolicy(gym.spaces.Box(-5, 5, (4,)), gym.spaces.Discrete(2), seed=3)
    threads = torch.get_num_threads()
    one_by_one = evaluate_policy(policy, "CartPole-v1", episodes=7, seed=5, parallel=1, with_lengths=True)
    side_by_side = evaluate_policy(policy, "CartPole-v1", episodes=7, seed=5, parallel=3, with_lengths=True)
    assert side_by_side == one_by_one
    assert torch.get_num_threads() == threads  # it plays on one thread and gives the caller's back
    returns, lengths = one_by_one
    assert returns == [float(n) for n in lengths] and len(set(lengths)) > 1  # CartPole pays 1 per step


# ---- the plan ----------------------------------------------------------------------------------
def train(tmp_path, overrides=(), executor="local", name="dqn_cartpole"):
    (exp,) = load_experiments(ROOT / "examples" / f"{name}.yaml", list(overrides), seed=0)
    return run_experiment(exp, tmp_path, executor, quiet=True)


def test_dqn_cartpole_learns_a_greedy_policy(tmp_path):
    # the example stops once 10 greedy episodes average 475 (CartPole's maximum is 500)
    result = train(tmp_path, [("stop.timesteps_total", 30_000)])
    evaluation = result.get("evaluation", {})  # absent when the budget ran out between evaluations
    assert evaluation.get("episode_return_mean", 0) >= 475, (result["timesteps_total"], evaluation)
    assert 0.04 <= result["epsilon"] < 0.5  # annealed from 1.0 as exploration_schedule says


def test_dqn_with_remote_workers_on_ray_sends_them_epsilon(tmp_path, ray_session):
    overrides = [("stop.timesteps_total", 2000), ("config.num_workers", 2), ("config.num_cpus_per_worker", 0.5),
                 ("config.learning_starts", 500), ("config.exploration_schedule", [[0, 1.0], [1500, 0.1]]),
                 ("config.evaluation_interval", 1), ("config.evaluation_num_episodes", 2),
                 ("config.training_intensity", 8), ("config.prioritized_replay", True)]
    (exp,) = load_experiments(ROOT / "examples" / "dqn_cartpole.yaml", overrides, seed=0)
    result = run_experiment(exp, tmp_path, "ray", quiet=True)
    assert result["timesteps_total"] >= 2000 and result["num_env_steps_trained"] > 0
    assert result["epsilon"] == pytest.approx(0.1) and result["weights_version"] > 0
    assert "evaluation" in result
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").open()]
    assert rows[0]["replay_buffer_bytes"] > 0 and "replay_buffer_bytes" not in rows[-1]


def test_epsilon_reaches_remote_workers_with_the_weights(ray_session):
    from flowrl.executors import make_executor
    from flowrl.operators import UpdateWeights

    workers = WorkerSet(num_workers=2, num_cpus_per_worker=0.5, env="CartPole-v1", rollout_fragment_length=4,
                        seed=0, policy="QPolicy", policy_config={"epsilon": 1.0})
    workers.policy.epsilon = 0.25
    with Plan(Stream.from_iterable([{}]).then(UpdateWeights(workers)), executor=make_executor("ray")) as plan:
        plan.step()
        assert [w["epsilon"].item() for w in workers.remote_workers.foreach("get_weights")] == [0.25, 0.25]


def test_checkpoint_resume_and_eval_of_a_dqn_run(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"tiny-dqn": {
        "env": "CartPole-v1", "run": "DQN", "stop": {"timesteps_total": 2048},
        "config": {"learning_starts": 500, "timesteps_per_iteration": 512, "checkpoint_freq": 1,
                   "checkpoint_replay_buffer": True, "evaluation_interval": 0, "training_intensity": 4,
                   "target_network_update_freq": 1024,
                   "seed": 0}}}))
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "replay buffer" in out  # the first progress line says what the buffer's columns take
    run_dir = (tmp_path / "runs" / "tiny-dqn" / "latest").resolve()
    checkpoint = sorted((run_dir / "checkpoints").glob("checkpoint_*"))[-1]
    assert (checkpoint / "target_model.pt").is_file() and (checkpoint / "replay_buffer.npz").is_file()
    with np.load(checkpoint / "replay_buffer.npz", allow_pickle=False) as saved:
        assert int(saved["size"]) == 2048  # 8 envs x 4 steps per sample

    policy = flowrl.load_policy(run_dir)
    assert isinstance(policy.policy, QPolicy)
    obs = np.array([0.01, -0.02, 0.03, 0.04], np.float32)
    q = policy.policy.model(torch.as_tensor(obs)[None])
    assert policy.compute_action(obs) == int(q.argmax())
    assert main(["eval", str(run_dir), "--episodes", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2

    plan.write_text(plan.read_text().replace("2048", "3072"))
    assert main(["run", str(plan), "--resume", str(run_dir), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert rows[-1]["timesteps_total"] == 3072
    # the buffer came back full: training went on from the first resumed iteration
    assert rows[-1]["replay_buffer_size"] == 3072
    # the target network's schedule went on too: its update count did not restart at 0
    resumed = next(i for i, row in enumerate(rows) if row["timesteps_total"] > 2048)
    assert rows[resumed - 1]["num_target_updates"] >= 1
    assert rows[resumed]["num_target_updates"] >= rows[resumed - 1]["num_target_updates"]
    assert all(0 <= row["num_env_steps_trained"] - row["last_target_update_step"] for row in rows)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("env, config, key", [
    ("Pendulum-v1", {}, "env: DQN needs Discrete actions"),
    ("CartPole-v1", {"n_step": 0}, "config.n_step: must be >= 1"),
    ("CartPole-v1", {"replay_buffer_capacity": 500, "learning_starts": 1000}, "config.replay_buffer_capacity: 500"),
    ("CartPole-v1", {"exploration_schedule": [[1000, 0.1], [0, 1.0]]}, "config.exploration_schedule: timesteps"),
    ("CartPole-v1", {"exploration_schedule": [[0, 1.5]]}, "config.exploration_schedule: epsilons must be in [0, 1]"),
    ("CartPole-v1", {"tau": 0}, "config.tau: must be in (0, 1], got 0"),
    ("CartPole-v1", {"replay_buffer_capacity": 10 ** 13}, "config.replay_buffer_capacity: 10,000,000,000,000 rows"),
])
def test_bad_dqn_input_is_one_line_naming_file_experiment_and_key(tmp_path, capsys, env, config, key):
    plan = tmp_path / "bad.yaml"
    config = {"learning_starts": 0, **config}
    plan.write_text(yaml.safe_dump({"bad-dqn": {"env": env, "run": "DQN", "stop": {"timesteps_total": 100},
                                                "config": config}}))
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"flowrl: error: {plan}: experiment 'bad-dqn': {key}"), err
    assert not (tmp_path / "runs").exists()


def test_progress_line_shows_the_replay_buffer_memory():
    result = {"training_iteration": 1, "timesteps_total": 1000, "episode_return_mean": 20.0, "env_steps_per_s": 900.0,
              "time_total_s": 1.0, "replay_buffer_bytes": 4_900_000}
    assert progress_line("x", result).endswith("| replay buffer 4.9 MB")
    del result["replay_buffer_bytes"]
    assert "replay" not in progress_line("x", result)
