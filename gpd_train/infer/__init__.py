"""Inference from a run folder or a Wan folder: sampling, media, export."""
