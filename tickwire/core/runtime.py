"""Process-wide settings for tickwire's long-running hot loops (server, feed, bench load)."""

from __future__ import annotations

import gc
import resource

#: Container allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect cyclic garbage far less often; call once, after start-up.

    Every batch, outbox list and parsed frame is an allocation. With the default threshold the
    collector ran hundreds of times a second with a thousand clients, and its older-generation
    passes walked every live object, which set the server's p99 at that scale. The hot paths
    make no reference cycles, so the cost is a little memory
    held briefly. Objects alive after start-up (modules, configuration) are frozen out of
    collection altogether.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's open-files soft limit to its hard limit; return (soft, hard) after.

    Every connection is a file descriptor, and the usual soft limit (1 024) caps a process at
    about a thousand clients while the hard limit allows far more. An unprivileged process may
    raise its soft limit up to the hard one, never the hard one itself: past that, more
    processes (server workers, load processes) are the way.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
