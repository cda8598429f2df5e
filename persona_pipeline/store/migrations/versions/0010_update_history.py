"""The update history: accepted updates live as Parquet files beside the persona store
(docs/contracts.md), no longer in `index_updates`. The table stays, so older stores upgrade
without a data migration here: the first process that opens the history moves the rows a store
still holds to it, a day at a time, and empties the table (PersonaStore.history). The index by
(key, device_id, observed_at) served reads that now go to the files: it goes.

Revision ID: 0010_update_history
Revises: 0009_anomaly_norms
"""

from __future__ import annotations

from alembic import op

revision = "0010_update_history"
down_revision = "0009_anomaly_norms"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_index_updates_key_device_time", table_name="index_updates")


def downgrade() -> None:
    op.create_index(
        "ix_index_updates_key_device_time", "index_updates", ["key", "device_id", "observed_at"], unique=False
    )
