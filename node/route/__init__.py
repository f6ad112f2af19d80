"""Routing: declarative rules decide which completed series go to which pipeline."""
