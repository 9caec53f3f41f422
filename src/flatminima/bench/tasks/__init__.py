"""Benchmark tasks (data shipped inside packages or generated locally, no downloads) behind the
:class:`~flatminima.bench.tasks.base.Task` interface; :data:`TASKS` maps names to task classes."""

# Importing a task module registers its tasks in TASKS.
from . import alignment, captions, graph, text, vision  # noqa: F401
from .base import TASKS, ClassificationTask, Task, TaskHParams, TaskUnavailable, register_task
from .digits import DigitsData, DigitsTask, load_digits, make_digits, make_mlp

__all__ = [
    "TASKS",
    "ClassificationTask",
    "DigitsData",
    "DigitsTask",
    "Task",
    "TaskHParams",
    "TaskUnavailable",
    "load_digits",
    "make_digits",
    "make_mlp",
    "register_task",
]
