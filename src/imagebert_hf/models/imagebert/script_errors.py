"""How the console scripts end on a bad input: one line naming it, `<program>: error: <message>`, and exit status 1,
rather than a traceback. It sits here, at the bottom of the package's layers, so that every script can use it (the
UNITER converter of this folder included)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager


# How torch re-raises an error of a DataLoader worker: its type and worker, then the worker's whole traceback.
_WORKER_ERROR = re.compile(r"^Caught \w+ (in DataLoader worker process \d+)\.\nOriginal Traceback", re.DOTALL)


def error_line(error: BaseException) -> str:
    """The message of `error` on one line: for an error a DataLoader worker raised, its own last line (the error
    and its message) and which worker, rather than the worker's traceback that torch puts in the message."""
    message = str(error)
    worker = _WORKER_ERROR.match(message)
    if worker is None:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1].strip()
    return f"{last} ({worker.group(1)})"


@contextmanager
def exit_on_error(
    program: str,
    errors: tuple[type[Exception], ...] = (OSError, ValueError),
    missing_extra: str | None = None,
) -> Iterator[None]:
    """Turns the `errors` the block raises (a missing file, a value the code rejects) into
    `SystemExit("<program>: error: <message>")`; anything else propagates unchanged.

    Args:
        program: The script's name, the first word of the line.
        errors: The exception classes that mean a bad argument or input.
        missing_extra: What a missing optional dependency (`ModuleNotFoundError`) asks the user to do, e.g. "the app
            needs its extra: pip install -e '.[app]'"; it follows the message after "; ".
    """
    try:
        yield
    except Exception as error:
        if missing_extra is not None and isinstance(error, ModuleNotFoundError):
            raise SystemExit(f"{program}: error: {error}; {missing_extra}") from None
        if isinstance(error, errors):
            raise SystemExit(f"{program}: error: {error_line(error)}") from None
        raise


def parse_json_arguments(parser, path: str) -> tuple:
    """The dataclasses an `HfArgumentParser` fills from the JSON object in the file `path` (a script's arguments
    given as `script.py args.json`). Raises a `ValueError` naming the file for one that cannot be read, is not a JSON
    object, misses a required argument, names an unknown one, or gives one a value of another type than its field's
    (`"false"` for a flag would otherwise be a string, and true: argparse converts a flag's text, this does not)."""
    import dataclasses
    import json
    import typing
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the arguments ({type(error).__name__}: {error}).") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}; expected an object of argument names and values."
        )
    for arguments in parser.dataclass_types:
        hints = typing.get_type_hints(arguments)
        for item in dataclasses.fields(arguments):
            if item.name in data and not _json_value_fits(data[item.name], hints[item.name]):
                raise ValueError(
                    f"{path}: {item.name} must be {_describe_type(hints[item.name])}, got {data[item.name]!r}."
                )
    try:
        return tuple(parser.parse_dict(data))
    except (TypeError, ValueError) as error:  # a required argument missing, an unknown one given
        raise ValueError(f"{path}: {error}") from None


def _json_value_fits(value, hint) -> bool:
    """Whether a JSON value is of the field type `hint` (bool, int, float, str, a list of those, None, a union);
    other types are left to the code that reads them."""
    import types
    import typing

    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_json_value_fits(value, argument) for argument in arguments)
    if origin is typing.Literal:
        return value in arguments
    if origin in (list, tuple):
        return isinstance(value, list) and (not arguments or all(_json_value_fits(x, arguments[0]) for x in value))
    checks = {
        type(None): lambda: value is None,
        bool: lambda: isinstance(value, bool),
        int: lambda: isinstance(value, int) and not isinstance(value, bool),
        float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: lambda: isinstance(value, str),
    }
    return checks[hint]() if hint in checks else True


def _describe_type(hint) -> str:
    """A field type in words, for a message: `int | None` is "an integer or null"."""
    import typing

    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        plural = {bool: "true or false values", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(arguments[0], 'values')}" if arguments else "a list"
    if arguments:
        return " or ".join(_describe_type(argument) for argument in arguments)
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def parse_flags(parser, argv: list[str] | None = None) -> tuple:
    """The dataclasses an `HfArgumentParser` fills from `argv` (`sys.argv` when None). An unknown flag is reported
    as argparse reports every other bad flag (usage, then `<program>: error: unrecognized arguments: ...`, exit
    status 2), where `parse_args_into_dataclasses` alone would raise a traceback."""
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed)


__all__ = ["error_line", "exit_on_error", "parse_flags", "parse_json_arguments"]
