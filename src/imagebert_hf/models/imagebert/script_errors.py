"""How the console scripts end on a bad input: one line naming it, `<program>: error: <message>`, and exit status 1,
rather than a traceback. It sits here, at the bottom of the package's layers, so that every script can use it (the
UNITER converter of this folder included)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
            needs its extra: pip install 'imagebert_hf[app]'"; it follows the message after "; ".
    """
    try:
        yield
    except Exception as error:
        if missing_extra is not None and isinstance(error, ModuleNotFoundError):
            raise SystemExit(f"{program}: error: {error}; {missing_extra}") from None
        if isinstance(error, errors):
            raise SystemExit(f"{program}: error: {error}") from None
        raise


def parse_flags(parser, argv: list[str] | None = None) -> tuple:
    """The dataclasses an `HfArgumentParser` fills from `argv` (`sys.argv` when None). An unknown flag is reported
    as argparse reports every other bad flag (usage, then `<program>: error: unrecognized arguments: ...`, exit
    status 2), where `parse_args_into_dataclasses` alone would raise a traceback."""
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed)


__all__ = ["exit_on_error", "parse_flags"]
