"""Handing key material to external tools without touching disk, argv or the environment.

Secrets are written into anonymous pipes; the child gets them as ``/dev/fd/N`` paths and
inherits only those descriptors. A writer thread feeds each pipe so large blobs never
deadlock against a child that reads lazily.
"""

from __future__ import annotations

import contextlib
import os
import threading
from types import TracebackType


class ToolSecrets:
    """Context manager: ``paths[i]`` is a ``/dev/fd/N`` path that yields ``blobs[i]`` once."""

    def __init__(self, *blobs: bytes) -> None:
        self._blobs = blobs
        self._read_fds: list[int] = []
        self._threads: list[threading.Thread] = []
        self.paths: list[str] = []

    @property
    def fds(self) -> tuple[int, ...]:
        """Descriptors to pass to ``subprocess`` as ``pass_fds``."""
        return tuple(self._read_fds)

    def __enter__(self) -> ToolSecrets:
        for blob in self._blobs:
            r, w = os.pipe()
            self._read_fds.append(r)
            self.paths.append(f"/dev/fd/{r}")
            t = threading.Thread(target=self._feed, args=(w, blob), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @staticmethod
    def _feed(fd: int, blob: bytes) -> None:
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except (BrokenPipeError, OSError):
            pass  # the child closed early or died: nothing to deliver to
        finally:
            os.close(fd)

    def close_parent_ends(self) -> None:
        """Close our copies of the read ends once the child has been started."""
        for fd in self._read_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read_fds = []

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_parent_ends()
        for t in self._threads:
            t.join(timeout=5)
