"""A TickwireServer for a test's block: started, then closed, failing rather than hanging."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from tests.conftest import timeout
from tickwire.core.config import ServerConfig

if TYPE_CHECKING:
    from tickwire.server.app import TickwireServer

CLOSE_TIMEOUT_S = 15.0
log = logging.getLogger("tests.serving")


@asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[TickwireServer]:
    """`async with serving(cfg) as srv:` — srv.url / srv.http_url / srv.port while inside.

    A `close()` that does not return in time fails the test; when the block itself failed, its
    error is the one reported, with the hang added as a note.
    """
    from tickwire.server.app import TickwireServer

    srv = TickwireServer(config)
    await srv.start()
    try:
        yield srv
    except BaseException as exc:
        if not await _close(srv):
            exc.add_note(f"and TickwireServer.close() did not return within {CLOSE_TIMEOUT_S} s")
        raise
    if not await _close(srv):
        raise AssertionError(f"TickwireServer.close() did not return within {CLOSE_TIMEOUT_S} s")


async def _close(srv: TickwireServer) -> bool:
    closing = asyncio.create_task(srv.close(), name="test-server-close")
    done, _ = await asyncio.wait({closing}, timeout=timeout(CLOSE_TIMEOUT_S))
    if closing in done:
        closing.result()
        return True
    log.error("TickwireServer.close() hung; tasks left:\n%s", _task_report())
    closing.cancel()
    await asyncio.wait({closing}, timeout=1.0)
    return False


def _task_report() -> str:
    lines = []
    for task in asyncio.all_tasks():
        if task.done() or task is asyncio.current_task():
            continue
        where = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack(limit=6)]
        lines.append(f"  {task.get_name()} cancelling={task.cancelling()} at {' < '.join(where)}")
    return "\n".join(lines) or "  (none)"
