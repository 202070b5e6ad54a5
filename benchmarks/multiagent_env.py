"""Multi-agent envs alone, without policies: how fast multi_agent_cartpole steps, and what a
random policy scores on simple_spread.

    python benchmarks/multiagent_env.py [--steps 200000] [--episodes 500]

1. Raw env steps/s of flowrl.testing_envs.multi_agent_cartpole (4 agents) against 4 gymnasium
   CartPole-v1 envs stepped one after the other in one process (what 4x single-agent sampling
   steps), and against gymnasium's numpy-vectorized CartPole (4 copies, what flowrl's sampler uses
   for CartPole-v1), in env steps/s and in pole (agent) steps/s: a fallen pole waits for the
   others, so a multi-agent env step moves 1 to 4 poles. Uniform random actions, drawn
   beforehand; resets (frequent under random actions) are counted in. Goal: >= 0.8x the 4 envs
   in pole steps/s.
2. The team return (the sum over agents) of uniform random actions on mpe2.simple_spread_v3
   (N=3, 25 steps an episode): the baseline a learning curve is read against (the issue: about -81).
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

from flowrl.multi_agent_env import make_multi_agent_env
from flowrl.testing_envs import multi_agent_cartpole

NUM_POLES = 4


def multi_agent_steps_per_s(steps: int, seed: int) -> tuple[float, float]:
    """(env steps/s, pole steps/s): a pole that fell waits for the others, so an env step of
    multi_agent_cartpole moves 1 to 4 poles."""
    env = multi_agent_cartpole(NUM_POLES)
    actions = np.random.default_rng(seed).integers(2, size=(steps, NUM_POLES)).tolist()
    env.reset(seed=seed)
    poles = 0
    start = time.perf_counter()
    for row in actions:
        if not env.agents:
            env.reset()
        poles += len(env.agents)
        env.step(dict(zip(env.agents, row)))
    seconds = time.perf_counter() - start
    return steps / seconds, poles / seconds


def gym_envs_steps_per_s(steps: int, seed: int) -> float:
    envs = [gym.make("CartPole-v1") for _ in range(NUM_POLES)]
    actions = np.random.default_rng(seed).integers(2, size=(steps, NUM_POLES)).tolist()
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
    start = time.perf_counter()
    for row in actions:
        for env, action in zip(envs, row):
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
    return steps / (time.perf_counter() - start)


def gym_vector_steps_per_s(steps: int, seed: int) -> float:
    env = gym.make_vec("CartPole-v1", num_envs=NUM_POLES, vectorization_mode="vector_entry_point")
    actions = np.random.default_rng(seed).integers(2, size=(steps, NUM_POLES))
    env.reset(seed=seed)
    start = time.perf_counter()
    for row in actions:
        env.step(row)  # autoreset: next step
    return steps / (time.perf_counter() - start)


def random_team_returns(episodes: int, seed: int) -> np.ndarray:
    env = make_multi_agent_env("mpe2.simple_spread_v3:parallel_env", {"N": 3})
    rng = np.random.default_rng(seed)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        team = 0.0
        while obs:
            obs, rewards, terminations, truncations, _ = env.step({a: int(rng.integers(5)) for a in obs})
            team += sum(rewards.values())
            obs = {a: o for a, o in obs.items() if not (terminations[a] or truncations[a])}
        returns.append(team)
    return np.array(returns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000, help="env steps per CartPole measurement")
    parser.add_argument("--episodes", type=int, default=500, help="simple_spread episodes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    multi, multi_poles = multi_agent_steps_per_s(args.steps, args.seed)
    single = gym_envs_steps_per_s(args.steps, args.seed)
    vector = gym_vector_steps_per_s(args.steps, args.seed)
    print(f"{'env (4 CartPoles, random actions)':38s} {'env steps/s':>12s} {'pole steps/s':>13s} {'vs 4 envs':>10s}")
    for name, rate, poles in [("flowrl multi_agent_cartpole(4)", multi, multi_poles),
                              ("4x gymnasium CartPole-v1, in turn", single, NUM_POLES * single),
                              ("gymnasium CartPole-v1 vectorized (4)", vector, NUM_POLES * vector)]:
        print(f"{name:38s} {rate:12,.0f} {poles:13,.0f} {poles / (NUM_POLES * single):9.2f}x")
    goal = "met" if multi_poles >= 0.8 * NUM_POLES * single else "NOT met"
    print(f"goal: multi_agent_cartpole >= 0.8x the 4 envs in pole steps/s: {goal}")

    returns = random_team_returns(args.episodes, args.seed)
    print(f"\nmpe2.simple_spread_v3 (N=3), uniform random actions, {args.episodes} episodes of 25 steps:")
    print(f"team return per episode: mean {returns.mean():.1f} +- {returns.std(ddof=1) / np.sqrt(len(returns)):.1f} "
          f"(std {returns.std(ddof=1):.1f}, min {returns.min():.1f}, max {returns.max():.1f})")


if __name__ == "__main__":
    main()
