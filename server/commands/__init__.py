"""The `flux2-server` subcommands that are more than a few lines: edit, weights import/verify, doctor."""
