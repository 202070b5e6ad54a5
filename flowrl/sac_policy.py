"""The soft actor-critic policy (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and
Applications"; Box actions): a tanh-squashed Gaussian actor, twin Q critics, a Polyak-averaged
copy of the critics, and the entropy temperature alpha = exp(log_alpha).

An action is a = bias + scale * tanh(u), u ~ N(mu(s), sigma(s)), with scale and bias mapping
(-1, 1) onto the space's bounds. Its log-density follows from the change of variables:
    log pi(a|s) = log N(u; mu, sigma) - sum_i log(scale_i (1 - tanh(u_i)^2))

>>> import gymnasium as gym, numpy as np
>>> policy = SACPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-2, 2, (1,)), seed=0)
>>> out = policy.compute_actions(np.zeros((5, 3), np.float32))
>>> out.actions.shape, bool(np.all(np.abs(out.env_actions) <= 2))
((5, 1), True)
"""

from __future__ import annotations

import copy
import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.device import cpu_weights
from flowrl.policy import Actions, _apply, _layer_calls, flat_obs_size
from flowrl.q_policy import ReplayPolicy, mlp_layers

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # as SB3 and the SAC authors' code


def squashed_gaussian_logp(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of a = bias + scale * tanh(u), u ~ N(mean, exp(log_std)), summed over the
    action dimensions. log(1 - tanh(u)^2) is written as 2 (log 2 - u - softplus(-2u)), which
    stays finite where tanh(u) rounds to +-1."""
    gaussian = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det_tanh = 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))
    return (gaussian - log_det_tanh - torch.log(scale)).sum(-1)


class SquashedGaussianActor(nn.Module):
    """An MLP giving the mean and log standard deviation of u (log_std clamped to [-20, 2])."""

    def __init__(self, obs_size: int, act_dim: int, hidden: list[int], activation: str):
        super().__init__()
        layers, n = mlp_layers(obs_size, hidden, activation)
        self.trunk = nn.Sequential(nn.Flatten(), *layers)
        self.mean = nn.Linear(n, act_dim)
        self.log_std = nn.Linear(n, act_dim)
        self._steps = None  # plain calls of the layers, built on first forward (see policy._layer_calls)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._steps is None:
            self._steps = tuple(_layer_calls(m) for m in (self.trunk, self.mean, self.log_std))
        trunk, mean, log_std = self._steps
        features = _apply(trunk, obs if obs.dtype == torch.float32 else obs.float())  # MuJoCo's are float64
        return _apply(mean, features), _apply(log_std, features).clamp(LOG_STD_MIN, LOG_STD_MAX)


class TwinQ(nn.Module):
    """Two Q(s, a) MLPs evaluated as one: each layer's weights are stacked, shape
    (2, n_in, n_out), so both critics cost one batched matmul per layer. `forward` returns
    (2, batch). With `detach=True` no gradient reaches the critics' weights (the actor's loss
    differentiates Q with respect to the action only)."""

    def __init__(self, n_in: int, hidden: list[int], activation: str, num_critics: int = 2):
        super().__init__()
        sizes = [n_in, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # nn.Linear's default initialization: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))
        self.activation = {"relu": torch.relu, "tanh": torch.tanh}.get(activation)
        if self.activation is None:
            raise ValueError(f"SAC critics take activation relu or tanh, got {activation!r}")

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach: bool = False) -> torch.Tensor:
        x = torch.cat([obs.flatten(1).float(), actions], dim=1)
        x = x.unsqueeze(0).expand(len(self.weights[0]), *x.shape)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = self.activation(x)
        return x.squeeze(-1)


class SACModel(nn.Module):
    """What the learner trains: the actor, the twin critics and log_alpha. Workers only get the
    actor's weights."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Box, model_config: dict[str, Any],
                 initial_alpha: float):
        super().__init__()
        hidden = list(model_config.get("hidden", [256, 256]))
        activation = model_config.get("activation", "relu")
        obs_size, act_dim = flat_obs_size(observation_space), int(np.prod(action_space.shape))
        self.actor = SquashedGaussianActor(obs_size, act_dim, hidden, activation)
        self.critic = TwinQ(obs_size + act_dim, hidden, activation)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(initial_alpha)))


class SACPolicy(ReplayPolicy):
    """The SAC model, acting by sampling the squashed Gaussian (greedy: bias + scale *
    tanh(mean)); on the learner, one Adam with a parameter group each for the actor, the critics
    and alpha (Adam's state is per parameter, so this is three optimizers stepped together),
    and `target_model`, the Polyak-averaged critics."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space,
                 model: dict[str, Any] | None = None, seed: int | None = None, lr: float = 3e-4,
                 sample_seed: int | None = None, initial_alpha: float = 1.0, target_entropy: float | None = None):
        if not isinstance(action_space, gym.spaces.Box):
            raise ValueError(f"SAC needs a Box action space, got {action_space}")
        if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
            raise ValueError(f"SAC squashes actions into the space's bounds, which must be finite: {action_space}")
        super().__init__(observation_space, action_space, model, seed, lr, sample_seed)
        self.model = SACModel(observation_space, action_space, self.model_config, initial_alpha)
        self.target_model = copy.deepcopy(self.model.critic).requires_grad_(False)
        low, high = action_space.low.reshape(-1), action_space.high.reshape(-1)
        self.scale = torch.as_tensor((high - low) / 2.0, dtype=torch.float32)
        self.bias = torch.as_tensor((high + low) / 2.0, dtype=torch.float32)
        act_dim = len(low)
        # "auto" (None): -dim(A), the heuristic of Haarnoja et al. 2018.
        self.target_entropy = float(-act_dim if target_entropy is None else target_entropy)

    @property
    def target_source(self) -> nn.Module:
        """What `target_model` follows (UpdateTargetNetwork): the critics."""
        return self.model.critic

    def to_device(self, device: torch.device) -> None:
        super().to_device(device)
        self.scale, self.bias = self.scale.to(device), self.bias.to(device)

    def to_tensor(self, obs: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(obs, device=self.device).float()

    # ---- acting ---------------------------------------------------------------------------------
    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized actions (in the space's units) and their log-probabilities."""
        mean, log_std = self.model.actor(obs)
        u = mean + log_std.exp() * torch.randn_like(mean)
        actions = self.bias + self.scale * torch.tanh(u)
        return actions, squashed_gaussian_logp(u, mean, log_std, self.scale)

    def compute_actions(self, obs: np.ndarray, explore: bool = True) -> Actions:
        with torch.inference_mode():
            mean, log_std = self.model.actor(self.to_tensor(obs))
        mean, std = mean.cpu().numpy(), np.exp(log_std.cpu().numpy())
        u = mean + std * self.rng.standard_normal(mean.shape, dtype=np.float32) if explore else mean
        actions = (self.bias.cpu().numpy() + self.scale.cpu().numpy() * np.tanh(u)).astype(np.float32)
        actions = actions.reshape(len(actions), *self.action_space.shape)
        zeros = np.zeros(len(actions), dtype=np.float32)
        return Actions(actions, actions, zeros, zeros)

    # ---- learning -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The actor's, the critics' and alpha's: three optimizers in one Adam."""
        return [{"params": list(self.model.actor.parameters())}, {"params": list(self.model.critic.parameters())},
                {"params": [self.model.log_alpha]}]

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The actor's tensors: all a rollout worker needs."""
        return cpu_weights(self.model.actor.state_dict())

    def set_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> None:
        self.model.actor.load_state_dict(weights)
        if version is not None:
            self.weights_version = version
