"""The one exception type for user mistakes: the CLI prints it as one line, never a traceback."""


class SafetyScopeError(Exception):
    """A problem the user can fix (bad file, missing column, wrong model/SAE pair...)."""
