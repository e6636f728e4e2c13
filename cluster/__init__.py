"""Code every node shares: GGUF inspection, stage cutting, planning, the CLI."""
