"""Returns math as pure functions over arrays (numpy in, numpy out; no batch objects).

Rows are time steps, in order, possibly several trajectories one after another. Three flags
per row tell where a trajectory stops:

- `terminateds[t]`: the episode ended in a terminal state; nothing follows, bootstrap with 0.
- `dones[t]`: the trajectory stops after row t for any reason (termination, truncation, or
  the end of a sampled fragment); the recursion does not look past it. Truncated and cut
  rows bootstrap from `next_values[t]` = V(s_{t+1}).
- `next_values[t]`: V(s_{t+1}); only read where the row is the last of its trajectory and not
  terminated, or inside a trajectory (where it equals `values[t+1]`).

>>> import numpy as np
>>> r = np.array([1.0, 1.0, 1.0]); v = np.zeros(3); term = np.array([False, False, True])
>>> adv, ret = gae(r, v, v, term, term, gamma=0.5, lam=1.0)
>>> ret.tolist()
[1.75, 1.5, 1.0]
"""

from __future__ import annotations

import numpy as np


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def gae(rewards, values, next_values, terminateds, dones, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016).

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
    Returns (advantages, value_targets = advantages + values), float32.
    """
    rewards, values, next_values = _f64(rewards, values, next_values)
    not_terminal = 1.0 - np.asarray(terminateds, dtype=np.float64)
    carries = gamma * lam * (1.0 - np.asarray(dones, dtype=np.float64))
    deltas = rewards + gamma * next_values * not_terminal - values
    advantages = np.empty_like(deltas)
    running = 0.0
    for t in range(len(deltas) - 1, -1, -1):
        running = deltas[t] + carries[t] * running
        advantages[t] = running
    return advantages.astype(np.float32), (advantages + values).astype(np.float32)


def discounted_returns(rewards, next_values, terminateds, dones, gamma: float):
    """G_t = r_t + gamma * G_{t+1} within a trajectory; at its last row G_t bootstraps from
    V(s_{t+1}) unless terminated. float32."""
    rewards, next_values = _f64(rewards, next_values)
    terminateds = np.asarray(terminateds, dtype=bool)
    dones = np.asarray(dones, dtype=bool)
    out = np.empty_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        if dones[t]:
            running = 0.0 if terminateds[t] else next_values[t]
        running = rewards[t] + gamma * running
        out[t] = running
    return out.astype(np.float32)


def n_step_returns(rewards, values, next_values, terminateds, dones, gamma: float, n: int):
    """G_t^(n) = sum_{k<m} gamma^k r_{t+k} + gamma^m V(s_{t+m}), m = min(n, steps to the end of
    the trajectory); the bootstrap is 0 where the trajectory ends in termination. float32."""
    if n < 1:
        raise ValueError("n must be >= 1")
    rewards, values, next_values = _f64(rewards, values, next_values)
    terminateds = np.asarray(terminateds, dtype=bool)
    dones = np.asarray(dones, dtype=bool)
    T = len(rewards)
    out = np.empty(T)
    for t in range(T):
        g, discount, k = 0.0, 1.0, t
        while True:
            g += discount * rewards[k]
            discount *= gamma
            if dones[k]:
                bootstrap = 0.0 if terminateds[k] else next_values[k]
                break
            if k - t + 1 == n:
                bootstrap = values[k + 1]
                break
            k += 1
        out[t] = g + discount * bootstrap
    return out.astype(np.float32)


def vtrace(behaviour_logp, target_logp, rewards, values, next_values, terminateds, dones, gamma: float,
           rho_clip: float = 1.0, c_clip: float = 1.0):
    """V-trace targets and policy-gradient advantages (Espeholt et al. 2018, IMPALA).

    rho_t = min(rho_clip, pi/mu), c_t = min(c_clip, pi/mu)
    delta_t = rho_t * (r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t))
    v_t - V(s_t) = delta_t + gamma * c_t * (1 - done_t) * (v_{t+1} - V(s_{t+1}))
    pg_adv_t = rho_t * (r_t + gamma * v_{t+1} * (1 - terminated_t) - V(s_t)), with
    v_{t+1} = V(s_{t+1}) at the end of a trajectory.
    Returns (vs, pg_advantages), float32.
    """
    behaviour_logp, target_logp, rewards, values, next_values = _f64(
        behaviour_logp, target_logp, rewards, values, next_values)
    not_terminal = 1.0 - np.asarray(terminateds, dtype=np.float64)
    continues = 1.0 - np.asarray(dones, dtype=np.float64)
    ratios = np.exp(target_logp - behaviour_logp)
    rhos = np.minimum(rho_clip, ratios)
    cs = np.minimum(c_clip, ratios)
    deltas = rhos * (rewards + gamma * next_values * not_terminal - values)
    vs_minus_v = np.empty_like(deltas)
    running = 0.0
    for t in range(len(deltas) - 1, -1, -1):
        running = deltas[t] + gamma * cs[t] * continues[t] * running
        vs_minus_v[t] = running
    vs = vs_minus_v + values
    # v_{t+1}: the next row's target inside a trajectory, V(s_{t+1}) at its end.
    vs_next = next_values.copy()
    inside = continues[:-1] > 0
    vs_next[:-1][inside] = vs[1:][inside]
    pg_advantages = rhos * (rewards + gamma * vs_next * not_terminal - values)
    return vs.astype(np.float32), pg_advantages.astype(np.float32)


def n_step_sums(rewards, dones, gamma: float, n: int):
    """For each row t: m_t = min(n, rows from t to the end of its trajectory), and the
    discounted sum of those m_t rewards, sum_{k<m_t} gamma^k r_{t+k}. A trajectory ends after
    row t where `dones[t]` and after the last row. Returns (sums float32, m_t int64); the n-step
    target is then sums + gamma^m_t * (1 - terminated) * Q(s_{t+m_t}). One numpy pass per k < n.

    >>> sums, steps = n_step_sums([1.0, 1.0, 1.0], [False, False, True], gamma=0.5, n=2)
    >>> sums.tolist(), steps.tolist()
    ([1.5, 1.5, 1.0], [2, 2, 1])
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    (rewards,) = _f64(rewards)
    dones = np.asarray(dones, dtype=bool)
    T = len(rewards)
    rows = np.arange(T)
    # The last row of each row's trajectory: the first done at or after it (or the last row).
    ends = np.where(dones, rows, T - 1)
    ends = np.minimum.accumulate(ends[::-1])[::-1] if T else ends
    steps = np.minimum(n, ends - rows + 1)
    sums = np.zeros(T)
    for k in range(min(n, T)):
        sums += np.where(k < steps, gamma ** k * rewards[np.minimum(rows + k, T - 1)], 0.0)
    return sums.astype(np.float32), steps.astype(np.int64)
