"""Implementations of the core's ports: database, vault, keys, file ingest, Telegram I/O."""
