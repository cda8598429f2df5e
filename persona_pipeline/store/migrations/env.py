"""Alembic environment of the persona store: run by `persona_pipeline.store.schema` with an open
connection, or by the `alembic` command line (alembic.ini) against PERSONA_DB_URL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from persona_pipeline import settings
from persona_pipeline.store.tables import metadata

config = context.config


def run_with(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=settings.persona_db_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    run_with(connection)
else:
    engine = sa.create_engine(settings.persona_db_url())
    with engine.connect() as own:
        run_with(own)
