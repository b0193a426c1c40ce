"""Optional dependencies: one place that knows which extra installs which module.

The core install is torch, numpy, open_clip_torch and safetensors. Everything else is an extra, imported only
inside the function that needs it, through :func:`require`, so that ``import vlmfast`` and a calibration call
import none of them and a missing one says what to install::

    mpl = require("matplotlib.figure", "vlmfast.plot")
    # ImportError: matplotlib is needed for vlmfast.plot: pip install 'vlmfast[plot]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: top-level import name -> (distribution to install, the vlmfast extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plot"),
    "mlxtend": ("mlxtend", "data"),
    "sklearn": ("scikit-learn", "data"),
    "timm": ("timm", "data"),
    "faiss": ("faiss-cpu", "faiss"),
    "ray": ("ray", "distributed"),
}


def missing_extra(module: str, feature: str, cause: BaseException | str | None = None) -> ImportError:
    """The ImportError for an absent optional ``module`` needed by ``feature`` (raise it yourself)."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        raise ValueError(f"module: expected a module of an extra ({sorted(EXTRAS)}), got {module!r}")
    dist, extra = EXTRAS[top]
    msg = f"{dist} is needed for {feature}: pip install 'vlmfast[{extra}]'"
    if cause is not None:
        msg += f" (import failed: {cause})"
    return ImportError(msg, name=top)


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``) of an optional dependency, or raise an ImportError that
    names the package and the extra to install. ``feature`` is what needs it (``"vlmfast.plot"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module, feature, exc) from exc


def locate(module: str, feature: str) -> list[str]:
    """The folders of an optional *package* without importing it (for data files it ships), or the ImportError
    naming the extra when it is not installed."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:  # ValueError: sys.modules[top] is None or has no __spec__
        raise missing_extra(top, feature, exc) from exc
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra(top, feature)
    return list(spec.submodule_search_locations)


__all__ = ["EXTRAS", "locate", "missing_extra", "require"]
