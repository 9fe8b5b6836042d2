"""Package attributes imported on first use (PEP 562): a package can name its public classes without every
`import` of it paying for scikit-learn or the job modules behind them."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, where: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package`` whose names ``where`` maps to the (relative) module
    holding them; a name is imported once, then cached in the package's namespace."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
