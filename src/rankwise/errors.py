"""Errors that end a run with a one-line message and a specific exit code."""

from __future__ import annotations


class RankwiseError(Exception):
    """Base class: printed as one line, no traceback, exit code ``exit_code``."""

    exit_code = 1


class ConfigError(RankwiseError):
    """An invalid run config: names the dotted key. Exit code 2, raised before any heavy work."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config error at '{key}': {message}")


class DataError(RankwiseError):
    """A corrupt or missing data row/column/split: names split, row and column."""

    exit_code = 3


class ModelLoadError(RankwiseError):
    """A model path/hub id that cannot be loaded, with how to fix it."""

    exit_code = 4


class NonFiniteLossError(RankwiseError):
    """A NaN/Inf loss or gradient: names the step and the term that went bad."""

    exit_code = 5
