"""flux2-server: fal's FLUX.2 edit API over HTTP (`http/`), a durable queue (`queue/`), the edit service that owns the
model (`service/`), output files (`files/`), outbound HTTP (`net/`) and the command line (`cli/`); docs/architecture.md
draws the request path."""
