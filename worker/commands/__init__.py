"""One module per operator verb of the ``batch-worker`` command line (submit, status, dlq,
the event follower, the demo); ``worker.cli`` only parses arguments and calls them."""
