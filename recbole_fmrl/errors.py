"""The plugin's error types.

Every error a user can cause and fix (a bad config value, a missing or corrupt file, an untrusted
checkpoint) is a ``RecboleFmrlError`` whose message names the problem and the fix on one line. The CLIs
(``recbole_fmrl.cli``) print that line and exit 2.
"""

from __future__ import annotations


class RecboleFmrlError(Exception):
    """A user-fixable problem; ``str(err)`` is one line naming the problem and the fix."""

    def __str__(self) -> str:  # one line, whatever the message was built from
        return " ".join(super().__str__().split())


class ConfigError(RecboleFmrlError, ValueError):
    """A config value is invalid."""


class DataFileError(RecboleFmrlError, ValueError):
    """An input data file is missing, malformed or inconsistent."""


class CheckpointError(RecboleFmrlError, ValueError):
    """A checkpoint is missing, truncated, of another model, or not trusted."""


class FeatureError(DataFileError):
    """Bad feature input or configuration; the message names the problem and the fix."""
