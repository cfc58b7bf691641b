"""PostgreSQL and nothing else: connections and schema, job rows and their leases, the
outbox, the fleet's active count."""
