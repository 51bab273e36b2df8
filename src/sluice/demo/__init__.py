"""The embedded default: a tiny HF-format model, a character tokenizer and synthetic verifiable tasks."""
