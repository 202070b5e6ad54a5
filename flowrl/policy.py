"""Torch actor-critic policies built from gymnasium spaces.

- Observations: Box -> MLP (or a small CNN for image-shaped Box), Discrete/MultiDiscrete ->
  one-hot, MultiBinary -> float, Dict/Tuple -> each part flattened and concatenated.
- Actions: Discrete -> Categorical, Box -> diagonal Gaussian (the env gets the sample clipped
  to the bounds; log-probabilities are of the unclipped sample), MultiDiscrete -> one
  Categorical per dimension.
- A custom torch module is chosen by a registered name or "module:Class" in
  `model: {custom_model: ...}`; it is built as `Class(observation_space, action_space,
  num_outputs, model_config)` and its `forward(obs)` returns `(dist_inputs, values)`.

>>> import gymnasium as gym, numpy as np
>>> policy = TorchPolicy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), seed=0)
>>> out = policy.compute_actions(np.zeros((3, 4), np.float32))
>>> out.actions.shape, out.logp.shape, out.values.shape
((3,), (3,), (3,))
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.device import cpu_weights, move_policy
from flowrl.optim import Adam

_MODELS: dict[str, type] = {}

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}


def register_model(name: str, cls: type) -> None:
    """Make a custom torch module available as `model: {custom_model: name}`."""
    _MODELS[name] = cls


def resolve_class(spec: str, registry: dict[str, Any], what: str) -> Any:
    """A registered name, or "package.module:Attr"."""
    if spec in registry:
        return registry[spec]
    if ":" not in spec:
        raise ValueError(f"unknown {what} {spec!r}; registered: {sorted(registry)}, or give 'package.module:Name'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


# The policy classes a rollout worker can build, by the name a plan's config gives
# (`CommonConfig.policy_spec`); imported when first used, so this module needs none of them.
POLICY_CLASSES = {"TorchPolicy": "flowrl.policy:TorchPolicy", "QPolicy": "flowrl.q_policy:QPolicy",
                  "SACPolicy": "flowrl.sac_policy:SACPolicy"}


def make_policy(name: str, observation_space: gym.Space, action_space: gym.Space, **kwargs: Any) -> Any:
    """A policy of the class registered as `name` (or "package.module:Class"), built as
    `Class(observation_space, action_space, **kwargs)`."""
    return resolve_class(POLICY_CLASSES.get(name, name), {}, "policy")(observation_space, action_space, **kwargs)


# ---- observations --------------------------------------------------------------------------------
def image_layout(space: gym.Space) -> str | None:
    """"hwc" (84x84x4) or "chw" (4x84x84) for an image-shaped Box, else None."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3:
        return None
    if min(space.shape[:2]) >= 7:
        return "hwc"
    return "chw" if min(space.shape[1:]) >= 7 else None


def is_image(space: gym.Space) -> bool:
    return image_layout(space) is not None


def flat_obs_size(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return int(np.sum(space.nvec))
    if isinstance(space, gym.spaces.MultiBinary):
        return int(np.prod(space.n))
    if isinstance(space, gym.spaces.Dict):
        return sum(flat_obs_size(s) for s in space.spaces.values())
    if isinstance(space, gym.spaces.Tuple):
        return sum(flat_obs_size(s) for s in space.spaces)
    raise ValueError(f"observation space {space} is not supported (Box, Discrete, MultiDiscrete, "
                     "MultiBinary, Dict, Tuple)")


def obs_to_array(space: gym.Space, obs: Any) -> np.ndarray:
    """A batch of observations from a vector env as one array with a row per env: Box kept as
    is (images stay uint8), everything else flattened to float32."""
    if isinstance(space, gym.spaces.Box):
        return np.asarray(obs)
    n = len(obs) if not isinstance(obs, (dict, tuple)) else None
    return _flatten(space, obs, n)


def _flatten(space: gym.Space, obs: Any, n: int | None) -> np.ndarray:
    if isinstance(space, gym.spaces.Box):
        a = np.asarray(obs, dtype=np.float32)
        return a.reshape(len(a), -1)
    if isinstance(space, gym.spaces.Discrete):
        idx = np.asarray(obs, dtype=np.int64) - space.start
        return np.eye(space.n, dtype=np.float32)[idx]
    if isinstance(space, gym.spaces.MultiDiscrete):
        idx = np.asarray(obs, dtype=np.int64).reshape(len(obs), -1) - space.start.reshape(1, -1)
        return np.concatenate([np.eye(k, dtype=np.float32)[idx[:, j]] for j, k in enumerate(space.nvec.reshape(-1))],
                              axis=1)
    if isinstance(space, gym.spaces.MultiBinary):
        a = np.asarray(obs, dtype=np.float32)
        return a.reshape(len(a), -1)
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([_flatten(s, obs[k], n) for k, s in space.spaces.items()], axis=1)
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate([_flatten(s, obs[i], n) for i, s in enumerate(space.spaces)], axis=1)
    raise ValueError(f"observation space {space} is not supported")


# ---- action distributions ----------------------------------------------------------------------
class ActionDist:
    """A batch of action distributions with the few methods the losses need."""

    def __init__(self, dist: torch.distributions.Distribution, sum_last: bool):
        self.dist = dist
        self.sum_last = sum_last

    def _reduce(self, x):
        return x.sum(-1) if self.sum_last else x

    def sample(self):
        return self.dist.sample()

    def log_prob(self, actions):
        return self._reduce(self.dist.log_prob(actions))

    def entropy(self):
        return self._reduce(self.dist.entropy())

    def kl(self, other: "ActionDist"):
        return self._reduce(torch.distributions.kl_divergence(self.dist, other.dist))

    def mode(self):
        if isinstance(self.dist, torch.distributions.Normal):
            return self.dist.mean
        return self.dist.probs.argmax(-1)


class MultiCategorical(torch.distributions.Distribution):
    """Independent categoricals, one per MultiDiscrete dimension."""

    arg_constraints: dict = {}

    def __init__(self, logits: torch.Tensor, nvec: list[int]):
        self.parts = [torch.distributions.Categorical(logits=chunk) for chunk in torch.split(logits, nvec, dim=-1)]
        super().__init__(batch_shape=logits.shape[:-1], validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        return torch.stack([p.sample(sample_shape) for p in self.parts], dim=-1)

    def log_prob(self, value):
        return torch.stack([p.log_prob(value[..., i]) for i, p in enumerate(self.parts)], dim=-1)

    def entropy(self):
        return torch.stack([p.entropy() for p in self.parts], dim=-1)

    @property
    def probs(self):
        raise AttributeError("use mode()")


@torch.distributions.kl.register_kl(MultiCategorical, MultiCategorical)
def _kl_multi(p: MultiCategorical, q: MultiCategorical):
    return torch.stack([torch.distributions.kl_divergence(a, b) for a, b in zip(p.parts, q.parts)], dim=-1)


def num_dist_inputs(action_space: gym.Space) -> int:
    if isinstance(action_space, gym.spaces.Discrete):
        return int(action_space.n)
    if isinstance(action_space, gym.spaces.Box):
        return int(np.prod(action_space.shape))
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return int(np.sum(action_space.nvec))
    raise ValueError(f"action space {action_space} is not supported (Discrete, Box, MultiDiscrete)")


# ---- the default model ---------------------------------------------------------------------------
def _layer(n_in: int, n_out: int, std: float = math.sqrt(2)) -> nn.Linear:
    # Orthogonal init as in the PPO implementation details (Huang et al. 2022).
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, hidden: list[int], activation: str, n_out: int, out_std: float) -> nn.Sequential:
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_layer(n_in, h), act()]
        n_in = h
    layers.append(_layer(n_in, n_out, out_std))
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """Convolutions, then a linear layer of `out_size` with ReLU, over images of `shape` (HxWxC,
    or CxHxW with `channels_first`) divided by `scale` (255 for uint8 pixels: they stay uint8
    until here)."""

    def __init__(self, shape: tuple[int, ...], convs: list[tuple[int, int, int]], out_size: int, scale: float,
                 channels_first: bool = False):
        super().__init__()
        chw = shape if channels_first else (shape[2], shape[0], shape[1])
        c = chw[0]
        self.scale, self.channels_first = scale, channels_first
        layers: list[nn.Module] = []
        for channels, kernel, stride in convs:
            layers += [nn.Conv2d(c, channels, kernel, stride=stride), nn.ReLU()]
            c = channels
        self.net = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            n = self.net(torch.zeros(1, *chw)).shape[1]
        self.out = nn.Sequential(nn.Linear(n, out_size), nn.ReLU())

    def forward(self, obs):
        images = obs if self.channels_first else obs.permute(0, 3, 1, 2)
        return self.out(self.net(images.float() / self.scale))


class SmallCNN(ImageEncoder):
    """Two strided convolutions (16 3x3/2, 32 3x3/2) and a linear layer: images too small for
    the Nature CNN."""

    def __init__(self, shape: tuple[int, ...], out_size: int, scale: float, channels_first: bool = False):
        super().__init__(shape, [(16, 3, 2), (32, 3, 2)], out_size, scale, channels_first)


class NatureCNN(ImageEncoder):
    """The convolutional torso of DQN (Mnih et al. 2015): 32 8x8/4, 64 4x4/2, 64 3x3/1, then a
    linear layer of 512."""

    def __init__(self, shape: tuple[int, ...], out_size: int = 512, scale: float = 255.0,
                 channels_first: bool = False):
        super().__init__(shape, [(32, 8, 4), (64, 4, 2), (64, 3, 1)], out_size, scale, channels_first)


NATURE_CNN_MIN_SIZE = 36  # its three convolutions (8/4, 4/2, 3/1) need at least 36x36 pixels
NATURE_CNN_SIZE = 512


def image_encoder(space: gym.spaces.Box, small_out_size: int) -> tuple[ImageEncoder, int]:
    """The default torso for image observations and the size of its output: the Nature CNN (512)
    for images of at least 36x36 pixels (Atari's 84x84x4), else the small CNN (`small_out_size`)."""
    layout = image_layout(space)
    shape = space.shape if layout == "hwc" else (space.shape[1], space.shape[2], space.shape[0])
    scale = 255.0 if space.dtype == np.uint8 else 1.0
    first = layout == "chw"
    if min(shape[:2]) >= NATURE_CNN_MIN_SIZE:
        return NatureCNN(space.shape, NATURE_CNN_SIZE, scale, first), NATURE_CNN_SIZE
    return SmallCNN(space.shape, small_out_size, scale, first), small_out_size


class ActorCritic(nn.Module):
    """Separate policy and value networks (the default in CleanRL's PPO); for images one shared
    encoder (`image_encoder`: the Nature CNN for Atari, orthogonally initialized as in CleanRL's
    ppo_atari) and a linear head each, `hidden` giving only the small CNN's output size."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, num_outputs: int,
                 model_config: dict[str, Any]):
        super().__init__()
        hidden = list(model_config.get("hidden", [64, 64]))
        activation = model_config.get("activation", "tanh")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        if is_image(observation_space):
            self.encoder, n_in = image_encoder(observation_space, hidden[-1] if hidden else 256)
            hidden = []
            for layer in self.encoder.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    nn.init.orthogonal_(layer.weight, math.sqrt(2))
                    nn.init.zeros_(layer.bias)
        else:
            self.encoder = nn.Flatten()
            n_in = flat_obs_size(observation_space)
        self.pi = _mlp(n_in, hidden, activation, num_outputs, out_std=0.01)
        self.vf = _mlp(n_in, hidden, activation, 1, out_std=1.0)
        self._steps = None  # built on first forward
        self._numpy_params: tuple | None = None  # numpy_forward's parameters and views of them
        self._numpy_cache: tuple | None = None

    def forward(self, obs: torch.Tensor):
        if self._steps is None:
            self._steps = tuple(_layer_calls(m) for m in (self.encoder, self.pi, self.vf))
        encoder, pi, vf = self._steps
        features = _apply(encoder, obs if obs.dtype != torch.float64 else obs.float())
        if features.dtype != torch.float32:
            features = features.float()
        return _apply(pi, features), _apply(vf, features).squeeze(-1)

    def numpy_forward(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """`forward` in numpy, on views of the parameters (no copies: the optimizer and
        load_state_dict update them in place), for MLPs of Linear, Tanh and ReLU layers; None
        for other models (images, other activations, parameters off the CPU). On the small
        batches rollouts compute it is 2-3x faster than torch: one CartPole observation takes
        11 us against 22 us, 64 take 29 us against 71 us."""
        views = self._numpy_views()
        if views is None:
            return None
        encoder, pi, vf = views
        features = _apply_numpy(encoder, np.asarray(obs, dtype=np.float32))
        return _apply_numpy(pi, features), _apply_numpy(vf, features)[..., 0]

    def _numpy_views(self):
        # Rebuilt whenever a parameter's storage changed (a move between devices, say).
        if self._numpy_params is None:
            self._numpy_params = tuple(self.parameters())
        key = tuple([p.data_ptr() for p in self._numpy_params])
        if self._numpy_cache is None or self._numpy_cache[0] != key:
            on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in self._numpy_params)
            self._numpy_cache = (key, _numpy_calls(self.encoder, self.pi, self.vf) if on_cpu else None)
        return self._numpy_cache[1]


def _numpy_calls(*modules: nn.Module) -> tuple[list, ...] | None:
    """Each module's layers as numpy calls ((W^T, b) for a Linear layer), or None if a layer
    has no numpy form here."""
    out = []
    for module in modules:
        calls: list = []
        for layer in list(module) if isinstance(module, nn.Sequential) else [module]:
            if type(layer) is nn.Linear:
                calls.append((layer.weight.detach().numpy().T,
                              None if layer.bias is None else layer.bias.detach().numpy()))
            elif type(layer) is nn.Tanh:
                calls.append(np.tanh)
            elif type(layer) is nn.ReLU:
                calls.append(_relu)
            elif type(layer) is nn.Flatten and layer.start_dim == 1 and layer.end_dim == -1:
                calls.append(_flatten_rows)
            else:
                return None
        out.append(calls)
    return tuple(out)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, dtype=x.dtype)


def _flatten_rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


def _apply_numpy(calls: list, x: np.ndarray) -> np.ndarray:
    for call in calls:
        if type(call) is tuple:
            weight_t, bias = call
            x = x @ weight_t if bias is None else x @ weight_t + bias
        else:
            x = call(x)
    return x


def _log_softmax(x: np.ndarray) -> np.ndarray:
    # The ufuncs' reduce rather than x.max / x.sum: the same arithmetic without their Python
    # wrappers, which on a policy's few rows a step cost more than it.
    x = x - np.maximum.reduce(x, axis=-1, keepdims=True)
    return x - np.log(np.add.reduce(np.exp(x), axis=-1, keepdims=True))


def categorical(logp_all: np.ndarray, u: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Actions of the rows' categoricals (log-probabilities `logp_all`, a row each) by
    inverse-CDF sampling with uniforms `u` (a column), or the most likely ones where `u` is
    None; and their log-probabilities."""
    if u is not None:
        cdf = np.add.accumulate(np.exp(logp_all), axis=1)
        actions = np.minimum(np.add.reduce(u * cdf[:, -1:] > cdf, axis=1), logp_all.shape[1] - 1)
    else:
        actions = logp_all.argmax(axis=1)
    return actions.astype(np.int64), logp_all[np.arange(len(actions)), actions].astype(np.float32)


def _layer_calls(module: nn.Module) -> list:
    """The layers of `module` as plain calls. Going through nn.Module.__call__ (hooks) and
    attribute lookups for every small layer costs more than their arithmetic: inference on one
    observation takes 24 us this way against 57 us. The calls hold the Parameter objects
    themselves, which the optimizer, load_state_dict and deepcopy all keep (they update
    values in place or map them to their copies)."""
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    calls = []
    for layer in layers:
        if type(layer) is nn.Linear:
            calls.append(functools.partial(nn.functional.linear, weight=layer.weight, bias=layer.bias))
        elif type(layer) is nn.Tanh:
            calls.append(torch.tanh)
        elif type(layer) is nn.ReLU and not layer.inplace:
            calls.append(torch.relu)
        elif type(layer) is nn.Flatten and layer.start_dim == 1 and layer.end_dim == -1:
            calls.append(functools.partial(torch.flatten, start_dim=1))
        else:
            calls.append(layer.forward)
    return calls


def _apply(calls: list, x: torch.Tensor) -> torch.Tensor:
    for call in calls:
        x = call(x)
    return x


@dataclass
class Actions:
    env_actions: np.ndarray   # what the env gets (Box actions clipped to the bounds)
    actions: np.ndarray       # what was sampled (stored in batches; log-probs refer to these)
    logp: np.ndarray
    values: np.ndarray


class TorchPolicy:
    """A model, its action distribution, and (on the learner) its optimizer."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space,
                 model: dict[str, Any] | None = None, seed: int | None = None, lr: float = 3e-4,
                 sample_seed: int | None = None):
        """`seed` initializes the model (every copy of one policy uses the same seed, so all start
        with the same weights); `sample_seed` (default: `seed`) drives action sampling, from a
        generator of this policy's own, so policies in one process don't disturb each other."""
        self.observation_space = observation_space
        self.action_space = action_space
        self.model_config = dict(model or {})
        self.lr = lr
        num_outputs = num_dist_inputs(action_space)
        if seed is not None:
            torch.manual_seed(seed)
        custom = self.model_config.get("custom_model")
        model_cls = resolve_class(custom, _MODELS, "custom_model") if custom else ActorCritic
        self.model: nn.Module = model_cls(observation_space, action_space, num_outputs, self.model_config)
        self.log_std = None
        self._nvec = [int(k) for k in action_space.nvec.reshape(-1)] \
            if isinstance(action_space, gym.spaces.MultiDiscrete) else []
        if isinstance(action_space, gym.spaces.Box):
            # State-independent log standard deviation, learned (Schulman et al. 2017).
            self.log_std = nn.Parameter(torch.zeros(num_outputs))
            self.model.register_parameter("log_std", self.log_std)
            self._low = action_space.low.reshape(-1)
            self._high = action_space.high.reshape(-1)
        self.weights_version = 0
        self._optimizer: Adam | None = None
        self.rng = np.random.default_rng(sample_seed if sample_seed is not None else seed)
        self.device = torch.device("cpu")  # the learner's may move (flowrl.device.move_policy)

    # ---- acting ---------------------------------------------------------------------------------
    def dist(self, dist_inputs: torch.Tensor, model: nn.Module | None = None) -> ActionDist:
        """The action distribution of `dist_inputs`, which `model` (default: `self.model`)
        computed. A Gaussian takes its log_std from that same model: a copy of the model (a
        target network) has a log_std of its own."""
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            return ActionDist(torch.distributions.Categorical(logits=dist_inputs), sum_last=False)
        if isinstance(space, gym.spaces.Box):
            log_std = self.log_std if model is None else model.log_std
            std = log_std.expand_as(dist_inputs).exp()
            return ActionDist(torch.distributions.Normal(dist_inputs, std), sum_last=True)
        nvec = [int(k) for k in space.nvec.reshape(-1)]
        return ActionDist(MultiCategorical(dist_inputs, nvec), sum_last=True)

    def to_tensor(self, obs: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(obs, device=self.device)
        return t if t.dtype == torch.uint8 else t.float()

    def compute_actions(self, obs: np.ndarray, explore: bool = True) -> Actions:
        """Sample (or, with `explore=False`, take the most likely) actions for a batch of
        observations. The sampling is done here in numpy rather than through
        torch.distributions, whose construction costs more than the model itself on small
        batches; `dist()` gives the same log-probabilities for the losses."""
        dist_inputs, values = self._forward_numpy(obs)
        space = self.action_space
        if isinstance(space, gym.spaces.Box):
            mean, log_std = dist_inputs, self.log_std.detach().cpu().numpy()
        elif isinstance(space, gym.spaces.Discrete):
            logp_all = _log_softmax(dist_inputs)
        else:
            logp_all = np.concatenate([_log_softmax(c) for c in np.split(dist_inputs, np.cumsum(self._nvec)[:-1], -1)],
                                      -1)
        if isinstance(space, gym.spaces.Box):
            std = np.exp(log_std)
            actions = mean + std * self.rng.standard_normal(mean.shape) if explore else mean
            logp = (-0.5 * ((actions - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
            actions = actions.reshape(len(actions), *space.shape).astype(np.float32)
            return Actions(np.clip(actions, space.low, space.high), actions, logp.astype(np.float32), values)
        if isinstance(space, gym.spaces.Discrete):
            actions, logp = self._categorical(logp_all, explore)
            return Actions(actions + space.start, actions, logp, values)
        parts, logps, start = [], [], 0
        for k in self._nvec:
            a, lp = self._categorical(logp_all[:, start:start + k], explore)
            parts.append(a)
            logps.append(lp)
            start += k
        actions = np.stack(parts, axis=1).reshape(len(logp_all), *space.shape)
        return Actions(actions + space.start, actions, np.sum(logps, axis=0).astype(np.float32), values)

    def _categorical(self, logp_all: np.ndarray, explore: bool) -> tuple[np.ndarray, np.ndarray]:
        return categorical(logp_all, self.rng.random((len(logp_all), 1)) if explore else None)

    def value(self, obs: np.ndarray) -> np.ndarray:
        return self._forward_numpy(obs)[1]

    def _forward_numpy(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's (dist_inputs, values) for a batch, as float32 numpy arrays: through the
        model's numpy form where it has one (ActorCritic MLPs), else through torch."""
        numpy_forward = getattr(self.model, "numpy_forward", None)
        out = numpy_forward(obs) if numpy_forward is not None else None
        if out is None:
            with torch.inference_mode():
                dist_inputs, values = self.model(self.to_tensor(obs))
                out = dist_inputs.float().cpu().numpy(), values.cpu().numpy()
        return out[0], out[1].astype(np.float32, copy=False)

    # ---- learning -------------------------------------------------------------------------------
    @property
    def optimizer(self) -> Adam:
        if self._optimizer is None:
            # torch's fused kernel (flowrl.optim) updates all parameters in one call: on small
            # models the per-tensor loop of torch.optim's default costs more than the arithmetic.
            self._optimizer = Adam(self.model.parameters(), lr=self.lr, eps=1e-5)
        return self._optimizer

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def to_device(self, device: torch.device) -> None:
        """The learner's modules on `device` (flowrl.device.move_policy)."""
        move_policy(self, device)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return cpu_weights(self.model.state_dict())

    def set_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> None:
        self.model.load_state_dict(weights)
        if version is not None:
            self.weights_version = version


def score_actions(policy: Any, obs: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log pi(a|s) and V(s) of actions someone else chose (as batches store them: Discrete
    without its start), under `policy`; zeros for policies without an action distribution
    (Q-learning, SAC), whose losses read neither."""
    if not isinstance(policy, TorchPolicy):
        zeros = np.zeros(len(obs), dtype=np.float32)
        return zeros, zeros
    with torch.inference_mode():
        dist_inputs, values = policy.model(policy.to_tensor(obs))
        logp = policy.dist(dist_inputs).log_prob(torch.as_tensor(actions, device=policy.device))
    return logp.cpu().numpy().astype(np.float32), values.cpu().numpy().astype(np.float32)
