"""`promptq limits`: the configured limits and each bucket's state in the shared Redis;
`--from-upstream` prints a limits file from what the upstream reports."""

from __future__ import annotations

import json

import click
import redis

from promptq.config import Settings, get_settings
from promptq.ratelimit.limiter import RedisLimiter
from promptq.ratelimit.table import LimitsError, LimitTable, describe_builtin_limits
from promptq.redis_roles import redis_client

HOW_TO_CONFIGURE = (
    "give your account's own limits in a file named by PROMPTQ_LIMITS_FILE "
    "(`promptq limits --from-upstream` prints one from what the upstream reports)"
)


def _unlimited(value: object) -> str:
    return "-" if value is None else str(value)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--from-upstream",
    is_flag=True,
    help="Make one minimal call to the upstream and print a limits file from the limits it "
    "reports (its anthropic-ratelimit-* headers).",
)
@click.option(
    "--model", help="The model to ask about with --from-upstream (default PROMPTQ_DEFAULT_MODEL)."
)
def limits(as_json: bool, from_upstream: bool, model: str | None) -> None:
    """Show configured rate limits and, for each model seen, its bucket's current state."""
    settings = get_settings()
    if from_upstream:
        _print_reported_limits(settings, model or settings.default_model)
        return
    if model:
        raise click.UsageError("--model goes with --from-upstream")
    try:
        table = LimitTable.load(settings.limits_file)
    except LimitsError as exc:
        raise click.ClickException(str(exc)) from exc
    configured = [entry.to_dict() for entry in table.entries()]
    buckets = []
    limiter_url = settings.redis_url_for("limiter")
    if limiter_url:
        client = redis_client(limiter_url, socket_connect_timeout=3)
        try:
            limiter = RedisLimiter(client, table)
            buckets = [limiter.snapshot(model) for model in limiter.known_models()]
        except redis.ConnectionError as exc:
            raise click.ClickException(
                "cannot reach the limiter's Redis (PROMPTQ_LIMITER_REDIS_URL, else "
                f"PROMPTQ_REDIS_URL) to read the buckets: {exc}"
            ) from exc
    if as_json:
        click.echo(json.dumps({"configured": configured, "buckets": buckets}, indent=2))
        return
    if settings.limits_file:
        click.echo(f"configured ({settings.limits_file}); '-' is unlimited:")
    else:
        click.echo(f"built-in limits, {describe_builtin_limits()};")
        click.echo(f"{HOW_TO_CONFIGURE}. '-' is unlimited:")
    click.echo(
        f"  {'PATTERN':28} {'RPM':>8} {'INPUT TPM':>11} {'OUTPUT TPM':>11} "
        f"{'CONCURRENCY':>11} {'BURST S':>8} {'TOKEN BURST S':>13}"
    )
    for entry in configured:
        click.echo(
            f"  {entry['pattern']:28} {_unlimited(entry['rpm']):>8} "
            f"{_unlimited(entry['input_tpm']):>11} {_unlimited(entry['output_tpm']):>11} "
            f"{_unlimited(entry['max_concurrency']):>11} {entry['burst_seconds']:>8} "
            f"{entry['token_burst_seconds']:>13}"
            + ("  (cache reads count as input)" if entry["count_cache_reads"] else "")
        )
    if not limiter_url:
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


def _print_reported_limits(settings: Settings, model: str) -> None:
    from promptq.ratelimit.discover import limits_file_text, minimal_request
    from promptq.ratelimit.headers import read_rate_limit_headers
    from promptq.upstream import UpstreamClient

    upstream = UpstreamClient(
        settings.upstream_url,
        settings.upstream_key,
        timeout=60,
        connect_timeout=settings.upstream_connect_timeout_seconds,
    )
    try:
        result = upstream.create_message(minimal_request(model))
    finally:
        upstream.close()
    text = limits_file_text(
        model, read_rate_limit_headers(result.rate_limit_headers), settings.upstream_url
    )
    if text is not None:
        # A 429 still reports the limits: the file is as good.
        click.echo(text, nl=False)
        return
    if result.status_code is None or not (
        200 <= result.status_code < 300 or result.status_code == 429
    ):
        status = result.status_code or result.error_type
        raise click.ClickException(
            f"the call to {upstream.url} for {model} failed ({status}: {result.error_message}); "
            "check PROMPTQ_UPSTREAM_URL, the upstream key (PROMPTQ_UPSTREAM_API_KEY) and --model"
        )
    raise click.ClickException(
        f"the upstream at {settings.upstream_url} reports no limits for {model} (no "
        "anthropic-ratelimit-*-limit headers; CometAPI may send none): write the account's "
        "limits in a file by hand and name it in PROMPTQ_LIMITS_FILE"
    )
