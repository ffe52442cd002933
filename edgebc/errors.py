"""Exceptions that carry a message meant for the person at the cart or the terminal."""


class EdgebcError(Exception):
    """A failure the user can act on; the CLI prints its message as one line."""


class ImageDecodeError(EdgebcError, ValueError):
    """An input file or buffer is not a readable image of an accepted kind and size."""


class DataLayoutError(EdgebcError, ValueError):
    """A dataset folder or manifest does not have the layout its reader expects."""


class ConfigError(EdgebcError, ValueError):
    """A configuration file or value is malformed, unknown or out of range."""


class MissingDependencyError(EdgebcError, ImportError):
    """An optional package is needed for this feature and is not installed."""
