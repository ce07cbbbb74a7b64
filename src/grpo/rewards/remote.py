"""A reward computed by another process, over HTTP: reward_funcs=["http://127.0.0.1:8000/score"].

Puts a heavy verifier, a sandbox or a judge model in a process (or on a machine) of its own; OpenRLHF calls it
remote_rm_url. `grpo serve-reward module:function` (grpo.rewards.server) serves any reward function this way.

The protocol, one POST per batch of completions, JSON both ways:

    request:  {"prompts": [...], "completions": [...], "completion_ids": [[...], ...], <column>: [...], ...}
    response: {"rewards": [0.5, null, ...]}     one number or null (not applicable) per completion, in order

Conversational prompts and completions are lists of {"role", "content"} messages, as reward functions get them.
Every dataset column is sent; trainer_state is not. Connection failures, timeouts and the statuses that say "try
again" (408, 429, 5xx) are retried with exponential backoff, a bounded number of times; any other status, or a
response that is not {"rewards": [one per completion]}, is an error naming the URL at once.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def is_reward_url(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


class RemoteReward:
    """A reward function that POSTs batches to `url` and reads the rewards back (see the module's protocol)."""

    def __init__(self, url: str, batch_size: int = 64, request_timeout: float = 120.0, max_retries: int = 3,
                 backoff: float = 1.0):
        """`request_timeout`: seconds for one HTTP request; `max_retries`: further attempts after a failure that
        may pass (waiting backoff, 2 x backoff, 4 x backoff, ... seconds between them)."""
        if not is_reward_url(url):
            raise ValueError(f"RemoteReward needs an http:// or https:// URL, got {url!r}.")
        if batch_size < 1 or request_timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError("RemoteReward needs batch_size >= 1, request_timeout > 0, max_retries >= 0, backoff >= 0.")
        self.url, self.batch_size, self.request_timeout = url, batch_size, request_timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.find_failing_completion = False  # see calls.py: one request per completion to find it costs too much
        # the metric name: rewards/remote_score/mean for .../score (the URL itself has slashes and colons)
        last = url.split("://", 1)[1].rstrip("/").split("/")[-1]
        self.__name__ = "remote_" + (re.sub(r"\W+", "_", last).strip("_") or "reward")

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        columns = {k: v for k, v in kwargs.items() if k not in ("trainer_state", "log_extra", "log_metric")}
        rewards: list[float | None] = []
        for start in range(0, len(completions), self.batch_size):
            stop = start + self.batch_size
            batch = {"prompts": prompts[start:stop], "completions": completions[start:stop],
                     **{k: v[start:stop] if isinstance(v, list) else v for k, v in columns.items()}}
            rewards += self._post(batch, len(batch["completions"]))
        return rewards

    def _post(self, batch: dict[str, Any], expected: int) -> list[float | None]:
        try:
            body = json.dumps(batch, default=jsonable).encode()
        except TypeError as e:
            raise TypeError(f"the request to the reward server at {self.url} cannot be written as JSON: {e}") from e
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        attempt = 0
        while True:
            try:
                with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                    return self._rewards(response.read(), expected)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code not in RETRIED_STATUSES or attempt == self.max_retries:
                    raise RuntimeError(
                        f"the reward server at {self.url} answered HTTP {e.code} {e.reason}"
                        f"{_attempts(attempt)}: {detail}"
                    ) from e
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                if attempt == self.max_retries:
                    reason = getattr(e, "reason", e)
                    if isinstance(reason, TimeoutError):
                        problem = f"gave no answer within request_timeout={self.request_timeout:g} s"
                        fix = "Make it faster, or give RemoteReward(url, request_timeout=...) a longer one."
                    else:
                        problem = f"cannot be reached ({reason})"
                        fix = ("Is it running? `grpo serve-reward module:function --port PORT` serves a reward "
                               "function.")
                    raise RuntimeError(f"the reward server at {self.url} {problem}{_attempts(attempt)}. {fix}") from e
            time.sleep(self.backoff * 2**attempt)
            attempt += 1

    def _rewards(self, raw: bytes, expected: int) -> list[float | None]:
        try:
            rewards = json.loads(raw)["rewards"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the reward server at {self.url} answered {raw[:200]!r}; expected JSON "
                             '{"rewards": [one number or null per completion]}.') from e
        if not isinstance(rewards, list) or len(rewards) != expected:
            count = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
            raise ValueError(f"the reward server at {self.url} returned {count} rewards for {expected} "
                             "completions; it must return one (a number or null) per completion, in order.")
        return rewards


def _attempts(attempt: int) -> str:
    return f" ({attempt + 1} attempts)" if attempt else ""


def jsonable(value: Any) -> Any:
    """The `default` of json.dumps: numpy and torch values as plain numbers and lists; anything else is a
    TypeError naming its type."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} ({repr(value)[:80]}) is not JSON")
