"""Multi-agent: PPO on a 4-agent CartPole, simple_spread, and multi-agent sampling throughput.

    python benchmarks/multiagent.py throughput [--seconds 5] [--rounds 5] [--copies 8]
    python benchmarks/multiagent.py cartpole [--seeds 3] [--mapping independent|shared] [--ray]
    python benchmarks/multiagent.py spread [--steps 1000000]

throughput: poles stepped per second in one process, each pole a CartPole-v1 copy under an MLP
  policy: (a) one multi-agent worker on flowrl.testing_envs:multi_agent_cartpole (4 agents x K
  copies, --copies, default 8), shared and independent mappings, in agent steps/s; (b) one
  single-agent worker on CartPole-v1 with 4 x K sub-envs through gymnasium's SyncVectorEnv of
  separate CartPole-v1 envs (vectorization "sync"): the like-for-like baseline, the same
  simulator per pole; (c) the same with gymnasium's numpy-vectorized CartPole (vectorization
  "auto"), for reference; (d) for the independent mapping's four policies, four single-agent
  workers on CartPole-v1, each with K sub-envs (sync) and a policy of its own, sampled one after
  another: "4x single-agent sampling in one process" with four policies, like for like. Goal:
  (a) / (b) >= 0.8. The workers take turns (--rounds), so that load from elsewhere on the
  machine falls on all alike.
cartpole: PPO, every policy's episode_return_mean >= 475 within 400k env steps, per seed
  (independent: four policies; shared: one; --ray: 2 Ray rollout workers).
spread: mpe2 simple_spread_v3 (N=3) with a shared PPO policy: the team return per 100k env
  steps against a random policy's (about -81 per episode), as a table. gamma 0.95, not 0.99:
  episodes are cut at max_cycles 25 and bootstrap from V(last obs), so with 0.99 the critic
  must learn infinite-horizon values near -0.8 / (1 - 0.99) = -80 per agent from observations
  without the time; its loss (15-30) then dominates the gradient (norm 6-10 against grad_clip
  0.5, shrinking every policy step 10-20x) and its errors drown the advantages: the return
  stalls near -72 while the entropy collapses (without grad_clip as well). With 0.95 (a horizon
  of about 20 steps) the value loss falls below 1 and the return keeps improving.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import flowrl
from flowrl.rollout import WorkerSet

CARTPOLE = "flowrl.testing_envs:multi_agent_cartpole"
SPREAD = "mpe2.simple_spread_v3:parallel_env"


def sampling_rates(seconds: float, rounds: int, workers: dict[str, list[dict]]) -> dict[str, float]:
    """Rows sampled per second by each of `workers` (name -> the WorkerSet options of one or
    more local workers in this process, sampled one after another; agent steps for a
    multi-agent one). The entries take turns, `rounds` turns of seconds / rounds each, so that
    a burst of load from elsewhere on the machine falls on all of them alike; each one's figure
    is the median of its turns."""
    made = {name: [WorkerSet(**{"seed": 0, **options}).local_worker for options in group]
            for name, group in workers.items()}
    for group in made.values():
        for worker in group:
            worker.sample()  # warm up
    rates: dict[str, list[float]] = {name: [] for name in made}
    for _ in range(rounds):
        for name, group in made.items():
            rows, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / rounds:
                for worker in group:
                    batch = worker.sample()
                    rows += batch.agent_steps if hasattr(batch, "agent_steps") else len(batch)
            rates[name].append(rows / (time.perf_counter() - t0))
    for group in made.values():
        for worker in group:
            worker.close()
    return {name: float(np.median(r)) for name, r in rates.items()}


def throughput(args) -> None:
    # One BLAS thread for every worker measured, as a multi-agent worker sets when it is made.
    threadpool_limits(1, user_api="blas")
    k, fragment = args.copies, 128
    multi = {"env": CARTPOLE, "env_config": {"num_agents": 4}, "num_envs_per_worker": k,
             "rollout_fragment_length": fragment}
    single = {"env": "CartPole-v1", "num_envs_per_worker": 4 * k, "rollout_fragment_length": fragment}
    rate = sampling_rates(args.seconds, args.rounds, {
        "shared": [{**multi, "multiagent": {"policy_mapping": "shared"}}],
        "independent": [{**multi, "multiagent": {"policy_mapping": "independent"}}],
        "sync": [{**single, "vectorization": "sync"}],
        "auto": [{**single, "vectorization": "auto"}],
        "four": [{**single, "num_envs_per_worker": k, "vectorization": "sync", "seed": seed} for seed in range(4)]})
    print(f"{4 * k} poles per worker, rollout_fragment_length {fragment}, {args.seconds:g} s per worker "
          f"in {args.rounds} turns (median)")
    print(f"(b) single-agent, {4 * k} CartPole-v1 sub-envs (sync):        {rate['sync']:9,.0f} env steps/s")
    print(f"(c) single-agent, {4 * k} sub-envs, numpy-vectorized (auto):  {rate['auto']:9,.0f} env steps/s")
    print(f"(d) 4 single-agent workers in turn, {k} sub-envs (sync) each:  {rate['four']:9,.0f} env steps/s")
    for mapping in ("shared", "independent"):
        print(f"(a) multi-agent, 4 agents x {k} copies, {mapping:11s}:     {rate[mapping]:9,.0f} agent steps/s   "
              f"(a)/(b) {rate[mapping] / rate['sync']:.2f} (goal >= 0.8)   (a)/(c) {rate[mapping] / rate['auto']:.2f}"
              + (f"   (a)/(d) {rate[mapping] / rate['four']:.2f}" if mapping == "independent" else ""))


def cartpole(args) -> None:
    config = {"multiagent": {"policy_mapping": args.mapping}, "env_config": {"num_agents": 4},
              "num_envs_per_worker": 8, "rollout_fragment_length": 64, "train_batch_size": 2048,
              "sgd_minibatch_size": 256, "num_sgd_iter": 10, "lr": 1e-3, "num_workers": 2 if args.ray else 0}
    print(f"PPO, {args.mapping} policies, 4-agent CartPole, {'ray, 2 workers' if args.ray else 'local'}")
    print("seed | env steps to every policy >= 475 | time s | policy returns at the end")
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        with flowrl.build("PPO", env=CARTPOLE, config={**config, "seed": seed},
                          executor="ray" if args.ray else "local") as algo:
            reached = None
            while reached is None:
                result = algo.train()
                returns = {k.split("/")[1]: v for k, v in result.items()
                           if k.startswith("policy/") and k.endswith("/episode_return_mean")}
                if returns and all(v is not None and v >= 475 for v in returns.values()):
                    reached = result["num_env_steps_sampled"]
                elif result["num_env_steps_sampled"] >= args.max_steps:
                    break
        shown = ", ".join(f"{p} {v:.0f}" for p, v in sorted(returns.items()))
        print(f"{seed:4d} | {reached if reached else 'not within ' + str(args.max_steps):>33} | "
              f"{time.perf_counter() - t0:6.0f} | {shown}")


def random_team_return(episodes: int = 20) -> float:
    from flowrl.multi_agent_env import make_multi_agent_env

    env = make_multi_agent_env(SPREAD, {"N": 3})
    rng = np.random.default_rng(0)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        total = 0.0
        while obs:
            actions = {a: int(rng.integers(env.action_space(a).n)) for a in obs}
            obs, rewards, terminations, truncations, _ = env.step(actions)
            total += sum(rewards.values())
            obs = {a: o for a, o in obs.items() if not (terminations.get(a) or truncations.get(a))}
        returns.append(total)
    return float(np.mean(returns))


def spread(args) -> None:
    config = {"multiagent": {"policy_mapping": "shared"}, "env_config": {"N": 3}, "num_envs_per_worker": 8,
              "rollout_fragment_length": 100, "train_batch_size": 4000, "sgd_minibatch_size": 500,
              "num_sgd_iter": 10, "lr": 1e-3, "gamma": 0.95, "seed": 0}
    print(f"simple_spread_v3 (N=3), shared PPO; random policy: team return {random_team_return():.1f}")
    print("env steps | team episode_return_mean")
    with flowrl.build("PPO", env=SPREAD, config=config) as algo:
        next_row = 100_000
        while True:
            result = algo.train()
            if result["num_env_steps_sampled"] >= next_row:
                print(f"{result['num_env_steps_sampled']:9d} | {result['episode_return_mean']:.1f}")
                next_row += 100_000
            if result["num_env_steps_sampled"] >= args.steps:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--seconds", type=float, default=5.0)
    t.add_argument("--rounds", type=int, default=5, help="turns each worker takes")
    t.add_argument("--copies", type=int, default=8, help="multi-agent env copies per worker (K)")
    c = sub.add_parser("cartpole")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--mapping", choices=["independent", "shared"], default="independent")
    c.add_argument("--max-steps", type=int, default=400_000)
    c.add_argument("--ray", action="store_true")
    s = sub.add_parser("spread")
    s.add_argument("--steps", type=int, default=1_000_000)
    args = parser.parse_args()
    {"throughput": throughput, "cartpole": cartpole, "spread": spread}[args.what](args)


if __name__ == "__main__":
    main()
