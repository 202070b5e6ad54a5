"""Off-policy estimates: what a target policy would have earned on episodes recorded by a
behaviour policy, from the recorded log-probabilities (Precup et al. 2000).

Per episode, with rho_t = prod_{k<=t} pi(a_k|s_k) / mu(a_k|s_k):
    V_behavior = sum_t gamma^t r_t
    V_IS       = sum_t gamma^t rho_t r_t
    V_WIS      = sum_t gamma^t (rho_t / w_t) r_t,  w_t = mean of rho_t over the episodes that reach t
Each is averaged over episodes; `v_gain` is V_target / V_behavior.

>>> import numpy as np
>>> eps = np.array([0, 0, 1]); r = np.array([1.0, 1.0, 2.0])
>>> out = importance_sampling(np.log([0.5, 1.0, 0.5]), np.log([0.25, 1.0, 1.0]), r, eps, gamma=1.0)
>>> out["v_behavior"], out["is/v_target"], round(out["wis/v_target"], 6)
(2.0, 2.5, 1.7)
"""

from __future__ import annotations

import numpy as np


def importance_sampling(target_logp, behavior_logp, rewards, eps_id, gamma: float) -> dict[str, float]:
    """IS and WIS estimates over whole episodes. Rows are time steps, each episode's rows
    together and in order (`eps_id` marks them)."""
    target_logp, behavior_logp, rewards = (np.asarray(a, dtype=np.float64) for a in
                                           (target_logp, behavior_logp, rewards))
    eps_id = np.asarray(eps_id)
    n = len(rewards)
    if n == 0:
        raise ValueError("no episodes to estimate from")
    new = np.ones(n, dtype=bool)
    new[1:] = eps_id[1:] != eps_id[:-1]
    episode = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    t = np.arange(n) - starts[episode]
    # Cumulative log-ratio within each episode; exponentiated with a cap against overflow.
    log_ratio = np.cumsum(target_logp - behavior_logp)
    log_ratio -= np.concatenate([[0.0], log_ratio[starts[1:] - 1]])[episode]
    rho = np.exp(np.minimum(log_ratio, 50.0))
    discount = gamma ** t
    num_episodes = len(starts)
    v_behavior = np.bincount(episode, discount * rewards, num_episodes)
    v_is = np.bincount(episode, discount * rho * rewards, num_episodes)
    w = np.bincount(t, rho) / np.bincount(t)   # mean rho_t over the episodes reaching step t
    v_wis = np.bincount(episode, discount * rho / np.maximum(w[t], 1e-300) * rewards, num_episodes)
    behavior = float(v_behavior.mean())
    out = {"v_behavior": behavior, "episodes": num_episodes}
    for name, values in (("is", v_is), ("wis", v_wis)):
        target = float(values.mean())
        out[f"{name}/v_target"] = target
        out[f"{name}/v_gain"] = target / behavior if behavior != 0 else float("nan")
    return out
