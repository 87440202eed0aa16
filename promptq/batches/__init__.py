"""Message Batches, with Anthropic's paths, fields and semantics; each request is a job."""
