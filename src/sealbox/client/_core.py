"""SigningClient: the blocking face of :class:`AsyncSigningClient`.

The protocol runs on an event loop in a private thread; any number of caller threads may
sign at once (the task runner does), and ``sign_many`` signs a batch with one call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._aio import DEFAULT_TIMEOUT, AsyncSigningClient, SignItem, SignOutcome, request_token_async
from ._hosts import Server
from ._logproof import LogProof

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

T = TypeVar("T")


def request_token(
    server: Server, ca: Path, user: str, password: str, ip: str, duration: int, timeout: float = 30.0
) -> str:
    """Mint an upload token for ``ip`` through ``POST /token`` (what a token issuer does).

    Raises :class:`TokenRefused` if the server answers no, :class:`ServerUnavailable` if it
    does not answer in time."""
    coro = request_token_async(server, ca, user, password, ip, duration, timeout)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: run the request on a loop of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class SigningClient:
    """Signs files with the classic protocol against a list of servers (see AsyncSigningClient)."""

    def __init__(
        self,
        servers: Sequence[Server],
        ca: Path,
        token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache_dir: Path | None = None,
        nonce_file: Path | None = None,
        max_errors: int = 5,
        shuffle: bool = True,
        connections: int = 16,
        source_address: str | None = None,
        on_retry: Callable[[Path, str, str], None] | None = None,
        log_proof: bool = False,
        log_key: Ed25519PublicKey | None = None,
    ) -> None:
        """``on_retry`` is called on the client's own thread."""
        self._client = AsyncSigningClient(
            servers,
            ca,
            token,
            timeout=timeout,
            cache_dir=cache_dir,
            nonce_file=nonce_file,
            max_errors=max_errors,
            shuffle=shuffle,
            connections=connections,
            source_address=source_address,
            on_retry=on_retry,
            log_proof=log_proof,
            log_key=log_key,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sealbox-client", daemon=True)
        self._thread.start()
        self._running: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()

    @property
    def log_proofs(self) -> list[LogProof]:
        """Every signing log proof checked so far (``log_proof``): a copy."""
        return list(self._client.log_proofs)

    def __enter__(self) -> SigningClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what is still running (after Ctrl-C, say), close connections, stop the loop."""
        if self._loop.is_closed():
            return
        with self._lock:
            for fut in self._running:
                fut.cancel()
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _shutdown(self) -> None:
        """On the client's loop: end every task still there (what a Ctrl-C left: each unwinds
        before the loop closes, as ``asyncio.run`` does, instead of being destroyed pending),
        then close the sessions and the threads that read files."""
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        await self._loop.shutdown_default_executor()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._lock:
            self._running.add(fut)
        try:
            return fut.result()
        finally:
            with self._lock:
                self._running.discard(fut)

    def sign(
        self,
        source: Path,
        formats: Sequence[str],
        dest: Path | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SignOutcome:
        """Sign ``source`` with each format in turn; the outcome carries any error."""
        return self._run(self._client.sign(source, formats, dest, progress))

    def sign_many(
        self, items: Sequence[SignItem], jobs: int = 8, progress: Callable[[int], None] | None = None
    ) -> list[SignOutcome]:
        """Sign many files, at most ``jobs`` at a time; outcomes in the order of ``items``."""
        return self._run(self._client.sign_many(items, jobs, progress))

    def sign_one(self, source: Path, fmt: str, dest: Path) -> tuple[str, bool]:
        """Sign one file with one format; raises a :class:`ClientError` of the failure's kind."""
        return self._run(self._client.sign_one(source, fmt, dest))
