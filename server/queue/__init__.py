"""The queue: its interface (`backend`), SQLite and Redis backends, `connect` (pick one from a URL), the
`dispatcher` that runs queued requests, worker `heartbeat`s, `webhooks` and `retention`."""
