"""Feedback bookkeeping: a refresh of the key weights that changes nothing is recorded too (the
refreshes get their own id instead of the weights version as key), each write of a batch's
responses has a load id the refreshes remember, and responses to offers not made yet are held.

Revision ID: 0005_feedback_bookkeeping
Revises: 0004_segment_centres
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_feedback_bookkeeping"
down_revision = "0004_segment_centres"
branch_labels = None
depends_on = None

REFRESHES = "key_weight_refreshes"
REBUILT = "key_weight_refreshes_rebuilt"


def upgrade() -> None:
    op.add_column("offer_feedback", sa.Column("load_id", sa.String(length=32), nullable=True))
    op.create_table(
        "offer_feedback_held",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("source_file", sa.Text(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=True),
        sa.Column("offer_id", sa.Text(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("responded_at", sa.Text(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hold_until", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_offer_feedback_held_batch", "offer_feedback_held", ["batch_id"])
    # The primary key moves from `version` to a new `refresh_id`: the table is rebuilt, its rows
    # copied in the order they were made (the new ids number them, on PostgreSQL by its sequence).
    op.create_table(
        REBUILT,
        sa.Column(
            "refresh_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("batches", sa.Text(), nullable=False),
        sa.Column("loads", sa.Text(), nullable=True),
        sa.Column("responses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("refresh_id"),
    )
    op.execute(
        f"insert into {REBUILT} (version, batches, responses, created_at) "
        f"select version, batches, responses, created_at from {REFRESHES} order by version"
    )
    op.drop_table(REFRESHES)
    op.rename_table(REBUILT, REFRESHES)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"alter index {REBUILT}_pkey rename to {REFRESHES}_pkey")
        op.execute(f"alter sequence {REBUILT}_refresh_id_seq rename to {REFRESHES}_refresh_id_seq")


def downgrade() -> None:
    # Back to one row per weights version: the last refresh that left each version in use.
    op.create_table(
        REBUILT,
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("batches", sa.Text(), nullable=False),
        sa.Column("responses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.execute(
        f"insert into {REBUILT} (version, batches, responses, created_at) "
        f"select version, batches, responses, created_at from {REFRESHES} where refresh_id in "
        f"(select max(refresh_id) from {REFRESHES} group by version)"
    )
    op.drop_table(REFRESHES)
    op.rename_table(REBUILT, REFRESHES)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"alter index {REBUILT}_pkey rename to {REFRESHES}_pkey")
    op.drop_index("ix_offer_feedback_held_batch", table_name="offer_feedback_held")
    op.drop_table("offer_feedback_held")
    op.drop_column("offer_feedback", "load_id")
