"""Baseline: the persona store as issues 1-4 left it (until then made by create_all).

Revision ID: 0001_baseline
Revises: None
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "anomaly_scores",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("is_anomaly", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("cause", sa.Text(), nullable=True),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("segment_z", sa.Float(), nullable=False),
        sa.Column("detector", sa.String(length=16), nullable=False),
        sa.Column("detector_z", sa.Float(), nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index("ix_anomaly_scores_flag", "anomaly_scores", ["is_anomaly"], unique=False)
    op.create_table(
        "device_clusters",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=False),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("clustered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index("ix_device_clusters_cluster", "device_clusters", ["cluster_id"], unique=False)
    op.create_table(
        "device_profiles",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text().with_variant(sa.Text(collation="C"), "postgresql"), nullable=True),
        sa.Column("value", sa.Text().with_variant(sa.Text(collation="C"), "postgresql"), nullable=False),
        sa.Column("value_number", sa.Float(), nullable=True),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "key"),
    )
    op.create_table(
        "index_update_rejects",
        sa.Column("partition_date", sa.String(length=10), nullable=False),
        sa.Column("source_file", sa.Text(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("reason_code", sa.String(length=32), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_index_update_rejects_partition", "index_update_rejects", ["partition_date"], unique=False
    )
    op.create_table(
        "index_updates",
        sa.Column("partition_date", sa.String(length=10), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=True),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.Text().with_variant(sa.Text(collation="C"), "postgresql"), nullable=False),
        sa.Column("value_number", sa.Float(), nullable=True),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_file", sa.Text(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=True),
    )
    op.create_index(
        "ix_index_updates_key_device_time", "index_updates", ["key", "device_id", "observed_at"], unique=False
    )
    op.create_index("ix_index_updates_partition", "index_updates", ["partition_date"], unique=False)
    op.create_table(
        "key_weight_refreshes",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("batches", sa.Text(), nullable=False),
        sa.Column("responses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_table(
        "key_weights",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("version", "key"),
    )
    op.create_table(
        "offer_feedback",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("offer_id", sa.String(length=64), nullable=False),
        sa.Column("response", sa.String(length=16), nullable=False),
        sa.Column("responded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_file", sa.Text(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", "offer_id", "response"),
    )
    op.create_table(
        "offer_feedback_rejects",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("source_file", sa.Text(), nullable=False),
        sa.Column("source_row", sa.Integer(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("reason_code", sa.String(length=32), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_offer_feedback_rejects_batch", "offer_feedback_rejects", ["batch_id"], unique=False)
    op.create_table(
        "persona_dimensions",
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("weight_key", sa.Text(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("space", "position"),
    )
    op.create_table(
        "persona_vectors",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=True),
        sa.Column("space", sa.String(length=64), nullable=False),
        sa.Column("weights_version", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("fingerprint", sa.BigInteger(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "segments",
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("traits", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("cluster_id"),
    )
    op.create_table(
        "service_recommendations",
        sa.Column("offer_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("service_id", sa.Text(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("offer_day", sa.String(length=10), nullable=False),
        sa.Column("priority", sa.Float(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=True),
        sa.Column("weights_version", sa.Integer(), nullable=True),
        sa.Column("space", sa.String(length=64), nullable=True),
        sa.Column("persona_vector", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("offer_id"),
    )
    op.create_index("ix_service_recommendations_day", "service_recommendations", ["offer_day"], unique=False)
    op.create_index(
        "ix_service_recommendations_device",
        "service_recommendations",
        ["device_id", "service_id"],
        unique=False,
    )
    op.create_table(
        "support_tickets",
        sa.Column("ticket_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("severity", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("ticket_id"),
    )
    op.create_table(
        "vector_index_clusters",
        sa.Column("collection", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("collection", "device_id"),
    )
    op.create_table(
        "vector_index_state",
        sa.Column("collection", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("collection", "device_id"),
    )


def downgrade() -> None:
    op.drop_table("vector_index_state")
    op.drop_table("vector_index_clusters")
    op.drop_table("support_tickets")
    op.drop_index("ix_service_recommendations_device", table_name="service_recommendations")
    op.drop_index("ix_service_recommendations_day", table_name="service_recommendations")
    op.drop_table("service_recommendations")
    op.drop_table("segments")
    op.drop_table("persona_vectors")
    op.drop_table("persona_dimensions")
    op.drop_index("ix_offer_feedback_rejects_batch", table_name="offer_feedback_rejects")
    op.drop_table("offer_feedback_rejects")
    op.drop_table("offer_feedback")
    op.drop_table("key_weights")
    op.drop_table("key_weight_refreshes")
    op.drop_index("ix_index_updates_partition", table_name="index_updates")
    op.drop_index("ix_index_updates_key_device_time", table_name="index_updates")
    op.drop_table("index_updates")
    op.drop_index("ix_index_update_rejects_partition", table_name="index_update_rejects")
    op.drop_table("index_update_rejects")
    op.drop_table("device_profiles")
    op.drop_index("ix_device_clusters_cluster", table_name="device_clusters")
    op.drop_table("device_clusters")
    op.drop_index("ix_anomaly_scores_flag", table_name="anomaly_scores")
    op.drop_table("anomaly_scores")
