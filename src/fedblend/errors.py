"""User-facing errors: each one prints as a single line and exits with code 2."""

from __future__ import annotations


class FedblendError(Exception):
    """Base class for errors caused by the user's input (config, data, arguments)."""

    exit_code = 2


class ConfigError(FedblendError):
    """An experiment config is malformed or names impossible values."""


class DataError(FedblendError):
    """A data file is missing, unreadable, empty or lacks a required field."""
