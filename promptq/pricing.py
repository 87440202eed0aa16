"""Prices per model (USD per million tokens) and the exact cost of a usage in dollars.

A price table maps shell-style model patterns to prices; the longest matching pattern wins
(`promptq.patterns`). The built-in table below holds Anthropic's list prices; a TOML file
(PROMPTQ_PRICING_FILE) overrides and extends it:

    [models."claude-sonnet-4-5*"]
    input = 3.00           # required
    output = 15.00         # required
    cache_write = 3.75     # 5-minute cache writes; default 1.25 x input
    cache_read = 0.30      # cache hits; default 0.1 x input
    cache_write_1h = 6.00  # 1-hour cache writes; default 2 x input

Money is Decimal from end to end, never float: TOML numbers are parsed from their text,
and costs are computed without rounding. The database keeps money as integer picodollars
(1e-12 USD), so a price may have at most 6 decimals: a per-token price (price / 1e6) then
has at most 12, and every cost is a whole number of picodollars.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from decimal import (
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)
from functools import cache, lru_cache
from typing import Any

from promptq.config import Settings
from promptq.patterns import longest_match
from promptq.tablefile import check_entry_shape, read_table_file
from promptq.usage import Usage


class PricingError(ValueError):
    """A price table that cannot be used; the message says where, what, and what to do."""


PRICE_FIELDS = ("input", "output", "cache_write", "cache_read", "cache_write_1h")
REQUIRED_FIELDS = ("input", "output")
# Anthropic's prompt-caching multipliers of the base input price, used for a price a table
# leaves out: 5-minute writes cost 1.25x input, 1-hour writes 2x, cache hits 0.1x.
DEFAULT_MULTIPLIERS = {
    "cache_write": Decimal("1.25"),
    "cache_read": Decimal("0.1"),
    "cache_write_1h": Decimal("2"),
}
MAX_PRICE_DECIMALS = 6
# No Claude price has come near this (the dearest is $75): a larger figure is almost surely a
# unit mistake, and a far larger one could overflow the 64-bit picodollar columns.
MAX_PRICE = Decimal(10_000)
TOKENS_PER_PRICE_UNIT_EXPONENT = 6  # prices are per million (10**6) tokens

# Cost arithmetic is exact or an error: inputs are integers and prices with at most 6
# decimals, so no result needs rounding, and one that would is a bug to surface, not hide.
_EXACT = Context(prec=100, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])

_FILE_HELP = 'the file holds [models."PATTERN"] tables of prices in USD per million tokens'


@dataclass(frozen=True)
class ModelPrices:
    """The prices of the models a pattern matches, in USD per million tokens."""

    pattern: str
    input: Decimal
    output: Decimal
    cache_write: Decimal  # 5-minute cache writes
    cache_read: Decimal
    cache_write_1h: Decimal

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise PricingError(f"a model pattern must be a non-empty string, got {self.pattern!r}")
        for name in PRICE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = Decimal(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, Decimal):
                raise PricingError(
                    f'prices for "{self.pattern}": {name} must be a Decimal, got {value!r}'
                )
            problem = _price_problem(value)
            if problem:
                raise PricingError(f'prices for "{self.pattern}": {name} = {value} {problem}')

    def to_dict(self) -> dict[str, str]:
        """The prices as decimal strings, to store with a job: the prices it was charged at."""
        return {
            "pattern": self.pattern,
            **{name: format_usd(getattr(self, name)) for name in PRICE_FIELDS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> ModelPrices:
        """The inverse of to_dict. Omitted cache prices take their defaults, as in a file."""
        pattern = data.get("pattern")
        if not isinstance(pattern, str):
            raise PricingError(f"stored prices have no pattern: {dict(data)!r}")
        where = f'stored prices for "{pattern}"'
        prices: dict[str, Any] = {}
        for name, value in data.items():
            if name == "pattern":
                continue
            if isinstance(value, str):
                try:
                    prices[name] = Decimal(value)
                except InvalidOperation:
                    raise PricingError(
                        f"{where}: {name} = {value!r} is not a decimal number"
                    ) from None
            else:
                prices[name] = value
        return _model_prices(pattern, prices, where)


@dataclass(frozen=True)
class Cost:
    """What a usage cost, in USD, by kind of token. cache_write covers both lifetimes."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # Database rows give None-or-Decimal and callers write `or 0`: take ints, but
            # never a float, which cannot hold most decimal amounts exactly.
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, Decimal(value))
            elif not isinstance(value, Decimal) or not value.is_finite():
                raise TypeError(f"Cost.{field.name} must be a finite Decimal, got {value!r}")

    @property
    def total(self) -> Decimal:
        total = Decimal(0)
        for amount in (self.input, self.output, self.cache_write, self.cache_read):
            total = _EXACT.add(total, amount)
        return total

    def to_api(self) -> dict[str, str]:
        return {
            "currency": "USD",
            "total": format_usd(self.total),
            "input": format_usd(self.input),
            "output": format_usd(self.output),
            "cache_write": format_usd(self.cache_write),
            "cache_read": format_usd(self.cache_read),
        }


def cost_of(usage: Usage, prices: ModelPrices) -> Cost:
    """The exact cost of a usage: tokens x price / 1,000,000 for each kind, no rounding.

    Cache writes are split by lifetime: the 1-hour part at cache_write_1h, the rest at the
    5-minute cache_write price.
    """
    cache_write = _EXACT.add(
        _tokens_cost(usage.cache_creation_5m_input_tokens, prices.cache_write),
        _tokens_cost(usage.cache_creation_1h_input_tokens, prices.cache_write_1h),
    )
    return Cost(
        input=_tokens_cost(usage.input_tokens, prices.input),
        output=_tokens_cost(usage.output_tokens, prices.output),
        cache_write=cache_write,
        cache_read=_tokens_cost(usage.cache_read_input_tokens, prices.cache_read),
    )


def format_usd(amount: Decimal) -> str:
    """A plain decimal string: no exponent, no trailing zeros, "0" for zero.

    Clients parse these with a decimal type; "3E-8" or "0.0030000" would be correct but
    surprising, and some parsers reject the exponent form.
    """
    if isinstance(amount, int) and not isinstance(amount, bool):
        amount = Decimal(amount)
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise ValueError(f"not a finite Decimal amount: {amount!r}")
    if amount.is_zero():
        return "0"
    text = format(amount, "f")  # "f" with no precision is exact: it never rounds
    return text.rstrip("0").rstrip(".") if "." in text else text


class PriceTable:
    """Prices by model pattern; a model is priced by its longest matching pattern."""

    def __init__(self, entries: Iterable[ModelPrices] = ()) -> None:
        # Insertion order is the tie-break of longest_match. An entry for a pattern already
        # present replaces it in place: a file overriding a built-in keeps the built-in's rank.
        self._entries: dict[str, ModelPrices] = {}
        for entry in entries:
            self._entries[entry.pattern] = entry

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> PriceTable:
        """The built-in prices, overridden and extended by the file at `path` if one is given."""
        if path is None:
            return cls(_builtin_prices())
        text = read_table_file(path, "pricing", "PROMPTQ_PRICING_FILE", PricingError)
        return cls.from_toml(text, source=os.fspath(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>", *, builtins: bool = True) -> PriceTable:
        """The built-in prices overridden and extended by a TOML text (without them if
        `builtins` is False). `source` names the text in error messages."""
        base = _builtin_prices() if builtins else ()
        return cls([*base, *_parse_toml(text, source)])

    def prices_for(self, model: str) -> ModelPrices | None:
        """The prices of `model`, or None when no pattern matches: no price beats a wrong one."""
        pattern = longest_match(self._entries, model)
        return None if pattern is None else self._entries[pattern]

    def patterns(self) -> list[str]:
        return list(self._entries)


def _tokens_cost(tokens: int, price_per_million: Decimal) -> Decimal:
    product = _EXACT.multiply(Decimal(tokens), price_per_million)
    return _EXACT.scaleb(product, -TOKENS_PER_PRICE_UNIT_EXPONENT)


def _price_problem(value: Decimal) -> str | None:
    """What makes `value` unusable as a price per million tokens, or None."""
    if not value.is_finite():
        return "is not a finite number; give a price such as 3.00"
    if value < 0:
        return "is negative; a price must be 0 or more"
    if value > MAX_PRICE:
        return (
            f"is more than {MAX_PRICE} USD per million tokens; prices are per million "
            "tokens, check the unit"
        )
    if _decimal_places(value) > MAX_PRICE_DECIMALS:
        return (
            f"has more than {MAX_PRICE_DECIMALS} decimal places; promptq keeps money exact "
            "to the picodollar (1e-12 USD), so a price per million tokens may have at most "
            f"{MAX_PRICE_DECIMALS}: round it"
        )
    return None


def _decimal_places(value: Decimal) -> int:
    """Significant decimal places: 3.750 has 2. Exact, unlike normalize(), which rounds."""
    if value.is_zero():
        return 0
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite values only
    places = -exponent
    for digit in reversed(digits):
        if places <= 0 or digit != 0:
            break
        places -= 1
    return max(places, 0)


def _model_prices(pattern: str, given: Mapping[str, Any], where: str) -> ModelPrices:
    """Validate one entry's prices (from a file, the built-ins or storage) and fill defaults."""
    check_entry_shape(
        pattern,
        given,
        PRICE_FIELDS,
        where,
        PricingError,
        keys_note=" (USD per million tokens)",
    )
    prices: dict[str, Decimal] = {}
    for name in REQUIRED_FIELDS:
        if name not in given:
            raise PricingError(
                f"{where}: {name!r} is missing; give the price in USD per million "
                f"{name} tokens, e.g. {name} = 3.00"
            )
    for name, value in given.items():
        prices[name] = _checked_price(value, name, where)
    for name, multiplier in DEFAULT_MULTIPLIERS.items():
        if name in prices:
            continue
        value = _EXACT.multiply(prices["input"], multiplier)
        problem = _price_problem(value)
        if problem:
            raise PricingError(
                f"{where}: {name} defaults to {multiplier} x input = {format_usd(value)}, "
                f"which {problem.split(';')[0]}; set {name} explicitly"
            )
        prices[name] = value
    return ModelPrices(pattern=pattern, **prices)


def _checked_price(value: Any, name: str, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        hint = " (a string); write it without quotes" if isinstance(value, str) else ""
        raise PricingError(
            f"{where}: {name} must be a number in USD per million tokens, got {value!r}"
            f"{hint}, e.g. {name} = 3.00"
        )
    price = Decimal(value)
    problem = _price_problem(price)
    if problem:
        raise PricingError(f"{where}: {name} = {value} {problem}")
    return price


def _parse_toml(text: str, source: str) -> list[ModelPrices]:
    try:
        # parse_float=Decimal: a price is read from its text, never through a binary float.
        document = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise PricingError(f"{source}: not valid TOML ({exc}); fix the syntax") from None
    unknown = [key for key in document if key != "models"]
    if unknown:
        raise PricingError(f"{source}: unknown top-level key {unknown[0]!r}; {_FILE_HELP}")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise PricingError(f"{source}: 'models' must be a table; {_FILE_HELP}")
    entries = []
    for pattern, table in models.items():
        where = f'{source}: [models."{pattern}"]'
        if not isinstance(table, dict):
            raise PricingError(f"{where} must be a table of prices, got {table!r}; {_FILE_HELP}")
        entries.append(_model_prices(pattern, table, where))
    return entries


# Built-in prices: Anthropic's list prices in USD per million tokens, read on 2026-11-26 from
# the "Model pricing" table of https://platform.claude.com/docs/en/about-claude/pricing and
# the "Pricing" section of each model's page (platform.claude.com/docs/en/models/<model>/).
# Prices that moved after launch: Sonnet 5 kept its $2/$10 launch price (the rise to $3/$15
# planned for 2026-09-01 was cancelled); Sonnet 5.5's cache hits fell from $0.20 to $0.10 on
# 2026-10-07. Fable 5.2 (released 2026-11-09) and that Sonnet 5.5 cut are taken from release
# notes quoting the page, not from the page itself: check them first when refreshing.
# Haiku 3 and Sonnet 3.7 have left the page; theirs are the last published prices.
#
# Every price is written out, none derived: the cache multipliers are not universal (Haiku 3
# writes at 1.2x; Fable 5.1/5.2 read at 0.025x, Opus 5.5 and Sonnet 5.5 at 0.05x).
#
# Patterns: a trailing * also covers dated snapshots and proxy variants such as CometAPI's
# "-thinking" models. The 5-generation models named without a point release get an exact
# pattern plus "-[!0-9]*", so that an unknown point release (claude-opus-5-7, say) finds no
# price instead of its predecessor's: point releases have changed prices (Opus 5.5, Fable 5.1,
# Fable 5.2). The 4-generation family patterns are safe: it has no releases left to come.
#
# Left out on purpose:
#   claude-haiku-5-5: priced by prompt length, $0.10/$0.50 (cache: 0.125 5m, 0.20 1h, 0.01
#     hits) up to 100K prompt tokens and five times that above, per request; any flat price
#     is wrong for one band. To price short-prompt traffic, add that band in your file.
#   claude-mythos-5-2: limited availability; its price could not be confirmed.
# Not modelled: the >200K-input premium of Sonnet 4/4.5 with the 1M-context beta ($6/$22.50),
# fast mode, data-residency surcharges, and CometAPI's own rates, which may differ from
# Anthropic's list: a pricing file records what you actually pay.
#
# pattern: (input, 5m cache write, 1h cache write, cache read, output), in the column order
# of Anthropic's table so that a row can be checked against the page at a glance.
# fmt: off
_BUILTIN_PRICES: dict[str, tuple[str, str, str, str, str]] = {
    "claude-fable-5-2*":        ("8",    "10",    "16",   "0.20", "40"),
    "claude-fable-5-1*":        ("10",   "12.50", "20",   "0.25", "50"),
    "claude-fable-5":           ("10",   "12.50", "20",   "1",    "50"),
    "claude-fable-5-[!0-9]*":   ("10",   "12.50", "20",   "1",    "50"),
    "claude-mythos-5-1*":       ("10",   "12.50", "20",   "0.25", "50"),
    "claude-mythos-5":          ("10",   "12.50", "20",   "1",    "50"),
    "claude-mythos-5-[!0-9]*":  ("10",   "12.50", "20",   "1",    "50"),
    "claude-opus-5-5*":         ("4",    "5",     "8",    "0.20", "20"),
    "claude-opus-5":            ("5",    "6.25",  "10",   "0.50", "25"),
    "claude-opus-5-[!0-9]*":    ("5",    "6.25",  "10",   "0.50", "25"),
    "claude-opus-4-8*":         ("5",    "6.25",  "10",   "0.50", "25"),
    "claude-opus-4-7*":         ("5",    "6.25",  "10",   "0.50", "25"),
    "claude-opus-4-6*":         ("5",    "6.25",  "10",   "0.50", "25"),
    "claude-opus-4-5*":         ("5",    "6.25",  "10",   "0.50", "25"),
    "claude-opus-4-1*":         ("15",   "18.75", "30",   "1.50", "75"),
    "claude-opus-4*":           ("15",   "18.75", "30",   "1.50", "75"),
    "claude-sonnet-5-5*":       ("2",    "2.50",  "4",    "0.10", "10"),
    "claude-sonnet-5":          ("2",    "2.50",  "4",    "0.20", "10"),
    "claude-sonnet-5-[!0-9]*":  ("2",    "2.50",  "4",    "0.20", "10"),
    "claude-sonnet-4-6*":       ("3",    "3.75",  "6",    "0.30", "15"),
    "claude-sonnet-4-5*":       ("3",    "3.75",  "6",    "0.30", "15"),
    "claude-sonnet-4*":         ("3",    "3.75",  "6",    "0.30", "15"),
    "claude-3-7-sonnet*":       ("3",    "3.75",  "6",    "0.30", "15"),
    "claude-haiku-4-5*":        ("1",    "1.25",  "2",    "0.10", "5"),
    "claude-3-5-haiku*":        ("0.80", "1",     "1.6",  "0.08", "4"),
    "claude-3-haiku*":          ("0.25", "0.30",  "0.50", "0.03", "1.25"),
}
# fmt: on
_BUILTIN_COLUMNS = ("input", "cache_write", "cache_write_1h", "cache_read", "output")


def settings_prices(settings: Settings) -> PriceTable:
    """The price table of PROMPTQ_PRICING_FILE (or the built-ins), read once per process:
    what intake checks a request against. Workers load theirs once at start, the same way."""
    return _cached_prices(str(settings.pricing_file) if settings.pricing_file else None)


@lru_cache(maxsize=8)
def _cached_prices(path: str | None) -> PriceTable:
    return PriceTable.load(path)


@cache
def _builtin_prices() -> tuple[ModelPrices, ...]:
    # Through the same validation as a file, so a mistyped built-in fails like a user's would.
    return tuple(
        _model_prices(
            pattern,
            {name: Decimal(text) for name, text in zip(_BUILTIN_COLUMNS, row, strict=True)},
            f'built-in prices: "{pattern}"',
        )
        for pattern, row in _BUILTIN_PRICES.items()
    )
