"""`grpo serve-reward module:function`: a reward function behind HTTP, for reward_funcs=["http://host:port/"].

The reference server of grpo.rewards.remote's protocol: POST {"prompts": [...], "completions": [...], ...} to any
path, get {"rewards": [...]}. The function is called with the request's keys as keyword arguments (and
trainer_state=None), exactly as the trainer would call it; an async function is awaited. A GET answers
{"reward_function": name}, a health check. A failing call answers HTTP 500 with the error and its traceback,
which the trainer's error then shows; a request that is not a JSON object with a "completions" list, HTTP 400.

Requests are served in threads (ThreadingHTTPServer), so a function that releases the GIL (I/O, a model on a
GPU, a subprocess) scores concurrent batches in parallel; a pure-Python one takes them in turn.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from grpo.rewards.contract import reward_func_name
from grpo.rewards.remote import jsonable


def make_server(func: Callable[..., Any], host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server (not yet serving: call serve_forever) that scores requests with `func`. Port 0 picks a free one."""
    name = reward_func_name(func)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            self._answer(200, {"reward_function": name})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict) or not isinstance(body.get("completions"), list):
                    raise ValueError('the body must be a JSON object with a "completions" list')
            except ValueError as e:
                self._answer(400, {"error": f"bad request: {e}"})
                return
            try:
                rewards = func(**{"trainer_state": None, **body})
                if inspect.isawaitable(rewards):
                    rewards = asyncio.run(rewards)
                self._answer(200, {"rewards": rewards})
            except Exception as e:
                self._answer(500, {"error": f"reward function '{name}' raised {type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()})

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, default=jsonable).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
            if args and str(args[1]) != "200":  # only requests that went wrong
                super().log_message(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_reward(spec: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the reward `spec` (a built-in name or "package.module:function") until interrupted."""
    from grpo.recipe import reward_by_name

    func = reward_by_name(spec)
    if isinstance(func, str):
        raise ValueError(f"'{spec}' is a URL; serve a function (a built-in name or 'package.module:function').")
    try:
        server = make_server(func, host, port)
    except OSError as e:  # the port is taken, the address is not this machine's
        raise ValueError(f"cannot listen on {host}:{port} ({e}); choose another --port or --host.") from e
    bound_host, bound_port = server.server_address[:2]
    print(f"grpo serve-reward: '{reward_func_name(func)}' at http://{bound_host}:{bound_port}/ "
          f"(reward_funcs=[\"http://{bound_host}:{bound_port}/\"]); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
