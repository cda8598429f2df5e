"""Schema of the persona store, created and upgraded by Alembic migrations, never dropped.

Every process upgrades the database to the newest revision before its first use (idempotent;
serialized on PostgreSQL by an advisory lock). A database made before migrations existed
(by `create_all`, issues 1-4) is recognised by its tables and adopted at the baseline.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from persona_pipeline.secrets import mask_url

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001_baseline"
# The tables of the baseline revision: how a store made before migrations is recognised.
BASELINE_TABLES = frozenset(
    {
        "index_updates",
        "index_update_rejects",
        "device_profiles",
        "key_weights",
        "persona_vectors",
        "persona_dimensions",
        "vector_index_state",
        "vector_index_clusters",
        "device_clusters",
        "segments",
        "anomaly_scores",
        "service_recommendations",
        "support_tickets",
        "offer_feedback",
        "offer_feedback_rejects",
        "key_weight_refreshes",
    }
)
# Any number, the same in every process: the key of the PostgreSQL advisory lock.
MIGRATION_LOCK_KEY = 7_301_964_211


class SchemaError(RuntimeError):
    """The persona store's schema is not one this version of the pipeline can use."""


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: sa.Engine) -> tuple[str | None, str]:
    """Bring the database to the newest revision; returns (revision before, revision after)."""
    try:
        return _upgrade(engine)
    except sa.exc.DBAPIError:
        # SQLite has no advisory lock: another process may have created the same tables
        # first. That is fine once the database is at the head.
        with engine.connect() as connection:
            if current_revision(connection) != head_revision():
                raise
        return head_revision(), head_revision()


def _upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    head = head_revision()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("select pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        before = current_revision(connection)
        if before == head:
            return before, head
        if before is None and _has_unversioned_tables(connection):
            command.stamp(alembic_config(connection), BASELINE)
            before = BASELINE
        known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        if before is not None and before not in known:
            where = mask_url(engine.url.render_as_string(hide_password=False))
            raise SchemaError(
                f"the persona store at {where} is at schema "
                f"revision {before}, which this version of persona_pipeline does not know (newer code "
                "wrote it?): upgrade persona_pipeline, or point PERSONA_DB_URL at another database"
            )
        command.upgrade(alembic_config(connection), "head")
    return before, head


def _has_unversioned_tables(connection: sa.Connection) -> bool:
    """True for a store made by create_all before migrations; refuses a partial one."""
    present = set(sa.inspect(connection).get_table_names()) & BASELINE_TABLES
    if not present:
        return False
    if present != BASELINE_TABLES:
        missing = ", ".join(sorted(BASELINE_TABLES - present))
        raise SchemaError(
            f"the persona store has some of its tables but not {missing} and no schema revision: "
            "it was not made by persona_pipeline, or a table was dropped by hand"
        )
    return True
