"""The signing task runner: scopes, cert levels, chain of trust, per-format packaging.

``sealbox task run`` (:func:`sealbox.task.runner.run_task`), ``sealbox task init --dev``
(:mod:`sealbox.task.devinit`) and ``sealbox cot`` (:mod:`sealbox.task.cot`).
"""

from .runner import EXIT_FAILED, EXIT_MALFORMED, EXIT_OK, EXIT_UNAVAILABLE, run_task

__all__ = ["EXIT_FAILED", "EXIT_MALFORMED", "EXIT_OK", "EXIT_UNAVAILABLE", "run_task"]
