"""Preset configs (YAML), installed as package data."""
