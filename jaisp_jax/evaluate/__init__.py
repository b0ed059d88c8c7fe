"""Evaluation: held-out embeddings, diagnostics and probes against truth."""
