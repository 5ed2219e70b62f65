"""Every error a user can cause, as one tree.

    EdgelmError                 anything edgelm refuses to do; the message says what to do next
    ├── InputError              a bad argument, file or folder given by the user
    │   ├── UnsupportedModelError   an architecture or config edgelm cannot export
    │   └── OutputExistsError       an output folder that exists (use --force)
    ├── ValidationError         an exported graph disagrees with PyTorch beyond tolerance
    ├── QualityError            an optimization step lost more quality than allowed (nothing written)
    ├── ArtifactError           an artifact folder that is missing files or has a bad manifest
    └── DependencyError         an optional package (an extra) is not installed

The CLI prints ``str(error)`` as one line and exits with a non-zero code; nothing else
in edgelm is allowed to reach the user as a traceback.
"""

from __future__ import annotations


def is_whole(value, at_least: int | None = None) -> bool:
    """A whole number as JSON or Python gives it (True and False are not), ``>= at_least`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (at_least is None or value >= at_least)


class EdgelmError(Exception):
    """Base class: a refusal with a message that tells the user what to do."""

    exit_code = 2


class InputError(EdgelmError):
    """Bad user input: a path, an argument, a config value."""


class UnsupportedModelError(InputError):
    """A model edgelm has no exporter for, or a config option it cannot represent."""


class OutputExistsError(InputError):
    """The output folder exists and --force was not given."""


class ValidationError(EdgelmError):
    """The exported graph disagrees with PyTorch. ``failures`` lists every failing output."""

    def __init__(self, message: str, failures: list[str] | None = None):
        super().__init__(message)
        self.failures = failures or []


class QualityError(EdgelmError):
    """A quantized (or otherwise optimized) model failed its quality gate; nothing was written."""


class ArtifactError(EdgelmError):
    """An artifact folder that cannot be used (missing manifest, missing or altered files)."""


class DependencyError(EdgelmError):
    """An optional dependency is missing; the message names the extra to install."""


def require(module: str, extra: str):
    """Import ``module`` or raise a DependencyError that names the pip extra providing it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"this command needs the Python package '{module.split('.')[0]}', which is not installed: "
            f"run  pip install 'edgelm[{extra}]'  (import failed: {exc})"
        ) from None
