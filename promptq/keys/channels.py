"""Redis channels that carry word of keys between processes."""

# The key ids revoked; API processes drop them from their cache of checked keys.
REVOKED_CHANNEL = "promptq:keys:revoked"
