"""An external application driving a gymnasium env through flowrl's policy server: each step
asks the server for an action (or, with --epsilon-greedy, picks a random one with probability
epsilon and logs it), steps the env, and reports the reward. It stops after --max-steps env
steps, --max-seconds, or when the server goes away (the plan stopped), and prints one JSON line.

    flowrl run examples/ppo_cartpole_external.yaml &        # serves at 127.0.0.1:9900
    python examples/external_client.py --token-file runs/cartpole-ppo-external/latest/external_token
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import gymnasium as gym
import numpy as np

from flowrl.client import PolicyClient, PolicyServerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="http://127.0.0.1:9900")
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--inference", choices=["remote", "local"], default="remote")
    parser.add_argument("--epsilon-greedy", type=float, metavar="DECAY_STEPS",
                        help="choose a random action (log_action) with probability epsilon, which falls from 1 "
                             "to --final-epsilon over DECAY_STEPS steps of this client; else get_action")
    parser.add_argument("--final-epsilon", type=float, default=0.02)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    env = gym.make(args.env)
    rng = np.random.default_rng(args.seed)
    steps, returns, reason = 0, [], "max_steps"
    deadline = time.monotonic() + args.max_seconds
    # Wait for the server (and the token it writes to its run directory): the plan may still be starting.
    while True:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
            client = PolicyClient(args.address, token, inference=args.inference)
            break
        except (ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline:
                print(json.dumps({"steps": 0, "episodes": 0, "stopped": "no server"}))
                return 1
            time.sleep(0.2)
    try:
        episode_seed = args.seed * 100_000
        while steps < args.max_steps and time.monotonic() < deadline:
            episode = client.start_episode()
            obs, _ = env.reset(seed=episode_seed)
            episode_seed += 1
            total = 0.0
            while True:
                if args.epsilon_greedy is not None:
                    fraction = min(1.0, steps / max(args.epsilon_greedy, 1.0))
                    epsilon = 1.0 + fraction * (args.final_epsilon - 1.0)
                if args.epsilon_greedy is not None and rng.random() < epsilon:
                    action = env.action_space.sample()
                    client.log_action(episode, obs, action)
                else:
                    action = client.get_action(episode, obs)
                obs, reward, terminated, truncated, _ = env.step(action)
                steps += 1
                total += float(reward)
                client.log_returns(episode, reward)
                if terminated or truncated:
                    client.end_episode(episode, obs, truncated=truncated)
                    returns.append(total)
                    break
        client.close()
    except (ConnectionError, PolicyServerError) as e:
        if isinstance(e, PolicyServerError) and e.status != 503:
            raise
        reason = "server gone"  # the plan stopped: its server closed
    if steps >= args.max_steps:
        reason = "max_steps"
    elif time.monotonic() >= deadline and reason != "server gone":
        reason = "max_seconds"
    last = returns[-20:]
    print(json.dumps({"steps": steps, "episodes": len(returns), "stopped": reason,
                      "return_mean_last_20": float(np.mean(last)) if last else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
