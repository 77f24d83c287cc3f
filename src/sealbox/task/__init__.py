"""The signing task runner: scopes, cert levels, chain of trust, per-format packaging.

``sealbox task run`` (:func:`sealbox.task.runner.run_task`), ``sealbox task init --dev``
(dev tooling: :mod:`sealbox.deploy.taskdev`) and ``sealbox cot`` (:mod:`sealbox.task.cot`).

The runner's modules, in the order a task goes through them: :mod:`.runner` (the order of
work: config, task.json, token, publishing), :mod:`.scopes`, :mod:`.plan` (inputs and
outputs), :mod:`.trust` (chain of trust of upstream tasks, fetching through
:mod:`.artifacts`, records in :mod:`.cot`), :mod:`.steps` (inspection, per-format signing,
outputs; packaging in :mod:`.behaviours`), :mod:`.exits` (exit codes, ``TaskFailure``).
"""

from .exits import EXIT_FAILED, EXIT_MALFORMED, EXIT_OK, EXIT_UNAVAILABLE, TaskFailure
from .runner import run_task

__all__ = ["EXIT_FAILED", "EXIT_MALFORMED", "EXIT_OK", "EXIT_UNAVAILABLE", "TaskFailure", "run_task"]
