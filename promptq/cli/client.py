"""Client commands: they talk HTTP to PROMPTQ_API_URL with PROMPTQ_API_KEY."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import requests

from promptq.config import get_settings
from promptq.priority import Priority

FINAL = {"succeeded", "failed", "canceled"}


def _call(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    settings = get_settings()
    if settings.api_key is None:
        raise click.ClickException(
            "PROMPTQ_API_KEY is not set; `promptq up` prints one, or run `promptq keys create NAME`"
        )
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"}
    try:
        response = requests.request(
            method, f"{settings.api_url}{path}", headers=headers, timeout=90, **kwargs
        )
    except requests.ConnectionError as exc:
        raise click.ClickException(
            f"cannot reach promptq at {settings.api_url} (PROMPTQ_API_URL): is it running?"
        ) from exc
    try:
        body = response.json()
    except ValueError as exc:
        raise click.ClickException(f"{response.status_code} from promptq, not JSON") from exc
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise click.ClickException(f"{response.status_code}: {error.get('message', body)}")
    return body  # type: ignore[no-any-return]


@click.command()
@click.argument("prompt")
@click.option("--model", help="Model to run (default: PROMPTQ_DEFAULT_MODEL on the server).")
@click.option("--max-tokens", type=int)
@click.option("--system")
@click.option(
    "--priority", type=click.Choice([p.value for p in Priority]), default=Priority.NORMAL.value
)
@click.option("--wait", is_flag=True, help="Wait for the answer and print its text.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole job as JSON.")
def submit(
    prompt: str,
    model: str | None,
    max_tokens: int | None,
    system: str | None,
    priority: str,
    wait: bool,
    as_json: bool,
) -> None:
    """Submit a prompt as a job."""
    body: dict[str, Any] = {"prompt": prompt, "priority": priority}
    for name, value in (("model", model), ("max_tokens", max_tokens), ("system", system)):
        if value is not None:
            body[name] = value
    job = _call("POST", "/v1/jobs", params={"wait": 55} if wait else None, json=body)
    while wait and job["status"] not in FINAL:
        time.sleep(1)
        job = _call("GET", f"/v1/jobs/{job['id']}", params=None)
    if as_json:
        click.echo(json.dumps(job, indent=2))
    elif not wait:
        click.echo(job["id"])
    elif job["status"] == "succeeded":
        click.echo(job["output_text"])
        cost = (job.get("cost") or {}).get("total", "?")
        usage = job.get("usage") or {}
        click.echo(
            f"[{job['id']}: {usage.get('input_tokens')} in / "
            f"{usage.get('output_tokens')} out tokens, ${cost}]",
            err=True,
        )
    else:
        error = job.get("error") or {}
        raise click.ClickException(f"job {job['id']} {job['status']}: {error.get('message')}")


@click.group()
def jobs() -> None:
    """Look at jobs."""


@jobs.command("ls")
@click.option("--status", type=click.Choice(sorted(FINAL | {"queued", "running", "retrying"})))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100))
@click.option("--json", "as_json", is_flag=True)
def jobs_ls(status: str | None, limit: int, as_json: bool) -> None:
    """List your jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    page = _call("GET", "/v1/jobs", params=params)
    if as_json:
        click.echo(json.dumps(page["data"], indent=2))
        return
    click.echo(f"{'ID':32}  {'STATUS':10}  {'MODEL':28}  {'COST':>10}  CREATED")
    for job in page["data"]:
        cost = (job.get("cost") or {}).get("total", "-")
        click.echo(
            f"{job['id']:32}  {job['status']:10}  {job['model'][:28]:28}  {cost:>10}  "
            f"{job['created_at']}"
        )


commands = [submit, jobs]
