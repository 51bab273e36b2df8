"""The one error type of configuration problems."""


class ConfigError(ValueError):
    """A flag, YAML key or value the run cannot use; the message names the flag or key to fix.

    The CLI prints it and exits with status 2, like argparse's own usage errors.
    """
