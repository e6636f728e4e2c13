"""Runs on GPU boxes: one process per GPU, serving one pipeline stage."""
