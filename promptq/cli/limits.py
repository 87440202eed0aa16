"""`promptq limits`: the configured limits and each bucket's state in the shared Redis."""

from __future__ import annotations

import json

import click
import redis

from promptq.config import get_settings
from promptq.ratelimit.limiter import Limiter
from promptq.ratelimit.table import LimitsError, LimitTable


def _unlimited(value: object) -> str:
    return "-" if value is None else str(value)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def limits(as_json: bool) -> None:
    """Show configured rate limits and, for each model seen, its bucket's current state."""
    settings = get_settings()
    try:
        table = LimitTable.load(settings.limits_file)
    except LimitsError as exc:
        raise click.ClickException(str(exc)) from exc
    configured = [entry.to_dict() for entry in table.entries()]
    buckets = []
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        try:
            limiter = Limiter(client, table)
            buckets = [limiter.snapshot(model) for model in limiter.known_models()]
        except redis.ConnectionError as exc:
            raise click.ClickException(
                f"cannot reach Redis at PROMPTQ_REDIS_URL to read the buckets: {exc}"
            ) from exc
    if as_json:
        click.echo(json.dumps({"configured": configured, "buckets": buckets}, indent=2))
        return
    source = settings.limits_file or "built-in defaults"
    click.echo(f"configured ({source}); '-' is unlimited:")
    click.echo(
        f"  {'PATTERN':28} {'RPM':>8} {'INPUT TPM':>11} {'OUTPUT TPM':>11} "
        f"{'CONCURRENCY':>11} {'BURST S':>8}"
    )
    for entry in configured:
        click.echo(
            f"  {entry['pattern']:28} {_unlimited(entry['rpm']):>8} "
            f"{_unlimited(entry['input_tpm']):>11} {_unlimited(entry['output_tpm']):>11} "
            f"{_unlimited(entry['max_concurrency']):>11} {entry['burst_seconds']:>8}"
        )
    if not settings.redis_url:
        click.echo("PROMPTQ_REDIS_URL is not set: no bucket state to show")
        return
    if not buckets:
        click.echo("no bucket has been used yet")
        return
    click.echo("buckets:")
    click.echo(
        f"  {'MODEL':28} {'PATTERN':16} {'RATE':>5} {'IN FLIGHT':>9} {'WAITING':>8} "
        f"{'PAUSED S':>8}  REPORTED BY UPSTREAM"
    )
    for bucket in buckets:
        reported = ", ".join(f"{dim} {value}/min" for dim, value in bucket["reported"].items())
        click.echo(
            f"  {bucket['model'][:28]:28} {bucket['limits']['pattern'][:16]:16} "
            f"{bucket['factor']:>5.0%} {bucket['in_flight']:>9} {bucket['waiting']:>8} "
            f"{bucket['paused_for_seconds']:>8.1f}  {reported or '-'}"
        )
