"""Errors a user can act on. The CLI and the API print their message, never a traceback."""


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
