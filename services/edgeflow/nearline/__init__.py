"""Nearline mode: member events in, recomputed lists out, shortly after each event.

`events` is what the gateway's Publish writes (one Redis Stream, with the visibility SETs
updated in the same atomic step); `worker` is the consumer-group worker that applies them.
"""
