"""Each part of promptq alone, in the foreground, for real deployments."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from promptq.config import (
    Settings,
    admin_token_problem,
    flower_password_problem,
    get_settings,
    upstream_warning,
)
from promptq.logging import configure_logging, logging_config


def preflight(
    settings: Settings, *, needs_upstream_key: bool = True, announce_limits: bool = True
) -> None:
    """Refuse to start on a broken limits or price file, saying what is wrong in it, or
    without an upstream key that every job would need (`promptq up` runs its simulator
    then, so it does not ask); say which limits are in force when no file gives the
    account's own (`announce_limits`)."""
    from promptq.cli.limits import HOW_TO_CONFIGURE
    from promptq.pricing import PriceTable, PricingError
    from promptq.ratelimit.table import LimitsError, LimitTable, describe_builtin_limits

    try:
        LimitTable.load(settings.limits_file)
        PriceTable.load(settings.pricing_file)
    except (LimitsError, PricingError) as exc:
        raise click.ClickException(str(exc)) from exc
    missing_key = settings.missing_upstream_key() if needs_upstream_key else None
    if missing_key is not None:
        raise click.ClickException(missing_key)
    warning = upstream_warning(settings)
    if warning is not None:
        configure_logging(settings)
        logging.getLogger("promptq.upstream").warning(warning)
    if settings.limits_file is None and announce_limits:
        # Most accounts allow more than the built-ins: running on them unawares leaves most
        # of the account unused, so say it once, where the operator looks.
        configure_logging(settings)
        logging.getLogger("promptq.limits").warning(
            "no limits file: the built-in limits are in force, %s; %s",
            describe_builtin_limits(),
            HOW_TO_CONFIGURE,
        )


def refuse_weak_admin_token(settings: Settings) -> None:
    problem = admin_token_problem(settings)
    if problem is not None:
        raise click.ClickException(problem)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API."""
    import uvicorn

    settings = get_settings()
    refuse_weak_admin_token(settings)
    preflight(settings)
    # uvicorn applies this in each of its processes, in place of its own coloured format.
    uvicorn.run(
        "api.main:app",
        host=host,
        port=port,
        workers=workers,
        log_config=logging_config(settings),
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@click.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    help="Upstream calls in flight at once, each in a greenlet (default: "
    "PROMPTQ_WORKER_CONCURRENCY); PROMPTQ_WORKER_STANDBY_JOBS more wait for one to end.",
)
@click.option(
    "--queues",
    default="promptq,promptq-webhooks",
    show_default=True,
    help="Comma-separated queues: promptq (jobs) and promptq-webhooks (deliveries).",
)
@click.option("--hostname", help="Celery node name (default: promptq@HOST).")
@click.option(
    "--task-events",
    is_flag=True,
    help="Send Celery's task events from the start (Flower turns them on itself once it "
    "runs; each is a publish on the broker, three per job).",
)
def worker(concurrency: int | None, queues: str, hostname: str | None, task_events: bool) -> None:
    """Run a Celery worker that executes jobs."""
    from worker.app import get_app

    if concurrency is not None:
        # The setting for the whole process: the call slots, the upstream's and the broker's
        # connection pools (worker.context, promptq.broker.celery_app) are sized from it.
        os.environ["PROMPTQ_WORKER_CONCURRENCY"] = str(concurrency)
        get_settings.cache_clear()
    settings = get_settings()
    preflight(settings)
    # Before Celery starts: what it warns about on start-up (running as root, say) is logged
    # as JSON too; its setup_logging receiver (worker.app) applies the same again.
    configure_logging(settings)
    argv = [
        *_celery_global_options(settings),
        "worker",
        # Patched for it since the process started (promptq.cli.green).
        "--pool=gevent",
        # The calls in flight and the standby jobs (promptq.jobs.call_slots).
        f"--concurrency={settings.worker_greenlets}",
        f"--queues={queues}",
        *(["--task-events"] if task_events else []),
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    argv.append(f"--hostname={hostname or 'promptq@%h'}")
    get_app().worker_main(argv)


@click.command()
@click.option(
    "--schedule",
    default=".promptq/celerybeat-schedule",
    show_default=True,
    help="Where beat keeps its last-run times.",
)
def beat(schedule: str) -> None:
    """Run the periodic scheduler (exactly one per deployment)."""
    from worker.app import get_app

    settings = get_settings()
    configure_logging(settings)
    Path(schedule).parent.mkdir(parents=True, exist_ok=True)
    get_app().start(
        [
            *_celery_global_options(settings),
            "beat",
            f"--loglevel={settings.log_level}",
            f"--schedule={schedule}",
        ]
    )


def _celery_global_options(settings: Settings) -> list[str]:
    """Celery's logging is promptq's (worker.app's setup_logging receiver). With JSON logs,
    Celery's start-up banner, printed straight to stdout, is left out too, so that every
    line a worker or beat writes is one JSON object."""
    return ["--quiet"] if settings.log_format == "json" else []


@click.command()
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int, address: str) -> None:
    """Run Flower, the Celery monitor, behind basic auth."""
    from worker.app import get_app

    settings = get_settings()
    credentials = (
        settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
    )
    # Flower shows every task and can revoke them and stop workers: never open to all.
    user, _, password = credentials.partition(":")
    if not user or not password:
        raise click.ClickException(
            "PROMPTQ_FLOWER_BASIC_AUTH is not set (or not user:password); set it, e.g. "
            "PROMPTQ_FLOWER_BASIC_AUTH=admin:$(openssl rand -hex 12), so Flower is not open "
            "to everyone who can reach its port"
        )
    problem = flower_password_problem(credentials)
    if problem is not None:
        raise click.ClickException(problem)
    get_app().start(
        ["flower", f"--port={port}", f"--address={address}", f"--basic-auth={credentials}"]
    )


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command("check")
@click.option(
    "--wait",
    "wait_seconds",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Keep checking this many seconds (a container waiting for the migration job).",
)
def db_check(wait_seconds: float) -> None:
    """Exit 0 when the database's schema is the one this release expects, 1 otherwise."""
    import time

    from sqlalchemy.exc import OperationalError

    from promptq.migrate import schema_revisions

    # Reading the revision makes Alembic describe its dialect at INFO, every 2 s.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    settings = get_settings()
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            current, head = schema_revisions(settings.database_url)
        except OperationalError as error:
            problem = f"the database does not answer ({error.orig}); check PROMPTQ_DATABASE_URL"
        else:
            if current == head:
                click.echo(f"database at {head}")
                return
            problem = (
                f"the database is at {current or 'no revision'}, this release expects {head}: "
                "run `promptq db upgrade`"
            )
        if time.monotonic() >= deadline:
            raise click.ClickException(problem)
        time.sleep(2)


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply Alembic migrations up to REVISION."""
    from promptq.migrate import upgrade

    settings = get_settings()
    backfilled = upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}")
    if backfilled is not None:
        click.echo(backfilled.describe())
        _say_what_retention_deletes(settings)


def _say_what_retention_deletes(settings: Settings) -> None:
    """Before the first prune runs, say what it will delete and how to keep it: an existing
    deployment learns of the policy from its upgrade, not from missing jobs."""
    from promptq.retention import eligible_jobs

    if settings.retention_days == 0:
        click.echo("retention: off (PROMPTQ_RETENTION_DAYS=0); every job is kept")
        return
    count = eligible_jobs(settings)
    click.echo(
        f"retention: finished jobs are kept {settings.retention_days} days "
        f"(PROMPTQ_RETENTION_DAYS); {count} stored jobs ended before that and will be deleted "
        "by the next prune (`promptq beat` runs one every hour; `promptq db prune --dry-run` "
        "shows what it would delete). Spend and usage figures are kept forever. To keep "
        "every job, set PROMPTQ_RETENTION_DAYS=0 before starting `promptq beat`."
    )


@db.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def db_prune(dry_run: bool) -> None:
    """Delete finished jobs older than PROMPTQ_RETENTION_DAYS, in small batches."""
    from promptq.retention import prune

    settings = get_settings()
    report = prune(settings, dry_run=dry_run)
    click.echo(report.describe())


@click.command("simulate-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
@click.option("--latency", default=0.0, show_default=True, help="Seconds added to each call.")
@click.option("--latency-jitter", default=0.0, show_default=True, help="Up to this much more.")
@click.option("--rpm", type=int, help="Requests per minute before 429s (default: unlimited).")
@click.option("--input-tpm", type=int, help="Input tokens per minute.")
@click.option("--output-tpm", type=int, help="Output tokens per minute.")
@click.option(
    "--burst-seconds",
    default=1.0,
    show_default=True,
    help="Request bucket capacity in seconds of rate.",
)
@click.option(
    "--token-burst-seconds",
    default=60.0,
    show_default=True,
    help="Token bucket capacity in seconds of rate (a minute, as Anthropic's).",
)
@click.option(
    "--ratelimit-headers/--no-ratelimit-headers",
    default=True,
    show_default=True,
    help="Send anthropic-ratelimit-* headers.",
)
@click.option("--p-429", default=0.0, help="Chance of a random 429.")
@click.option("--p-500", default=0.0, help="Chance of a random 500.")
@click.option("--p-529", default=0.0, help="Chance of a random 529 (overloaded).")
@click.option("--p-malformed", default=0.0, help="Chance of an HTML error page.")
@click.option("--p-drop", default=0.0, help="Chance of a dropped connection.")
@click.option("--seed", type=int, help="Seed for the random faults.")
def simulate_upstream(host: str, port: int, **options: Any) -> None:
    """Serve an Anthropic-faithful fake /v1/messages (for tests, benchmarks and demos)."""
    from promptq.simulator import SimulatorConfig, serve

    config = SimulatorConfig(**{k: v for k, v in options.items() if v is not None})
    click.echo(f"simulated upstream on http://{host}:{port}/v1/messages", err=True)
    serve(host, port, config)


commands = [api, worker, beat, flower, db, simulate_upstream]
