"""L1, the worker side of a snapshot: capture references in the training thread, copy them to host
memory while the next forward and backward run, and fence before the next optimizer step."""
