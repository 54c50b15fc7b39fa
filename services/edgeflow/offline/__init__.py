"""The offline job: a workflow's graph run in bulk over every member (or one shard), in
vectorised batches, writing a precomputed list that goes live only when the whole run is done.

The nearline worker runs the same batch runner for the few members an event touches.
"""
