"""Batches and their result lines, in Anthropic's shapes."""

from __future__ import annotations

import json
from typing import Any

from promptq.batches.repository import EXPIRED_ERROR, OUTCOME_COLUMNS
from promptq.jobspec.presenter import isoformat
from promptq.models import BatchStatus, JobStatus, MessageBatch
from promptq.upstream.anthropic_errors import anthropic_error


def request_counts(batch: MessageBatch) -> dict[str, int]:
    """Anthropic's request_counts: processing, succeeded, errored, canceled, expired, from
    the batch's own counters."""
    return {
        "processing": batch.processing_count,
        **{outcome: getattr(batch, column) for outcome, column in OUTCOME_COLUMNS.items()},
    }


def results_path(batch_id: str) -> str:
    return f"/v1/messages/batches/{batch_id}/results"


def batch_to_api(batch: MessageBatch, base_url: str) -> dict[str, Any]:
    ended = batch.processing_status == BatchStatus.ENDED
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.processing_status,
        "request_counts": request_counts(batch),
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
