"""The one exception type for user mistakes: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    """A problem with the user's input (file, particle or option), not a bug.

    The message must name the file, the particle or the option at fault and fit on one line.
    """
