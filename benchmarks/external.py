"""External applications: the policy server a plan trains from, and `flowrl serve`.

    python benchmarks/external.py [--seconds 10] [--clients 8] [--learning]

CartPole-v1 with the default MLP policy, every server on 127.0.0.1, every client its own process:
  (1) remote inference: `--clients` clients step their envs with get_action + log_returns (one
      round trip per step) while the plan's thread takes batches: actions/s in all, and the
      p50/p99 latency of get_action as the clients see it;
  (2) local inference: clients act with pulled weights and send rows in batches: env steps/s
      of 1 client against a rollout worker sampling the same env alone with 1 sub-env (goal
      >= 0.5x), and of `--clients` clients against a worker with as many sub-envs, which
      computes one forward pass for all of them (a client's env steps one at a time);
  (3) `flowrl serve`: 4 client processes sending requests of 1 and of 64 observations:
      requests/s and p99 latency;
  (4) with --learning: PPO (examples/ppo_cartpole.yaml's settings) trained only through 4
      clients to a mean return of 475, and DQN (examples/dqn_cartpole_external.yaml's) through
      4 epsilon-greedy clients that log their random actions, to a training mean of 475 and to a
      greedy 10-episode evaluation of 475: env steps and seconds.
The machine is shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ---- client processes ----------------------------------------------------------------------------
def client_main(mode: str, address: str, token: str, seconds: float, seed: int) -> None:
    """A client process: CartPole-v1 driven through the server for `seconds`; prints JSON."""
    import gymnasium as gym

    from flowrl.client import PolicyClient, PolicyServerError

    client = PolicyClient(address, token, inference=mode, update_interval=1.0)
    env = gym.make("CartPole-v1")
    latencies, steps, episode_seed = [], 0, seed * 100_000
    print("ready", flush=True)  # all clients start together, once every one has started up
    sys.stdin.readline()
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            episode = client.start_episode()
            obs, _ = env.reset(seed=episode_seed)
            episode_seed += 1
            while True:
                t0 = time.perf_counter()
                action = client.get_action(episode, obs)
                latencies.append(time.perf_counter() - t0)
                obs, reward, terminated, truncated, _ = env.step(action)
                steps += 1
                client.log_returns(episode, reward)
                if terminated or truncated:
                    client.end_episode(episode, obs, truncated=truncated)
                    break
        elapsed = time.perf_counter() - start
        client.close()
    except (ConnectionError, PolicyServerError):
        elapsed = time.perf_counter() - start
    print(json.dumps({"steps": steps, "seconds": elapsed, "latencies": latencies[::max(1, len(latencies) // 20000)]}))


def serve_client_main(address: str, token: str, seconds: float, batch: int) -> None:
    """A `flowrl serve` client: POST /act with `batch` observations for `seconds`; prints JSON."""
    import msgpack

    from flowrl.client import _Connection, parse_address
    from flowrl.wire import encode_array

    host, port = parse_address(address)
    conn = _Connection(host, port, timeout=30)
    headers = f"Host: {host}:{port}\r\nContent-Type: application/msgpack\r\nAuthorization: Bearer {token}\r\n".encode()
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    sys.stdin.readline()
    bodies = [msgpack.packb({"v": 1, "obs": encode_array(rng.uniform(-0.2, 0.2, (batch, 4)).astype(np.float32))})
              for _ in range(16)]
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        status, _, _ = conn.request("/act", bodies[len(latencies) % 16], headers)
        latencies.append(time.perf_counter() - t0)
        assert status == 200, status
    print(json.dumps({"requests": len(latencies), "seconds": time.perf_counter() - start, "latencies": latencies}))


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)


def collect(procs: list[subprocess.Popen], wait_ready: bool = False) -> list[dict]:
    if wait_ready:  # start-up (imports) of some would otherwise eat the others' measured time
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
    return [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]


# ---- the server side -----------------------------------------------------------------------------
def make_server(config_class=None, **config):
    from flowrl.config import parse_config
    from flowrl.connectors.external import ExternalInput
    from flowrl.plans import PPOConfig
    from flowrl.rollout import WorkerSet

    external = {"port": 0, **config.pop("external", {})}
    cfg = parse_config(config_class or PPOConfig, {"input": "external", "external": external, "seed": 0, **config})
    kw = cfg.worker_kwargs("CartPole-v1")
    source = ExternalInput.from_config(cfg, kw)
    workers = WorkerSet(input_source=source, **kw)
    source.start(workers)
    return source, workers, cfg


def clients_against_server(mode: str, n: int, seconds: float) -> dict:
    """n client processes against a server whose batches a thread takes (and drops)."""
    source, _, _ = make_server()
    taken = [0]
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            batch = source.sample()
            if batch is None:
                return
            taken[0] += len(batch)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    procs = [spawn(["_client", mode, source.address, source.token, str(seconds), str(i)]) for i in range(n)]
    results = collect(procs, wait_ready=True)
    stop.set()
    source.stop()
    thread.join(5)
    steps = sum(r["steps"] for r in results)
    span = max(r["seconds"] for r in results)
    latencies = np.concatenate([r["latencies"] for r in results]) * 1e3
    return {"steps": steps, "steps_per_s": steps / span, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "rows_taken": taken[0],
            "rejected": source.server.rejected}


def rollout_worker_steps_per_s(num_envs: int, seconds: float) -> float:
    from flowrl.rollout import RolloutWorker

    worker = RolloutWorker("CartPole-v1", num_envs_per_worker=num_envs, rollout_fragment_length=max(1, 512 // num_envs),
                           seed=0)
    worker.sample()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        steps += len(worker.sample())
    worker.close()
    return steps / (time.perf_counter() - t0)


def serve_benchmark(seconds: float, n: int = 4) -> dict:
    import flowrl

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = {"num_envs_per_worker": 2, "rollout_fragment_length": 16, "train_batch_size": 32,
                  "sgd_minibatch_size": 32, "num_sgd_iter": 1, "seed": 0}
        with flowrl.build("PPO", env="CartPole-v1", config=config, output_dir=tmp) as algo:
            algo.train()
            algo.save()
            run_dir = algo.run_dir
        server = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "serve", str(run_dir), "--port", "0"],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            line = server.stdout.readline()
            address = line.split(" at ")[1].split("/act")[0]
            token = (run_dir / "serve_token").read_text().strip()
            for batch in (1, 64):
                results = collect([spawn(["_serve_client", address, token, str(seconds), str(batch)])
                                   for _ in range(n)], wait_ready=True)
                requests = sum(r["requests"] for r in results)
                latencies = np.concatenate([r["latencies"] for r in results]) * 1e3
                out[batch] = {"requests_per_s": requests / max(r["seconds"] for r in results),
                              "p50_ms": float(np.percentile(latencies, 50)),
                              "p99_ms": float(np.percentile(latencies, 99))}
        finally:
            server.send_signal(2)
            server.communicate(timeout=30)
    return out


def learning(tmp: Path) -> dict:
    from flowrl.plans import DQNConfig, build_dqn_plan, build_ppo_plan
    from flowrl.rollout import evaluate_policy

    token_file = tmp / "token"
    client = str(ROOT / "examples" / "external_client.py")

    def clients(source, n, *extra):
        token_file.write_text(source.token)
        return [subprocess.Popen([sys.executable, client, "--address", source.address, "--token-file", str(token_file),
                                  "--seed", str(i), "--max-seconds", "900", *extra], stdout=subprocess.PIPE, text=True,
                                 cwd=ROOT) for i in range(n)]

    out = {}
    source, workers, cfg = make_server(lr=0.001)
    plan = build_ppo_plan(workers, cfg)
    t0 = time.perf_counter()
    with plan:
        procs = clients(source, 4)
        for result in plan.run(max_iterations=60):
            if (result["episode_return_mean"] or 0) >= 475:
                break
    [p.communicate(timeout=60) for p in procs]
    out["ppo"] = {"episode_return_mean": result["episode_return_mean"], "env_steps": result["timesteps_total"],
                  "seconds": time.perf_counter() - t0}

    from flowrl.planfile import load_yaml

    spec = load_yaml((ROOT / "examples" / "dqn_cartpole_external.yaml").read_text())["cartpole-dqn-external"]
    # The example's whole config, input: external and its server settings too, on a free port.
    source, workers, cfg = make_server(DQNConfig, **dict(spec["config"],
                                                         external={**spec["config"]["external"], "port": 0}))
    plan = build_dqn_plan(workers, cfg)
    t0 = time.perf_counter()
    greedy_at = None
    with plan:
        procs = clients(source, 4, "--epsilon-greedy", "2000", "--final-epsilon", "0.02")
        for result in plan.run(max_iterations=200):
            if greedy_at is None and result["training_iteration"] % 2 == 0:
                greedy = float(np.mean(evaluate_policy(workers.policy, "CartPole-v1", episodes=10, seed=1000)))
                if greedy >= 475:
                    greedy_at = (result["timesteps_total"], time.perf_counter() - t0)
            if (result["episode_return_mean"] or 0) >= 475:
                break
    [p.communicate(timeout=60) for p in procs]
    out["dqn"] = {"episode_return_mean": result["episode_return_mean"], "env_steps": result["timesteps_total"],
                  "seconds": time.perf_counter() - t0, "greedy_475_at_env_steps_and_s": greedy_at}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--learning", action="store_true")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")

    remote = clients_against_server("remote", args.clients, args.seconds)
    print(f"(1) remote inference, {args.clients} clients: {remote['steps_per_s']:,.0f} actions/s, get_action p50 "
          f"{remote['p50_ms']:.2f} ms, p99 {remote['p99_ms']:.2f} ms ({remote['steps']:,} steps, "
          f"{remote['rejected']} rejected)")
    local = clients_against_server("local", args.clients, args.seconds)
    local1 = clients_against_server("local", 1, args.seconds)
    worker_n = rollout_worker_steps_per_s(args.clients, args.seconds / 2)
    worker1 = rollout_worker_steps_per_s(1, args.seconds / 2)
    print(f"(2) local inference: 1 client (one env) {local1['steps_per_s']:,.0f} env steps/s against a rollout "
          f"worker with 1 sub-env {worker1:,.0f}: {local1['steps_per_s'] / worker1:.2f}x (goal >= 0.5x); "
          f"{args.clients} clients {local['steps_per_s']:,.0f} against a worker with {args.clients} sub-envs "
          f"(one forward pass for all) {worker_n:,.0f}: {local['steps_per_s'] / worker_n:.2f}x")
    served = serve_benchmark(args.seconds)
    for batch, r in served.items():
        print(f"(3) flowrl serve, 4 clients, {batch} observation{'s' if batch > 1 else ''} per request: "
              f"{r['requests_per_s']:,.0f} requests/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    if args.learning:
        with tempfile.TemporaryDirectory() as tmp:
            figures = learning(Path(tmp))
        p, d = figures["ppo"], figures["dqn"]
        print(f"(4) PPO through 4 clients: episode_return_mean {p['episode_return_mean']:.1f} at {p['env_steps']:,} "
              f"env steps in {p['seconds']:.0f} s")
        greedy = d["greedy_475_at_env_steps_and_s"]
        greedy_text = f"greedy 10-episode mean >= 475 first at {greedy[0]:,} env steps ({greedy[1]:.0f} s)" \
            if greedy else "greedy evaluation never reached 475"
        print(f"    DQN through 4 epsilon-greedy clients (log_action): episode_return_mean "
              f"{d['episode_return_mean']:.1f} at {d['env_steps']:,} env steps in {d['seconds']:.0f} s; {greedy_text}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve_client":
        serve_client_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
