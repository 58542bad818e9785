"""The keeper, one process per node that outlives crashed workers: its typed messages (messages.py:
one request and reply per operation), protocol and client, its server and handlers, snapshot slots in shared memory, background persists to the store, prefetch
for restarted workers, the watch on hung ranks and peers, and reclaiming what dead keepers left.
A new keeper operation goes here."""
