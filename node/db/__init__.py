"""Tracking database: models, engine, migrations."""
