"""Reading a user's TOML table file (prices, limits), with errors that say what to do."""

from __future__ import annotations

import os


def read_table_file(
    path: str | os.PathLike[str], kind: str, variable: str, error: type[ValueError]
) -> str:
    """The file's text; `kind` names it in messages ("pricing", "limits"), `variable` is the
    setting that pointed at it, and `error` the exception its table raises."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise error(
            f"{kind} file {name!r} ({variable}) does not exist; fix the path, or unset "
            f"{variable} to use the built-in {kind}"
        ) from None
    except OSError as exc:
        raise error(
            f"cannot read {kind} file {name!r}: {exc.strerror or exc}; make it a readable "
            f"file, or unset {variable}"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{kind} file {name!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from None
