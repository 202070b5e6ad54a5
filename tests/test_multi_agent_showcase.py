"""Per-policy `plan:` settings, and the PPO + DQN showcase (examples/ppo_dqn_multiagent.py): one
plan where one policy learns with PPO and another with DQN from the same rollouts."""

from pathlib import Path

import pytest
import yaml

import flowrl
from flowrl.cli import main
from flowrl.multi_agent import parse_multiagent, policies_of_plan, policy_class_of
from flowrl.policy import TorchPolicy
from flowrl.q_policy import QPolicy

from examples.ppo_dqn_multiagent import build_plan

ROOT = Path(__file__).resolve().parent.parent
CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
SHOWCASE = yaml.safe_load((ROOT / "examples" / "ppo_dqn_multiagent.yaml").read_text())["cartpole-ppo-dqn"]
PPO_KEYS = ("policy_loss", "vf_loss", "kl", "clip_fraction", "entropy")  # what ppo_loss reports
DQN_KEYS = ("mean_q", "mean_td_error", "loss")                           # what dqn_loss reports
RANDOM_RETURN = 22  # a CartPole pole under random actions stands about 22 steps


def showcase_config(**overrides):
    config = dict(SHOWCASE["config"], **overrides)
    for key in ("ppo", "dqn"):
        config[key] = dict(SHOWCASE["config"][key], **overrides.get(key, {}))
    return config


# ---- the plan setting ------------------------------------------------------------------------------
def test_a_policys_plan_picks_its_class_with_that_plans_options_or_the_runs():
    assert policy_class_of({}, "TorchPolicy", {}) == ("TorchPolicy", {})
    assert policy_class_of({"plan": "DQN"}, "TorchPolicy", {}) == ("QPolicy", {"dueling": True, "epsilon": 1.0})
    # A run that builds Q-policies itself: its options (its dueling, its epsilon) hold.
    assert policy_class_of({"plan": "DQN"}, "QPolicy", {"dueling": False, "epsilon": 0.5}) == \
        ("QPolicy", {"dueling": False, "epsilon": 0.5})
    section = {"policies": {"a": {"plan": "dqn"}, "b": {"plan": "PPO"}, "c": {}}, "policy_mapping": "independent"}
    assert parse_multiagent(section).policies["a"] == {"plan": "DQN"}  # as the registry spells it
    assert (policies_of_plan(section, "DQN"), policies_of_plan(section, "ppo")) == (["a"], ["b"])


def test_a_frozen_policy_of_another_plan_acts_in_a_built_in_plan():
    config = {"multiagent": {"policies": {"learner": {}, "opponent": {"plan": "DQN"}},
                             "policy_mapping": {"agent_0": "learner", "agent_1": "opponent"},
                             "policies_to_train": ["learner"]},
              "env_config": {"num_agents": 2}, "num_envs_per_worker": 2, "rollout_fragment_length": 32,
              "train_batch_size": 64, "sgd_minibatch_size": 64, "num_sgd_iter": 1, "seed": 0}
    with flowrl.build("PPO", env=CARTPOLE, config=config) as algo:
        policies = algo.workers.policies
        before = policies["opponent"].get_weights()
        result = algo.train()
        after = policies["opponent"].get_weights()
    assert (type(policies["learner"]), type(policies["opponent"])) == (TorchPolicy, QPolicy)
    assert all((before[k] == after[k]).all() for k in before)
    assert result["policy/opponent/episode_return_mean"] is not None and "policy/learner/vf_loss" in result


@pytest.mark.parametrize("policies, message", [
    ({"agent_0": {"plan": "DQM"}, "agent_1": {}},
     "config.multiagent.policies.agent_0.plan: unknown plan 'DQM'; did you mean 'DQN'?"),
    ({"agent_0": {"plan": 3}, "agent_1": {}},
     "config.multiagent.policies.agent_0.plan: expected a plan name such as PPO or DQN, got 3"),
    ({"agent_0": {"plan": "DQN"}, "agent_1": {}},
     "config.multiagent.policies.agent_0.plan: DQN, but run: PPO trains every policy to train with PPO's loss"),
])
def test_bad_policy_plans_exit_2_with_one_line_naming_the_key(tmp_path, capsys, policies, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"bad": {
        "env": CARTPOLE, "run": "PPO", "stop": {"timesteps_total": 100},
        "config": {"env_config": {"num_agents": 2},
                   "multiagent": {"policies": policies, "policy_mapping": "independent"}}}}))
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{plan}: experiment 'bad': {message}" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, message", [
    ({"multiagent": {"policies": {"ppo_policy": {"plan": "PPO"}, "dqn_policy": {}},
                     "policy_mapping": {"agent_0": "ppo_policy", "agent_1": "dqn_policy"}}},
     "config.multiagent.policies: every policy needs plan: PPO or plan: DQN"),
    ({"ppo": {"lr": 0.01}}, "config.ppo.lr: is a setting of the whole run"),
    ({"dqn": {"n_stp": 3}}, "config.dqn.n_stp: unknown key; did you mean 'n_step'?"),
    ({"dqn": {"dueling": False}}, "config.dqn.dueling: is not used by this plan"),
    ({"count_steps_by": "agent_steps"}, "config.count_steps_by: must be env_steps"),
])
def test_the_showcase_checks_its_config(change, message):
    with pytest.raises(flowrl.ConfigError, match=message.replace("?", r"\?")):
        flowrl.build(build_plan, env=CARTPOLE, config=showcase_config(**change))


# ---- the showcase ----------------------------------------------------------------------------------
def test_the_showcase_trains_ppo_and_dqn_policies_each_with_its_own_loss_and_both_learn():
    # Over seeds 0-4 both policies' mean returns (last 100 episodes) passed 150 within 22k-26k env
    # steps (the PPO one first, at 18k-20k); 40k is the budget, random play stands ~22 steps.
    seen: set[str] = set()
    with flowrl.build(build_plan, env=CARTPOLE, config=showcase_config(seed=0)) as algo:
        policies = algo.workers.policies
        assert (type(policies["ppo_policy"]), type(policies["dqn_policy"])) == (TorchPolicy, QPolicy)
        while True:
            result = algo.train()
            seen |= set(result)
            returns = [result[f"policy/{p}/episode_return_mean"] for p in ("ppo_policy", "dqn_policy")]
            if all(r is not None and r >= 150 for r in returns) or result["num_env_steps_sampled"] >= 40_000:
                break
    assert min(returns) >= 150, (returns, result["num_env_steps_sampled"])
    assert min(returns) > 5 * RANDOM_RETURN
    # Each learner's statistics, and only its own, under its policy: no loss trained the other's.
    assert all(f"policy/ppo_policy/{k}" in seen and f"policy/dqn_policy/{k}" not in seen for k in PPO_KEYS)
    assert all(f"policy/dqn_policy/{k}" in seen and f"policy/ppo_policy/{k}" not in seen for k in DQN_KEYS)
    assert result["policy/dqn_policy/replay_buffer_size"] > 0 and "policy/ppo_policy/replay_buffer_size" not in seen
    assert result["num_target_updates"] > 0 and result["epsilon"] == pytest.approx(0.04)
    assert result["policy/ppo_policy/weights_version"] > 0 and result["policy/dqn_policy/weights_version"] > 0


def test_the_showcase_runs_on_ray_with_one_worker():
    config = showcase_config(num_workers=1, num_envs_per_worker=2, rollout_fragment_length=32,
                             ppo={"train_batch_size": 128, "sgd_minibatch_size": 64, "num_sgd_iter": 1},
                             dqn={"learning_starts": 64})
    with flowrl.build(build_plan, env=CARTPOLE, config=config, executor="ray") as algo:
        for _ in range(3):
            result = algo.train()
        remote = algo.workers.remote_workers.foreach("weights_version")
        local = algo.workers.local_worker.weights_version()
    assert result["num_env_steps_sampled"] == 3 * 128
    assert all(local[p] > 0 for p in ("ppo_policy", "dqn_policy")) and "policy/dqn_policy/loss" in result
    assert remote == [local]  # each policy's newest weights reached the worker


def test_the_showcase_plan_file_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["run", "examples/ppo_dqn_multiagent.yaml", "--output-dir", str(tmp_path / "runs"), "--quiet",
                 "--set", "stop.timesteps_total=2048"]) == 0
    assert "cartpole-ppo-dqn: done" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "cartpole-ppo-dqn" / "latest"
    assert isinstance(flowrl.load_policy(run_dir, policy="dqn_policy").policy, QPolicy)
    assert isinstance(flowrl.load_policy(run_dir, policy="ppo_policy").policy, TorchPolicy)
