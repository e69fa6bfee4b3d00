"""Training inputs: the built-in videos, prompt-embedding sets and their encoder."""
