"""Errors that the command line reports as one plain line (no traceback unless --debug)."""

import argparse
import importlib


class NinError(Exception):
    """A user-facing error: the message names what is wrong and where."""


class DataError(NinError, ValueError):
    """A data file is missing, damaged, or not in the format its name promises."""


class TrainingStalled(NinError):
    """The loss sits at ln K with every class map dead: training would go on learning nothing."""


class NonFiniteLoss(NinError):
    """The training loss became NaN or infinite."""


class CheckpointError(NinError):
    """A checkpoint or weights file is missing, damaged, or belongs to another model."""


class NinNote(UserWarning):
    """Something the user should know about a result that is still right (`warnings.warn`); the command line
    prints it as one line, "nin COMMAND: note: ...", to stderr."""


class MissingPackage(NinError):
    """An optional dependency is not installed (`require_package`); the message names the extra that brings it."""


def require_package(package: str, what: str, extra: str) -> None:
    """Import ``package`` (an optional dependency); when it is not installed, a one-line NinError saying which
    extra brings it (MissingPackage): "WHAT needs the PACKAGE package: pip install "network-in-network[EXTRA]"."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as error:
        if error.name != package.split(".")[0] and error.name != package:
            raise
        raise MissingPackage(f'{what} needs the {package.split(".")[0]} package: pip install "network-in-network[{extra}]"') \
            from None


def path_arg(text: str) -> str:
    """An argparse type for a path flag: an empty one (an unset shell variable, say) is refused in one line, not
    taken as the current folder or as "not given"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; expected a file or folder name")
    return text


def _count_at_least(text: str, minimum: int, expected: str) -> int:
    """``text`` as an int of at least ``minimum``, or argparse's one-line refusal saying ``expected``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a count of 1 or more, refused by argparse in one line otherwise."""
    return _count_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type for a count where 0 means "none" (`nin bench --warmup`, `--workers`): 0 or more, refused by
    argparse in one line otherwise."""
    return _count_at_least(text, 0, "0 or a positive integer")
