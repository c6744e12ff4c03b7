"""Checklist definitions: one TOML file per procedure, validated on load."""

from checklists.schema import ChecklistError, load_all, load_checklist

__all__ = ["ChecklistError", "load_all", "load_checklist"]
