"""Cancelling non-streaming work when its client goes away.

Streaming responses are cancelled by Starlette when the client disconnects; a plain
request handler is not, so without this a closed connection would keep its engine row
busy until max_new_tokens.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

T = TypeVar("T")
POLL_S = 0.2


class ClientGone(Exception):
    """The client closed the connection; nobody is left to answer."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()  # closes the event stream, which cancels the engine row
            await asyncio.gather(task, return_exceptions=True)
