"""A private asyncio event loop in a daemon thread, shared by async reward functions and async tools.

A loop of its own, rather than `asyncio.run` per call, works from scripts and from notebooks (whose loop already
runs), and keeps whatever a user's coroutines bind to a loop (an HTTP session, say) valid from call to call.
"""

from __future__ import annotations

import asyncio
import threading

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="grpo-async").start()
    return _loop
