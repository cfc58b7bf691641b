"""The status API and its pages (`batch-worker web`): read-only, over the durable state."""
