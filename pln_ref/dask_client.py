"""Connecting to a Dask cluster: one place for the scheduler-address conventions.

``scheduler`` arguments across pln-ref take a ``distributed.Client`` (used as it is, never closed
here) or the address of a running scheduler (``dask scheduler`` prints it, e.g.
``tcp://10.0.0.5:8786``; a client is opened here and closed by the caller via ``owned``). An
address that cannot be reached raises ``SchedulerUnreachableError`` with one line naming the
address, and a scheduler without workers one naming the fix (start ``dask worker ADDRESS``).
"""

from __future__ import annotations

__all__ = ["SchedulerUnreachableError", "connect", "require_workers"]


class SchedulerUnreachableError(ValueError):
    """The Dask scheduler at the given address cannot be reached (a ValueError, so the CLI prints it
    as one line with exit status 2)."""


def connect(scheduler, *, timeout: float | None = None):
    """(client, owned): ``scheduler`` a ``distributed.Client`` (owned False) or a scheduler address
    (a new Client, owned True: close it when done). ``timeout``: seconds to wait for the
    connection before ``SchedulerUnreachableError`` (default: Dask's configured
    ``distributed.comm.timeouts.connect``, 30 s unless set)."""
    from dask.distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise ValueError(f"scheduler must be a dask.distributed.Client or an address string, got {scheduler!r}")
    try:
        kw = {} if timeout is None else {"timeout": timeout}
        client = Client(scheduler, **kw)
    except (OSError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SchedulerUnreachableError(
            f"cannot reach the Dask scheduler at {scheduler} ({first}); start one "
            f"(dask scheduler) with workers (dask worker ADDRESS) or leave out the scheduler address "
            f"to run in this process") from None
    return client, True


def require_workers(client) -> int:
    """The number of workers of ``client``'s scheduler; ValueError (one line) if it has none."""
    n = len(client.scheduler_info().get("workers", {}))
    if n == 0:
        raise ValueError("the Dask scheduler has no workers: start some (dask worker ADDRESS) or leave out "
                         "the scheduler address to run in this process")
    return n
