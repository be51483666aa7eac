"""Errors raised by the store contract; each message names the store, task, array or chunk at fault."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Base class: anything wrong with a feature store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given location."""


class SchemaVersionError(StoreError):
    """The store was written by a newer (or unknown) schema version than this library reads."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


class StoreMismatchError(StoreError):
    """An existing store was made with other settings than the ones asked for."""


class StoreIncompleteError(StoreError):
    """A task's features were not all written (an interrupted extraction)."""


class StoreValidationError(StoreError):
    """Validation found problems; `problems` lists each one."""

    def __init__(self, location: str, problems: list[str]):
        self.location = location
        self.problems = list(problems)
        listed = "\n  - ".join(self.problems)
        super().__init__(f"store {location} is not valid ({len(self.problems)} problem(s)):\n  - {listed}")
