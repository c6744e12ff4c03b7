"""Composition root: settings, wiring, run modes (polling, shell) and the CLI."""
