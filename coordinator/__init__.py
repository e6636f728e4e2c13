"""Runs on the Ray driver: tokenizer, draft model, the decode loop, the HTTP API."""
