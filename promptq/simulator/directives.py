"""Directives: `[[sim:...]]` in the prompt, asking for faults, latency and the length of the
answer per call."""

from __future__ import annotations

import re
from dataclasses import dataclass

from promptq.simulator.answers import ApiError
from promptq.simulator.faults import FAULTS

_DIRECTIVE = re.compile(r"\[\[sim:([^\]]*)\]\]")
_FAULT_DIRECTIVE = re.compile(r"^\s*([a-z0-9-]+)(?:\s+x(\d+))?\s*$")
_LATENCY_DIRECTIVE = re.compile(r"^\s*latency\s*=\s*(\d+(?:\.\d+)?)\s*$")
_OUTPUT_DIRECTIVE = re.compile(r"^\s*output\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class Directives:
    faults: tuple[tuple[str, int | None], ...] = ()  # (fault, times; None = forever)
    latency: float = 0.0
    # Output tokens the answer writes (at most max_tokens); None: as long as the reply is.
    output_tokens: int | None = None

    def fault_for_call(self, call_index: int) -> str | None:
        seen = 0
        for fault, times in self.faults:
            if times is None or call_index < seen + times:
                return fault
            seen += times
        return None


def parse_directives(text: str) -> Directives:
    faults: list[tuple[str, int | None]] = []
    latency = 0.0
    output_tokens = None
    for inner in _DIRECTIVE.findall(text):
        if match := _LATENCY_DIRECTIVE.match(inner):
            latency += float(match.group(1))
        elif match := _OUTPUT_DIRECTIVE.match(inner):
            output_tokens = int(match.group(1))
        elif (match := _FAULT_DIRECTIVE.match(inner)) and match.group(1) in FAULTS:
            times = match.group(2)
            faults.append((match.group(1), int(times) if times else None))
        else:
            raise ApiError(
                400,
                "invalid_request_error",
                f"simulator: unknown directive [[sim:{inner}]]; faults are "
                f"{', '.join(sorted(FAULTS))}, optionally followed by xN, latency=S or output=N",
            )
    return Directives(tuple(faults), latency, output_tokens)
