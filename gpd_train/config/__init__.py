"""Configuration: the chains' registry, defaults + TOML + flags resolved once."""
