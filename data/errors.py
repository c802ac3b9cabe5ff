"""Errors about the data itself: missing folders, unreadable or damaged files. Each message names the
file (and the record, for LMDB) and what to do; the runner records it and main.py prints it without a
traceback. The classes also derive from the built-in type that used to be raised for the same fault,
so code that catches ``FileNotFoundError`` or ``ValueError`` keeps working."""
from __future__ import annotations


class DataError(Exception):
    """Missing, incomplete or damaged data."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or file that does not exist."""


class DataConfigError(DataError, ValueError):
    """Data that does not match what the configuration asks for (no root, other classes)."""


class CorruptDataError(DataError, RuntimeError):
    """A file that exists but cannot be read: truncated, garbled, not an image."""
