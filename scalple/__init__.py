"""Scalple: a PostgreSQL wire-protocol audit proxy."""

__version__ = "0.1.0"
