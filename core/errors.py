"""Errors a user can fix. They print as one clear paragraph, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a config value, a missing file). `exit_code` is what the process returns."""

    exit_code = 1


class ConfigError(UserError):
    """The composed config is invalid: caught before data or device are touched."""

    exit_code = 2


class DataNotFoundError(UserError):
    """A data set is not where the config says it is."""

    exit_code = 1


class BadSampleError(UserError):
    """A training or evaluation sample that cannot be loaded (a broken file), met while the run goes on: it stops
    with the command that resumes it from its last checkpoint once the data are fixed."""


class DataError(UserError):
    """A data file is there but cannot be used (truncated, corrupt, not UTF-8, too short): caught when the task
    reads it, before the first step."""

    exit_code = 2


class TaskError(UserError):
    """The task breaks the protocol of core/task.py (what loss or evaluate returns, a missing batch_size): caught
    on the first step or before it."""

    exit_code = 2
