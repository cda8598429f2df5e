"""One writer for the `cluster_id` payload: device_clusters. persona_index records which write
put each point in the collection (`vector_index_state.written`), and vector_index_clusters the
write whose point got the payload (`point_written`), so device_clusters finds the points
persona_index wrote again since (a point is replaced whole: its payload lost the cluster_id).
Rows from before this revision have neither mark, which compare equal: their payloads, written
with the point before, stay until persona_index writes the point again.

Revision ID: 0008_one_payload_writer
Revises: 0007_weights_gate
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_one_payload_writer"
down_revision = "0007_weights_gate"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vector_index_state", sa.Column("written", sa.BigInteger(), nullable=True))
    op.add_column("vector_index_clusters", sa.Column("point_written", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("vector_index_clusters", "point_written")
    op.drop_column("vector_index_state", "written")
