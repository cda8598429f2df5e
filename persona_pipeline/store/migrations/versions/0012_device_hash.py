"""Device shards beyond ingest: `device_profiles`, `profile_changes` and `persona_vectors` keep
each row's `device_hash` (device_shards.device_hash of its device_id), so a run of one device shard
reads its own rows in SQL; `persona_vector_runs` keeps a run per feature space and device shard
(an existing row becomes shard 0 of 1, the unsharded run). The every-device mark of
`profile_changes` (a NULL device_id, written by an erasure) gives way to deleting the vector runs,
which makes every shard's next run compute all its devices: a pending mark is converted so.

Revision ID: 0012_device_hash
Revises: 0011_device_shards
"""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa
from alembic import op

from persona_pipeline.device_shards import device_hash

revision = "0012_device_hash"
down_revision = "0011_device_shards"
branch_labels = None
depends_on = None

HASHED = ("device_profiles", "profile_changes", "persona_vectors")


def upgrade() -> None:
    for name in HASHED:
        op.add_column(name, sa.Column("device_hash", sa.BigInteger(), nullable=True))
    connection = op.get_bind()
    _fill_device_hashes(connection)

    op.create_table(
        "persona_vector_runs_sharded",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("device_shard", sa.Integer(), nullable=False),
        sa.Column("device_shards", sa.Integer(), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("space", "device_shard", "device_shards"),
    )
    every_device = connection.execute(
        sa.text("SELECT count(*) FROM profile_changes WHERE device_id IS NULL")
    ).scalar()
    if not every_device:
        op.execute(
            "INSERT INTO persona_vector_runs_sharded "
            "(space, device_shard, device_shards, as_of, computed_at, devices) "
            "SELECT space, 0, 1, as_of, computed_at, devices FROM persona_vector_runs"
        )
    op.execute("DELETE FROM profile_changes WHERE device_id IS NULL")
    op.drop_table("persona_vector_runs")
    op.rename_table("persona_vector_runs_sharded", "persona_vector_runs")


def _fill_device_hashes(connection: sa.Connection) -> None:
    """Every existing row's device_hash, through a table of each device's hash and one UPDATE
    per table."""
    queries = [f"SELECT DISTINCT device_id FROM {name} WHERE device_id IS NOT NULL" for name in HASHED]
    ids = pd.concat([pd.read_sql(sa.text(query), connection) for query in queries], ignore_index=True)[
        "device_id"
    ].drop_duplicates()
    if ids.empty:
        return
    fill = op.create_table(
        "device_hash_fill",
        sa.Column("device_id", sa.Text(), primary_key=True),
        sa.Column("device_hash", sa.BigInteger(), nullable=False),
    )
    frame = pd.DataFrame({"device_id": ids.to_numpy(dtype=object), "device_hash": device_hash(ids)})
    connection.execute(fill.insert(), frame.to_dict("records"))
    for name in HASHED:
        op.execute(
            f"UPDATE {name} SET device_hash = (SELECT f.device_hash FROM device_hash_fill f "
            f"WHERE f.device_id = {name}.device_id) WHERE device_id IS NOT NULL"
        )
    op.drop_table("device_hash_fill")


def downgrade() -> None:
    op.create_table(
        "persona_vector_runs_unsharded",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("space"),
    )
    # Only the unsharded runs carry over; a sharded store's next run computes every device.
    op.execute(
        "INSERT INTO persona_vector_runs_unsharded (space, as_of, computed_at, devices) "
        "SELECT space, as_of, computed_at, devices FROM persona_vector_runs "
        "WHERE device_shard = 0 AND device_shards = 1"
    )
    op.drop_table("persona_vector_runs")
    op.rename_table("persona_vector_runs_unsharded", "persona_vector_runs")
    for name in reversed(HASHED):
        op.drop_column(name, "device_hash")
