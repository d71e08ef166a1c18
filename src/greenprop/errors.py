"""The one exception type the CLI turns into a single clear line and exit code 2."""


class GreenpropError(ValueError):
    """A problem the user can fix (bad option, missing data, unwritable output).

    It subclasses ValueError so library users can catch bad input the usual way.

    The CLI prints ``greenprop: error: <message>`` and exits with code 2 instead of
    showing a traceback.
    """


class TrainingDiverged(GreenpropError):
    """Training produced a non-finite loss; the last good checkpoint is kept.

    ``compare`` records such a run as diverged and goes on with the others.
    """
