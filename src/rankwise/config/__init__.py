"""Run configuration: typed schema, YAML composition and CLI overrides."""
