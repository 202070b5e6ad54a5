"""Serving a trained policy: `flowrl serve RUN_DIR` (an HTTP endpoint in this process) and
`deployment(RUN_DIR)`, the same policy as a Ray Serve deployment (the `serve` extra:
`pip install 'flowrl[serve]'`) for users who outgrow one process.

Both answer `POST /act` in the wire format of flowrl.wire: a batch of observations in,
the actions out, greedy unless the server was started with `explore` or the request says
`"explore": true`:

    curl -s http://127.0.0.1:8000/act -H "Authorization: Bearer $(cat runs/cartpole-ppo/latest/serve_token)" \\
         -H "Content-Type: application/json" -d '{"v": 1, "obs": [[0.0, 0.1, 0.0, -0.1]]}'
    {"v":1,"actions":[0]}

The token is the `--token-file`'s, or a new one written to RUN_DIR/serve_token (mode 0600).
Binding to anything but a loopback address needs a token file.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from flowrl.wire import (DEFAULT_MAX_BODY_BYTES, MSGPACK, WireServer, batch_size_of, check_bind, decode_value,
                         encode_value, field, handle, new_token, read_token, write_token)

MAX_BATCH = 4096
TOKEN_FILE_NAME = "serve_token"


class PolicyService:
    """The `/act` route over a TrainedPolicy (flowrl.load_policy), shared by `flowrl serve` and
    the Ray Serve deployment. Requests are served one at a time (one policy)."""

    def __init__(self, trained: Any, explore: bool = False, max_batch: int = MAX_BATCH):
        self.trained = trained
        self.explore = explore
        self.max_batch = max_batch
        self.lock = threading.Lock()
        self.routes = {"/act": self.act}

    def act(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        from flowrl.policy import obs_to_array

        policy = self.trained.policy
        space = policy.observation_space
        value = field(request, "obs", (list, dict))
        n = batch_size_of(space, value, self.max_batch)
        obs = obs_to_array(space, decode_value(space, value, "obs", batch=n))
        explore = field(request, "explore", bool, self.explore)
        with self.lock:
            out = policy.compute_actions(obs, explore=explore)
        return {"actions": encode_value(policy.action_space, out.env_actions, kind == MSGPACK)}


def service_token(trained: Any, host: str, token_file: str | None) -> tuple[str, Path]:
    """The token and the file it is in: `token_file`'s, or a new one written beside the run."""
    from flowrl.planfile import ExperimentError

    try:
        check_bind(host, token_file is not None)
        if token_file is not None:
            return read_token(token_file), Path(token_file)
    except ValueError as e:
        raise ExperimentError(f"--token-file: {e}") from None
    run_dir = Path(trained.checkpoint).parent.parent if trained.checkpoint is not None else Path(".")
    token = new_token()
    try:
        return token, write_token(run_dir / TOKEN_FILE_NAME, token)
    except OSError as e:
        raise ExperimentError(f"{run_dir / TOKEN_FILE_NAME}: cannot write the token ({e.strerror or e}); "
                              "give --token-file") from None


def serve_forever(path: str, host: str = "127.0.0.1", port: int = 8000, token_file: str | None = None,
                  explore: bool = False, stream: TextIO | None = None, ready: threading.Event | None = None,
                  stop: threading.Event | None = None) -> int:
    """`flowrl serve`: serve the policy of a run or checkpoint until Ctrl-C (or `stop` is set)."""
    from flowrl.planfile import ExperimentError
    from flowrl.trained import load_policy

    stream = stream or sys.stdout
    if not 0 <= port <= 65535:
        raise ExperimentError(f"--port {port}: must be in [0, 65535]")
    trained = load_policy(path)
    token, where = service_token(trained, host, token_file)
    service = PolicyService(trained, explore)
    try:
        server = WireServer(host, port, token, service.routes, DEFAULT_MAX_BODY_BYTES, name="flowrl-serve")
    except OSError as e:
        raise ExperimentError(f"--port {port}: cannot listen on {host}:{port}: {e.strerror or e}") from None
    stream.write(f"flowrl serve: {trained.checkpoint} ({trained.env or 'no env'}) at {server.address}/act, "
                 f"{'sampling' if explore else 'greedy'}; token in {where}; Ctrl-C stops\n")
    stream.flush()
    if ready is not None:
        ready.set()
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):  # a timeout, so that Ctrl-C reaches this thread
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    stream.write("flowrl serve: stopped\n")
    stream.flush()
    return 0


def deployment(run_dir: str, token_file: str | None = None, explore: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **options: Any):
    """A Ray Serve application serving the policy of `run_dir` (a run or checkpoint directory)
    at POST /act, with the same body format and token as `flowrl serve`; `options` go to
    `ray.serve.deployment` (num_replicas, ray_actor_options, ...).

        from ray import serve
        serve.run(flowrl.serve.deployment("runs/cartpole-ppo/latest", num_replicas=2), route_prefix="/")
    """
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(f"flowrl.serve.deployment needs Ray Serve ({e}); install it with "
                          "pip install 'flowrl[serve]'") from None
    from flowrl.trained import load_policy

    trained = load_policy(run_dir)  # fails here, in the caller, rather than in every replica
    token, _ = service_token(trained, "127.0.0.1", token_file)

    class FlowrlPolicy:
        def __init__(self, path: str, token: str, explore: bool, max_body_bytes: int):
            from flowrl.trained import load_policy

            self.service = PolicyService(load_policy(path), explore)
            self.token, self.max_body_bytes = token, max_body_bytes

        async def __call__(self, request):
            from starlette.responses import Response

            body = await request.body()
            status, kind, payload = handle(self.service.routes, self.token, "/act", request.headers, body,
                                           self.max_body_bytes)
            return Response(payload, status_code=status, media_type=kind)

    options.setdefault("name", "flowrl-policy")
    return serve.deployment(FlowrlPolicy, **options).bind(str(trained.checkpoint), token, explore, max_body_bytes)
