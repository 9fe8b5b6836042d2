"""The one exception type for user mistakes: the CLI prints it as one line, never a traceback."""


class SafetyScopeError(ValueError):
    """A problem the user can fix (bad file, missing column, wrong model/SAE pair...).

    A ValueError, so that library callers (and scikit-learn's estimator checks) catch bad input the usual way."""


def check_number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, integer: bool = False, none_ok: bool = False):
    """``value`` if it is a finite number within the bounds, else a one-line SafetyScopeError naming ``name``
    (the option or field, as the user wrote it). The one range check the configs' ``__post_init__`` use, so a NaN,
    a negative count or a string in a file is refused where the setting is defined, not deep in the work."""
    import math
    import numbers

    if value is None and none_ok:
        return value
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise SafetyScopeError(f"{name} must be a finite {'integer' if integer else 'number'}; got {value!r}")
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    if (low is not None and (value <= low if low_open else value < low)) or \
       (high is not None and (value >= high if high_open else value > high)):
        raise SafetyScopeError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}; got {value!r}")
    return value
