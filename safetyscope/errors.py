"""The one exception type for user mistakes: the CLI prints it as one line, never a traceback."""


class SafetyScopeError(ValueError):
    """A problem the user can fix (bad file, missing column, wrong model/SAE pair...).

    A ValueError, so that library callers (and scikit-learn's estimator checks) catch bad input the usual way."""
