"""Global rate limits, shared by every worker through Redis."""
