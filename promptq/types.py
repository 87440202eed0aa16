"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import BigInteger, DateTime, Dialect, String
from sqlalchemy.types import TypeDecorator

# Money is stored as an integer count of picodollars (1e-12 USD). SQLite has no exact
# decimal type (NUMERIC columns come back as floats), and sums must add up to the cent on
# both databases; integers are exact everywhere. Per-token prices are validated to fit.
PICODOLLARS_PER_USD = Decimal(10) ** 12


class Money(TypeDecorator[Decimal]):
    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        scaled = Decimal(value) * PICODOLLARS_PER_USD
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{value} USD is finer than a picodollar and cannot be stored")
        return int(scaled)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return picodollars_to_usd(int(value))


def picodollars_to_usd(value: int) -> Decimal:
    return (Decimal(value) / PICODOLLARS_PER_USD).normalize()


E = TypeVar("E", bound=StrEnum)


class EnumString(TypeDecorator[E]):
    """A StrEnum kept as its value in a VARCHAR: what is stored is the same string as when
    these columns were typed `str` (no migration, no CHECK constraint, and the partial
    indexes' WHERE terms still compare with literal strings), and what is read is the enum.
    Not SQLAlchemy's Enum: on PostgreSQL that would be a type of its own unless told
    otherwise, and what it stores is the member's name unless told otherwise."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum
        self.length = length

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        # A plain string is checked against the enum too: an unknown one fails here, not
        # as a row no reader can take.
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)

    @property
    def python_type(self) -> type[E]:
        return self.enum


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; promptq stores UTC-aware datetimes only")
        value = value.astimezone(UTC)
        # SQLite compares datetimes as text, so every value must be written the same way.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
