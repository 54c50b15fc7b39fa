"""What every service process shares: `server` (the gRPC server, its health, warm-up and
drain), `guard` and `auth` (what is refused before a handler runs), `tracing` and
`metrics`, `errors` (a handler's typed failure and its status code), `tls`, `cpu` (request
work off the event loop, with its deadline) and `reload` (the periodic look)."""
