"""Per-policy trained-row counters (`policy/<name>/num_agent_steps_trained`, TrainOneStep's) and the
target-network schedule that follows them: in a plan where a PPO-like learner and a DQN learner train
side by side, the DQN's target network is copied on its own rows, never hastened by the other's."""

import numpy as np
import torch

from flowrl.multi_agent_batch import MultiAgentBatch
from flowrl.operators import Concurrently, StandardMetricsReporting, TrainOneStep, UpdateTargetNetwork
from flowrl.plan import Plan
from flowrl.rollout import WorkerSet
from flowrl.sample_batch import SampleBatch
from flowrl.stream import Stream

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
PPO_ROWS, DQN_ROWS, EVERY = 32, 8, 20   # rows per batch of each learner; DQN target copy every 20 of its rows


def _workers():
    return WorkerSet(env=CARTPOLE, env_config={"num_agents": 2}, seed=0,
                     multiagent={"policies": {"ppo": {"plan": "PPO"}, "dqn": {"plan": "DQN"}},
                                 "policy_mapping": {"agent_0": "ppo", "agent_1": "dqn"}})


def _batch(pid: str, n: int, seed: int) -> MultiAgentBatch:
    """n CartPole-shaped rows of one policy; env_steps = n, as Replay counts a replayed minibatch."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    rows = SampleBatch({"obs": obs, "new_obs": obs, "actions": rng.integers(2, size=n),
                        "rewards": rng.normal(size=n).astype(np.float32)})
    return MultiAgentBatch({pid: rows}, env_steps=n)


def value_loss(policy, b):  # the PPO-like learner: its value head towards the rewards
    loss = ((policy.model(b["obs"])[1] - b["rewards"]) ** 2).mean()
    return loss, {"vf_loss": loss}


def q_loss(policy, b):  # the DQN learner: Q(s, a) towards the rewards
    q = policy.model(b["obs"]).gather(1, b["actions"].long()[:, None])[:, 0]
    loss = ((q - b["rewards"]) ** 2).mean()
    return loss, {"loss": loss}


def _plan(workers, start: int = 0) -> Plan:
    """Round robin: one PPO batch (32 rows), then one DQN batch (8 rows) and its target schedule."""
    ppo = Stream.from_iterable([_batch("ppo", PPO_ROWS, start + i) for i in range(50)]) \
        .then(TrainOneStep(workers, value_loss))
    dqn = Stream.from_iterable([_batch("dqn", DQN_ROWS, 1000 + start + i) for i in range(50)]) \
        .then(TrainOneStep(workers, q_loss)).then(UpdateTargetNetwork(workers, every_steps=EVERY))
    return Plan(Concurrently({"ppo": ppo, "dqn": dqn}, output=["ppo", "dqn"]), report=StandardMetricsReporting())


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_dqn_target_is_copied_at_exactly_its_own_trained_rows():
    workers = _workers()
    dqn = workers.policies["dqn"]
    with _plan(workers) as plan:
        results = [plan.step() for _ in range(12)]   # ppo, dqn, ppo, dqn, ...: 6 batches each
        assert _same(dqn.model, dqn.target_model)  # the 6th DQN batch (48 rows) was a copy: 48 - 24 >= 20
    dqn_results = results[1::2]
    rows = [r["policy/dqn/num_agent_steps_trained"] for r in dqn_results]
    assert rows == [8, 16, 24, 32, 40, 48]
    # Copies at 24 and 48 of its own rows (the first at >= 20, then >= 20 after 24); the plan's
    # trained env steps, which the PPO batches add to, would have copied at every DQN batch.
    assert [r["policy/dqn/num_target_updates"] for r in dqn_results] == [0, 0, 1, 1, 1, 2]
    assert [r["policy/dqn/last_target_update_step"] for r in dqn_results] == [0, 0, 24, 24, 24, 48]
    # The plan's totals: every copy, and its trained env steps at the last one (6 x 32 + 6 x 8).
    assert results[-1]["num_target_updates"] == 2 and results[-1]["last_target_update_step"] == 240
    assert results[-1]["num_env_steps_trained"] == 240 and results[-1]["num_agent_steps_trained"] == 240
    # Per-policy rows come out in the results (StandardMetricsReporting's record) for both learners.
    assert [r["policy/ppo/num_agent_steps_trained"] for r in results[0::2]] == [32, 64, 96, 128, 160, 192]
    assert "policy/ppo/num_target_updates" not in results[-1]  # PPO has no target network
    assert not hasattr(workers.policies["ppo"], "target_model")


def test_between_copies_the_target_stays_behind_the_trained_network():
    workers = _workers()
    dqn = workers.policies["dqn"]
    with _plan(workers) as plan:
        plan.step(), plan.step()          # ppo, dqn: 8 rows, no copy yet
        first = {k: v.clone() for k, v in dqn.target_model.state_dict().items()}
        assert not _same(dqn.model, dqn.target_model)
        for _ in range(2):
            plan.step()                   # ppo, then dqn: 16 rows, still no copy
        assert all(torch.equal(first[k], v) for k, v in dqn.target_model.state_dict().items())
        plan.step(), plan.step()          # 24 rows: the copy
        assert _same(dqn.model, dqn.target_model)


def test_a_resume_keeps_each_policys_rows_and_target_schedule():
    workers = _workers()
    with _plan(workers) as plan:
        for _ in range(8):                # 4 DQN batches: 32 rows, copied at 24
            saved = plan.step()
        progress = plan.progress_state()
    assert (saved["policy/dqn/num_agent_steps_trained"], saved["policy/dqn/last_target_update_step"]) == (32, 24)
    with _plan(workers, start=100) as again:
        again.restore_progress(progress)
        results = [again.step() for _ in range(4)]
    assert results[0]["policy/ppo/num_agent_steps_trained"] == 32 * 5
    dqn_results = results[1::2]
    assert [r["policy/dqn/num_agent_steps_trained"] for r in dqn_results] == [40, 48]
    # The schedule goes on from the copy at 24: the next at 48, not 20 rows after the resume.
    assert [r["policy/dqn/num_target_updates"] for r in dqn_results] == [1, 2]
    assert [r["policy/dqn/last_target_update_step"] for r in dqn_results] == [24, 48]
    assert dqn_results[-1]["num_target_updates"] == 2
