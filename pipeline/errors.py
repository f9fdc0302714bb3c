"""Errors a user can act on. The CLI and the API print their message, never a traceback."""

from __future__ import annotations


class TandemError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class InputError(TandemError):
    """A message, file or argument that Tandem cannot use as given."""


class IndexLoadError(TandemError):
    """A knowledge index that is missing, corrupt or built with another encoder."""


class ModelLoadError(TandemError):
    """A model artifact that is missing, corrupt or of an unknown format."""


class ResponderError(TandemError):
    """The generator failed, timed out or could not be reached."""

    @classmethod
    def timed_out(cls, seconds: float) -> ResponderError:
        """A reply that went ``seconds`` without a new token (GenerationLimits.timeout_s), in one
        wording for every backend."""
        return cls(f"generation timed out: no new token for {seconds:.0f} s")
