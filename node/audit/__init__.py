"""Audit trail: every transition is one small typed event, stored as one append-only row."""
