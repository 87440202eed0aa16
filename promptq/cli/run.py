"""`promptq run FILE`: a file of prompts as jobs, watched to the end, written back in order.

Each row becomes one job (POST /v1/jobs, normal priority) rather than a Message Batch: a
job takes an Idempotency-Key, so every row is sent under `RUN:LINE` and sending it again
returns the same job. Running the same command again, or `--resume RUN` after Ctrl-C, is
then safe at any point, even halfway through sending; a batch has no such key, and a run
cut short while creating one could not tell whether it exists. Jobs are watched by paging
GET /v1/jobs (newest first, back to the run's oldest job) while many are open, and one by
one once few are left.
"""

from __future__ import annotations

import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import requests
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from promptq.config import get_settings
from promptq.runs import (
    Row,
    RunFileError,
    RunSpec,
    check_output_path,
    failed_result,
    read_rows,
    result_of,
    run_id,
    write_output,
)

FINAL = frozenset({"succeeded", "failed", "canceled"})
SUBMIT_THREADS = 8
POLL_SECONDS = 1.0
# Below this many open jobs, asking for each is cheaper than paging the key's job list.
FEW_OPEN = 50
PAGE = 100
PLAIN_EVERY_SECONDS = 5.0
RETRIED_STATUSES = frozenset({429, 502, 503, 504})


class Transient(Exception):
    """An answer worth asking again (a quota's 429, a restarting API)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Api:
    """promptq's HTTP API with this key; one connection pool per thread."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {key}"}
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """(status, JSON body); retries what is worth retrying for about two minutes, then
        raises ClickException, as for what no row can get past (no API, a wrong key)."""
        try:
            return self._call(method, path, headers, **kwargs)
        except Transient as exc:
            raise click.ClickException(f"{exc}; gave up after retrying") from None

    @retry(
        retry=retry_if_exception_type(Transient),
        wait=wait_exponential(multiplier=0.5, max=30) + wait_random(0, 1),
        stop=stop_after_attempt(9),
        reraise=True,
    )
    def _call(
        self, method: str, path: str, headers: dict[str, str] | None, **kwargs: Any
    ) -> tuple[int, Any]:
        try:
            response = self._session().request(
                method,
                f"{self.url}{path}",
                headers={**self._headers, **(headers or {})},
                timeout=60,
                **kwargs,
            )
        except requests.ConnectionError as exc:
            raise Transient(f"cannot reach promptq at {self.url} (PROMPTQ_API_URL)") from exc
        if response.status_code in RETRIED_STATUSES:
            after = response.headers.get("retry-after")
            if after and after.isdigit():
                time.sleep(min(float(after), 60))
            raise Transient(f"{response.status_code} from promptq")
        try:
            body = response.json()
        except ValueError:
            raise click.ClickException(
                f"{response.status_code} from {self.url}{path}, not JSON: is PROMPTQ_API_URL "
                "promptq's address?"
            ) from None
        if response.status_code == 401:
            raise click.ClickException(f"401: {_message(body)}")
        return response.status_code, body


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else str(body)


@click.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompt", "prompt", help="A Jinja2 template; the file's columns are its variables.")
@click.option("--template", "template_name", help="A template made with POST /v1/templates.")
@click.option("--model", help="Model for every row (default: the template's, else the server's).")
@click.option("--max-tokens", type=click.IntRange(min=1))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Results, one line per row in input order: .csv or .jsonl.",
)
@click.option("--resume", "resume", metavar="RUN", help="Reattach to a run (its id).")
def run(
    file: Path,
    prompt: str | None,
    template_name: str | None,
    model: str | None,
    max_tokens: int | None,
    out: Path | None,
    resume: str | None,
) -> None:
    """Run every row of a CSV (with a header row) or JSONL FILE as a job, and wait for all.

    Running the same command again resumes the run rather than sending the rows twice."""
    if (prompt is None) == (template_name is None):
        raise click.UsageError("give --prompt TEMPLATE or --template NAME (one of them)")
    settings = get_settings()
    if settings.api_key is None:
        raise click.ClickException(
            "PROMPTQ_API_KEY is not set; `promptq up` prints one, or run `promptq keys create NAME`"
        )
    api = Api(settings.api_url, settings.api_key.get_secret_value())
    try:
        check_output_path(out)
        spec = _spec(api, prompt, template_name, model, max_tokens)
        data = file.read_bytes()
        columns, rows = read_rows(file, data, spec)
    except RunFileError as exc:
        raise click.ClickException(str(exc)) from None
    run = resume or run_id(data, spec)
    if resume and resume != run_id(data, spec):
        click.echo(
            f"resuming {resume} with another file or options: unchanged rows keep their jobs, "
            "changed ones are refused",
            err=True,
        )
    for row in rows:
        if row.error is not None:
            click.echo(f"{file}: {row.error} (written as a failed row)", err=True)
    display = Display(run, rows)
    try:
        _submit(api, run, rows, display)
        _watch(api, rows, display)
    except KeyboardInterrupt:
        display.stop()
        click.echo(
            f"\nStopped watching. Run {run} goes on on the server; reattach with:\n"
            f"  {_reattach_command(run)}",
            err=True,
        )
        sys.exit(130)
    display.stop()
    if out is not None:
        write_output(out, columns, rows)
    counts = display.counts()
    click.echo(
        f"{run}: {len(rows)} rows, {counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"${display.dollars()}" + (f"; results in {out}" if out else "")
    )
    if counts["failed"]:
        sys.exit(1)


def _spec(
    api: Api, prompt: str | None, name: str | None, model: str | None, max_tokens: int | None
) -> RunSpec:
    if prompt is not None:
        return RunSpec.inline(prompt, model, max_tokens)
    assert name is not None
    status, body = api.call("GET", f"/v1/templates/{name}")
    if status != 200:
        raise click.ClickException(f"--template {name}: {status}: {_message(body)}")
    return RunSpec.stored(body, model, max_tokens)


def _reattach_command(run: str) -> str:
    words = ["promptq", *sys.argv[1:]]
    if "--resume" in words:
        at = words.index("--resume")
        del words[at : at + 2]
    words = [w for w in words if not w.startswith("--resume=")]
    return shlex.join([*words, "--resume", run])


def _submit(api: Api, run: str, rows: list[Row], display: Display) -> None:
    """Every row with a job not yet known is sent under its Idempotency-Key."""

    def send(row: Row) -> None:
        assert row.job is not None
        body = row.job.model_dump(mode="json", exclude_none=True)
        body["metadata"] = {**(body.get("metadata") or {}), "promptq_run": run, "line": row.line}
        status, answer = api.call(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": f"{run}:{row.line}"}
        )
        if status in (200, 202):
            row.result = result_of(answer)
        elif status == 409:
            row.result = failed_result(
                f"line {row.line}: changed since {run} began ({_message(answer)}); "
                "start a new run (without --resume) to send it"
            )
        else:
            row.result = failed_result(f"line {row.line}: {status}: {_message(answer)}")
        display.update()

    todo = [row for row in rows if row.job is not None and not row.result]
    executor = ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="promptq-run")
    try:
        for future in [executor.submit(send, row) for row in todo]:
            future.result()
    finally:
        # On Ctrl-C, rows not yet sent stay unsent; running the command again sends them.
        executor.shutdown(wait=False, cancel_futures=True)


def _watch(api: Api, rows: list[Row], display: Display) -> None:
    by_id = {row.result["job_id"]: row for row in rows if row.result.get("job_id")}
    while True:
        open_ids = [i for i, row in by_id.items() if row.result.get("status") not in FINAL]
        display.update()
        if not open_ids:
            return
        time.sleep(POLL_SECONDS)
        if len(open_ids) <= FEW_OPEN:
            with ThreadPoolExecutor(SUBMIT_THREADS) as executor:
                jobs = list(executor.map(lambda i: api.call("GET", f"/v1/jobs/{i}"), open_ids))
            found = [job for status, job in jobs if status == 200]
        else:
            found = _jobs_since(api, min(open_ids))
        for job in found:
            row = by_id.get(job.get("id", ""))
            if row is not None:
                row.result = result_of(job)


def _jobs_since(api: Api, oldest: str) -> list[dict[str, Any]]:
    """The key's jobs from the newest back to `oldest` (ids sort by creation)."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": PAGE, "batch": "none"}
    while True:
        status, page = api.call("GET", "/v1/jobs", params=params)
        if status != 200:
            raise click.ClickException(f"GET /v1/jobs: {status}: {_message(page)}")
        found.extend(page["data"])
        cursor = page.get("next_cursor")
        if not cursor or cursor <= oldest:
            return found
        params = {**params, "after": cursor}


class Display:
    """Progress: a live bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, run: str, rows: list[Row], live: bool | None = None) -> None:
        self.run = run
        self.rows = rows
        self.live = sys.stderr.isatty() if live is None else live
        self.started = time.monotonic()
        self._finished_at_start: int | None = None
        self._last_plain = 0.0
        self._printed_last = False
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        if self.live:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[line]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(self.run, total=len(self.rows), line="")
        self._bar.start()

    def counts(self) -> dict[str, int]:
        counts = {"succeeded": 0, "failed": 0, "waiting": 0}
        for row in self.rows:
            status = row.result.get("status")
            if status == "succeeded":
                counts["succeeded"] += 1
            elif status in FINAL:
                counts["failed"] += 1
            else:
                counts["waiting"] += 1
        return counts

    def dollars(self) -> Decimal:
        return sum(
            (Decimal(row.result["cost_usd"]) for row in self.rows if row.result.get("cost_usd")),
            Decimal(0),
        )

    def line(self, counts: dict[str, int]) -> str:
        finished = counts["succeeded"] + counts["failed"]
        if self._finished_at_start is None:
            # Rows already finished when this attached (a resumed run) are not this
            # session's rate.
            self._finished_at_start = finished
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (finished - self._finished_at_start) / elapsed
        eta = f"{counts['waiting'] / rate:.0f} s" if rate > 0 and counts["waiting"] else "-"
        return (
            f"{counts['succeeded']} done, {counts['failed']} failed, {counts['waiting']} "
            f"waiting, {rate:.1f}/s, ETA {eta}, ${self.dollars()}"
        )

    def update(self) -> None:
        with self._lock:
            counts = self.counts()
            text = self.line(counts)
            if self._bar is not None:
                completed = len(self.rows) - counts["waiting"]
                self._bar.update(self._task, completed=completed, line=text)
                return
            now = time.monotonic()
            last = not counts["waiting"]
            if (now - self._last_plain >= PLAIN_EVERY_SECONDS and not last) or (
                last and not self._printed_last
            ):
                self._last_plain = now
                self._printed_last = last
                click.echo(f"{self.run}: {text}", err=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
