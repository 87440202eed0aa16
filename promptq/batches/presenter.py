"""Batches and their result lines, in Anthropic's shapes."""

from __future__ import annotations

import json
from typing import Any

from promptq.batches.repository import EXPIRED_ERROR
from promptq.jobs.presenter import isoformat
from promptq.models import BatchStatus, JobStatus, MessageBatch
from promptq.upstream.anthropic_errors import anthropic_error

Counts = dict[tuple[str, bool], int]


def request_counts(counts: Counts) -> dict[str, int]:
    """Anthropic's request_counts: processing, succeeded, errored, canceled, expired."""
    result = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    for (status, expired), count in counts.items():
        if status == JobStatus.SUCCEEDED:
            result["succeeded"] += count
        elif status == JobStatus.FAILED:
            result["errored"] += count
        elif status == JobStatus.CANCELED:
            result["expired" if expired else "canceled"] += count
        else:
            result["processing"] += count
    return result


def results_path(batch_id: str) -> str:
    return f"/v1/messages/batches/{batch_id}/results"


def batch_to_api(batch: MessageBatch, counts: Counts, base_url: str) -> dict[str, Any]:
    ended = batch.processing_status == BatchStatus.ENDED
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.processing_status,
        "request_counts": request_counts(counts),
        "ended_at": isoformat(batch.ended_at),
        "created_at": isoformat(batch.created_at),
        "expires_at": isoformat(batch.expires_at),
        "archived_at": None,
        "cancel_initiated_at": isoformat(batch.cancel_initiated_at),
        "results_url": base_url.rstrip("/") + results_path(batch.id) if ended else None,
    }


def result_line(row: Any) -> bytes:
    """One JSONL line of a batch's results, from a row of RESULT_COLUMNS."""
    if row.status == JobStatus.SUCCEEDED:
        result: dict[str, Any] = {"type": "succeeded", "message": row.result}
    elif row.status == JobStatus.FAILED:
        _, body = anthropic_error(row.error_type, row.error_message, row.upstream_status)
        result = {"type": "errored", "error": body}
    elif row.status == JobStatus.CANCELED:
        result = {"type": "expired" if row.error_type == EXPIRED_ERROR else "canceled"}
    else:  # not reached once the batch has ended; said plainly if it ever is
        result = {"type": "processing"}
    line = {"custom_id": row.custom_id, "result": result}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
