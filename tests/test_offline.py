"""Offline datasets: output and input connectors, RLlib JSON and Minari readers, offline plans
(BC, MARWIL), off-policy estimates, `flowrl dataset inspect`, and one-line errors on bad data."""

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowrl import SampleBatch
from flowrl.cli import main
from flowrl.connectors import OUTPUT_COLUMNS, Dataset, DatasetError, DatasetWriter, shuffled
from flowrl.connectors.reader import DatasetInput, EpisodeReturns, complete_episodes
from flowrl.estimators import importance_sampling
from flowrl.plan import Plan
from flowrl.rollout import WorkerSet
from tests.strategies import batches

ROOT = Path(__file__).resolve().parent.parent


def cartpole_batches(n=3, seed=0, num_envs=4, fragment=64):
    workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=num_envs, rollout_fragment_length=fragment, seed=seed)
    out = [workers.local_worker.sample() for _ in range(n)]
    workers.local_worker.close()
    return out


def record(path, batches_, **kwargs):
    with DatasetWriter(path, **kwargs) as writer:
        for b in batches_:
            writer.write(b)
    return writer


def read_all(path, columns=None):
    data = Dataset.open(path)
    parts = [SampleBatch(cols, {k: v for k, v in data.spaces.items() if k in cols}) for cols in data.scan(columns)]
    return SampleBatch.concat(parts)


# ---- output connector ----------------------------------------------------------------------------
def test_parquet_output_uses_rllib_names_tensor_columns_and_spaces(tmp_path):
    sampled = cartpole_batches()
    writer = record(tmp_path, sampled, max_rows_per_file=300)
    assert [f.name.endswith(".parquet") for f in writer.files] == [True] * 3  # 768 rows -> 300, 300, 168
    table = pq.read_table(tmp_path)  # plain pyarrow, no flowrl
    assert table.column_names == list(OUTPUT_COLUMNS)
    assert table.num_rows == 768
    assert isinstance(table.schema.field("obs").type, pa.FixedShapeTensorType)
    assert table.schema.field("obs").type.shape == [4]
    assert table.schema.field("terminateds").type == pa.bool_()
    got = read_all(tmp_path)
    expected = SampleBatch.concat(sampled).select(list(OUTPUT_COLUMNS))
    assert got == SampleBatch(expected.to_numpy(), expected.spaces)
    assert got.spaces["actions"] == gym.spaces.Discrete(2)


def test_files_read_without_flowrl_in_plain_pyarrow_and_ray_data(tmp_path, ray_session):
    record(tmp_path, cartpole_batches(n=1))
    code = ("import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); "
            "assert not any(m.startswith('flowrl') for m in sys.modules); "
            "print(t.num_rows, t.schema.field('obs').type.shape, t.column('actions').to_pylist()[:3])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("256 [4] [")
    import ray.data

    rows = ray.data.read_parquet(str(tmp_path)).take_batch(8, batch_format="numpy")
    assert rows["obs"].shape == (8, 4) and rows["terminateds"].dtype == bool


def test_arrow_ipc_output_round_trips(tmp_path):
    sampled = cartpole_batches(n=2)
    writer = record(tmp_path, sampled, format="arrow", compression="lz4", max_rows_per_file=200, row_group_size=64)
    assert all(f.suffix == ".arrow" for f in writer.files)
    with pa.ipc.open_file(writer.files[0]) as reader:  # plain pyarrow
        assert reader.schema.field("obs").type.shape == [4]
    data = Dataset.open(tmp_path)
    assert data.format == "arrow" and data.num_rows == 512 and len(data.chunks) > len(data.files)
    assert read_all(tmp_path)["actions"].tolist() == SampleBatch.concat(sampled)["actions"].tolist()


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    writer = DatasetWriter(tmp_path, max_rows_per_file=1000)
    writer.write(cartpole_batches(n=1)[0])

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    assert list(tmp_path.iterdir()) == []


def test_readers_skip_temporary_files_of_a_crashed_writer(tmp_path):
    record(tmp_path, cartpole_batches(n=1))
    (tmp_path / ".part-x-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert Dataset.open(tmp_path).num_rows == 256


def test_any_plan_records_what_it_samples(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
rec:
  env: CartPole-v1
  run: A2C
  stop: {{timesteps_total: 600}}
  config: {{num_envs_per_worker: 2, rollout_fragment_length: 50, output: {tmp_path / 'data'},
           output_max_rows_per_file: 250, seed: 0}}
""")
    assert main(["run", str(plan), "--output-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    data = Dataset.open(tmp_path / "data")
    assert data.num_rows == 600 and len(data.files) == 3  # 250 + 250 + the rest at the end


# ---- round trips (hypothesis) --------------------------------------------------------------------
@settings(max_examples=30)
@given(batch=batches(min_rows=1), fmt=st.sampled_from(["parquet", "arrow"]), rows_per_file=st.integers(1, 50))
def test_written_batches_read_back_equal(tmp_path_factory, batch, fmt, rows_per_file):
    path = tmp_path_factory.mktemp("ds")
    record(path, [batch], format=fmt, max_rows_per_file=rows_per_file, columns=None, row_group_size=7)
    assert read_all(path) == batch


@settings(max_examples=20)
@given(n=st.integers(1, 300), batch_size=st.integers(1, 64), capacity=st.integers(1, 100), epochs=st.integers(1, 3))
def test_shuffled_batches_cover_every_row_once_per_epoch(tmp_path_factory, n, batch_size, capacity, epochs):
    path = tmp_path_factory.mktemp("ds")
    record(path, [SampleBatch({"i": np.arange(n), "obs": np.arange(2 * n, dtype=np.float32).reshape(n, 2)})],
           columns=None, row_group_size=17)
    out = list(Dataset.open(path).batches(["i", "obs"], batch_size, capacity, seed=0, num_epochs=epochs))
    rows = np.concatenate([b["i"] for b in out])
    assert sorted(rows.tolist()) == sorted(list(range(n)) * epochs)
    assert all(len(b) == batch_size for b in out[:-1]) and 0 < len(out[-1]) <= batch_size
    assert np.array_equal(np.concatenate([b["obs"] for b in out]), np.stack([2 * rows, 2 * rows + 1], 1))


def test_shuffling_mixes_rows_and_is_seeded(tmp_path):
    record(tmp_path, [SampleBatch({"i": np.arange(5000)})], columns=None, row_group_size=1000)
    data = Dataset.open(tmp_path)
    first = next(data.batches(["i"], 512, 2000, seed=1))["i"]
    assert np.array_equal(first, next(data.batches(["i"], 512, 2000, seed=1))["i"])
    assert not np.array_equal(first, next(data.batches(["i"], 512, 2000, seed=2))["i"])
    assert len(np.unique(first // 1000)) > 1  # rows from several row groups in one batch
    assert np.abs(np.diff(first)).mean() > 100  # not runs of consecutive rows


@settings(max_examples=30)
@given(n=st.integers(1, 400), capacity=st.integers(1, 120), batch_size=st.integers(1, 50),
       chunk=st.integers(1, 90), seed=st.integers(0, 2**32 - 1))
def test_shuffle_buffer_keeps_each_row_within_its_window(n, capacity, batch_size, chunk, seed):
    # A row leaves when its slot comes up in the buffer's random visiting order: after at most
    # 2 * capacity arrivals, so no row moves 2 * capacity places or more (and none moves ahead
    # by capacity or more). Each row comes out once; the buffer's rows drain in random order.
    rows = np.arange(n)
    parts = ({"i": rows[a:a + chunk], "x": np.stack([rows[a:a + chunk]] * 3, 1).astype(np.float32)}
             for a in range(0, n, chunk))
    out = list(shuffled(parts, batch_size, capacity, np.random.default_rng(seed)))
    order = np.concatenate([b["i"] for b in out])
    assert sorted(order.tolist()) == rows.tolist()
    assert all(len(b["i"]) % batch_size == 0 for b in out[:-1])
    assert np.array_equal(np.concatenate([b["x"] for b in out]), np.stack([order] * 3, 1))
    moved = np.arange(n) - np.argsort(order)  # where each row went, minus where it came in
    assert moved.max() < capacity and moved.min() > -2 * capacity


def test_shuffle_buffer_draws_rows_uniformly_from_its_window():
    # With the buffer full of rows 0..C-1, the next C rows out are those rows in a random
    # order: over many seeds each row is about equally likely at each position.
    capacity, trials = 8, 4000
    counts = np.zeros((capacity, capacity))
    for seed in range(trials):
        parts = iter([{"i": np.arange(2 * capacity)}])
        first = next(shuffled(parts, capacity, capacity, np.random.default_rng(seed)))["i"][:capacity]
        counts[first, np.arange(capacity)] += 1
    expected = trials / capacity
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # 5 standard deviations


def test_dataset_input_streams_on_both_executors(tmp_path, executor):
    record(tmp_path, cartpole_batches(n=2), max_rows_per_file=200)  # 3 files
    with Plan(DatasetInput(tmp_path, ["obs", "actions"], batch_size=100, seed=0, num_epochs=2),
              executor=executor) as plan:
        results = list(plan.run())
    rows = sum(len(r["output"]) for r in results)
    assert rows == 1024 and results[-1]["num_rows_read"] == 1024 == results[-1]["num_env_steps_sampled"]
    assert results[0]["output"].columns == ["obs", "actions"]
    assert results[0]["output"]["obs"].shape == (100, 4)


def test_dataset_at_a_uri_streams_on_both_executors(tmp_path, executor):
    # URIs name files through a filesystem (s3://, gs://, ...); file:// takes the same path
    # without a network: listing, footers, row groups, and Ray Data's read tasks.
    record(tmp_path / "d", cartpole_batches(n=2), max_rows_per_file=200)  # 3 files
    uri = (tmp_path / "d").as_uri()
    data = Dataset.open(uri)
    assert data.num_rows == 512 and all(f.startswith("file:///") for f in data.files)
    assert Dataset.open(f"{uri}/*.parquet").files == data.files
    with Plan(DatasetInput(uri, ["obs", "actions"], batch_size=100, seed=0, num_epochs=2), executor=executor) as plan:
        results = list(plan.run())
    assert sum(len(r["output"]) for r in results) == 1024
    assert read_all(uri) == read_all(tmp_path / "d")


def test_dataset_in_an_fsspec_filesystem(tmp_path):
    # Schemes pyarrow does not know go through fsspec (here its in-memory filesystem).
    import fsspec

    record(tmp_path / "p", cartpole_batches(n=1), max_rows_per_file=100)
    record(tmp_path / "a", cartpole_batches(n=1), max_rows_per_file=100, format="arrow")
    memory = fsspec.filesystem("memory")
    for fmt in ("p", "a"):
        for f in sorted((tmp_path / fmt).iterdir()):
            memory.pipe(f"/flowrl-test/{fmt}/{f.name}", f.read_bytes())
        assert read_all(f"memory://flowrl-test/{fmt}") == read_all(tmp_path / fmt)
        data = Dataset.open(f"memory://flowrl-test/{fmt}")
        rows = np.concatenate([b["t"] for b in data.batches(["t"], 64, 100, seed=0, num_epochs=1)])
        assert len(rows) == data.num_rows == 256
    with pytest.raises(DatasetError, match="memory://flowrl-test/none: no such file or directory"):
        Dataset.open("memory://flowrl-test/none")
    with pytest.raises(DatasetError, match="no data files match"):
        Dataset.open("memory://flowrl-test/p/*.arrow")
    with pytest.raises(DatasetError, match="nosuch://x: unknown filesystem"):
        Dataset.open("nosuch://x")
    memory.pipe("/flowrl-test/j/out.json", b"{}\n")
    with pytest.raises(DatasetError, match="RLlib JSON datasets are read from local files"):
        Dataset.open("memory://flowrl-test/j")
    memory.rm("/flowrl-test", recursive=True)


def test_missing_dataset_at_a_uri_is_one_line_from_the_cli(tmp_path, capsys):
    uri = (tmp_path / "nope").as_uri()
    assert f"config.input: {uri}: no such file or directory" in bad_input(tmp_path, capsys, uri)


# ---- RLlib JSON and Minari -----------------------------------------------------------------------
def rllib_pack(array):
    from ray import cloudpickle
    import lz4.frame

    return base64.b64encode(lz4.frame.compress(cloudpickle.dumps(array))).decode("ascii")


def test_rllib_json_output_with_packed_columns(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for k in range(130):  # three blocks of lines (64, 64, 2)
        obs = rng.normal(size=(5, 4)).astype(np.float32)
        lines.append(json.dumps({"type": "SampleBatch", "obs": rllib_pack(obs), "new_obs": rllib_pack(obs + 1),
                                 "actions": [0, 1, 1, 0, 1], "rewards": [1.0] * 5,
                                 "dones": [False] * 4 + [True], "eps_id": [k] * 5, "t": list(range(5)),
                                 "action_logp": [-0.69] * 5, "infos": [{}] * 5}))
    (tmp_path / "output-2024-01-01_worker-0_0.json").write_text("\n".join(lines) + "\n")
    data = Dataset.open(tmp_path)
    assert data.format == "json" and len(data.chunks) == 3
    batch = read_all(tmp_path)
    assert len(batch) == 650 and batch["obs"].shape == (650, 4) and batch["obs"].dtype == np.float32
    assert batch["eps_id"].tolist() == np.repeat(np.arange(130), 5).tolist()
    assert batch["terminateds"].tolist() == ([False] * 4 + [True]) * 130  # RLlib's old "dones"
    assert np.allclose(batch["new_obs"], batch["obs"] + 1)
    assert "infos" not in batch.columns


def test_rllib_json_pickled_payloads_are_refused_not_run(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    import lz4.frame

    evil = base64.b64encode(lz4.frame.compress(pickle.dumps(Payload()))).decode()
    path = tmp_path / "output.json"
    path.write_text(json.dumps({"type": "SampleBatch", "obs": evil, "actions": [0]}) + "\n")
    assert main(["dataset", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: line 1: column 'obs': refusing to load posix.system" in err and err.count("\n") == 1
    assert not (tmp_path / "pwned").exists()


def test_minari_dataset(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    from minari.data_collector import EpisodeBuffer

    env = gym.make("CartPole-v1")
    episodes = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        steps = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(steps, (obs, action, reward, terminated, truncated)):
                steps[key].append(value)
            done = terminated or truncated
        episodes.append(EpisodeBuffer(id=seed, observations=np.array(steps.pop("observations")),
                                      actions=np.array(steps.pop("actions")), **steps))
    with pytest.warns(UserWarning):  # minari asks for a description and an eval env
        minari.create_dataset_from_buffers("cartpole/random-v0", episodes, env=env, algorithm_name="random",
                                           data_format="arrow")
    data = Dataset.open("minari:cartpole/random-v0")
    assert data.spaces["actions"] == gym.spaces.Discrete(2)
    batch = read_all("minari:cartpole/random-v0")
    ds = minari.load_dataset("cartpole/random-v0")
    assert len(batch) == ds.total_steps
    first = next(ds.iterate_episodes([0]))
    n = len(first.actions)
    assert np.allclose(batch["obs"][:n], first.observations[:-1]) and np.allclose(batch["new_obs"][:n],
                                                                                  first.observations[1:])
    assert batch["terminateds"][n - 1] and batch["t"][:n].tolist() == list(range(n))


# ---- bad input -----------------------------------------------------------------------------------
def bad_input(tmp_path, capsys, dataset, env="CartPole-v1"):
    plan = tmp_path / "bc.yaml"
    env_line = f"env: {env}" if env else ""
    plan.write_text(f"bc:\n  {env_line}\n  run: BC\n  stop: {{timesteps_total: 1000}}\n"
                    f"  config: {{input: '{dataset}'}}\n")
    code = main(["run", str(plan), "--output-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("flowrl: error: "), err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    return err


def test_missing_columns_are_named(tmp_path, capsys):
    record(tmp_path / "d", [SampleBatch({"obs": np.zeros((4, 4), np.float32), "rewards": np.ones(4)})])
    err = bad_input(tmp_path, capsys, tmp_path / "d")
    assert f"config.input: {tmp_path / 'd'}: missing column 'actions' (the dataset has: obs, rewards)" in err


def test_shapes_that_do_not_fit_the_env_are_named(tmp_path, capsys):
    record(tmp_path / "d", [SampleBatch({"obs": np.zeros((4, 3), np.float32), "actions": np.zeros(4, np.int64)})])
    err = bad_input(tmp_path, capsys, tmp_path / "d")
    assert "column 'obs' has rows of shape (3,), but the space Box(" in err and "needs (4,)" in err


def test_shapes_that_do_not_fit_the_recorded_spaces_are_named(tmp_path, capsys):
    spaces = {"obs": gym.spaces.Box(-1, 1, (5,), np.float32), "actions": gym.spaces.Discrete(2)}
    record(tmp_path / "d", [SampleBatch({"obs": np.zeros((4, 3), np.float32), "actions": np.zeros(4, np.int64)},
                                        spaces)])
    assert "column 'obs' has rows of shape (3,)" in bad_input(tmp_path, capsys, tmp_path / "d", env=None)


def test_truncated_and_corrupt_files_are_named(tmp_path, capsys):
    record(tmp_path / "d", cartpole_batches(n=2), max_rows_per_file=256)
    victim = sorted((tmp_path / "d").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])
    err = bad_input(tmp_path, capsys, tmp_path / "d")
    assert f"{victim}: not a readable Parquet file (truncated or corrupt?)" in err
    victim.write_bytes(os.urandom(4000))
    assert f"{victim}: not a readable Parquet file" in bad_input(tmp_path, capsys, tmp_path / "d")


def test_empty_and_missing_datasets(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'}: an empty dataset" in bad_input(tmp_path, capsys, tmp_path / "empty")
    assert f"{tmp_path / 'nope'}: no such file or directory" in bad_input(tmp_path, capsys, tmp_path / "nope")
    assert "no data files match" in bad_input(tmp_path, capsys, tmp_path / "*.parquet")
    pq.write_table(pa.table({"obs": pa.array([], pa.float32()), "actions": pa.array([], pa.int64())}),
                   tmp_path / "empty" / "zero.parquet")
    assert "an empty dataset (0 rows)" in bad_input(tmp_path, capsys, tmp_path / "empty")


def test_dataset_without_spaces_needs_an_env(tmp_path, capsys):
    pq.write_table(pa.table({"obs": pa.array([1.0, 2.0]), "actions": pa.array([0, 1])}), tmp_path / "x.parquet")
    assert "has no spaces for obs and actions; name the env" in bad_input(tmp_path, capsys, tmp_path / "x.parquet",
                                                                           env=None)


# ---- estimates and returns -----------------------------------------------------------------------
def test_episode_returns_by_hand():
    # Episode 3: rewards 1, 2, 4 with gamma 0.5 -> G = [1 + 0.5*2 + 0.25*4, 2 + 0.5*4, 4] = [3, 4, 4].
    # Episode 1 (rows given out of order): rewards 10, 20 -> G = [20, 20].
    returns = EpisodeReturns(np.array([3, 1, 3, 3, 1]), np.array([0, 1, 1, 2, 0]),
                             np.array([1.0, 20.0, 2.0, 4.0, 10.0]), gamma=0.5)
    assert returns.lookup(np.array([1, 3, 3, 1, 3]), np.array([0, 2, 0, 1, 1])).tolist() == [20, 4, 3, 20, 4]
    with pytest.raises(DatasetError, match="time steps are not consecutive"):
        EpisodeReturns(np.array([1, 1]), np.array([0, 2]), np.ones(2), gamma=0.5)


def test_importance_sampling_by_hand():
    # Episode A: pi/mu = 2 then 0.5 (rho = 2, 1), rewards 1, 1; episode B: pi/mu = 0.5 (rho = 0.5), reward 3.
    # gamma = 0.9. V_behavior: A = 1 + 0.9 = 1.9, B = 3 -> 2.45.
    # IS: A = 2 + 0.9 * 1 = 2.9, B = 1.5 -> 2.2.
    # WIS: w_0 = (2 + 0.5) / 2 = 1.25, w_1 = 1 -> A = 2/1.25 + 0.9 * 1 = 2.5, B = 0.5/1.25 * 3 = 1.2 -> 1.85.
    target = np.log([0.8, 0.2, 0.1])
    behavior = np.log([0.4, 0.4, 0.2])
    out = importance_sampling(target, behavior, [1.0, 1.0, 3.0], [7, 7, 9], gamma=0.9)
    assert out["v_behavior"] == pytest.approx(2.45, abs=1e-9)
    assert out["is/v_target"] == pytest.approx(2.2, abs=1e-9)
    assert out["wis/v_target"] == pytest.approx(1.85, abs=1e-9)
    assert out["is/v_gain"] == pytest.approx(2.2 / 2.45) and out["episodes"] == 2


def test_complete_episodes_only_whole_ones(tmp_path):
    cols = {"eps_id": np.array([5, 5, 6, 6, 7]), "t": np.array([3, 4, 0, 1, 0]),
            "terminateds": np.array([False, True, False, True, False]), "truncateds": np.zeros(5, bool),
            "rewards": np.ones(5, np.float32)}
    record(tmp_path, [SampleBatch(cols)], columns=None)
    episodes = complete_episodes(Dataset.open(tmp_path), ["rewards"], 10)
    assert episodes["eps_id"].tolist() == [6, 6]  # 5 lacks its start, 7 its end


# ---- plans and tools -----------------------------------------------------------------------------
def test_marwil_mixes_dataset_rows_with_fresh_samples(tmp_path):
    from flowrl.config import parse_config
    from flowrl.plans import MARWILConfig, build_marwil_plan

    record(tmp_path, cartpole_batches(n=2))
    config = parse_config(MARWILConfig, {"input": str(tmp_path), "input_fraction": 0.5, "train_batch_size": 256,
                                         "num_envs_per_worker": 2, "rollout_fragment_length": 64, "seed": 0,
                                         "evaluation_interval": 0, "off_policy_estimation_episodes": 5})
    workers = WorkerSet(**config.worker_kwargs("CartPole-v1"))
    with build_marwil_plan(workers, config) as plan:
        result = plan.step()
    assert result["num_rows_read"] == 128 and result["num_env_steps_sampled"] == 256
    assert result["num_env_steps_trained"] == 256
    assert {"policy_loss", "vf_loss", "mean_weight"} <= set(result)
    assert result["off_policy_estimation"]["episodes"] == 5


def test_dataset_inspect(tmp_path, capsys):
    record(tmp_path, cartpole_batches(n=2, num_envs=1, fragment=300))
    assert main(["dataset", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "parquet, 1 file(s)" in out and "600 rows" in out and "actions        Discrete(2)" in out
    assert main(["dataset", "inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    batch = read_all(tmp_path)
    ends = batch["terminateds"] | batch["truncateds"]
    assert info["rows"] == 600 and info["columns"]["obs"]["shape"] == [4]
    assert info["episodes"]["total"] == len(np.unique(batch["eps_id"]))
    assert info["episodes"]["complete"] == int(ends.sum())
    assert info["episodes"]["return_mean"] == pytest.approx(batch["t"][ends].mean() + 1)


def test_record_with_ppo_then_clone_with_bc(tmp_path):
    """The README's offline example, end to end through the console script."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def flowrl(*args):
        proc = subprocess.run([sys.executable, "-m", "flowrl.cli", *args, "--quiet", "--seed", "0"], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    flowrl("run", "examples/ppo_cartpole_record.yaml")
    assert Dataset.open(tmp_path / "datasets" / "cartpole-ppo").num_rows >= 150_000
    out = flowrl("run", "examples/bc_cartpole.yaml")
    assert "(evaluation/episode_return_mean" in out
    run_dir = tmp_path / "runs" / "cartpole-bc" / "latest"
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["evaluation/episode_return_mean"] >= 450
