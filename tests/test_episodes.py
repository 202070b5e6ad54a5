"""Episode ids and returns-to-go of recorded episodes: ids unique across worker instances,
datasets whose ids two episodes share refused by name, MARWIL's returns bootstrapped where
an episode was truncated or cut."""

import numpy as np
import pytest
import torch

from flowrl.cli import main
from flowrl.config import parse_config
from flowrl.connectors import Dataset, DatasetWriter
from flowrl.connectors.input import DatasetError
from flowrl.connectors.inspect import inspect_dataset
from flowrl.connectors.reader import EpisodeReturns, complete_episodes
from flowrl.plans.marwil import AddReturnsToGo, MARWILConfig, build_marwil_plan
from flowrl.rollout import RolloutWorker, WorkerSet
from flowrl.sample_batch import SampleBatch


def write(path, **columns):
    with DatasetWriter(path, columns=None) as writer:
        writer.write(SampleBatch({k: np.asarray(v) for k, v in columns.items()}))
    return writer.files[0]


# ---- unique ids -----------------------------------------------------------------------------------
def test_worker_instances_with_the_same_seed_and_index_have_disjoint_episode_ids():
    # A replaced worker, a resumed run, a second run: a new instance with the same seed and index.
    ids = []
    for _ in range(2):
        worker = RolloutWorker("CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=64, seed=0,
                               actor_index=1)
        ids.append(np.concatenate([worker.sample()["eps_id"] for _ in range(3)]))
        worker.close()
    assert len(np.unique(ids[0])) > 2 and len(np.unique(ids[1])) > 2   # several episodes each
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    assert ids[0].dtype == np.int64 and ids[0].min() >= 0


# ---- ids two episodes share -----------------------------------------------------------------------
def two_recordings_reusing_an_id(path):
    """Two recordings each starting their episode ids at 5 (as separate runs did before ids were unique)."""
    def recording(n):
        return write(path, eps_id=[5] * n, t=range(n), rewards=np.ones(n, np.float32),
                     terminateds=[False] * (n - 1) + [True], truncateds=np.zeros(n, bool),
                     obs=np.zeros((n, 4), np.float32), new_obs=np.zeros((n, 4), np.float32),
                     actions=np.zeros(n, np.int64))

    return recording(3), recording(2)


def test_returns_refuse_an_id_that_two_episodes_share_naming_both_files(tmp_path):
    first, second = two_recordings_reusing_an_id(tmp_path)
    with pytest.raises(DatasetError, match="eps_id 5: the step t=0 appears twice") as e:
        EpisodeReturns.from_dataset(Dataset.open(tmp_path), gamma=0.9)
    assert str(first) in str(e.value) and str(second) in str(e.value)
    assert "two episodes share this id" in str(e.value)


def test_off_policy_episodes_refuse_an_id_that_two_episodes_share(tmp_path):
    first, second = two_recordings_reusing_an_id(tmp_path)
    with pytest.raises(DatasetError, match="eps_id 5: ") as e:
        complete_episodes(Dataset.open(tmp_path), ["rewards"], 10)
    assert str(first) in str(e.value) and str(second) in str(e.value)


def test_dataset_inspect_counts_ids_that_several_episodes_share(tmp_path, capsys):
    two_recordings_reusing_an_id(tmp_path)
    assert main(["dataset", "inspect", str(tmp_path)]) == 0
    assert "1 eps_id(s) shared by several episodes" in capsys.readouterr().out
    assert inspect_dataset(Dataset.open(tmp_path))["episodes"]["shared_ids"] == 1


def test_rows_after_an_episode_ended_are_refused(tmp_path):
    # No step twice, but the id goes on after its episode terminated at t=1: a second episode's later part.
    write(tmp_path, eps_id=[5, 5, 5, 5], t=[0, 1, 2, 3], rewards=np.ones(4, np.float32),
          terminateds=[False, True, False, False], truncateds=np.zeros(4, bool), new_obs=np.zeros((4, 1), np.float32))
    with pytest.raises(DatasetError, match="eps_id 5: rows go on after the episode ended at t=1"):
        EpisodeReturns.from_dataset(Dataset.open(tmp_path), gamma=0.9)


def test_an_episode_split_over_two_files_is_one_episode(tmp_path):
    # What the writer does every max_rows_per_file rows: not a shared id.
    write(tmp_path, eps_id=[5, 5], t=[0, 1], rewards=np.ones(2, np.float32), terminateds=[False, False],
          truncateds=np.zeros(2, bool), new_obs=np.zeros((2, 1), np.float32))
    write(tmp_path, eps_id=[5], t=[2], rewards=np.ones(1, np.float32), terminateds=[True],
          truncateds=np.zeros(1, bool), new_obs=np.zeros((1, 1), np.float32))
    returns = EpisodeReturns.from_dataset(Dataset.open(tmp_path), gamma=0.5)
    assert returns.lookup(np.array([5, 5, 5]), np.array([0, 1, 2])).tolist() == [1.75, 1.5, 1.0]
    assert complete_episodes(Dataset.open(tmp_path), ["rewards"], 10)["t"].tolist() == [0, 1, 2]


def test_marwil_run_on_a_dataset_with_a_shared_id_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    two_recordings_reusing_an_id(data)
    plan = tmp_path / "marwil.yaml"
    plan.write_text("m:\n  env: CartPole-v1\n  run: MARWIL\n  stop: {timesteps_total: 100}\n"
                    f"  config: {{input: '{data}', evaluation_interval: 0}}\n")
    code = main(["run", str(plan), "--output-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("flowrl: error: "), err
    assert "eps_id 5: the step t=0 appears twice" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()   # refused before a run directory was made


# ---- returns-to-go bootstrapped at truncation -----------------------------------------------------
R = [1.0, 2.0, 3.0, 4.0]
FINAL_OBS = [[7.0]]   # new_obs of the last row: V(s_4) = 10 below


def value_of_final_obs(obs):
    assert obs.tolist() == FINAL_OBS   # asked once, for the one episode that needs it
    return np.array([10.0])


@pytest.mark.parametrize("ending, expected", [
    # terminated: G = [1 + .9*2 + .81*3 + .729*4, 2 + .9*3 + .81*4, 3 + .9*4, 4] = [8.146, 7.94, 6.6, 4]
    ("terminated", [8.146, 7.94, 6.6, 4.0]),
    # truncated at t=3: G_3 = 4 + .9 * V(s_4) = 13, G_2 = 3 + .9*13 = 14.7, G_1 = 2 + .9*14.7 = 15.23,
    # G_0 = 1 + .9*15.23 = 14.707
    ("truncated", [14.707, 15.23, 14.7, 13.0]),
    # cut where the recording stops (neither flag): bootstrapped the same way
    ("cut", [14.707, 15.23, 14.7, 13.0]),
])
def test_returns_to_go_by_hand_terminated_truncated_and_cut(tmp_path, ending, expected):
    last = [False, False, False, True]
    no = [False] * 4
    write(tmp_path, eps_id=[3, 3, 3, 3], t=[0, 1, 2, 3], rewards=np.array(R, np.float32),
          terminateds=last if ending == "terminated" else no, truncateds=last if ending == "truncated" else no,
          new_obs=np.array([[1.0], [2.0], [3.0], FINAL_OBS[0]], np.float32))
    returns = EpisodeReturns.from_dataset(Dataset.open(tmp_path), gamma=0.9)
    got = returns.lookup(np.array([3, 3, 3, 3]), np.array([2, 0, 3, 1]), value=value_of_final_obs)
    np.testing.assert_allclose(got, np.array(expected)[[2, 0, 3, 1]], atol=1e-5)


def test_marwil_value_targets_use_the_learners_current_value(tmp_path):
    # The same 4-step truncated episode; V(s_4) from the learner's value network, which changes as it learns.
    write(tmp_path, eps_id=[3, 3, 3, 3], t=[0, 1, 2, 3], rewards=np.array(R, np.float32), terminateds=[False] * 4,
          truncateds=[False, False, False, True], obs=np.zeros((4, 4), np.float32), actions=np.zeros(4, np.int64),
          new_obs=np.full((4, 4), 0.5, np.float32))
    config = parse_config(MARWILConfig, {"input": str(tmp_path), "gamma": 0.9, "evaluation_interval": 0})
    workers = WorkerSet(**config.worker_kwargs("CartPole-v1"))
    add = AddReturnsToGo(EpisodeReturns.from_dataset(Dataset.open(tmp_path), 0.9), workers)
    batch = SampleBatch({"eps_id": np.array([3, 3]), "t": np.array([3, 0])})
    for _ in range(2):
        v = float(workers.policy.value(np.full((1, 4), 0.5, np.float32))[0])
        # G_3 = 4 + .9 V ; G_0 = 1 + .9*2 + .81*3 + .729*4 + .9^4 V = 8.146 + .6561 V
        np.testing.assert_allclose(add(batch)["value_targets"], [4 + 0.9 * v, 8.146 + 0.6561 * v], atol=1e-5)
        with torch.no_grad():
            workers.policy.model.vf[-1].bias += 5.0
    assert build_marwil_plan(workers, config) is not None


def test_bootstrapping_needs_new_obs(tmp_path):
    write(tmp_path, eps_id=[3, 3], t=[0, 1], rewards=np.ones(2, np.float32), terminateds=[False, False])
    with pytest.raises(DatasetError, match="1 episode.* end without terminating .* no 'new_obs' column"):
        EpisodeReturns.from_dataset(Dataset.open(tmp_path), gamma=0.9)


def test_returns_need_terminateds(tmp_path):
    write(tmp_path, eps_id=[3, 3], t=[0, 1], rewards=np.ones(2, np.float32))
    with pytest.raises(DatasetError, match="missing column 'terminateds'"):
        EpisodeReturns.from_dataset(Dataset.open(tmp_path), gamma=0.9)
