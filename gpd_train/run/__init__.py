"""The run folder as a record: files, records, provenance, destinations, loading a stage's model,
checks made before work."""
