"""Output files: where they are kept (`storage`: local, shared directory, S3), how images become files (`outputs`),
and how local ones are served (`serving`)."""
