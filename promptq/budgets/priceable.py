"""What a key with a monthly budget may send: only calls promptq can price.

A budget holds only if every call's cost is counted. A model with no price records no cost;
beta features (the anthropic-beta header) and server tools (web search, code execution) are
billed in ways a token price table cannot express; a request field promptq does not know may
switch on another such thing (a priority service tier, an MCP server). So for a budgeted key
these are refused at intake, with what to do, before anything is spent; a key without a
budget may send them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from promptq.errors import PermissionDenied
from promptq.models import ApiKey
from promptq.pricing import PriceTable

# Messages API fields whose cost is the tokens they make, as the price table prices them.
PRICED_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
    }
)
# Tools the client runs itself: only their tokens are billed. Any other `type` is a server
# tool the upstream runs and bills per use.
CLIENT_TOOL_TYPES = (None, "custom")


class NotPriceable(PermissionDenied):
    """A budgeted key sent what promptq cannot price; the API answers 403."""


def check_priceable(
    key: ApiKey,
    request: Mapping[str, Any],
    prices: PriceTable,
    anthropic_beta: str | None = None,
    where: str = "",
) -> None:
    """Refuse, for a key with a monthly budget, a call whose cost promptq cannot count.
    `where` names the call in messages (a batch request's custom_id)."""
    if key.monthly_budget_usd is None:
        return
    what = f"{where}: " if where else ""
    because = f"API key {key.name!r} has a monthly budget, and promptq cannot count the cost of "
    model = str(request.get("model", ""))
    if prices.prices_for(model) is None:
        raise NotPriceable(
            f"{what}model {model!r} has no price in promptq's price table (the built-in "
            f"prices, or PROMPTQ_PRICING_FILE): {because}a call to it. Add the model's "
            "prices to the pricing file, or use a key without a budget"
        )
    if anthropic_beta:
        raise NotPriceable(
            f"{what}{because}beta features (anthropic-beta: {anthropic_beta}); send the "
            "request without the header, or use a key without a budget"
        )
    unknown = sorted(set(request) - PRICED_FIELDS)
    if unknown:
        raise NotPriceable(
            f"{what}{because}what {', '.join(unknown)} may switch on; leave "
            f"{'them' if len(unknown) > 1 else 'it'} out, or use a key without a budget"
        )
    for tool in request.get("tools") or []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in CLIENT_TOOL_TYPES:
            raise NotPriceable(
                f"{what}{because}the server tool {kind!r}, which the upstream bills per use; "
                "use tools your client runs, or a key without a budget"
            )
