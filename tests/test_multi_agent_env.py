"""Multi-agent envs: the PettingZoo adapters (who acts when, which rewards arrive when, final
observations), the factory errors, and the test envs of flowrl.testing_envs."""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import pytest

from flowrl.envs import EnvError
from flowrl.multi_agent_env import MultiAgentEnv, is_multi_agent_env, make_multi_agent_env
from flowrl.testing_envs import MultiAgentCartPole, ScriptedMultiAgentEnv

TICTACTOE = "pettingzoo.classic.tictactoe_v3:env"
SPREAD = "mpe2.simple_spread_v3:parallel_env"


def done(terminations: dict, truncations: dict, agent: str) -> bool:
    return bool(terminations.get(agent) or truncations.get(agent))


def rollout(env: MultiAgentEnv, seed: int, act) -> tuple[list[tuple], dict[str, float]]:
    """Steps `env` to the end of one episode with `act(agent, obs, info)`; gives each step's
    (acting agents, obs, rewards, terminations, truncations) and each agent's return."""
    obs, infos = env.reset(seed=seed)
    steps, returns = [], {}
    while obs:
        acting = sorted(obs)
        obs, rewards, terminations, truncations, infos = env.step({a: act(a, obs[a], infos[a]) for a in acting})
        steps.append((acting, obs, rewards, terminations, truncations))
        for agent, reward in rewards.items():
            returns[agent] = returns.get(agent, 0.0) + reward
        obs = {a: o for a, o in obs.items() if not done(terminations, truncations, a)}
    return steps, returns


# ---- PettingZoo AEC: tictactoe ---------------------------------------------------------------------

def play(env: MultiAgentEnv, moves: list[int]):
    """Plays `moves` alternately from the first player; checks the turns; gives the last step."""
    obs, _ = env.reset(seed=0)
    for k, move in enumerate(moves):
        player = "player_1" if k % 2 == 0 else "player_2"
        assert list(obs) == [player]
        out = env.step({player: move})
        obs = out[0]
    return out


def test_tictactoe_turns_and_masks():
    env = make_multi_agent_env(TICTACTOE)
    assert env.possible_agents == ["player_1", "player_2"]
    assert env.observation_space("player_1") == gym.spaces.Box(0, 1, (3, 3, 2), np.int8)
    assert env.action_space("player_2") == gym.spaces.Discrete(9)
    obs, rewards, terminations, truncations, infos = play(env, [0, 3])
    # Only the agent to move is in obs; nothing rewarded, nobody done; cells 0 and 3 are taken.
    assert list(obs) == ["player_1"] and rewards == {"player_1": 0.0, "player_2": 0.0}
    assert terminations == {"player_1": False} and truncations == {"player_1": False}
    assert infos["player_1"]["action_mask"].tolist() == [0, 1, 1, 0, 1, 1, 1, 1, 1]
    assert obs["player_1"].shape == (3, 3, 2)
    assert obs["player_1"][0, 0].tolist() == [1, 0] and obs["player_1"][1, 0].tolist() == [0, 1]  # mine, theirs
    assert env.agents == ["player_1", "player_2"]


def test_tictactoe_winner_and_loser_credited_on_the_winning_move():
    env = make_multi_agent_env(TICTACTOE)
    # player_1: 0 1 2 (the top row); player_2: 3 4.
    obs, rewards, terminations, truncations, _ = play(env, [0, 3, 1, 4, 2])
    assert rewards == {"player_1": 1.0, "player_2": -1.0}
    assert terminations == {"player_1": True, "player_2": True}
    assert truncations == {"player_1": False, "player_2": False}
    assert sorted(obs) == ["player_1", "player_2"]  # both final observations
    assert obs["player_2"][0, :, 1].tolist() == [1, 1, 1]  # player_2 sees player_1's row
    assert env.agents == [] and env.env.agents == []  # the dead steps were taken inside


def test_tictactoe_loser_that_did_not_move_gets_its_minus_one():
    env = make_multi_agent_env(TICTACTOE)
    # player_2 completes 3 4 5 on the sixth move: player_1's -1 arrives on player_2's move.
    obs, rewards, terminations, _, _ = play(env, [0, 3, 1, 4, 8, 5])
    assert rewards == {"player_1": -1.0, "player_2": 1.0}
    assert terminations == {"player_1": True, "player_2": True}


def test_tictactoe_illegal_move_ends_the_game_with_pettingzoo_penalty(capsys):
    from pettingzoo.utils.env_logger import EnvLogger

    env = make_multi_agent_env(TICTACTOE)
    obs, rewards, terminations, truncations, _ = play(env, [4, 4])  # player_2 plays the taken cell
    assert rewards == {"player_1": 0.0, "player_2": -1.0}
    assert all(terminations.values()) and sorted(obs) == ["player_1", "player_2"]
    assert env.agents == []
    # PettingZoo's warning is neither printed nor kept (its list would grow with every game).
    assert "Illegal move" not in capsys.readouterr().out and EnvLogger.mqueue == [] and EnvLogger._output


def test_tictactoe_random_legal_games_are_zero_sum_and_end():
    env = make_multi_agent_env(TICTACTOE)
    rng = np.random.default_rng(0)
    for seed in range(20):
        steps, returns = rollout(env, seed, lambda a, o, info: int(rng.choice(np.flatnonzero(info["action_mask"]))))
        assert 5 <= len(steps) <= 9
        assert all(len(acting) == 1 for acting, *_ in steps)
        assert returns["player_1"] == -returns["player_2"] and returns["player_1"] in (-1.0, 0.0, 1.0)
        assert steps[-1][3] == {"player_1": True, "player_2": True}


def test_step_out_of_turn_is_an_error():
    env = make_multi_agent_env(TICTACTOE)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"agent 'player_1' is to act, but the actions are for \['player_2'\]"):
        env.step({"player_2": 0})


# ---- PettingZoo rps: AEC and parallel -------------------------------------------------------------

def test_rps_aec_reward_arrives_for_the_first_mover_on_the_second_move():
    env = make_multi_agent_env("pettingzoo.classic.rps_v2:env", {"max_cycles": 2})
    assert env.observation_space("player_0") == gym.spaces.Discrete(4)  # the other's last move, or none
    obs, _ = env.reset(seed=0)
    assert list(obs) == ["player_0"]
    obs, rewards, terminations, truncations, _ = env.step({"player_0": 1})  # paper
    assert list(obs) == ["player_1"] and rewards == {"player_0": 0.0, "player_1": 0.0}
    obs, rewards, terminations, truncations, _ = env.step({"player_1": 0})  # rock: paper wins
    assert list(obs) == ["player_0"] and rewards == {"player_0": 1.0, "player_1": -1.0}
    assert obs["player_0"] == 0  # player_0 now sees player_1's rock
    env.step({"player_0": 2})
    obs, rewards, terminations, truncations, _ = env.step({"player_1": 0})  # rock beats scissors
    assert rewards == {"player_0": -1.0, "player_1": 1.0}
    # max_cycles=2 rounds: both truncated, not terminated, final observations for both.
    assert truncations == {"player_0": True, "player_1": True}
    assert terminations == {"player_0": False, "player_1": False}
    assert sorted(obs) == ["player_0", "player_1"] and env.agents == []


def test_rps_parallel_both_act_each_step_and_are_truncated_together():
    env = make_multi_agent_env("pettingzoo.classic.rps_v2:parallel_env", {"max_cycles": 3})
    steps, returns = rollout(env, 0, lambda a, o, info: 1 if a == "player_0" else 0)  # paper vs rock
    assert len(steps) == 3
    assert all(acting == ["player_0", "player_1"] for acting, *_ in steps)
    assert all(rewards == {"player_0": 1, "player_1": -1} for _, _, rewards, _, _ in steps)
    assert returns == {"player_0": 3.0, "player_1": -3.0}
    assert steps[-1][4] == {"player_0": True, "player_1": True} and steps[1][4] == {"player_0": False,
                                                                                   "player_1": False}


def test_parallel_env_masks_go_to_infos():
    from pettingzoo import ParallelEnv

    from flowrl.multi_agent_env import ParallelEnvAdapter

    class Masked(ParallelEnv):
        possible_agents = agents = ["a", "b"]
        space = gym.spaces.Dict({"observation": gym.spaces.Box(0, 9, (2,)),
                                 "action_mask": gym.spaces.Box(0, 1, (3,), np.int8)})

        def observation_space(self, agent):
            return self.space

        def action_space(self, agent):
            return gym.spaces.Discrete(3)

        def _obs(self, t):
            return {a: {"observation": np.array([t, i], np.float32), "action_mask": np.array([1, t % 2, 0], np.int8)}
                    for i, a in enumerate(self.agents)}

        def reset(self, seed=None, options=None):
            return self._obs(0), {"a": {"note": 1}, "b": {}}

        def step(self, actions):
            return self._obs(1), {"a": 1, "b": 0}, {"a": True, "b": True}, {"a": False, "b": False}, {"a": {}, "b": {}}

    env = ParallelEnvAdapter(Masked())
    assert env.observation_space("a") == Masked.space["observation"]
    obs, infos = env.reset(seed=0)
    assert obs["b"].tolist() == [0.0, 1.0] and infos["a"]["note"] == 1 and infos["a"]["action_mask"].tolist() == [1, 0, 0]
    obs, rewards, terminations, _, infos = env.step({"a": 0, "b": 0})
    assert obs["a"].tolist() == [1.0, 0.0] and infos["b"]["action_mask"].tolist() == [1, 1, 0]
    assert rewards == {"a": 1.0, "b": 0.0} and all(type(r) is float for r in rewards.values())
    assert terminations == {"a": True, "b": True}


# ---- mpe2 simple_spread ---------------------------------------------------------------------------

def random_actions(seed: int):
    rng = np.random.default_rng(seed)
    return lambda agent, obs, info: int(rng.integers(5))


def test_simple_spread_parallel_rollout_and_seeding():
    env = make_multi_agent_env(SPREAD, {"N": 3})
    assert env.possible_agents == ["agent_0", "agent_1", "agent_2"]
    assert env.observation_space("agent_1").shape == (18,) and env.action_space("agent_1") == gym.spaces.Discrete(5)
    steps, returns = rollout(env, 3, random_actions(0))
    assert len(steps) == 25  # max_cycles
    assert all(acting == ["agent_0", "agent_1", "agent_2"] for acting, *_ in steps)
    assert all(steps[-1][4].values()) and not any(steps[-1][3].values())  # truncated, not terminated
    assert not any(steps[-2][4].values())
    assert all(r < 0 for r in returns.values())  # distances to the landmarks are penalties
    again, returns_again = rollout(make_multi_agent_env(SPREAD, {"N": 3}), 3, random_actions(0))
    assert returns_again == returns
    assert all(np.array_equal(a[1][agent], b[1][agent]) for a, b in zip(steps, again) for agent in a[1])
    _, other = rollout(env, 4, random_actions(0))
    assert other != returns


def test_simple_spread_aec_and_parallel_agree_on_every_agent_return():
    """mpe2's parallel env is its AEC env run round by round: the AEC adapter, which gets every
    agent's reward on the last agent's turn of a round, must credit each agent the same return."""
    actions = np.random.default_rng(1).integers(5, size=(25, 3))

    def scripted():
        calls = []  # one per action asked for: 3 per round in both kinds of env

        def act(agent, obs, info):
            calls.append(agent)
            return int(actions[(len(calls) - 1) // 3, int(agent[-1])])
        return act

    _, parallel_returns = rollout(make_multi_agent_env(SPREAD, {"N": 3}), 5, scripted())
    aec_steps, aec_returns = rollout(make_multi_agent_env("mpe2.simple_spread_v3:env", {"N": 3}), 5, scripted())
    assert len(aec_steps) == 75
    assert [acting for acting, *_ in aec_steps[:4]] == [["agent_0"], ["agent_1"], ["agent_2"], ["agent_0"]]
    assert aec_steps[0][2] == {"agent_0": 0.0, "agent_1": 0.0, "agent_2": 0.0}  # rewards come at a round's end
    assert all(r < 0 for r in aec_steps[2][2].values())
    assert aec_returns == pytest.approx(parallel_returns, abs=1e-9)
    assert all(aec_steps[-1][4].values()) and sorted(aec_steps[-1][1]) == ["agent_0", "agent_1", "agent_2"]


# ---- which envs are multi-agent; bad factories -----------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ("CartPole-v1", False),
    ("flowrl.testing_envs:SleepyCartPole", False),   # a gymnasium.Env class: told without making it
    ("flowrl.testing_envs:multi_agent_cartpole", True),
    ("flowrl.testing_envs:ScriptedMultiAgentEnv", True),
    (TICTACTOE, True),
    (SPREAD, True),
])
def test_is_multi_agent_env(env, expected):
    assert is_multi_agent_env(env) is expected


@pytest.mark.parametrize("env, env_config, message", [
    ("flowrl.testing_envs:nothing_here", None, "env 'flowrl.testing_envs:nothing_here': cannot load entry point"),
    ("flowrl.testing_envs:multi_agent_cartpole", {"num_agents": 0},
     "env 'flowrl.testing_envs:multi_agent_cartpole': its factory raised ValueError: num_agents must be at least 1"),
    ("flowrl.testing_envs:multi_agent_cartpole", {"poles": 3}, "bad env_config {'poles': 3}"),
    ("numpy:zeros", {"shape": 3}, "env 'numpy:zeros': its factory returned a ndarray, not"),
    ("CartPole-v1", None, "env 'CartPole-v1' is a gymnasium env, not a multi-agent env"),
    ("flowrl.testing_envs:ConstantEnv", None, "env 'flowrl.testing_envs:ConstantEnv' is a gymnasium env, not a"),
    ("CartPol-v1", None, "unknown env 'CartPol-v1'; did you mean 'CartPole-v1'?"),
])
def test_bad_factory_is_one_line_naming_the_env(env, env_config, message):
    with pytest.raises(EnvError) as error:
        make_multi_agent_env(env, env_config)
    assert message in str(error.value) and "\n" not in str(error.value)
    if "is a gymnasium env" not in message:  # to which is_multi_agent_env says False
        with pytest.raises(EnvError) as error:
            is_multi_agent_env(env, env_config)
        assert message in str(error.value)


def test_missing_pettingzoo_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pettingzoo", None)  # import pettingzoo now fails
    with pytest.raises(EnvError, match=r"needs pettingzoo \(pip install 'flowrl\[multiagent\]'\)"):
        make_multi_agent_env(TICTACTOE)


# ---- multi_agent_cartpole ---------------------------------------------------------------------------

def balance(agent, obs, info):
    return int(obs[2] + 0.5 * obs[3] > 0)


def test_multi_agent_cartpole_moves_as_gymnasium_cartpole():
    """Agent i under seed s is CartPole-v1 reset with seed 4 s + i, step for step, bit for bit,
    also when the agents fall at different steps; a fallen agent is not stepped again."""
    env = MultiAgentCartPole(num_agents=4)
    poles = [gym.make("CartPole-v1") for _ in range(4)]
    rng = np.random.default_rng(0)
    for seed in (0, 10):
        obs, _ = env.reset(seed=seed)
        expected = [pole.reset(seed=4 * seed + i)[0] for i, pole in enumerate(poles)]
        assert all(np.array_equal(obs[f"agent_{i}"], expected[i]) for i in range(4))
        lengths = {}
        while env.agents:
            # agent_0 balances, the others push at random: they fall at different times.
            actions = {a: balance(a, obs[a], {}) if a == "agent_0" else int(rng.integers(2)) for a in env.agents}
            obs, rewards, terminations, truncations, _ = env.step(actions)
            assert sorted(obs) == sorted(actions) and rewards == dict.fromkeys(actions, 1.0)
            for agent, action in actions.items():
                o, r, terminated, truncated, _ = poles[int(agent[-1])].step(action)
                assert np.array_equal(obs[agent], o) and obs[agent].dtype == np.float32
                assert (terminations[agent], truncations[agent]) == (terminated, truncated)
                if terminated or truncated:
                    lengths[agent] = env._t
        assert lengths["agent_0"] == 500 and len(set(lengths.values())) > 1


def test_multi_agent_cartpole_copies_seeded_in_turn_share_no_pole():
    """A worker seeds its env copies s, s + 1, ...: their 4 x 3 poles all start apart."""
    env = MultiAgentCartPole(num_agents=4)
    starts = [tuple(o) for seed in (7, 8, 9) for o in env.reset(seed=seed)[0].values()]
    assert len(set(starts)) == 12
    again = [tuple(o) for seed in (7, 8, 9) for o in env.reset(seed=seed)[0].values()]
    assert again == starts


def test_multi_agent_cartpole_agents_leave_and_are_truncated_at_500():
    env = MultiAgentCartPole(num_agents=3)
    steps, returns = rollout(env, 1, lambda a, o, i: 0 if a == "agent_2" else balance(a, o, i))
    assert len(steps) == 500
    fall = next(k for k, step in enumerate(steps) if step[3].get("agent_2"))
    assert fall < 30 and returns["agent_2"] == fall + 1  # reward 1 also on the falling step
    assert all("agent_2" not in acting for acting, *_ in steps[fall + 1:])
    assert steps[fall + 1][0] == ["agent_0", "agent_1"]
    assert steps[-1][4] == {"agent_0": True, "agent_1": True} and steps[-1][3] == {"agent_0": False, "agent_1": False}
    assert not any(steps[-2][4].values())
    assert returns["agent_0"] == returns["agent_1"] == 500.0 and env.agents == []
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step({})


def test_multi_agent_cartpole_bad_actions():
    env = MultiAgentCartPole(num_agents=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="agent 'agent_1': a CartPole action is 0 or 1, got None"):
        env.step({"agent_0": 1})
    with pytest.raises(ValueError, match="got 2"):
        env.step({"agent_0": 1, "agent_1": 2})


# ---- the scripted env ------------------------------------------------------------------------------

def test_scripted_env_leaves_and_joins_as_documented():
    env = ScriptedMultiAgentEnv()
    assert env.observation_space("flyer").shape == (3,) and env.action_space("late") == gym.spaces.Discrete(2)
    actions = {"walker": 2, "flyer": np.array([0.5, -0.5], np.float32), "late": 1}
    steps, returns = rollout(env, 0, lambda a, o, i: actions[a])
    assert [acting for acting, *_ in steps] == [["flyer", "walker"], ["flyer", "walker"], ["late", "walker"],
                                              ["late", "walker"]]
    assert steps[1][3]["flyer"] and sorted(steps[1][1]) == ["flyer", "late", "walker"]  # flyer's last obs, late joins
    assert steps[1][1]["late"].tolist() == [2.0] and steps[0][1]["flyer"].tolist() == [1.0, 0.5, -0.5]
    assert steps[3][4] == {"walker": True, "late": False} and steps[3][3] == {"walker": False, "late": True}
    assert returns == {"walker": 8.0, "flyer": 1.0, "late": 20.0}
