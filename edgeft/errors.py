"""The error tree. Each error is also the matching builtin, so callers can catch either.

Messages read "{where}: {what}. {what to do}". The CLI turns `EdgeftError` into one line:
input and usage errors exit 2, failed checks and operations exit 1.
"""

from __future__ import annotations

import difflib

# every character str.splitlines() breaks at, shown escaped instead
_ONE_LINE = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class EdgeftError(Exception):
    exit_code = 2

    def __init__(self, message: str = "", *args):
        # names from user files (columns, keys, paths) may hold line breaks: keep one line
        super().__init__(str(message).translate(_ONE_LINE), *args)


class UsageError(EdgeftError, ValueError):
    """An option or a combination of options that cannot work."""


class DataError(EdgeftError, ValueError):
    """A dataset file, row or field that cannot be used."""


class ConfigError(EdgeftError, ValueError):
    """A recipe or config file (TOML) with a bad key or value."""


class ProfileError(ConfigError):
    """A device profile that cannot be used."""


class ModelError(EdgeftError, ValueError):
    """A model that cannot be found, loaded or used for the task."""


class MissingDependencyError(EdgeftError, ImportError):
    """An optional dependency that this command needs is not installed."""


class BundleError(EdgeftError, ValueError):
    exit_code = 1


class ParityError(EdgeftError, AssertionError):
    exit_code = 1


class TrainingError(EdgeftError, RuntimeError):
    exit_code = 1


def refuse_existing(output, overwrite: bool | None) -> None:
    """The guard of every command that writes a folder: an existing --output needs --overwrite
    (None: the command has no --overwrite, so it needs another --output)."""
    from pathlib import Path

    if Path(output).exists() and not overwrite:
        hint = "" if overwrite is None else " or pass --overwrite"
        raise UsageError(f"{output}: already exists. Choose another --output{hint}.")


def did_you_mean(name: str, choices) -> str:
    """' Did you mean "x"?' for the closest choice, or '' (never auto-corrects)."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


def require(module: str, extra: str = "train"):
    """Import an optional module or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is not installed: this command needs the [{extra}] extra. "
            f'Install it with: pip install -c constraints.txt "edgeft[{extra}]"'
        ) from e
