"""The merging service: blend scored lists, dedup, visibility filters, quotas, top-K."""
