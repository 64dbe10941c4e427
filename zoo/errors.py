"""Errors a user can cause. Each message says what was wrong and how to fix it."""

from __future__ import annotations


class ZooError(Exception):
    """Base class of every error zoo raises for bad input."""


class UnknownNameError(ZooError, KeyError):
    """A name that no registry, store or source knows."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ChecksumError(ZooError):
    """A downloaded or cached file whose sha256 differs from the expected one."""


class DownloadError(ZooError):
    """A remote file that could not be fetched."""


class UnsafeCheckpointError(ZooError):
    """A pickled checkpoint that needs arbitrary Python objects to load."""


class CheckpointMismatchError(ZooError):
    """A state dict that does not fit the architecture it is loaded into."""


class ConfigError(ZooError):
    """A malformed or inconsistent configuration or model card."""


class DataError(ZooError):
    """Shards that cannot be read as asked: no match, a missing file, too few for the workers."""


class SampleError(ZooError, ValueError):
    """A sample that lacks what a transform needs: no caption to choose, a mask of another size."""
