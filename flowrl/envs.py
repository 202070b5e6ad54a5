"""Making gymnasium vector envs from an id or a "package.module:Class" entry point."""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym


class EnvError(ValueError):
    """The env cannot be made: unknown id, bad entry point, bad env_config."""


def _load_entry_point(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"env {spec!r}: cannot load entry point ({e})") from None


def check_env_id(env: str) -> None:
    """Raise EnvError with a suggestion when `env` is neither registered nor an entry point."""
    if ":" in env and env.split(":", 1)[0] not in gym.envs.registry:
        _load_entry_point(env)
        return
    if env in gym.envs.registry:
        return
    import difflib

    close = difflib.get_close_matches(env, list(gym.envs.registry), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise EnvError(f"unknown env {env!r}{hint}")


def make_env(env: str, env_config: dict[str, Any] | None = None) -> gym.Env:
    """One env from a registered id or a "package.module:Class" entry point."""
    env_config = dict(env_config or {})
    check_env_id(env)
    try:
        if ":" in env and env not in gym.envs.registry:
            return _load_entry_point(env)(**env_config)
        return gym.make(env, **env_config)
    except TypeError as e:
        raise EnvError(f"env {env!r}: bad env_config {env_config} ({e})") from None


def make_vector_env(env: str, num_envs: int = 1, env_config: dict[str, Any] | None = None,
                    vectorization: str = "auto") -> gym.vector.VectorEnv:
    """A vector env of `num_envs` copies. `vectorization`: "auto" uses the env's own numpy
    vectorized implementation when it has one (CartPole's), else "sync"; "async" runs each
    copy in a subprocess. Autoreset is gymnasium's default (next step)."""
    env_config = dict(env_config or {})
    check_env_id(env)
    if vectorization not in ("auto", "sync", "async", "vector_entry_point"):
        raise EnvError(f"vectorization {vectorization!r} must be auto, sync, async or vector_entry_point")
    try:
        if ":" in env and env not in gym.envs.registry:
            fns = [lambda: make_env(env, env_config) for _ in range(num_envs)]
            return gym.vector.AsyncVectorEnv(fns) if vectorization == "async" else gym.vector.SyncVectorEnv(fns)
        mode = vectorization
        if mode == "auto":
            mode = "vector_entry_point" if gym.envs.registry[env].vector_entry_point else "sync"
        return gym.make_vec(env, num_envs=num_envs, vectorization_mode=mode, **env_config)
    except EnvError:
        raise
    except TypeError as e:
        raise EnvError(f"env {env!r}: bad env_config {env_config} ({e})") from None
