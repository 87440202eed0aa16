"""Reading a user's TOML table file (prices, limits), with errors that say what to do."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


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


def check_entry_shape(
    pattern: str,
    given: Mapping[str, Any],
    keys: Sequence[str],
    where: str,
    error: type[ValueError],
    pattern_hint: str = "",
    keys_note: str = "",
) -> None:
    """Refuse an entry with an empty pattern or a key the table does not know."""
    if not pattern:
        raise error(
            f"{where}: the pattern is empty; name a model or a shell-style pattern such as "
            f'"claude-sonnet-4-5*"{pattern_hint}'
        )
    unknown = [name for name in given if name not in keys]
    if unknown:
        # [models.claude-sonnet-4.5] splits at the dot into a pattern and a sub-table.
        nested = isinstance(given[unknown[0]], dict)
        hint = '; quote a pattern that has dots: [models."claude-x-4.5*"]' if nested else ""
        raise error(
            f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(keys)}{keys_note}{hint}"
        )
