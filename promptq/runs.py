"""A file of prompts as one run (`promptq run`): each row of a CSV (with a header row) or
JSONL file is rendered with a prompt template into one job; the results go back out in
the input's order. This module knows rows, templates, run ids and output files; the
command (promptq.cli.run) does the HTTP.

Rendering uses promptq.templates, the same Jinja2 sandbox as /v1/templates: a row's
columns are the variables, and the whole row is `input`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from promptq import templates
from promptq.config import get_settings
from promptq.jobspec.schemas import JobCreate
from promptq.models import PromptTemplate
from promptq.validation import describe_validation_errors

OUTPUT_FIELDS = ("output_text", "status", "error", "cost_usd", "job_id")
OUTPUT_SUFFIXES = (".csv", ".jsonl")
MISSING_HINT = "add that column to the file"


class RunFileError(ValueError):
    """A file or option that cannot start a run at all (not one bad row)."""


@dataclass
class Row:
    """One row of the input: its line, its own columns, and the job it makes (or why not)."""

    line: int
    values: dict[str, Any]
    job: JobCreate | None = None
    error: str | None = None
    # What became of it: filled from the job as the run goes on.
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    """What a run renders with: a template (inline text or a stored one) and overrides."""

    template: PromptTemplate
    source: str  # "--prompt TEXT" or "--template NAME", for messages

    @classmethod
    def inline(cls, prompt: str, model: str | None, max_tokens: int | None) -> RunSpec:
        try:
            templates.check_syntax(get_settings(), prompt)
        except templates.TemplateError as exc:
            raise RunFileError(f"--prompt: {exc}") from None
        template = PromptTemplate(
            name="--prompt", prompt=prompt, model=model, max_tokens=max_tokens
        )
        return cls(template, "--prompt")

    @classmethod
    def stored(cls, stored: dict[str, Any], model: str | None, max_tokens: int | None) -> RunSpec:
        """From a template as GET /v1/templates/{name} shows it; the options override it."""
        template = PromptTemplate(
            name=stored["name"],
            prompt=stored["prompt"],
            system=stored.get("system"),
            model=model or stored.get("model"),
            max_tokens=max_tokens or stored.get("max_tokens"),
            temperature=stored.get("temperature"),
        )
        return cls(template, f"--template {stored['name']}")

    def fingerprint(self) -> dict[str, Any]:
        t = self.template
        return {
            "prompt": t.prompt,
            "system": t.system,
            "model": t.model,
            "max_tokens": t.max_tokens,
            "temperature": t.temperature,
        }


def run_id(data: bytes, spec: RunSpec) -> str:
    """The same file with the same template and options is the same run: running the
    command again resumes it instead of sending every row twice."""
    digest = hashlib.sha256(data)
    digest.update(json.dumps(spec.fingerprint(), sort_keys=True).encode())
    return "run_" + digest.hexdigest()[:20]


def check_output_path(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise RunFileError(f"--out {path}: give a file ending in .csv or .jsonl")


def read_rows(path: Path, data: bytes, spec: RunSpec) -> tuple[list[str], list[Row]]:
    """The input's columns (in order of first appearance) and its rows, each rendered into
    a job or marked with what is wrong with it and on which line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RunFileError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns, rows = _csv_rows(path, text)
    elif suffix in (".jsonl", ".ndjson"):
        columns, rows = _jsonl_rows(text)
    else:
        raise RunFileError(f"{path}: give a .csv file (with a header row) or a .jsonl file")
    for row in rows:
        if row.error is None:
            row.job, row.error = _render(spec, row)
        if row.error is not None:
            row.result = failed_result(row.error)
    return columns, rows


def failed_result(error: str) -> dict[str, Any]:
    return {**dict.fromkeys(OUTPUT_FIELDS), "status": "failed", "error": error}


def _render(spec: RunSpec, row: Row) -> tuple[JobCreate | None, str | None]:
    try:
        return templates.job_from_here(
            get_settings(), spec.template, row.values, MISSING_HINT
        ), None
    except templates.TemplateError as exc:
        return None, f"line {row.line}: {exc}"
    except ValidationError as exc:
        return None, f"line {row.line}: {describe_validation_errors(list(exc.errors()))}"
    except Exception as exc:  # a template's own runtime error (a filter on a wrong type...)
        # One row's error must never stop the others; the message says what it was.
        return None, f"line {row.line}: template error: {type(exc).__name__}: {exc}"


def _csv_rows(path: Path, text: str) -> tuple[list[str], list[Row]]:
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise RunFileError(f"{path}: empty; the first line names the columns") from None
    except csv.Error as exc:
        raise RunFileError(f"{path}: line 1: {exc}") from None
    columns = [name.strip() for name in header]
    if not any(columns) or len(set(columns)) != len(columns):
        raise RunFileError(f"{path}: line 1 must name each column once (the template's variables)")
    rows: list[Row] = []
    line = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append(Row(line, {}, error=f"line {line}: {exc}"))
            line = reader.line_num + 1
            continue
        if fields:  # a blank line is no row
            row = Row(line, dict(zip(columns, fields, strict=False)))
            if len(fields) != len(columns):
                row.error = (
                    f"line {line}: {len(fields)} fields where the header names {len(columns)}"
                )
            rows.append(row)
        line = reader.line_num + 1
    return columns, rows


def _jsonl_rows(text: str) -> tuple[list[str], list[Row]]:
    columns: dict[str, None] = {}
    rows: list[Row] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            values = json.loads(raw)
        except ValueError as exc:
            rows.append(Row(line, {}, error=f"line {line}: not JSON ({exc})"))
            continue
        if not isinstance(values, dict):
            rows.append(Row(line, {}, error=f"line {line}: a JSON object per line, please"))
            continue
        columns.update(dict.fromkeys(values))
        rows.append(Row(line, values))
    return list(columns), rows


def result_of(job: dict[str, Any]) -> dict[str, Any]:
    """The output columns from a job as the API shows it."""
    error = job.get("error") or {}
    return {
        "output_text": job.get("output_text"),
        "status": job.get("status"),
        "error": error.get("message"),
        "cost_usd": (job.get("cost") or {}).get("total"),
        "job_id": job.get("id"),
    }


def write_output(path: Path, columns: list[str], rows: list[Row]) -> None:
    """One line per input row, in input order: its own columns, then the result's."""
    own = [c for c in columns if c not in OUTPUT_FIELDS]
    temporary = path.with_name(path.name + ".part")
    with open(temporary, "w", encoding="utf-8", newline="") as out:
        if path.suffix.lower() == ".csv":
            writer = csv.writer(out)
            writer.writerow([*own, *OUTPUT_FIELDS])
            for row in rows:
                values = [_cell(row.values.get(c)) for c in own]
                writer.writerow(values + [_cell(row.result.get(f)) for f in OUTPUT_FIELDS])
        else:
            for row in rows:
                record = {**row.values, **{f: row.result.get(f) for f in OUTPUT_FIELDS}}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    # Whole or not at all: a reader never sees half a file.
    temporary.replace(path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
