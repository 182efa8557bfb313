"""Data: the embedded shapes dataset, tokenizer and task formatting."""
