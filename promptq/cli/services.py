"""Each part of promptq alone, in the foreground, for real deployments."""

from __future__ import annotations

from pathlib import Path

import click

from promptq.config import Settings, get_settings


def preflight(settings: Settings) -> None:
    """Refuse to start on a broken limits or price file, saying what is wrong in it."""
    from promptq.pricing import PriceTable, PricingError
    from promptq.ratelimit.table import LimitsError, LimitTable

    try:
        LimitTable.load(settings.limits_file)
        PriceTable.load(settings.pricing_file)
    except (LimitsError, PricingError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API."""
    import uvicorn

    preflight(get_settings())
    uvicorn.run(
        "api.main:app", host=host, port=port, workers=workers, log_level="info", access_log=False
    )


@click.command()
@click.option("--concurrency", type=int, help="Upstream calls in flight at once (threads).")
@click.option("--queues", default="promptq", show_default=True, help="Comma-separated queues.")
@click.option("--hostname", help="Celery node name (default: promptq@HOST).")
def worker(concurrency: int | None, queues: str, hostname: str | None) -> None:
    """Run a Celery worker that executes jobs."""
    from worker.app import app

    settings = get_settings()
    preflight(settings)
    concurrency = concurrency or settings.worker_concurrency
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        "--task-events",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    argv.append(f"--hostname={hostname or 'promptq@%h'}")
    app.worker_main(argv)


@click.command()
@click.option(
    "--schedule",
    default=".promptq/celerybeat-schedule",
    show_default=True,
    help="Where beat keeps its last-run times.",
)
def beat(schedule: str) -> None:
    """Run the periodic scheduler (exactly one per deployment)."""
    from worker.app import app

    Path(schedule).parent.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--loglevel=INFO", f"--schedule={schedule}"])


@click.command()
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--address", default="127.0.0.1", show_default=True)
def flower(port: int, address: str) -> None:
    """Run Flower, the Celery monitor, behind basic auth."""
    from worker.app import app

    settings = get_settings()
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if settings.flower_basic_auth:
        argv.append(f"--basic-auth={settings.flower_basic_auth.get_secret_value()}")
    app.start(argv)


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply Alembic migrations up to REVISION."""
    from promptq.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}")


@click.command("simulate-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
@click.option("--latency", default=0.0, show_default=True, help="Seconds added to each call.")
@click.option("--latency-jitter", default=0.0, show_default=True, help="Up to this much more.")
@click.option("--rpm", type=int, help="Requests per minute before 429s (default: unlimited).")
@click.option("--input-tpm", type=int, help="Input tokens per minute.")
@click.option("--output-tpm", type=int, help="Output tokens per minute.")
@click.option(
    "--burst-seconds", default=1.0, show_default=True, help="Bucket capacity in seconds of rate."
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
def simulate_upstream(host: str, port: int, **options: object) -> None:
    """Serve an Anthropic-faithful fake /v1/messages (for tests, benchmarks and demos)."""
    from promptq.simulator import SimulatorConfig, serve

    config = SimulatorConfig(**{k: v for k, v in options.items() if v is not None})
    click.echo(f"simulated upstream on http://{host}:{port}/v1/messages", err=True)
    serve(host, port, config)


commands = [api, worker, beat, flower, db, simulate_upstream]
