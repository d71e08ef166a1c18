"""The one exception type the CLI turns into a single clear line and exit code 2."""


class GreenpropError(Exception):
    """A problem the user can fix (bad option, missing data, unwritable output).

    The CLI prints ``greenprop: error: <message>`` and exits with code 2 instead of
    showing a traceback.
    """
