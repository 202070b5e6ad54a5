"""Returns math against answers worked out by hand (4-step trajectories, gamma 0.9)."""

import numpy as np
import pytest

from flowrl.returns import discounted_returns, gae, n_step_returns, vtrace

R = np.array([1.0, 2.0, 3.0, 4.0])
V = np.array([0.5, 1.0, 1.5, 2.0])
G, LAM = 0.9, 0.8
NO = np.array([False, False, False, False])
LAST = np.array([False, False, False, True])


def test_gae_terminated_bootstraps_with_zero():
    next_v = np.array([1.0, 1.5, 2.0, 9.0])  # 9.0 must be ignored: the episode terminated
    adv, ret = gae(R, V, next_v, LAST, LAST, G, LAM)
    # deltas: 1+.9*1-.5=1.4, 2+.9*1.5-1=2.35, 3+.9*2-1.5=3.3, 4-2=2.0 ; gamma*lam = .72
    a3 = 2.0
    a2 = 3.3 + 0.72 * a3
    a1 = 2.35 + 0.72 * a2
    a0 = 1.4 + 0.72 * a1
    np.testing.assert_allclose(adv, [a0, a1, a2, a3], atol=1e-6)
    np.testing.assert_allclose(ret, np.array([a0, a1, a2, a3]) + V, atol=1e-6)


def test_gae_truncated_bootstraps_from_final_value():
    next_v = np.array([1.0, 1.5, 2.0, 9.0])
    adv, _ = gae(R, V, next_v, NO, LAST, G, LAM)
    a3 = 4 + 0.9 * 9.0 - 2.0          # 10.1
    a2 = 3.3 + 0.72 * a3
    a1 = 2.35 + 0.72 * a2
    a0 = 1.4 + 0.72 * a1
    np.testing.assert_allclose(adv, [a0, a1, a2, a3], atol=1e-6)


def test_gae_fragment_cut_does_not_leak_between_trajectories():
    # rows 0-1: an episode cut by the fragment boundary (V(s_2 of that episode) = 1.5);
    # rows 2-3: another episode that terminates.
    next_v = np.array([1.0, 1.5, 2.0, 0.0])
    dones = np.array([False, True, False, True])
    terms = np.array([False, False, False, True])
    adv, _ = gae(R, V, next_v, terms, dones, G, LAM)
    np.testing.assert_allclose(adv, [1.4 + 0.72 * 2.35, 2.35, 3.3 + 0.72 * 2.0, 2.0], atol=1e-6)


def test_gae_lambda_one_equals_discounted_returns_minus_values():
    next_v = np.array([1.0, 1.5, 2.0, 9.0])
    adv, ret = gae(R, V, next_v, NO, LAST, G, 1.0)
    np.testing.assert_allclose(ret, discounted_returns(R, next_v, NO, LAST, G), atol=1e-5)


def test_discounted_returns_terminated_and_truncated():
    np.testing.assert_allclose(discounted_returns(R, np.full(4, 10.0), LAST, LAST, G),
                               [8.146, 7.94, 6.6, 4.0], atol=1e-6)
    np.testing.assert_allclose(discounted_returns(R, np.full(4, 10.0), NO, LAST, G),
                               [14.707, 15.23, 14.7, 13.0], atol=1e-5)


def test_n_step_returns_two_steps():
    next_v = np.array([1.0, 1.5, 2.0, 10.0])
    # G0 = 1 + .9*2 + .81*V(s2)=1.5 ; G1 = 2 + .9*3 + .81*V(s3)=2.0 ; G2 and G3 reach the end
    np.testing.assert_allclose(n_step_returns(R, V, next_v, LAST, LAST, G, 2),
                               [4.015, 6.32, 6.6, 4.0], atol=1e-6)
    np.testing.assert_allclose(n_step_returns(R, V, next_v, NO, LAST, G, 2),
                               [4.015, 6.32, 14.7, 13.0], atol=1e-5)
    with pytest.raises(ValueError):
        n_step_returns(R, V, next_v, NO, LAST, G, 0)


def test_n_step_with_large_n_equals_discounted_returns():
    next_v = np.array([1.0, 1.5, 2.0, 10.0])
    np.testing.assert_allclose(n_step_returns(R, V, next_v, NO, LAST, G, 100),
                               discounted_returns(R, next_v, NO, LAST, G), atol=1e-5)


def test_vtrace_on_policy_equals_discounted_returns():
    next_v = np.array([1.0, 1.5, 2.0, 10.0])
    logp = np.log(np.full(4, 0.3))
    vs, pg = vtrace(logp, logp, R, V, next_v, NO, LAST, G)
    returns = discounted_returns(R, next_v, NO, LAST, G)
    np.testing.assert_allclose(vs, returns, atol=1e-5)
    vs_next = np.append(returns[1:], 10.0)
    np.testing.assert_allclose(pg, R + G * vs_next - V, atol=1e-5)


def test_vtrace_off_policy_clips_ratios():
    # ratios pi/mu = [2, 0.5] -> rho = c = [1, 0.5]; truncated after row 1 with V(s_2) = 2.
    behaviour = np.log([0.25, 0.5])
    target = np.log([0.5, 0.25])
    vs, pg = vtrace(behaviour, target, np.ones(2), np.zeros(2), np.array([0.0, 2.0]),
                    np.array([False, False]), np.array([False, True]), G)
    # delta0 = 1*(1 + 0 - 0) = 1 ; delta1 = .5*(1 + .9*2) = 1.4
    # vs1 = 1.4 ; vs0 = 1 + .9*1*1.4 = 2.26 ; pg0 = 1 + .9*1.4 = 2.26 ; pg1 = .5*(1 + .9*2) = 1.4
    np.testing.assert_allclose(vs, [2.26, 1.4], atol=1e-6)
    np.testing.assert_allclose(pg, [2.26, 1.4], atol=1e-6)


def test_vtrace_uses_rho_bar_for_deltas_and_advantages_and_c_bar_for_traces():
    # pi/mu = [2, 0.5, 1.2] with rho_bar = 1.5, c_bar = 0.8: rho = [1.5, 0.5, 1.2], c = [0.8, 0.5, 0.8].
    # r = [1, 2, 3], V = [0.5, 1, 1.5], truncated after row 2 with V(s_3) = 2, gamma 0.9.
    ratios = np.array([2.0, 0.5, 1.2])
    behaviour = np.log([0.4, 0.4, 0.5])
    target = behaviour + np.log(ratios)
    rewards, values, next_values = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 1.5]), np.array([1.0, 1.5, 2.0])
    vs, pg = vtrace(behaviour, target, rewards, values, next_values, np.zeros(3, bool), np.array([False, False, True]),
                    0.9, rho_clip=1.5, c_clip=0.8)
    # TD errors r + 0.9 V(s') - V = 1.4, 2.35, 3.3 ; delta = rho * TD = 2.1, 1.175, 3.96
    # vs - V: 3.96 ; 1.175 + 0.9 * 0.5 * 3.96 = 2.957 ; 2.1 + 0.9 * 0.8 * 2.957 = 4.22904
    np.testing.assert_allclose(vs, [0.5 + 4.22904, 1.0 + 2.957, 1.5 + 3.96], atol=1e-5)
    # pg = rho (r + 0.9 vs_{t+1} - V), vs_3 = V(s_3) = 2:
    #   1.5 (1 + 0.9 * 3.957 - 0.5) = 6.09195 ; 0.5 (2 + 0.9 * 5.46 - 1) = 2.957 ; 1.2 (3 + 1.8 - 1.5) = 3.96
    np.testing.assert_allclose(pg, [6.09195, 2.957, 3.96], atol=1e-5)
