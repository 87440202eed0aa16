"""`promptq keys create|list|revoke`: operator commands on the database itself."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from promptq.config import Settings, get_settings
from promptq.db import session_scope
from promptq.jobspec.presenter import isoformat
from promptq.keys.policy import QUOTAS, PolicyError, parse_models, parse_quota
from promptq.keys.repository import ApiKeyRepository
from promptq.keys.service import ApiKeyError, create_key, update_key
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


def _models(_: click.Context, __: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    try:
        return parse_models(value)
    except PolicyError as exc:
        raise click.BadParameter(str(exc)) from exc


def _quotas(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    try:
        return dict(parse_quota(value) for value in values)
    except PolicyError as exc:
        raise click.BadParameter(str(exc)) from exc


MODELS_HELP = (
    "Model patterns this key may use, comma-separated (e.g. 'claude-haiku-*,claude-sonnet-*'); "
    "others are refused with 403. Default: every model."
)
QUOTA_HELP = f"NAME=VALUE: this key's own quota, NAME one of {', '.join(QUOTAS)} (repeatable)."


@keys.command("create")
@click.argument("name")
@click.option("--rpm", type=click.IntRange(min=1), help="This key's own requests per minute.")
@click.option(
    "--monthly-budget",
    callback=_budget,
    help="USD this key may spend per calendar month (UTC); past it, new jobs get 402.",
)
@click.option("--models", callback=_models, help=MODELS_HELP)
@click.option("--quota", "quotas", multiple=True, callback=_quotas, help=QUOTA_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def create(
    name: str,
    rpm: int | None,
    monthly_budget: Decimal | None,
    models: list[str] | None,
    quotas: dict[str, Any],
    as_json: bool,
) -> None:
    """Create a key; its secret and webhook signing secret are shown now and never again."""
    try:
        with session_scope(get_settings().database_url) as session:
            created = create_key(
                session,
                name,
                rpm=rpm,
                monthly_budget_usd=monthly_budget,
                models=models,
                quotas=quotas,
            )
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


@keys.command("update")
@click.argument("key_id_or_name")
@click.option("--rpm", type=click.IntRange(min=1), help="This key's own requests per minute.")
@click.option("--no-rpm", is_flag=True, help="Remove the key's own requests per minute.")
@click.option("--monthly-budget", callback=_budget, help="USD this key may spend a month.")
@click.option("--no-budget", is_flag=True, help="Remove the key's monthly budget.")
@click.option("--models", callback=_models, help=MODELS_HELP)
@click.option("--all-models", is_flag=True, help="Let the key use every model again.")
@click.option("--quota", "quotas", multiple=True, callback=_quotas, help=QUOTA_HELP)
@click.option(
    "--default-quota",
    "defaults",
    multiple=True,
    type=click.Choice(list(QUOTAS)),
    help="Give the key the server's default for this quota again (repeatable).",
)
def update(
    key_id_or_name: str,
    rpm: int | None,
    no_rpm: bool,
    monthly_budget: Decimal | None,
    no_budget: bool,
    models: list[str] | None,
    all_models: bool,
    quotas: dict[str, Any],
    defaults: tuple[str, ...],
) -> None:
    """Change what a key may do: its rpm, budget, models and quotas. Every API process
    applies the change within a second."""
    for given, removed, what in (
        (rpm, no_rpm, "--rpm and --no-rpm"),
        (monthly_budget, no_budget, "--monthly-budget and --no-budget"),
        (models, all_models, "--models and --all-models"),
    ):
        if given is not None and removed:
            raise click.UsageError(f"{what} contradict each other; give one")
    changes: dict[str, Any] = {}
    if rpm is not None or no_rpm:
        changes["rpm"] = rpm
    if monthly_budget is not None or no_budget:
        changes["monthly_budget_usd"] = monthly_budget
    if models is not None or all_models:
        changes["models"] = models
    quota_changes: dict[str, Any] = {**quotas, **{name: None for name in defaults}}
    if not changes and not quota_changes:
        raise click.UsageError("nothing to change; see `promptq keys update --help`")
    settings = get_settings()
    try:
        with session_scope(settings.database_url) as session:
            key = update_key(session, key_id_or_name, **changes, quotas=quota_changes)
            key_id, name = key.id, key.name
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"updated {key_id} ({name})")
    _announce(settings, key_id)


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
                "models": key.models,
                "quotas": key.quotas,
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
    click.echo(
        f"{'ID':32}  {'NAME':20}  {'PREFIX':12}  {'RPM':>6}  {'BUDGET':>10}  {'STATE':7}  "
        "MODELS; QUOTAS"
    )
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        models = ",".join(row["models"]) if row["models"] else "all"
        quotas = ",".join(f"{k}={v}" for k, v in (row["quotas"] or {}).items()) or "defaults"
        click.echo(
            f"{row['id']:32}  {row['name'][:20]:20}  {row['prefix']:12}  "
            f"{row['rpm'] or '-':>6}  {row['monthly_budget_usd'] or '-':>10}  {state:7}  "
            f"{models}; {quotas}"
        )


@keys.command("revoke")
@click.argument("key_id_or_name")
def revoke(key_id_or_name: str) -> None:
    """Revoke a key by id or name: requests with it are refused from now on, its jobs not
    yet started and its batches are canceled, its webhooks stop."""
    from promptq.jobs.revocation import revoke as revoke_key

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
    _announce(settings, key_id)


def _announce(settings: Settings, key_id: str) -> None:
    """Tell every API process to forget the key's cached copy now."""
    from promptq.keys.channels import announce_key_change
    from promptq.redis_roles import redis_client

    told = False
    events_url = settings.redis_url_for("events")
    if events_url:
        client = redis_client(events_url, socket_connect_timeout=3)
        try:
            told = announce_key_change(client, key_id)
        finally:
            client.close()
    if not told:
        click.echo(
            "could not reach the events' Redis (PROMPTQ_EVENTS_REDIS_URL, else "
            "PROMPTQ_REDIS_URL): API processes apply this once their "
            "cache of checked keys forgets the key, within 5 seconds",
            err=True,
        )
