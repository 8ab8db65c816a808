"""Reward tasks: built-ins by name, or a user's class as 'package.module:ClassName'."""

from __future__ import annotations

import importlib

from ..config import ConfigError, TaskConfig
from .arithmetic import ArithmeticTask
from .base import Example, Task, reports_kl
from .conciseness import ConcisenessTask
from .countdown import CountdownTask
from .multiplication import MultiplicationTask

BUILTIN_TASKS = {
    "arithmetic": ArithmeticTask,
    "conciseness": ConcisenessTask,
    "countdown": CountdownTask,
    "multiplication": MultiplicationTask,
}

__all__ = ["BUILTIN_TASKS", "Example", "Task", "make_task", "reports_kl"]


def make_task(cfg: TaskConfig) -> Task:
    """Instantiate the task named by `task.name` with the task config."""
    if cfg.name in BUILTIN_TASKS:
        return BUILTIN_TASKS[cfg.name](cfg)
    module_name, sep, attr = cfg.name.partition(":")
    if not sep:
        raise ConfigError(
            f"config field 'task.name': unknown task '{cfg.name}' "
            f"(built-in: {', '.join(BUILTIN_TASKS)}; or 'package.module:ClassName')"
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"config field 'task.name': cannot import '{cfg.name}': {exc}") from exc
    try:
        task = cls(cfg)
    except Exception as exc:  # a plug-in that cannot be built from the task config
        raise ConfigError(f"config field 'task.name': '{cfg.name}' failed to start: {exc}") from exc
    if not isinstance(task, Task):
        raise ConfigError(
            f"config field 'task.name': '{cfg.name}' does not implement the Task protocol "
            "(attributes name, train, test and a score(completion, example) method)"
        )
    return task
