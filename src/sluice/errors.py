"""Errors raised by several layers (config parsing, plug-in loading, listeners), in a module that imports nothing,
so any layer can raise them without depending on the layer that usually reports them (``sluice.config``
re-exports ``ConfigError`` for users)."""


class ConfigError(ValueError):
    """A flag, YAML key or value the run cannot use; the message names the flag or key to fix.

    The CLI prints it and exits with status 2, like argparse's own usage errors.
    """
