"""Replay: the row buffer (n-step returns at insertion against hand-computed answers, ring
overwrite, memory), prioritized sampling and its trees (hypothesis), checkpoints, and the
operators that run store and replay side by side (Concurrently's round-robin weights)."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowrl import ActorSet, Plan, PlanStructureError, Stream, from_actors, union
from flowrl.operators import (Concurrently, Replay, ReplayBuffer, StoreToReplayBuffer, UpdatePriorities,
                              check_replay_memory, weights_for_training_intensity)
from flowrl.operators.replay import BatchReplayBuffer, MixInReplay, format_nbytes
from flowrl.returns import n_step_sums
from flowrl.sample_batch import SampleBatch
from flowrl.segment_tree import MinTree, SumTree, update_together
from flowrl.stream import Order
from flowrl.testing import CountingSource

G = 0.9
R5 = [1.0, 2.0, 3.0, 4.0, 5.0]


def steps(eps_id, rewards, end=None, t0=0, env_step_obs=True):
    """Rows of one episode from step t0: obs s_t = [eps_id * 100 + t], new_obs = s_{t+1}; the
    last row ends the episode when `end` is "terminated" or "truncated"."""
    n = len(rewards)
    t = np.arange(t0, t0 + n)
    term, trunc = np.zeros(n, bool), np.zeros(n, bool)
    if end == "terminated":
        term[-1] = True
    elif end == "truncated":
        trunc[-1] = True
    return {"obs": (eps_id * 100 + t)[:, None].astype(np.float32),
            "actions": (t % 2).astype(np.int64),
            "rewards": np.asarray(rewards, np.float32),
            "new_obs": (eps_id * 100 + t + 1)[:, None].astype(np.float32),
            "terminateds": term, "truncateds": trunc,
            "eps_id": np.full(n, eps_id, np.int64), "t": t.astype(np.int64)}


def batch(*parts):
    """Rows of several episodes laid out one after another, as a rollout batch holds its
    sub-envs' fragments."""
    return SampleBatch({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def stored(buf):
    """Every stored row, ordered by obs (rows are unique per (episode, step))."""
    rows = buf.get(np.arange(len(buf)))
    order = np.argsort(rows["obs"][:, 0], kind="stable")
    return {k: rows[k][order] for k in rows.columns if k not in ("batch_indexes", "weights")}


def assert_same_rows(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- n-step returns, by hand (gamma 0.9, n 3, rewards 1..5) -------------------------------------
# G0 = 1 + .9*2 + .81*3 = 5.23   G1 = 2 + .9*3 + .81*4 = 7.94   G2 = 3 + .9*4 + .81*5 = 10.65
# G3 = 4 + .9*5 = 8.5 (two steps left)   G4 = 5 (one)
HAND_SUMS = [5.23, 7.94, 10.65, 8.5, 5.0]
HAND_DISCOUNTS = [0.729, 0.729, 0.729, 0.81, 0.9]
HAND_NEW_OBS = [3, 4, 5, 5, 5]   # s_{t+m}: the last three rows all reach the episode's final obs


def hand_episode_rows(end):
    """The rows stored from the 5-step episode ending in `end`: the same sums, discounts and
    next observations whichever way it ends."""
    buf = ReplayBuffer(100, n_step=3, gamma=G)
    assert buf.add(batch(steps(0, R5, end))) == 5
    rows = stored(buf)
    np.testing.assert_allclose(rows["rewards"], HAND_SUMS, atol=1e-5)
    np.testing.assert_allclose(rows["discounts"], HAND_DISCOUNTS, atol=1e-7)
    assert rows["new_obs"][:, 0].tolist() == HAND_NEW_OBS
    assert rows["obs"][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert rows["actions"].tolist() == [0, 1, 0, 1, 0]
    return rows


def test_n_step_terminated_episode_does_not_bootstrap_past_the_end():
    # Rows 2-4 reach the terminal step: their target is the reward sum alone.
    assert hand_episode_rows("terminated")["terminateds"].tolist() == [False, False, True, True, True]


def test_n_step_truncated_episode_bootstraps_from_the_last_obs():
    assert hand_episode_rows("truncated")["terminateds"].tolist() == [False] * 5


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_n_step_episode_split_across_two_adds_equals_one_add(cut):
    whole = ReplayBuffer(100, n_step=3, gamma=G)
    whole.add(batch(steps(0, R5, "terminated")))
    split = ReplayBuffer(100, n_step=3, gamma=G)
    first = steps(0, R5[:cut], t0=0)                      # the fragment ends mid-episode
    second = steps(0, R5[cut:], "terminated", t0=cut)
    # Only rows with all three steps in hand are stored; the rest wait for the next add().
    assert split.add(batch(first)) == max(cut - 2, 0)
    assert split.num_pending == min(cut, 2)
    assert split.add(batch(second)) == 5 - max(cut - 2, 0)
    assert split.num_pending == 0
    assert_same_rows(stored(split), stored(whole))


def test_n_step_one_row_per_add_equals_one_add():
    whole = ReplayBuffer(100, n_step=3, gamma=G)
    whole.add(batch(steps(0, R5, "truncated")))
    split = ReplayBuffer(100, n_step=3, gamma=G)
    counts = [split.add(batch(steps(0, [r], "truncated" if t == 4 else None, t0=t))) for t, r in enumerate(R5)]
    assert counts == [0, 0, 1, 1, 3]
    nothing = SampleBatch({k: v[:0] for k, v in steps(0, [1.0]).items()})
    assert split.add(nothing) == 0 and split.add(batch(steps(3, [1.0]))) == 0   # episode 3 waits
    assert split.add(nothing) == 0 and split.num_pending == 1
    split.add(batch(steps(3, [1.0], "terminated", t0=1)))
    whole.add(batch(steps(3, [1.0, 1.0], "terminated")))
    assert_same_rows(stored(split), stored(whole))


def test_n_step_two_interleaved_episodes():
    # Two sub-envs, each fragment laid out env by env, both cut mid-episode by the first add:
    # episode 1 (rewards 1..5) terminates, episode 2 (rewards 10, 20, 30, 40) is truncated.
    buf = ReplayBuffer(100, n_step=3, gamma=G)
    assert buf.add(batch(steps(1, R5[:3]), steps(2, [10.0, 20.0, 30.0]))) == 2  # t=0 of each
    assert buf.num_pending == 4
    assert buf.add(batch(steps(1, R5[3:], "terminated", t0=3), steps(2, [40.0], "truncated", t0=3))) == 7
    rows = stored(buf)
    ep1, ep2 = rows["obs"][:, 0] < 200, rows["obs"][:, 0] >= 200
    np.testing.assert_allclose(rows["rewards"][ep1], HAND_SUMS, atol=1e-5)
    assert rows["terminateds"][ep1].tolist() == [False, False, True, True, True]
    # 10 + .9*20 + .81*30 = 52.3 ; 20 + .9*30 + .81*40 = 79.4 ; 30 + .9*40 = 66 ; 40
    np.testing.assert_allclose(rows["rewards"][ep2], [52.3, 79.4, 66.0, 40.0], atol=1e-4)
    np.testing.assert_allclose(rows["discounts"][ep2], [0.729, 0.729, 0.81, 0.9], atol=1e-7)
    assert rows["new_obs"][ep2][:, 0].tolist() == [203, 204, 204, 204]
    assert rows["terminateds"][ep2].tolist() == [False] * 4


def test_n_step_rows_of_interleaved_episodes_in_any_order():
    # Rows alternating between two episodes (as if batches of two workers were merged) store
    # the same transitions as the episodes one after the other.
    a, b = steps(1, R5, "terminated"), steps(2, [10.0, 20.0, 30.0, 40.0, 50.0], "truncated")
    mixed = {k: np.stack([a[k], b[k]], axis=1).reshape(-1, *a[k].shape[1:]) for k in a}
    one, other = ReplayBuffer(100, n_step=3, gamma=G), ReplayBuffer(100, n_step=3, gamma=G)
    one.add(batch(a, b))
    other.add(SampleBatch(mixed))
    assert_same_rows(stored(one), stored(other))


def test_n_step_episode_that_ends_and_restarts_inside_a_fragment():
    # One sub-env: episode 5 terminates after two steps, episode 6 starts in the same fragment.
    buf = ReplayBuffer(100, n_step=2, gamma=0.5)
    assert buf.add(batch(steps(5, [1.0, 2.0], "terminated"), steps(6, [4.0, 8.0, 16.0]))) == 4
    rows = stored(buf)
    # ep 5: 1 + .5*2 = 2 (terminal), 2 (terminal); ep 6: 4 + .5*8 = 8, 8 + .5*16 = 16 (t=2 waits)
    assert rows["rewards"].tolist() == [2.0, 2.0, 8.0, 16.0]
    assert rows["terminateds"].tolist() == [True, True, False, False]
    assert rows["discounts"].tolist() == [0.25, 0.5, 0.25, 0.25]
    assert buf.num_pending == 1


def test_n_step_rows_whose_episode_skips_steps_are_stored_with_what_arrived():
    # The same episode id goes on at a later step (rows lost, or a restarted worker reusing
    # ids): the rows held are not held back forever; they bootstrap from the last obs they have.
    buf = ReplayBuffer(100, n_step=3, gamma=G)
    assert buf.add(batch(steps(0, [1.0, 2.0]))) == 0
    assert buf.add(batch(steps(0, [7.0], t0=5))) == 2
    rows = stored(buf)
    np.testing.assert_allclose(rows["rewards"], [1 + 0.9 * 2, 2.0], atol=1e-6)
    np.testing.assert_allclose(rows["discounts"], [0.81, 0.9], atol=1e-7)
    assert rows["new_obs"][:, 0].tolist() == [2, 2] and rows["terminateds"].tolist() == [False, False]
    assert buf.num_pending == 1   # step 5 waits for steps 6 and 7


def test_one_step_rows_are_the_transitions():
    buf = ReplayBuffer(100, gamma=G)   # n_step 1 needs no eps_id / t
    cols = steps(0, R5, "terminated")
    assert buf.add(SampleBatch({k: cols[k] for k in ("obs", "actions", "rewards", "new_obs", "terminateds")})) == 5
    rows = stored(buf)
    assert rows["rewards"].tolist() == R5
    np.testing.assert_allclose(rows["discounts"], [G] * 5)
    assert rows["new_obs"][:, 0].tolist() == [1, 2, 3, 4, 5]
    assert rows["terminateds"].tolist() == [False, False, False, False, True]


def test_n_step_sums_by_hand():
    sums, m = n_step_sums(R5, [False, False, False, False, True], G, 3)
    np.testing.assert_allclose(sums, HAND_SUMS, atol=1e-5)
    assert m.tolist() == [3, 3, 3, 2, 1]
    sums, m = n_step_sums([1.0, 2.0, 3.0], [True, False, False], 0.5, 2)   # two trajectories
    assert sums.tolist() == [1.0, 3.5, 3.0] and m.tolist() == [1, 2, 1]


@st.composite
def sub_env_streams(draw):
    """Per sub-env, a run of episodes (each ended by termination or truncation, the last one
    possibly still running), and the cut points that split each into fragments."""
    envs = []
    next_id = 0
    for _ in range(draw(st.integers(1, 3))):
        parts = []
        episodes = draw(st.integers(1, 4))
        for i in range(episodes):
            length = draw(st.integers(1, 7))
            rewards = draw(st.lists(st.integers(-3, 3).map(float), min_size=length, max_size=length))
            ends = ["terminated", "truncated"] + ([None] if i == episodes - 1 else [])  # only the last runs on
            parts.append(steps(next_id, rewards, draw(st.sampled_from(ends))))
            next_id += 1
        env = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        cuts = sorted(draw(st.lists(st.integers(0, len(env["t"])), max_size=4)))
        envs.append((env, cuts))
    return envs


def reference_transitions(env, n, gamma):
    """Plain-loop n-step transitions of one sub-env's rows: (obs id, reward sum, new_obs id,
    terminated, m) for every row whose m steps are known."""
    out = []
    T = len(env["t"])
    for i in range(T):
        g, m = 0.0, 0
        while True:
            j = i + m
            g += gamma ** m * float(env["rewards"][j])
            m += 1
            ended = env["terminateds"][j] or env["truncateds"][j]
            if m == n or ended:
                out.append((float(env["obs"][i, 0]), g, float(env["new_obs"][j, 0]), bool(env["terminateds"][j]), m))
                break
            if j + 1 == T:     # the episode is still running: this row waits
                break
    return out


@settings(max_examples=60, derandomize=True)
@given(sub_env_streams(), st.integers(1, 4))
def test_n_step_fragments_in_any_cut_store_the_reference_transitions(envs, n):
    expected = sorted(t for env, _ in envs for t in reference_transitions(env, n, G))
    whole, cut = ReplayBuffer(1000, n_step=n, gamma=G), ReplayBuffer(1000, n_step=n, gamma=G)
    whole.add(batch(*[env for env, _ in envs]))
    # Each add() holds every sub-env's next fragment, env by env (as a rollout batch does).
    pieces = [np.split(np.arange(len(env["t"])), cuts) for env, cuts in envs]
    for k in range(max(len(p) for p in pieces)):
        parts = [{c: v[p[k]] for c, v in env.items()} for (env, _), p in zip(envs, pieces) if k < len(p)]
        cut.add(batch(*parts))
    assert_same_rows(stored(cut), stored(whole))
    rows = stored(whole)
    got = list(zip(rows["obs"][:, 0].tolist(), rows["rewards"].tolist(), rows["new_obs"][:, 0].tolist(),
                   rows["terminateds"].tolist(), np.round(np.log(rows["discounts"]) / math.log(G)).astype(int).tolist()))
    assert [(o, no, term, m) for o, _, no, term, m in got] == [(o, no, term, m) for o, _, no, term, m in expected]
    np.testing.assert_allclose([g for _, g, *_ in got], [g for _, g, *_ in expected], rtol=1e-6, atol=1e-5)
    assert whole.num_pending == cut.num_pending == sum(len(env["t"]) for env, _ in envs) - len(expected)


# ---- the ring and its memory ------------------------------------------------------------------
def one_step(n, start=0, obs_dtype=np.float32, obs_shape=(1,)):
    ids = np.arange(start, start + n)
    obs = np.broadcast_to(ids.reshape(-1, *[1] * len(obs_shape)), (n, *obs_shape)).astype(obs_dtype)
    return SampleBatch({"obs": obs, "actions": np.zeros(n, np.int64), "rewards": ids.astype(np.float32),
                        "new_obs": obs + 1, "terminateds": np.zeros(n, bool)})


def test_ring_overwrites_the_oldest_rows():
    buf = ReplayBuffer(4)
    buf.add(one_step(3))
    buf.add(one_step(3, start=3))   # rows 3, 4, 5 go to slots 3, 0, 1
    assert len(buf) == 4
    assert buf.get(np.arange(4))["rewards"].tolist() == [4.0, 5.0, 2.0, 3.0]
    buf.add(one_step(9, start=10))  # more rows than slots: only the last four stay, in order
    assert buf.get(np.arange(4))["rewards"].tolist() == [16.0, 17.0, 18.0, 15.0]


def test_uint8_observations_stay_uint8_and_memory_is_known_up_front():
    image = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    spaces = {"obs": image, "new_obs": image, "actions": gym.spaces.Discrete(4)}
    buf = ReplayBuffer(50, prioritized=True)
    estimate = ReplayBuffer.estimate_nbytes(50, spaces, prioritized=True)
    assert buf.nbytes == 0
    buf.add(SampleBatch(one_step(3, obs_dtype=np.uint8, obs_shape=(84, 84, 4)).to_numpy(), spaces))
    sample = buf.sample(8)
    assert sample["obs"].dtype == np.uint8 and sample["new_obs"].dtype == np.uint8
    assert sample.spaces["obs"] == image
    # obs + new_obs 2 * 28,224, action 8, reward 4, terminated 1, discount 4; two trees of 2 * 64 nodes
    assert buf.nbytes == estimate == 50 * (2 * 28224 + 17) + 2 * 128 * 8
    # The example: 100k rows of 84x84x4 uint8 (columns only, never allocated here).
    assert format_nbytes(ReplayBuffer.estimate_nbytes(100_000, spaces)) == "5.65 GB"


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_estimate_matches_what_rollouts_allocate(env):
    from flowrl.rollout import WorkerSet

    workers = WorkerSet(env=env, num_envs_per_worker=2, rollout_fragment_length=4, seed=0)
    buf = ReplayBuffer(1000, n_step=2)
    buf.add(workers.local_worker.sample())
    assert buf.nbytes == ReplayBuffer.estimate_nbytes(1000, workers.spaces) > 0
    assert buf.sample(4).spaces["actions"] == workers.spaces["actions"]


def test_check_replay_memory_refuses_what_does_not_fit(monkeypatch):
    from flowrl.operators import replay

    spaces = {"obs": gym.spaces.Box(-1, 1, (4,)), "actions": gym.spaces.Discrete(2)}
    assert check_replay_memory(1000, spaces) == 49_000
    monkeypatch.setattr(replay, "available_memory", lambda: 1_000_000)
    assert check_replay_memory(20, spaces) == 980
    with pytest.raises(ValueError) as e:
        check_replay_memory(100_000, spaces)
    assert str(e.value) == ("replay_buffer_capacity 100,000 rows needs 4.9 MB of memory for its columns, but "
                            "only 1 MB is available; lower the capacity")
    assert replay.available_memory() is None or replay.available_memory() > 0


def test_add_rejects_missing_columns_and_a_changed_layout():
    buf = ReplayBuffer(10, n_step=3)
    cols = steps(0, R5)
    with pytest.raises(ValueError, match=r"no column\(s\) \['eps_id'\] \(needed for n_step > 1\)"):
        buf.add(SampleBatch({k: v for k, v in cols.items() if k != "eps_id"}))
    buf.add(SampleBatch(cols))
    with pytest.raises(ValueError, match="column 'obs' is float64\\[1\\], but the buffer holds float32\\[1\\]"):
        buf.add(SampleBatch({**cols, "obs": cols["obs"].astype(np.float64)}))
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4).sample(1)


# ---- prioritized replay -----------------------------------------------------------------------
updates = st.lists(st.tuples(st.lists(st.integers(0, 63), min_size=1, max_size=20),
                             st.lists(st.integers(0, 1000), min_size=20, max_size=20)), min_size=1, max_size=8)


@settings(max_examples=100, derandomize=True)
@given(st.integers(1, 64), updates, st.booleans())
def test_trees_stay_exact_after_batched_updates(capacity, batches, fractional):
    sums, mins = SumTree(capacity), MinTree(capacity)
    paired = [SumTree(capacity), MinTree(capacity)]   # the replay buffer's one-pass update of both
    leaves = np.zeros(capacity)
    leaf_mins = np.full(capacity, np.inf)
    for indexes, values in batches:
        idx = np.array(indexes) % capacity
        # Integers are summed exactly in any order; fractions test the bitwise rebuild below.
        vals = np.array(values[:len(idx)], dtype=np.float64) / (7.0 if fractional else 1.0)
        sums.update(idx, vals)
        mins.update(idx, vals)
        update_together(paired, idx, vals)
        for i, v in zip(idx, vals):     # the reference: one write after another, the last wins
            leaves[i] = v
            leaf_mins[i] = v
    np.testing.assert_array_equal(sums.values, leaves)
    assert mins.min() == leaf_mins.min()
    np.testing.assert_array_equal(paired[0].tree, sums.tree)
    np.testing.assert_array_equal(paired[1].tree, mins.tree)
    if not fractional:
        assert sums.total() == leaves.sum()
        P = sums.leaf_offset   # every node is the exact sum of the leaves below it
        for node in range(1, P):
            lo = node << (sums.depth - node.bit_length() + 1)
            width = P >> (node.bit_length() - 1)
            assert sums.tree[node] == sums.tree[lo:lo + width].sum()
    else:
        assert math.isclose(sums.total(), math.fsum(leaves), rel_tol=1e-12, abs_tol=1e-12)
    # Parents are recomputed from their children, never adjusted: bit for bit a fresh build.
    fresh_sums, fresh_mins = SumTree(capacity), MinTree(capacity)
    fresh_sums.rebuild(leaves)
    fresh_mins.rebuild(leaf_mins)
    np.testing.assert_array_equal(sums.tree, fresh_sums.tree)
    np.testing.assert_array_equal(mins.tree, fresh_mins.tree)


def test_repeated_index_in_one_update_last_write_wins():
    tree = SumTree(4)
    tree.update(np.array([2, 0, 2, 2]), np.array([1.0, 7.0, 5.0, 3.0]))
    assert tree.values.tolist() == [7.0, 0.0, 3.0, 0.0] and tree.total() == 10.0
    mins = MinTree(4)
    mins.update(np.array([1, 1]), np.array([0.5, 2.0]))
    assert mins.min() == 2.0


def test_prefix_sum_search_by_hand():
    tree = SumTree(5)
    tree.update(np.arange(4), np.array([1.0, 0.0, 2.0, 3.0]))   # cumulative 1, 1, 3, 6
    found = tree.find_prefix_sum(np.array([0.0, 0.999, 1.0, 2.999, 3.0, 5.999]))
    assert found.tolist() == [0, 0, 2, 2, 3, 3]   # the zero leaf is never found
    with pytest.raises(ValueError):
        tree.update(np.array([0]), np.array([-1.0]))
    with pytest.raises(IndexError):
        tree.update(np.array([5]), np.array([1.0]))


def chi_square_p_value(observed, expected):
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@settings(max_examples=25, derandomize=True)
@given(st.lists(st.floats(0.1, 10.0), min_size=2, max_size=20), st.sampled_from([0.6, 1.0]))
def test_sampled_frequencies_match_priorities(td, alpha):
    n = len(td)
    buf = ReplayBuffer(32, prioritized=True, alpha=alpha, eps=1e-6, seed=1)
    buf.add(one_step(n))
    buf.update_priorities(np.arange(n), np.array(td) * np.where(np.arange(n) % 2, -1, 1))  # |td| counts
    draws = 40_000
    counts = np.bincount(np.concatenate([buf.sample(4000)["batch_indexes"] for _ in range(draws // 4000)]),
                         minlength=n)
    p = (np.abs(td) + 1e-6) ** alpha
    expected = draws * p / p.sum()
    assert chi_square_p_value(counts, expected) > 1e-4


def test_importance_weights_by_hand():
    buf = ReplayBuffer(8, prioritized=True, alpha=1.0, eps=0.5, seed=0)
    buf.add(one_step(4))
    buf.update_priorities(np.arange(4), np.array([0.5, 1.5, 2.5, 3.5]))   # p = 1, 2, 3, 4 of 10
    sample = buf.sample(500, beta=0.5)
    # w_i = (N P(i))^-beta / max_j w_j = (4 P(i))^-0.5 / (4 * 0.1)^-0.5 = sqrt(0.1 / P(i))
    by_hand = {0: 1.0, 1: math.sqrt(0.5), 2: math.sqrt(1 / 3), 3: 0.5}
    for i, w in zip(sample["batch_indexes"].tolist(), sample["weights"].tolist()):
        assert w == pytest.approx(by_hand[i], rel=1e-6)
    assert set(sample["batch_indexes"].tolist()) == {0, 1, 2, 3}
    uniform = ReplayBuffer(8, seed=0)
    uniform.add(one_step(4))
    assert uniform.sample(16, beta=0.5)["weights"].tolist() == [1.0] * 16


def test_new_rows_get_the_largest_priority_seen():
    buf = ReplayBuffer(8, prioritized=True, alpha=0.5, eps=1e-6, seed=0)
    buf.add(one_step(2))
    np.testing.assert_allclose(buf.priorities, [1.0, 1.0])   # nothing seen yet: p = 1
    buf.update_priorities(np.array([0, 1]), np.array([8.0, 0.0]))
    buf.add(one_step(2, start=2))
    np.testing.assert_allclose(buf.priorities, np.sqrt([8 + 1e-6, 1e-6, 8 + 1e-6, 8 + 1e-6]))
    with pytest.raises(ValueError, match="NaN"):
        buf.update_priorities(np.array([0]), np.array([np.nan]))
    with pytest.raises(IndexError):
        buf.update_priorities(np.array([4]), np.array([1.0]))


def test_update_priorities_operator_takes_its_keys_out_of_the_stats():
    buf = ReplayBuffer(8, prioritized=True, alpha=1.0, eps=0.5, seed=0)
    buf.add(one_step(3))
    op = UpdatePriorities(buf)
    out = op({"loss": 1.0, "td_error": torch.tensor([1.5, 0.5], requires_grad=True) * 1,
              "batch_indexes": torch.tensor([2, 0])})
    assert out == {"loss": 1.0}
    np.testing.assert_allclose(buf.priorities, [1.0, 1.0, 2.0])
    with pytest.raises(KeyError, match="td_error"):
        op({"loss": 1.0})
    uniform = UpdatePriorities(ReplayBuffer(8))   # nothing to update, nothing required
    assert uniform({"loss": 1.0, "td_error": np.zeros(2), "batch_indexes": np.zeros(2, np.int64)}) == {"loss": 1.0}
    assert uniform({"loss": 1.0}) == {"loss": 1.0}


# ---- checkpoints ------------------------------------------------------------------------------
def test_state_round_trip_through_npz_without_pickle(tmp_path):
    def fresh(capacity=5):
        return ReplayBuffer(capacity, n_step=3, gamma=G, prioritized=True, alpha=0.7, seed=3)

    buf = fresh()
    # 6 rows stored in 5 slots (the ring wraps), and 2 rows of episode 2 wait for their steps.
    assert buf.add(batch(steps(1, R5, "terminated"), steps(2, [1.0, 1.0, 1.0]))) == 6
    buf.update_priorities(np.array([0, 3, 3]), np.array([2.0, 5.0, 0.25]))
    state = buf.state()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    np.savez(tmp_path / "replay.npz", **state)
    restored = fresh()
    with np.load(tmp_path / "replay.npz", allow_pickle=False) as data:
        restored.load_state({k: data[k] for k in data.files})
    assert (len(restored), restored.num_pending, restored.nbytes) == (5, 2, buf.nbytes)
    slots = np.arange(5)
    assert restored.get(slots) == buf.get(slots)
    np.testing.assert_array_equal(restored.priorities, buf.priorities)
    # The same generator state and trees: the same next samples. The same pending rows and
    # ring position: the same rows once episode 2 goes on.
    assert restored.sample(16) == buf.sample(16)
    more = batch(steps(2, [2.0, 2.0], "truncated", t0=3))
    assert restored.add(more) == buf.add(more) == 4
    assert restored.get(slots) == buf.get(slots)
    buf.save(tmp_path / "again.npz")   # the same through save() / load()
    again = fresh()
    again.load(tmp_path / "again.npz")
    assert again.get(slots) == buf.get(slots) and again.num_pending == 0
    with pytest.raises(ValueError, match="capacity 5, this buffer 7"):
        fresh(7).load_state(state)
    empty = fresh()
    empty.load_state(fresh().state())
    assert len(empty) == 0 and empty.nbytes == 0


def test_a_refused_state_leaves_the_buffer_as_it_was():
    buf = ReplayBuffer(5, n_step=3, gamma=G, prioritized=True, seed=0)
    buf.add(batch(steps(1, R5, "terminated"), steps(2, [1.0, 1.0])))
    state = buf.state()
    before = buf.get(np.arange(len(buf)))
    broken = [{**state, "priorities": np.full(5, np.nan)},
              {**state, "position": np.array(7)},
              {k: v for k, v in state.items() if k != "pending.t"},
              {k: v for k, v in state.items() if k != "columns.obs"},
              {**state, "count_steps_by": np.array("frames")}]
    target = ReplayBuffer(5, n_step=3, gamma=G, prioritized=True, seed=0)
    target.add(batch(steps(9, [3.0], "terminated")))
    kept = target.get(np.arange(1))
    for bad in broken:
        with pytest.raises(ValueError, match="replay buffer state"):
            target.load_state(bad)
        assert len(target) == 1 and target.num_pending == 0 and target.get(np.arange(1)) == kept
    target.load_state(state)
    assert target.get(np.arange(5)) == before and target.num_pending == 2


# ---- store and replay side by side ------------------------------------------------------------
def logged(events, tag, items):
    def gen():
        for x in items:
            events.append(tag)
            yield x
    return Stream.source(gen, name=tag)


def test_weights_take_exactly_four_train_items_per_store_item_locally():
    events = []
    store, train = logged(events, "S", range(1000)), logged(events, "T", range(10_000))
    both = Concurrently({"store": store, "train": train}, output="train", round_robin_weights={"store": 1, "train": 4})
    with Plan(both) as plan:
        outputs = [plan.step()["output"] for _ in range(20)]
    assert outputs == list(range(20))
    assert "".join(events) == "STTTT" * 5


def test_fractional_weights_hold_the_ratio_exactly():
    events = []
    store, train = logged(events, "S", range(1000)), logged(events, "T", range(10_000))
    both = Concurrently({"store": store, "train": train}, output="store",
                        round_robin_weights={"store": 1, "train": 0.4})
    with Plan(both) as plan:
        for _ in range(25):
            plan.step()
    # Credit 0.4 a round: a train item in rounds 3 and 5 of every five, none lost to rounding.
    # The 25th store item is the last output: its round's train item is not pulled yet.
    assert "".join(events) == "SSSTSST" * 4 + "SSSTS" + "S"


def test_weights_for_training_intensity_are_exact():
    from fractions import Fraction

    assert weights_for_training_intensity(4, 16, 32) == {"store": 1, "train": 2}
    assert weights_for_training_intensity(0.1, 4, 32)["train"] == Fraction(1, 80)
    assert weights_for_training_intensity(None, 4, 32) == {"store": 1, "train": 1}
    with pytest.raises(ValueError):
        weights_for_training_intensity(0, 4, 32)
    with pytest.raises(ValueError, match="ROUND_ROBIN"):
        Concurrently({"a": Stream.from_iterable([1])}, "a", order=Order.AS_READY, round_robin_weights={"a": 1})
    with pytest.raises(ValueError, match="not among the streams"):
        Concurrently({"a": Stream.from_iterable([1])}, "a", round_robin_weights={"b": 1})
    with pytest.raises(ValueError, match="must be > 0"):
        Concurrently({"a": Stream.from_iterable([1])}, "a", round_robin_weights={"a": 0})


def replay_plan(executor, store_source, rows_per_store, training_intensity, batch_size, learning_starts, log,
                order=Order.ROUND_ROBIN):
    buf = ReplayBuffer(10_000, seed=0)

    def to_rows(item):
        log.append("S")
        return one_step(rows_per_store)

    def train_step(sample):
        log.append("T")
        return {"rows_trained": len(sample), "buffer_rows": len(buf)}

    store = store_source.map(to_rows).then(StoreToReplayBuffer(buf))
    train = Replay(buf, batch_size, learning_starts=learning_starts).map(train_step)
    weights = None if order is Order.AS_READY else \
        weights_for_training_intensity(training_intensity, rows_per_store, batch_size)
    both = Concurrently({"store": store, "train": train}, output="train", order=order, round_robin_weights=weights)
    return Plan(both, executor=executor), buf


def test_replay_waits_for_learning_starts_while_the_store_stream_runs(executor):
    # 4 rows per stored batch, 8-row minibatches, 3 rows trained per row sampled: 1.5 replayed
    # minibatches per stored batch, from the round in which the buffer reaches 12 rows.
    log = []
    actors = ActorSet(CountingSource, num_actors=2, num_cpus_per_actor=0.1)
    plan, buf = replay_plan(executor, from_actors(actors, "next", max_in_flight=2), 4, 3, 8, 12, log)
    with plan:
        results = [plan.step() for _ in range(30)]
    assert all(r["rows_trained"] == 8 for r in results)
    assert results[0]["buffer_rows"] == 12               # no training before learning_starts
    text = "".join(log)
    assert text.startswith("SSSTSTTSTSTT")
    stores = text.count("S")
    assert text.count("T") == 30 and math.floor(1.5 * (stores - 2)) == 30   # exact, on either executor


def test_replay_pumped_as_ready_waits_without_blocking_the_store(executor):
    log = []
    plan, buf = replay_plan(executor, Stream.from_iterable(range(10_000)), 4, None, 8, 20, log,
                            order=Order.AS_READY)
    with plan:
        results = [plan.step() for _ in range(5)]
    assert all(r["buffer_rows"] >= 20 for r in results)
    assert log.index("T") >= 5


def test_plan_with_rollouts_trains_training_intensity_rows_per_env_step():
    from flowrl.operators import ParallelRollouts
    from flowrl.rollout import WorkerSet

    workers = WorkerSet(env="CartPole-v1", num_envs_per_worker=2, rollout_fragment_length=8, seed=0)
    buf = ReplayBuffer(1000, n_step=3, seed=0)
    trained = []
    store = ParallelRollouts(workers).then(StoreToReplayBuffer(buf))
    train = Replay(buf, 32).map(lambda b: trained.append(len(b)) or {"trained": sum(trained)})
    weights = weights_for_training_intensity(6, 16, 32)    # 3 minibatches per 16-row fragment
    with Plan(Concurrently({"store": store, "train": train}, "train", round_robin_weights=weights)) as plan:
        for _ in range(30):
            result = plan.step()
    assert result["trained"] == 30 * 32 and result["num_env_steps_sampled"] == 10 * 16
    assert result["trained"] / result["num_env_steps_sampled"] == 6


def test_store_ending_before_learning_starts_is_an_error_not_a_hang():
    buf = ReplayBuffer(100)
    store = Stream.from_iterable([one_step(4)] * 2).then(StoreToReplayBuffer(buf))
    both = Concurrently({"store": store, "train": Replay(buf, 4, learning_starts=50)}, output="train")
    with Plan(both) as plan, pytest.raises(PlanStructureError, match=r"\['store'\] ended while \['train'\]"):
        plan.step()


def test_replay_read_in_the_storing_thread_before_it_is_ready_is_an_error_not_a_hang():
    buf = ReplayBuffer(100)
    store = Stream.from_iterable([one_step(4)] * 20).then(StoreToReplayBuffer(buf))
    with Plan(union(store, Replay(buf, 4, learning_starts=50))) as plan, \
            pytest.raises(PlanStructureError, match="Concurrently"):
        for _ in range(3):
            plan.step()
    with pytest.raises(ValueError, match="exceeds the buffer's capacity"):
        Replay(buf, 4, learning_starts=101)


def test_mix_in_replay_takes_a_batch_buffer():
    with pytest.raises(TypeError, match="BatchReplayBuffer"):
        MixInReplay(ReplayBuffer(4), replay_proportion=1.0)
    assert len(MixInReplay(BatchReplayBuffer(4), 2.0)(one_step(2))) == 3
