"""All queries on API keys."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from promptq.models import ApiKey


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def by_hash(self, key_hash: str) -> ApiKey | None:
        return self.session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()

    def by_id_or_name(self, ident: str) -> list[ApiKey]:
        query = select(ApiKey).where((ApiKey.id == ident) | (ApiKey.name == ident))
        return list(self.session.scalars(query))

    def all(self) -> Sequence[ApiKey]:
        return self.session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()

    def count_active(self) -> int:
        query = select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))
        return int(self.session.scalar(query) or 0)
