"""Several TorchPolicies acting as one: a multi-agent worker's independent policies, each with
the few observations of its own agents per env step.

On batches that small numpy's overhead per call, not the arithmetic, is the cost of acting (an
ActorCritic MLP on 8 CartPole observations is 16 numpy calls), so four policies cost four
times one. Policies with Discrete actions and MLPs of one shape act here together, as one stack
of nets (each policy's policy net and value net, whose hidden layers have one shape): their
weights stacked layer by layer (copies, made again when any parameter changes), one np.matmul per
layer over all of them with each policy's observations padded to the largest count, then one
log-softmax and one inverse-CDF sampling over the rows of all. Each policy draws its uniforms
from its own generator, as TorchPolicy.compute_actions does, so the actions are those it would
give; the padding changes how BLAS blocks the rows, so log-probabilities and values can differ
from it in the last bit (and an action only where a uniform falls within that of a CDF step).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from torch.optim.optimizer import register_optimizer_step_post_hook

from flowrl import optim
from flowrl.policy import ActorCritic, Actions, TorchPolicy, _apply_numpy, _flatten_rows, _log_softmax, categorical

# Optimizer steps taken in this process. Parameters change in place; their tensors' version
# counters see load_state_dict and other in-place ops but not every optimizer kernel (the fused
# Adam's), so the stacked copies are also made again after any optimizer step: flowrl's Adam
# counts its own (flowrl.optim.steps_taken), a torch.optim optimizer's (a policy subclass's
# own) are counted here.
_torch_optimizer_steps = 0


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _torch_optimizer_steps
    _torch_optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _can_stack(policy: Any) -> bool:
    """A TorchPolicy (not a subclass, which may act otherwise) with Discrete actions and the
    default model; whether its layers fit a numpy stack is seen when it acts."""
    return type(policy) is TorchPolicy and isinstance(policy.action_space, gym.spaces.Discrete) \
        and type(policy.model) is ActorCritic


def stacks(policies: list[Any]) -> list[list[int]]:
    """`policies` (by index) in the fewest groups whose members can act as one PolicyStack:
    policies that can be stacked, with equal spaces, together; every other one alone."""
    groups: list[list[int]] = []
    for i, policy in enumerate(policies):
        for group in groups:
            first = policies[group[0]]
            if _can_stack(policy) and _can_stack(first) and first.observation_space == policy.observation_space \
                    and first.action_space == policy.action_space:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


class PolicyStack:
    """Policies that act as one (see `stacks`): `compute_actions` takes a batch of observations
    per policy and gives one Actions over all their rows, policy by policy. A stack of one
    policy, or of policies whose layers do not stack now (other hidden sizes, parameters off
    the CPU), acts through each policy's own compute_actions."""

    def __init__(self, policies: list[Any]):
        if len(policies) > 1 and len(stacks(policies)) != 1:
            raise ValueError("a PolicyStack takes TorchPolicies with Discrete actions and equal spaces")
        self.policies = list(policies)
        self._params = [tuple(p.model.parameters()) for p in self.policies] if len(policies) > 1 else []
        self._key: tuple | None = None
        self._layers: list | None = None

    def compute_actions(self, obs: list[np.ndarray], explore: bool = True) -> Actions:
        """Actions for `obs[i]`, a batch of policy i's observations (at least one row), for
        every i, as TorchPolicy.compute_actions gives them, concatenated."""
        layers = self._stacked_layers() if len(self.policies) > 1 else None
        if layers is None:
            parts = [p.compute_actions(o, explore) for p, o in zip(self.policies, obs)]
            if len(parts) == 1:
                return parts[0]
            return Actions(*(np.concatenate(column) for column in
                             zip(*((a.env_actions, a.actions, a.logp, a.values) for a in parts))))
        counts, n = [len(o) for o in obs], len(obs)
        rows = max(counts)
        # The observations twice, for the policy nets and for the value nets; the first layer's inputs wide.
        x = np.zeros((2 * n, rows, layers[0][0].shape[1]), np.float32)
        for i, o in enumerate(obs):
            x[i, :len(o)] = x[n + i, :len(o)] = o.reshape(len(o), -1)
        out = _apply_numpy(layers, x)
        dist_inputs, values = out[:n], out[n:, :, 0]
        if min(counts) < rows:  # drop the padding
            real = np.arange(rows) < np.array(counts)[:, None]
            dist_inputs, values = dist_inputs[real], values[real]
        else:
            dist_inputs, values = dist_inputs.reshape(-1, dist_inputs.shape[-1]), values.reshape(-1)
        u = np.concatenate([p.rng.random((k, 1)) for p, k in zip(self.policies, counts)]) if explore else None
        actions, logp = categorical(_log_softmax(dist_inputs), u)
        return Actions(actions + self.policies[0].action_space.start, actions, logp, values)

    def _stacked_layers(self) -> list | None:
        """The stacked layers of the policies' current parameters, or None if they do not stack."""
        versions = tuple([(p.data_ptr(), p._version) for params in self._params for p in params])
        key = (optim.steps_taken, _torch_optimizer_steps, versions)
        if key != self._key:
            self._key, self._layers = key, self._stack()
        return self._layers

    def _stack(self) -> list | None:
        """The policy nets, then the value nets, of all policies as one stack: numpy calls as
        ActorCritic.numpy_forward's, a Linear layer's (W^T, b) as (nets, in, out) and
        (nets, 1, out), the value nets' output layers padded with zero columns to the policy
        nets' outputs. None where the nets are not all of one shape."""
        views = [p.model._numpy_views() for p in self.policies]
        if any(v is None or v[0] != [_flatten_rows] for v in views):
            return None
        nets = [v[1] for v in views] + [v[2] for v in views]
        layouts = {_layout(net) for net in nets}
        if len(layouts) != 1 or None in layouts:
            return None
        calls = []
        for layer in zip(*nets):
            if type(layer[0]) is not tuple:  # an activation
                calls.append(layer[0])
                continue
            width = max(w.shape[1] for w, _ in layer)
            weights = np.zeros((len(layer), layer[0][0].shape[0], width), np.float32)
            biases = None if layer[0][1] is None else np.zeros((len(layer), 1, width), np.float32)
            for i, (w, b) in enumerate(layer):
                weights[i, :, :w.shape[1]] = w
                if biases is not None:
                    biases[i, 0, :len(b)] = b
            calls.append((weights, biases))
        return calls


def _layout(net: list) -> tuple | None:
    """A net's numpy calls with each Linear layer as its shape and whether it has a bias, but
    the output layer's number of outputs (padded in a stack); None if the net does not end in one."""
    if type(net[-1]) is not tuple:
        return None
    layers = [(c[0].shape, c[1] is None) if type(c) is tuple else c for c in net]
    layers[-1] = (net[-1][0].shape[0], net[-1][1] is None)
    return tuple(layers)
