"""Making gymnasium vector envs from an id or a "package.module:Class" entry point."""

from __future__ import annotations

import importlib
import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.config import ConfigError
from flowrl.env_pipeline import EnvPipeline
from flowrl.executors import ActorFaultError


class EnvError(ValueError):
    """The env cannot be made: unknown id, bad entry point, bad env_config."""


class EnvFaultError(ActorFaultError):
    """An env raised while stepping or resetting, or gave data no policy can learn from (NaN or
    inf, an observation of the wrong shape). A remote worker (Ray) is replaced like a dead actor
    and counted in `num_env_faults`; in the driver the run stops with this one line."""

    counter = "num_env_faults"


# The info key by which a sub-env made anew after raising tells its worker to drop that step.
FAULT_INFO_KEY = "flowrl_env_fault"


def _where(error: BaseException) -> str:
    """' (file.py:12 in step)': the innermost frame of `error`'s traceback."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    if not frames:
        return ""
    frame = frames[-1]
    return f" ({os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"


def describe_error(error: BaseException) -> str:
    """'RuntimeError: first line of the message (file.py:12 in step)'."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}{_where(error)}"


class SubEnv(gym.Wrapper):
    """One sub-env of a rollout worker's vector env. Its errors name the env, the sub-env and
    the step of the episode, and it checks the shape of Box observations (a vector env would
    fail to stack them with a message that names neither).

    With `restart` (RLlib's `restart_failed_sub_environments`), an env that raises is closed and
    made again: that step returns the new env's first observation with reward 0, not done, and
    `info[FAULT_INFO_KEY]` (the error), and its worker drops the row and starts a new episode.
    An env that fails again each of `MAX_REMAKES` times it is made stops the run.
    """

    MAX_REMAKES = 3

    def __init__(self, env: gym.Env, make: Callable[[], gym.Env], name: str, index: int, restart: bool = False):
        super().__init__(env)
        self._make, self.name, self.index, self.restart = make, name, index, restart
        self.t = 0             # steps since the last reset
        self.num_remakes = 0
        self._seed: int | None = None
        space = env.observation_space
        self._shape = space.shape if isinstance(space, gym.spaces.Box) else None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._seed = seed
        try:
            obs, info = self.env.reset(seed=seed, options=options)
        except Exception as e:
            return self._remake(e, "while resetting")
        self.t = 0
        self._check(obs)
        return obs, info

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as e:
            obs, info = self._remake(e, f"at step {self.t + 1} of an episode")
            return obs, 0.0, False, False, info
        self.t += 1
        # Inline and by attribute where it can be: this runs for every step of every sub-env.
        if self._shape is not None and (obs.shape if type(obs) is np.ndarray else np.shape(obs)) != self._shape:
            self._check(obs)
        return obs, reward, terminated, truncated, info

    def _check(self, obs: Any) -> None:
        if self._shape is not None and np.shape(obs) != self._shape:
            raise EnvFaultError(f"env {self.name!r} (sub-env {self.index}) gave an observation of shape "
                                f"{np.shape(obs)} at step {self.t} of an episode; its observation_space has "
                                f"shape {self._shape}")

    def _remake(self, error: Exception, when: str) -> tuple[Any, dict]:
        message = f"env {self.name!r} (sub-env {self.index}) raised {describe_error(error)} {when}"
        if not self.restart:
            raise EnvFaultError(message) from error
        for _ in range(self.MAX_REMAKES):
            try:
                self.env.close()
            except Exception:
                pass  # it is broken already
            self.num_remakes += 1
            # A seeded env stays reproducible: each new copy gets a seed of its own.
            seed = None if self._seed is None else self._seed + 1_000_003 * self.num_remakes
            try:
                self.env = self._make()
                obs, info = self.env.reset(seed=seed)
                break
            except Exception as e:
                error = e
        else:
            raise EnvFaultError(f"{message}, and again each of the {self.MAX_REMAKES} times it was made anew "
                                f"(last: {describe_error(error)})") from error
        self.t = 0
        self._check(obs)
        return obs, {**info, FAULT_INFO_KEY: message}


def _load_entry_point(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"env {spec!r}: cannot load entry point ({e})") from None


# Env families whose package gymnasium does not install. gymnasium registers the MuJoCo and Box2D
# ids even without their packages (they fail only when made), and ALE ids appear once ale_py is
# imported, so the family is told from the id: (test, module, what to install).
ENV_FAMILIES = (
    (lambda env, entry: env.startswith("ALE/"), "ale_py", "ale-py (pip install 'flowrl[atari]')"),
    (lambda env, entry: entry.startswith("gymnasium.envs.mujoco"), "mujoco", "mujoco (pip install 'flowrl[mujoco]')"),
    (lambda env, entry: entry.startswith("gymnasium.envs.box2d"), "Box2D",
     "box2d (pip install swig 'gymnasium[box2d]')"),
    (lambda env, entry: env.startswith("minari:"), "minari", "minari (pip install 'flowrl[minari]')"),
    (lambda env, entry: env.startswith(("pettingzoo.", "pettingzoo:")), "pettingzoo",
     "pettingzoo (pip install 'flowrl[multiagent]')"),
    (lambda env, entry: env.startswith(("mpe2.", "mpe2:")), "mpe2", "mpe2 (pip install 'flowrl[multiagent]')"),
    (lambda env, entry: env.startswith("MinAtar/"), "minatar", "minatar (pip install 'flowrl[minatar]')"),
)


def _register_minatar() -> None:
    """MinAtar's gymnasium ids (MinAtar/Breakout-v1, ...), which its package registers only when
    asked; its module warns through logging that seaborn (for rendering) is missing: not shown."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        from minatar.gym import register_envs
    finally:
        root.setLevel(level)
    register_envs()


def _check_family(env: str) -> None:
    """EnvError naming what to install when `env` belongs to a family whose package is missing.
    Importing ale_py registers the ALE ids."""
    spec = gym.envs.registry.get(env)
    entry = spec.entry_point if spec is not None and isinstance(spec.entry_point, str) else ""
    for belongs, module, package in ENV_FAMILIES:
        if belongs(env, entry):
            try:
                importlib.import_module(module)
            except ImportError:
                raise EnvError(f"{env!r} needs {package}") from None
    if env.startswith("MinAtar/") and env not in gym.envs.registry:
        _register_minatar()
    if env.startswith("minari:"):
        raise EnvError(f"{env!r} is a Minari dataset, not an env: give it as config.input, and the env it was "
                       "recorded in as env")


def check_env_id(env: str) -> None:
    """Raise EnvError with a suggestion when `env` is neither registered nor an entry point, or
    naming the package to install when its family's package is missing."""
    _check_family(env)
    if ":" in env and env.split(":", 1)[0] not in gym.envs.registry:
        _load_entry_point(env)
        return
    if env in gym.envs.registry:
        return
    import difflib

    close = difflib.get_close_matches(env, list(gym.envs.registry), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise EnvError(f"unknown env {env!r}{hint}")


def make_env(env: str, env_config: dict[str, Any] | None = None, pipeline: EnvPipeline | None = None) -> gym.Env:
    """One env from a registered id or a "package.module:Class" entry point, with the per-env
    wrappers of `pipeline` (a config's env_wrappers)."""
    env_config = dict(env_config or {})
    check_env_id(env)
    try:
        if ":" in env and env not in gym.envs.registry:
            made = _load_entry_point(env)(**env_config)
        else:
            made = gym.make(env, **env_config)
    except gym.error.DependencyNotInstalled as e:
        raise EnvError(f"env {env!r}: {str(e).splitlines()[0]}") from None
    except TypeError as e:
        raise EnvError(f"env {env!r}: bad env_config {env_config} ({e})") from None
    if pipeline is None or not isinstance(made, gym.Env):
        return made
    try:
        return pipeline.wrap(made)
    except ConfigError:
        raise
    except (TypeError, ValueError, gym.error.Error) as e:  # a wrapper's kwargs of the wrong type or value
        raise EnvError(f"env {env!r}: env_wrappers: {describe_error(e)}") from None


def make_vector_env(env: str, num_envs: int = 1, env_config: dict[str, Any] | None = None,
                    vectorization: str = "auto", restart_failed_sub_environments: bool = False,
                    pipeline: EnvPipeline | None = None) -> gym.vector.VectorEnv:
    """A vector env of `num_envs` copies. `vectorization`: "auto" uses the env's own numpy
    vectorized implementation when it has one (CartPole's), else "sync"; "async" runs each
    copy in a subprocess. Autoreset is gymnasium's default (next step). The copies of a sync or
    async vector env are each a `SubEnv`; `restart_failed_sub_environments` makes them anew when
    they raise (an env's own vectorized implementation steps all copies at once, so "auto"
    then means "sync"). `pipeline` (a config's env_wrappers) wraps each copy and then the vector
    env (training rewards and normalization: its `normalizer` holds the statistics)."""
    env_config = dict(env_config or {})
    pipeline = pipeline or EnvPipeline()
    check_env_id(env)
    if vectorization not in ("auto", "sync", "async", "vector_entry_point"):
        raise EnvError(f"vectorization {vectorization!r} must be auto, sync, async or vector_entry_point")
    entry_point = ":" in env and env not in gym.envs.registry
    mode = vectorization
    if mode == "auto":
        vectorized = not entry_point and gym.envs.registry[env].vector_entry_point
        per_env = restart_failed_sub_environments or pipeline.wrappers or pipeline.atari
        mode = "vector_entry_point" if vectorized and not per_env else "sync"
    if mode == "vector_entry_point" and restart_failed_sub_environments:
        raise EnvError(f"env {env!r}: restart_failed_sub_environments needs vectorization sync or async (a "
                       "vectorized env steps all its copies at once, so one cannot be made anew alone)")
    try:
        if mode == "vector_entry_point":
            if pipeline.wrappers or pipeline.atari:
                raise EnvError(f"env {env!r}: env_wrappers wrap each copy, which needs vectorization sync or async")
            vec = gym.make_vec(env, num_envs=num_envs, vectorization_mode=mode, **env_config)
            return pipeline.transform(vec)

        def make() -> gym.Env:
            return make_env(env, env_config, pipeline)

        def sub_env(index: int) -> Callable[[], gym.Env]:
            def build():
                inner = make()
                return SubEnv(inner, make, env, index, restart_failed_sub_environments) \
                    if isinstance(inner, gym.Env) else inner
            return build

        fns = [sub_env(i) for i in range(num_envs)]
        if mode == "async":
            # A copy's error comes back to this process as an EnvFaultError that says it all in
            # one line (its SubEnv names the env, the error, where and when): gymnasium's report
            # of the same error, a traceback in red, is only noise.
            warnings.filterwarnings("ignore", message=r"\x1b\[31mERROR: ",
                                    module=r"gymnasium\.vector\.async_vector_env")
            return pipeline.transform(gym.vector.AsyncVectorEnv(fns))
        return pipeline.transform(gym.vector.SyncVectorEnv(fns))
    except EnvError:
        raise
    except gym.error.DependencyNotInstalled as e:
        raise EnvError(f"env {env!r}: {str(e).splitlines()[0]}") from None
    except TypeError as e:
        raise EnvError(f"env {env!r}: bad env_config {env_config} ({e})") from None
