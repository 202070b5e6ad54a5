"""Q-networks and the epsilon-greedy policy over them (DQN; Discrete actions).

- `QNetwork`: an MLP over flattened observations, or for images the Nature CNN (Mnih et al.
  2015; 84x84 Atari frames) or a small CNN (images under 36x36), then a dueling head (Wang et
  al. 2016), Q(s, a) = V(s) + A(s, a) - mean_a A(s, a), or a plain linear one. `forward(obs)` returns Q-values of shape (batch, num_actions).
- A custom torch module is chosen as for the actor-critic policy (`model: {custom_model: ...}`,
  a name given to `flowrl.policy.register_model` or "module:Class"); it is built as
  `Class(observation_space, action_space, num_actions, model_config)` and its `forward(obs)`
  returns the Q-values.
- `QPolicy` acts epsilon-greedily: the argmax of Q, or with probability `epsilon` an action
  drawn uniformly. Epsilon travels to remote workers with the weights, so the learner's
  exploration schedule reaches every worker.

>>> import gymnasium as gym, numpy as np
>>> policy = QPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=0, epsilon=0.0)
>>> policy.compute_actions(np.zeros((3, 4), np.float32)).actions.shape
(3,)
>>> policy.model(policy.to_tensor(np.zeros((3, 4), np.float32))).shape
torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.device import cpu_weights, move_policy
from flowrl.optim import Adam
from flowrl.policy import (_MODELS, ACTIVATIONS, Actions, _apply, _layer_calls, flat_obs_size, image_encoder, is_image,
                           resolve_class)


def mlp_layers(n_in: int, hidden: list[int], activation: str) -> tuple[list[nn.Module], int]:
    """Linear + activation per hidden size (PyTorch's default initialization, as SB3's
    off-policy networks); returns the layers and the size of their output."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), ACTIVATIONS[activation]()]
        n_in = h
    return layers, n_in


class QNetwork(nn.Module):
    """Q(s, .) for Discrete actions: an MLP (or the Nature CNN for images) and a dueling or
    plain head. `model_config`: hidden (default [256, 256]), activation (default relu), and
    `dueling` (default True)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, num_outputs: int,
                 model_config: dict[str, Any]):
        super().__init__()
        hidden = list(model_config.get("hidden", [256, 256]))
        activation = model_config.get("activation", "relu")
        if is_image(observation_space):  # the Nature CNN for Atari; `hidden` sizes only the small CNN
            self.encoder, n_in = image_encoder(observation_space, hidden[-1] if hidden else 512)
        else:
            layers, n_in = mlp_layers(flat_obs_size(observation_space), hidden, activation)
            self.encoder = nn.Sequential(nn.Flatten(), *layers)
        self.dueling = bool(model_config.get("dueling", True))
        self.advantage = nn.Linear(n_in, num_outputs)
        self.value = nn.Linear(n_in, 1) if self.dueling else None
        self._steps = None  # plain calls of the layers, built on first forward (see policy._layer_calls)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self._steps is None:
            self._steps = tuple(_layer_calls(m) for m in (self.encoder, self.advantage, self.value) if m is not None)
        encoder, advantage, *value = self._steps
        features = _apply(encoder, obs if obs.dtype == torch.uint8 else obs.float())
        advantages = _apply(advantage, features)
        if not self.dueling:
            return advantages
        # Wang et al. 2016, eq. 9: the mean advantage is subtracted so V and A are identifiable.
        return _apply(value[0], features) + advantages - advantages.mean(dim=-1, keepdim=True)


class ReplayPolicy:
    """What the policies of the replay plans (QPolicy, SACPolicy) share: Adam over
    `param_groups()` (fused: one kernel for all parameters), `set_lr`, and no value estimates
    (rollout workers ask for V at truncations; Q-learning has no use for it)."""

    model: nn.Module

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, model: dict[str, Any] | None,
                 seed: int | None, lr: float, sample_seed: int | None):
        """As TorchPolicy: `seed` initializes the model (every copy alike), `sample_seed` (default
        `seed`) drives this copy's exploration."""
        self.observation_space = observation_space
        self.action_space = action_space
        self.model_config = dict(model or {})
        self.lr = lr
        self.weights_version = 0
        self._optimizer: Adam | None = None
        self.rng = np.random.default_rng(sample_seed if sample_seed is not None else seed)
        self.device = torch.device("cpu")
        self.target_model: nn.Module | None = None
        if seed is not None:
            torch.manual_seed(seed)

    def to_device(self, device: torch.device) -> None:
        """The learner's modules on `device` (flowrl.device.move_policy)."""
        move_policy(self, device)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters())}]

    @property
    def optimizer(self) -> Adam:
        if self._optimizer is None:
            self._optimizer = Adam(self.param_groups(), lr=self.lr)
        return self._optimizer

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def value(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(len(obs), dtype=np.float32)


class QPolicy(ReplayPolicy):
    """A Q-network, epsilon-greedy acting, and (on the learner) its optimizer and target
    network (`target_model`, made by UpdateTargetNetwork on first use)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space,
                 model: dict[str, Any] | None = None, seed: int | None = None, lr: float = 5e-4,
                 sample_seed: int | None = None, dueling: bool = True, epsilon: float = 1.0):
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"a Q-network needs a Discrete action space, got {action_space}")
        super().__init__(observation_space, action_space, model, seed, lr, sample_seed)
        custom = self.model_config.get("custom_model")
        model_cls = resolve_class(custom, _MODELS, "custom_model") if custom else QNetwork
        self.model: nn.Module = model_cls(observation_space, action_space, int(action_space.n),
                                          {**self.model_config, "dueling": dueling})
        self.epsilon = float(epsilon)

    def to_tensor(self, obs: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(obs, device=self.device)
        return t if t.dtype == torch.uint8 else t.float()

    def compute_actions(self, obs: np.ndarray, explore: bool = True) -> Actions:
        """argmax_a Q(s, a), replaced with probability epsilon by a uniform action when
        exploring. Log-probabilities and values are not used by Q-learning: zeros."""
        with torch.inference_mode():
            q_values = self.model(self.to_tensor(obs)).cpu().numpy()
        actions = q_values.argmax(axis=1).astype(np.int64)
        if explore and self.epsilon > 0:
            explores = self.rng.random(len(actions)) < self.epsilon
            actions = np.where(explores, self.rng.integers(self.action_space.n, size=len(actions)), actions)
        zeros = np.zeros(len(actions), dtype=np.float32)
        return Actions(actions + self.action_space.start, actions, zeros, zeros)

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The model's tensors and, under "epsilon", the exploration rate the workers act with."""
        return {**cpu_weights(self.model.state_dict()), **self.get_exploration()}

    def get_exploration(self) -> dict[str, torch.Tensor]:
        """{"epsilon": the exploration rate}: what set_weights takes alone to change only it."""
        return {"epsilon": torch.tensor(self.epsilon, dtype=torch.float64)}

    def set_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> None:
        """The model's tensors and epsilon, or epsilon alone (get_exploration's)."""
        weights = dict(weights)
        epsilon = weights.pop("epsilon", None)
        if weights:
            self.model.load_state_dict(weights)
        if epsilon is not None:
            self.epsilon = float(epsilon)
        if version is not None:
            self.weights_version = version
