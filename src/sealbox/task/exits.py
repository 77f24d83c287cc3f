"""Exit codes of ``sealbox task run`` and the failure that carries one."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SealboxError

EXIT_OK = 0
EXIT_MALFORMED = 3
EXIT_UNAVAILABLE = 4
EXIT_FAILED = 5

#: where progress and messages go (a line at a time)
Echo = Callable[[str], None]


class TaskFailure(SealboxError):
    """The task stops: ``code`` is the exit code, ``message`` the first line of the report
    (what and why), ``details`` any lines shown under it."""

    def __init__(self, code: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []
