"""Whether the session store can serve: probed, so that health follows the store.

A replica whose store is unreachable fails every session RPC with UNAVAILABLE; a load
balancer should stop sending it traffic until the store is back. :class:`StoreHealth` pings
the store (:meth:`~chat.store.SessionStore.ping`, one attempt) every ``interval`` seconds
and reports each change, once: the server turns its ``grpc.health.v1`` status NOT_SERVING
and SERVING again (``Watch`` streams are told), and logs where the store is and what failed
(which clients are not told).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from chat.errors import StoreUnavailable
from chat.store import SessionStore

__all__ = ["StoreHealth"]

log = logging.getLogger(__name__)


class StoreHealth:
    """The last known state of a store, and the loop that keeps it current.

    >>> from chat.store.memory import MemoryStore
    >>> StoreHealth(MemoryStore()).available
    True
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        interval: float = 1.0,
        timeout: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError("interval and timeout must be > 0")
        self._store = store
        self._interval = interval
        self._timeout = timeout
        self._on_change = on_change
        #: The store answered its last probe (it did when the server opened it).
        self.available = True
        #: What the last failed probe said (for the log; may name the store's address).
        self.detail = ""

    async def check(self) -> bool:
        """Probe the store now; report a change; whether it is available."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._store.ping()
        except StoreUnavailable as error:
            self._failed(error.detail)
        except TimeoutError:
            self._failed(
                f"the {self._store.kind} store at {self._store.location} did not answer "
                f"within {self._timeout:g}s"
            )
        else:
            self._recovered()
        return self.available

    async def run(self) -> None:
        """Probe every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    def _failed(self, detail: str) -> None:
        self.detail = detail
        if not self.available:
            return
        self.available = False
        log.warning("session store unreachable, health is NOT_SERVING: %s", detail)
        if self._on_change is not None:
            self._on_change(False)

    def _recovered(self) -> None:
        if self.available:
            return
        self.available = True
        log.warning("session store reachable again, health is SERVING")
        if self._on_change is not None:
            self._on_change(True)
