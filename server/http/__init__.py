"""HTTP: the FastAPI app (`app`), its routes (`routes/`), middleware (`auth`, `body_limit`, `proxy`, `quotas`),
and the HTTP face of server.errors (`errors`, `responses`)."""
