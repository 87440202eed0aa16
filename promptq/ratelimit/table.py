"""The upstream account's rate limits per model, from built-in defaults and a TOML file.

A limit table maps shell-style model patterns to limits; the longest matching pattern wins
(`promptq.patterns`), as in the price table. The built-in table below holds CometAPI's
defaults for Claude models and a catch-all "*"; a TOML file (PROMPTQ_LIMITS_FILE) overrides
and extends it:

    [models."claude-*"]
    rpm = 50               # requests per minute
    input_tpm = 30000      # input tokens per minute (estimated before the call)
    output_tpm = 8000      # output tokens per minute (max_tokens reserved, the rest refunded)
    max_concurrency = 20   # calls in flight at once
    burst_seconds = 0.5    # optional: seconds of the request rate that may go at once
    token_burst_seconds = 60   # optional: depth of the token meters, in seconds of their rate
    count_cache_reads = false  # optional: true if the upstream counts cache reads as input

Every limit is a positive whole number or "unlimited", which switches that limit off.
0 is refused rather than read as "off": as a limit it would block every call forever.

A key left out of a file's entry is inherited: from the built-in entry of the same pattern
if there is one, otherwise from the "*" entry (the file's own "*" if it gives one, with its
gaps filled from the built-in "*"). So `[models."my-model"]` with only `rpm = 5` keeps the
catch-all's token and concurrency limits.

Requests and tokens are metered the way Anthropic meters them. The upstream may enforce a
minute's request limit second by second, so requests are spread out: after an idle spell
only `burst_seconds` worth of the request rate may go in one go. At low rates that is less
than one request (50 rpm x 0.5 s = 0.42 requests), so whatever consumes these figures must
still let one call through after an idle spell. Token buckets, on the other hand, are a
minute deep upstream (continuously refilled up to the per-minute maximum): a call takes its
input and `max_tokens` of output when it starts and gives back what it did not write when
it ends. The token meters are as deep (`token_burst_seconds`, default 60), so the calls in
flight are bounded by that capacity over `max_tokens`, not by a second's worth of the rate.
Prompt-cache reads do not count as input for current models; an upstream that counts them
says so with `count_cache_reads = true`.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from promptq.patterns import longest_match
from promptq.tablefile import check_entry_shape, read_table_file


class LimitsError(ValueError):
    """A limit table that cannot be used; the message says where, what, and what to do."""


LIMIT_FIELDS = ("rpm", "input_tpm", "output_tpm", "max_concurrency")
FIELDS = (*LIMIT_FIELDS, "burst_seconds", "token_burst_seconds", "count_cache_reads")
UNLIMITED = "unlimited"
CATCH_ALL = "*"
DEFAULT_BURST_SECONDS = 0.5
# As deep as the upstream's own token buckets: a minute of the per-minute limit.
DEFAULT_TOKEN_BURST_SECONDS = 60.0
# The limits are per minute: a burst of more than a minute's worth at once is not spreading
# the rate out at all, and is what an upstream enforcing it per second answers with 429s.
MAX_BURST_SECONDS = 60.0
# No account comes near these; a larger figure is almost surely a typo (an extra zero or
# two), and a limit that never binds is a limiter that does nothing. "unlimited" says it.
MAX_RPM = 1_000_000
MAX_CONCURRENCY = 10_000
_CAPS = {"rpm": MAX_RPM, "max_concurrency": MAX_CONCURRENCY}

_UNITS = {
    "rpm": "requests per minute",
    "input_tpm": "input tokens per minute",
    "output_tpm": "output tokens per minute",
    "max_concurrency": "calls in flight at once",
}
_EXAMPLES = {"rpm": 50, "input_tpm": 30000, "output_tpm": 8000, "max_concurrency": 20}

_FILE_HELP = f'the file holds [models."PATTERN"] tables with the keys {", ".join(FIELDS)}'


@dataclass(frozen=True)
class ModelLimits:
    """The upstream limits of the models a pattern matches. None: no limit on that one."""

    pattern: str
    rpm: int | None  # requests per minute
    input_tpm: int | None  # input tokens per minute, estimated before the call
    output_tpm: int | None  # output tokens per minute: max_tokens reserved, the rest refunded
    max_concurrency: int | None  # calls in flight at once
    burst_seconds: float = DEFAULT_BURST_SECONDS  # seconds of the request rate at once
    # Depth of the input and output token meters, in seconds of their rate.
    token_burst_seconds: float = DEFAULT_TOKEN_BURST_SECONDS
    # Whether prompt-cache reads count toward input_tpm (not at Anthropic for current models).
    count_cache_reads: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise LimitsError(f"a model pattern must be a non-empty string, got {self.pattern!r}")
        # The same checks as a file's values, so that limits built in code cannot be ones
        # a file would be refused for.
        where = f'limits for "{self.pattern}"'
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _checked_limit(value, name, where))
        object.__setattr__(self, "burst_seconds", _checked_burst(self.burst_seconds, where))
        object.__setattr__(
            self,
            "token_burst_seconds",
            _checked_burst(self.token_burst_seconds, where, "token_burst_seconds"),
        )
        object.__setattr__(self, "count_cache_reads", _checked_flag(self.count_cache_reads, where))

    def to_dict(self) -> dict[str, Any]:
        """The limits as JSON-ready values; None stands for "unlimited"."""
        return {
            "pattern": self.pattern,
            "rpm": self.rpm,
            "input_tpm": self.input_tpm,
            "output_tpm": self.output_tpm,
            "max_concurrency": self.max_concurrency,
            "burst_seconds": self.burst_seconds,
            "token_burst_seconds": self.token_burst_seconds,
            "count_cache_reads": self.count_cache_reads,
        }


class LimitTable:
    """Limits by model pattern; a model is limited by its longest matching pattern.

    The table always holds a catch-all "*" entry, so every model is limited by something:
    a model no other pattern names must not slip past the account's limits.
    """

    def __init__(self, entries: Iterable[ModelLimits]) -> None:
        # Insertion order is the tie-break of longest_match. An entry for a pattern already
        # present replaces it in place: a file overriding a built-in keeps the built-in's rank.
        self._entries: dict[str, ModelLimits] = {}
        for entry in entries:
            self._entries[entry.pattern] = entry
        if CATCH_ALL not in self._entries:
            raise LimitsError(
                'a limit table needs a catch-all "*" entry, so that a model of any name is '
                'still limited; add ModelLimits("*", ...)'
            )
        # The catch-all goes last, so that it loses every tie of longest_match: "*" and a
        # one-character pattern such as "m" are as long, and any other pattern is the more
        # specific one.
        self._entries[CATCH_ALL] = self._entries.pop(CATCH_ALL)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> LimitTable:
        """The built-in limits, overridden and extended by the file at `path` if one is given."""
        if path is None:
            return cls(_builtin_limits())
        text = read_table_file(path, "limits", "PROMPTQ_LIMITS_FILE", LimitsError)
        return cls.from_toml(text, source=os.fspath(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>", *, builtins: bool = True) -> LimitTable:
        """The built-in limits overridden and extended by a TOML text. `source` names the
        text in error messages.

        Without `builtins`, the table is the text's entries alone: the text must then give a
        "*" entry with every limit, and its other entries inherit what they leave out from it.
        """
        base = {entry.pattern: entry for entry in _builtin_limits()} if builtins else {}
        return cls([*base.values(), *_parse_toml(text, source, base)])

    def limits_for(self, model: str) -> ModelLimits:
        """The limits of `model`: its longest matching pattern's, else the "*" entry's."""
        pattern = longest_match(self._entries, model)
        # "*" matches every string, the empty one included, so None cannot happen; the
        # fallback keeps the promise even so.
        return self._entries[CATCH_ALL if pattern is None else pattern]

    def entries(self) -> list[ModelLimits]:
        """Every entry, sorted by pattern."""
        return sorted(self._entries.values(), key=lambda entry: entry.pattern)


def _checked_limit(value: Any, name: str, where: str) -> int | None:
    """A valid limit from a file or code: a positive whole number, or None for "unlimited"."""
    unit = _UNITS[name]
    if value == UNLIMITED and isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        example = f"e.g. {name} = {_EXAMPLES[name]}"
        if isinstance(value, bool):
            fix = f" (true/false is not a number); {example}"
        elif isinstance(value, str):
            fix = f' (a string); write a number without quotes, {example}, or exactly "{UNLIMITED}"'
        elif isinstance(value, float) and value.is_integer():
            fix = f"; write it without a decimal point: {name} = {int(value)}"
        elif isinstance(value, float):
            fix = f" (not a whole number); round it, {example}"
        else:
            fix = f"; {example}"
        raise LimitsError(
            f'{where}: {name} must be a whole number of {unit} or "{UNLIMITED}", got {value!r}{fix}'
        )
    if value == 0:
        raise LimitsError(
            f"{where}: {name} = 0 would block every call forever; to hold this model back, "
            f"give a very small limit such as {name} = 1, or remove the model from your "
            f'jobs; to switch this limit off, write {name} = "{UNLIMITED}"'
        )
    if value < 0:
        raise LimitsError(
            f"{where}: {name} = {value} is negative; give a positive whole number of {unit}, "
            f'or "{UNLIMITED}" to switch this limit off'
        )
    cap = _CAPS.get(name)
    if cap is not None and value > cap:
        raise LimitsError(
            f"{where}: {name} = {value} is more than {cap:,}, likely a typo; give the "
            f'account\'s real limit in {unit}, or "{UNLIMITED}" to switch this limit off'
        )
    return value


def _checked_burst(value: Any, where: str, name: str = "burst_seconds") -> float:
    tokens = name == "token_burst_seconds"
    default = DEFAULT_TOKEN_BURST_SECONDS if tokens else DEFAULT_BURST_SECONDS
    example = f"e.g. {name} = {default:g}"
    limit = f"more than 0 and at most {MAX_BURST_SECONDS:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        if value == UNLIMITED:
            # Unlimited would let more than a minute's worth go at once: not a limit at all.
            hint = " (a burst cannot be unlimited)"
        elif isinstance(value, str):
            hint = " (a string); write it without quotes,"
        else:
            hint = ";"
        raise LimitsError(
            f"{where}: {name} must be a number of seconds, {limit}, got {value!r}{hint} {example}"
        )
    seconds = float(value)
    if not math.isfinite(seconds):
        raise LimitsError(
            f"{where}: {name} = {value} is not a finite number; give a number of "
            f"seconds, {limit}, {example}"
        )
    if seconds <= 0:
        raise LimitsError(
            f"{where}: {name} = {value} must be more than 0: a burst of no time "
            f"would let no call through; give a small number, {example}"
        )
    if seconds > MAX_BURST_SECONDS:
        raise LimitsError(
            f"{where}: {name} = {value} is more than {MAX_BURST_SECONDS:g}: the limits "
            "are per minute, so that would spend more than a minute's worth at once, which "
            f"the upstream answers with 429s; give at most {MAX_BURST_SECONDS:g}"
        )
    return seconds


def _checked_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise LimitsError(
            f"{where}: count_cache_reads must be true or false (without quotes), got {value!r}"
        )
    return value


def _model_limits(
    pattern: str, given: Mapping[str, Any], parent: ModelLimits | None, where: str
) -> ModelLimits:
    """Validate one entry's limits (from a file or the built-ins); what it leaves out comes
    from `parent`, or, with no parent, is required (burst_seconds has its default)."""
    check_entry_shape(
        pattern, given, FIELDS, where, LimitsError, pattern_hint=', or "*" for every model'
    )
    values: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        if name in given:
            values[name] = _checked_limit(given[name], name, where)
        elif parent is not None:
            values[name] = getattr(parent, name)
        else:
            raise LimitsError(
                f"{where}: {name!r} is missing and there is no built-in entry to inherit it "
                f"from; give it in {_UNITS[name]}, e.g. {name} = {_EXAMPLES[name]}, or "
                f'{name} = "{UNLIMITED}"'
            )
    # The optional settings: given, else the parent's, else their defaults.
    if "burst_seconds" in given:
        values["burst_seconds"] = _checked_burst(given["burst_seconds"], where)
    elif parent is not None:
        values["burst_seconds"] = parent.burst_seconds
    if "token_burst_seconds" in given:
        values["token_burst_seconds"] = _checked_burst(
            given["token_burst_seconds"], where, "token_burst_seconds"
        )
    elif parent is not None:
        values["token_burst_seconds"] = parent.token_burst_seconds
    if "count_cache_reads" in given:
        values["count_cache_reads"] = _checked_flag(given["count_cache_reads"], where)
    elif parent is not None:
        values["count_cache_reads"] = parent.count_cache_reads
    return ModelLimits(pattern=pattern, **values)


def _parse_toml(text: str, source: str, base: Mapping[str, ModelLimits]) -> list[ModelLimits]:
    """The text's entries, in its order, each completed from `base` (see the module doc)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LimitsError(f"{source}: not valid TOML ({exc}); fix the syntax") from None
    unknown = [key for key in document if key != "models"]
    if unknown:
        raise LimitsError(f"{source}: unknown top-level key {unknown[0]!r}; {_FILE_HELP}")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise LimitsError(f"{source}: 'models' must be a table; {_FILE_HELP}")
    for pattern, table in models.items():
        if not isinstance(table, dict):
            raise LimitsError(
                f'{source}: [models."{pattern}"] must be a table of limits, got {table!r}; '
                f"{_FILE_HELP}"
            )

    if CATCH_ALL not in models and CATCH_ALL not in base:
        # Only without the built-ins: checked before the entries, whose gaps it would fill.
        raise LimitsError(
            f'{source}: no [models."*"] entry; without the built-in limits the file must give '
            "one, so that a model no other pattern matches is still limited: add "
            f'[models."*"] with {", ".join(LIMIT_FIELDS)}'
        )

    def where(pattern: str) -> str:
        return f'{source}: [models."{pattern}"]'

    # "*" first, wherever the file puts it: the entries with no built-in of their own
    # inherit from it.
    resolved: dict[str, ModelLimits] = {}
    if CATCH_ALL in models:
        resolved[CATCH_ALL] = _model_limits(
            CATCH_ALL, models[CATCH_ALL], base.get(CATCH_ALL), where(CATCH_ALL)
        )
    catch_all = resolved.get(CATCH_ALL, base.get(CATCH_ALL))
    for pattern, table in models.items():
        if pattern != CATCH_ALL:
            parent = base.get(pattern, catch_all)
            resolved[pattern] = _model_limits(pattern, table, parent, where(pattern))
    return [resolved[pattern] for pattern in models]


# Built-in limits: Anthropic's first usage tier for Claude Sonnet and Opus 4.x (50 rpm,
# 30,000 input and 8,000 output tokens a minute), the smallest paying account's limits, as
# the contract (PRODUCT.md, "Rate limits and prices") gives them; max_concurrency is
# promptq's own. A safe floor: most accounts allow more, and PROMPTQ_LIMITS_FILE (or
# `promptq limits --from-upstream`) gives the account's own. The catch-all "*" has the same
# figures on purpose: a model of any other name still goes through the same account, so it
# is still limited; a file can name it to give it its own limits, or "unlimited" ones.
BUILTIN_LIMITS_NAME = "Anthropic's first usage tier (Claude Sonnet and Opus 4.x)"
# fmt: off
_BUILTIN_LIMITS: dict[str, dict[str, int]] = {
    "claude-*": {"rpm": 50, "input_tpm": 30_000, "output_tpm": 8_000, "max_concurrency": 20},
    "*":        {"rpm": 50, "input_tpm": 30_000, "output_tpm": 8_000, "max_concurrency": 20},
}
# fmt: on


@cache
def _builtin_limits() -> tuple[ModelLimits, ...]:
    # Through the same validation as a file, so a mistyped built-in fails like a user's would.
    return tuple(
        _model_limits(pattern, values, None, f'built-in limits: "{pattern}"')
        for pattern, values in _BUILTIN_LIMITS.items()
    )


def describe_builtin_limits() -> str:
    """The built-in limits in words, for the line a process logs when no file is given."""
    limits = LimitTable(_builtin_limits()).limits_for("claude-sonnet-4-6")
    return (
        f"{BUILTIN_LIMITS_NAME}: {limits.rpm:,} requests, {limits.input_tpm:,} input tokens "
        f"and {limits.output_tpm:,} output tokens a minute, {limits.max_concurrency} calls "
        "in flight, for every model"
    )
