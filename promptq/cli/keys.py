"""`promptq keys create|list|revoke`: operator commands on the database itself."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from promptq.config import get_settings
from promptq.db import session_scope
from promptq.jobs.presenter import isoformat
from promptq.keys.repository import ApiKeyRepository
from promptq.keys.service import ApiKeyError, create_key
from promptq.pricing import format_usd


def _budget(_: click.Context, __: click.Parameter, value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value)
    except InvalidOperation as exc:
        raise click.BadParameter(f"{value!r} is not an amount of US dollars") from exc


@click.group()
def keys() -> None:
    """Create, list and revoke client API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--rpm", type=click.IntRange(min=1), help="This key's own requests per minute.")
@click.option(
    "--monthly-budget",
    callback=_budget,
    help="USD this key may spend per calendar month (UTC); past it, new jobs get 402.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def create(name: str, rpm: int | None, monthly_budget: Decimal | None, as_json: bool) -> None:
    """Create a key; its secret and webhook signing secret are shown now and never again."""
    try:
        with session_scope(get_settings().database_url) as session:
            created = create_key(session, name, rpm=rpm, monthly_budget_usd=monthly_budget)
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(
            json.dumps(
                {
                    "id": created.record.id,
                    "name": created.record.name,
                    "key": created.key,
                    "webhook_secret": created.webhook_secret,
                }
            )
        )
        return
    click.echo(
        f"created key {created.record.id} ({created.record.name}); "
        "store both secrets now, they are not shown again:"
    )
    click.echo(created.key)
    click.echo(created.webhook_secret)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_keys(as_json: bool) -> None:
    """List keys (never their secrets)."""
    with session_scope(get_settings().database_url) as session:
        rows: list[dict[str, Any]] = [
            {
                "id": key.id,
                "name": key.name,
                "prefix": key.key_prefix,
                "rpm": key.rpm,
                # format_usd, not str(): a stored 100 comes back normalized as 1E+2.
                "monthly_budget_usd": format_usd(key.monthly_budget_usd)
                if key.monthly_budget_usd is not None
                else None,
                "created_at": isoformat(key.created_at),
                "revoked_at": isoformat(key.revoked_at),
            }
            for key in ApiKeyRepository(session).all()
        ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no keys yet; create one with `promptq keys create NAME`")
        return
    click.echo(f"{'ID':32}  {'NAME':20}  {'PREFIX':12}  {'RPM':>6}  {'BUDGET':>10}  STATE")
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        click.echo(
            f"{row['id']:32}  {row['name'][:20]:20}  {row['prefix']:12}  "
            f"{row['rpm'] or '-':>6}  {row['monthly_budget_usd'] or '-':>10}  {state}"
        )


@keys.command("revoke")
@click.argument("key_id_or_name")
def revoke(key_id_or_name: str) -> None:
    """Revoke a key by id or name: requests with it are refused from now on, its jobs not
    yet started and its batches are canceled, its webhooks stop."""
    import redis

    from promptq.keys.revocation import announce_revocation
    from promptq.keys.revocation import revoke as revoke_key

    settings = get_settings()
    try:
        with session_scope(settings.database_url) as session:
            done = revoke_key(session, settings, key_id_or_name)
            key_id, name = done.key.id, done.key.name
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"revoked {key_id} ({name}): {done.jobs_canceled} jobs not yet started canceled, "
        f"{done.batches_canceled} batches canceled, {done.subscriptions_disabled} webhook "
        f"subscriptions disabled, {done.deliveries_stopped} webhook deliveries stopped"
    )
    told = False
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        try:
            told = announce_revocation(client, key_id)
        finally:
            client.close()
    if not told:
        click.echo(
            "could not reach Redis (PROMPTQ_REDIS_URL): API processes refuse the key once "
            "their cache of checked keys forgets it, within 5 seconds",
            err=True,
        )
