"""Alembic environment: the engine is handed in by node.db.migrate (never read from an ini file)."""

from __future__ import annotations

from alembic import context

from node.db.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
