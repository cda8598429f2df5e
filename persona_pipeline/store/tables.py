"""Tables of the persona store. The columns docs/contracts.md names are a contract; others are extra."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# Text compared for ordering (tie-breaks in the profile merge) must sort the same on
# every backend: byte order, which is SQLite's default and PostgreSQL's "C" collation.
OrderedText = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
UtcDateTime = sa.DateTime(timezone=True)

# Accepted updates before revision 0010. Since, they live in the update history (Parquet,
# resources/update_history.py); PersonaStore.history moves an older store's rows there.
index_updates = sa.Table(
    "index_updates",
    metadata,
    sa.Column("partition_date", sa.String(10), nullable=False),
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("customer_id", sa.Text),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("value", OrderedText, nullable=False),
    sa.Column("value_number", sa.Float),
    sa.Column("observed_at", UtcDateTime, nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_row", sa.Integer),
    sa.Index("ix_index_updates_partition", "partition_date"),
)

index_update_rejects = sa.Table(
    "index_update_rejects",
    metadata,
    sa.Column("partition_date", sa.String(10), nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_row", sa.Integer),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("reason_code", sa.String(32), nullable=False),
    sa.Column("rejected_at", UtcDateTime, nullable=False),
    sa.Column("device_id", sa.Text),  # when the row could be parsed; lets an erasure find it
    # The ingest run's device shard and shard count (0 of 1 unsharded): a run replaces its own.
    sa.Column("device_shard", sa.Integer),
    sa.Column("device_shards", sa.Integer),
    sa.Index("ix_index_update_rejects_partition", "partition_date"),
)

device_profiles = sa.Table(
    "device_profiles",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("customer_id", OrderedText),
    sa.Column("value", OrderedText, nullable=False),
    sa.Column("value_number", sa.Float),
    sa.Column("observed_at", UtcDateTime, nullable=False),
    # device_shards.device_hash of device_id: a device shard's rows are found in SQL.
    sa.Column("device_hash", sa.BigInteger),
)

key_weights = sa.Table(
    "key_weights",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    # "accepted": live when it was written (the configured weights, or a candidate the gate let
    # through); "rejected": a candidate the gate refused. The live version is the newest accepted.
    sa.Column("status", sa.String(16), nullable=False, server_default="accepted"),
)

persona_vectors = sa.Table(
    "persona_vectors",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("customer_id", sa.Text),
    sa.Column("space", sa.String(64), nullable=False),
    sa.Column("weights_version", sa.Integer, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),
    sa.Column("fingerprint", sa.BigInteger, nullable=False),
    sa.Column("computed_at", UtcDateTime, nullable=False),
    sa.Column("device_hash", sa.BigInteger),
)

# Devices whose profile changed since persona_vectors last read them: device_profiles adds a
# row per device it merges, in the same transaction. persona_vectors (of the device's shard)
# recomputes those devices and deletes the rows it read, so a day's vectors cost follows the
# devices that changed, not the fleet. (Before revision 0012 a NULL device_id stood for every
# device; no writer adds one now.)
profile_changes = sa.Table(
    "profile_changes",
    metadata,
    # SQLite numbers only an INTEGER PRIMARY KEY itself.
    sa.Column("change_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("device_id", sa.Text),
    sa.Column("device_hash", sa.BigInteger),
)

# Each feature space's last persona_vectors run per device shard (shard 0 of 1 unsharded): the
# newest event time it computed at (time-relative dimensions, moved city within N days, change
# for devices that sent nothing, and the next run finds them from here) and the shard's devices
# with a vector after it. No row for a shard: its next run computes every device of it.
persona_vector_runs = sa.Table(
    "persona_vector_runs",
    metadata,
    sa.Column("space", sa.String(64), primary_key=True),
    sa.Column("device_shard", sa.Integer, primary_key=True),
    sa.Column("device_shards", sa.Integer, primary_key=True),
    sa.Column("as_of", UtcDateTime, nullable=False),
    sa.Column("computed_at", UtcDateTime, nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
)

persona_dimensions = sa.Table(
    "persona_dimensions",
    metadata,
    sa.Column("space", sa.String(64), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("weight_key", sa.Text, nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
)

# What each Qdrant collection holds, so a re-run writes only the devices that changed.
vector_index_state = sa.Table(
    "vector_index_state",
    metadata,
    sa.Column("collection", sa.String(128), primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.BigInteger, nullable=False),
    # Which write of persona_index put the point there (microseconds; NULL: before migration 0008).
    sa.Column("written", sa.BigInteger),
)

# The cluster_id each Qdrant point's payload holds (written by device_clusters alone), so it
# rewrites exactly the payloads that differ from the table, even after a run that failed
# half-way; `point_written` is the point's `written` (vector_index_state) when its payload was
# written: persona_index replaces a point whole, so a point written again since has no cluster_id.
vector_index_clusters = sa.Table(
    "vector_index_clusters",
    metadata,
    sa.Column("collection", sa.String(128), primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("cluster_id", sa.Integer),  # NULL: the point carries no segment yet
    sa.Column("point_written", sa.BigInteger),
)

device_clusters = sa.Table(
    "device_clusters",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("cluster_id", sa.Integer, nullable=False),  # -1: density noise, in no segment
    sa.Column("distance", sa.Float, nullable=False),  # to the segment's centre (noise: the nearest)
    sa.Column("space", sa.String(64), nullable=False),
    sa.Column("clustered_at", UtcDateTime, nullable=False),
    # The fit (segment_fits.fitted_at) whose segments the row holds (revision 0013): a row of
    # another fit is assigned again, whenever it was written.
    sa.Column("fitted_at", UtcDateTime),
    sa.Index("ix_device_clusters_cluster", "cluster_id"),
)

# Every segment id ever given out (ids are never reused), with its current profile.
segments = sa.Table(
    "segments",
    metadata,
    sa.Column("cluster_id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
    sa.Column("traits", sa.Text, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("first_seen_at", UtcDateTime, nullable=False),
    sa.Column("last_seen_at", UtcDateTime, nullable=False),
    # Why an inactive id was retired (the refit's reason; revision 0007), NULL while active.
    sa.Column("retired_reason", sa.Text),
)

# The centres of the last full clustering fit per feature space (float64 bytes), written by the
# segments asset: device_clusters assigns each device that is not one of the fit's members, or
# whose vector changed since, to the nearest one.
segment_centres = sa.Table(
    "segment_centres",
    metadata,
    sa.Column("space", sa.String(64), primary_key=True),
    sa.Column("cluster_id", sa.Integer, primary_key=True),
    sa.Column("centre", sa.LargeBinary, nullable=False),
    sa.Column("fitted_at", UtcDateTime, nullable=False),
    sa.Column("settings", sa.Text, nullable=False),  # the fit's clustering settings, as JSON
)

# The last full fit of each feature space (revision 0013; the segments asset writes it with its
# centres and members): what device_clusters applies, also when it found no segment at all.
segment_fits = sa.Table(
    "segment_fits",
    metadata,
    sa.Column("space", sa.String(64), primary_key=True),
    sa.Column("fitted_at", UtcDateTime, nullable=False),
    sa.Column("settings", sa.Text, nullable=False),  # the fit's clustering settings, as JSON
    sa.Column("devices", sa.Integer, nullable=False),  # segmented by the fit
)

# The devices the last full fit segmented, with the segment and distance it gave each (revision
# 0013): device_clusters gives a device whose vector the fit read that segment, and every other
# device its nearest centre. On a fleet larger than the fit's sample only the sample's devices.
segment_members = sa.Table(
    "segment_members",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("cluster_id", sa.Integer, nullable=False),
    sa.Column("distance", sa.Float, nullable=False),
    sa.Column("space", sa.String(64), nullable=False),
)

anomaly_scores = sa.Table(
    "anomaly_scores",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("score", sa.Float, nullable=False),  # [0, 1], higher is stranger
    sa.Column("is_anomaly", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),  # for flagged devices and the highest scores; else NULL
    sa.Column("cause", sa.Text),  # the key that deviates most (or segment_distance), with `reason`
    sa.Column("cluster_id", sa.Integer, nullable=False),  # the segment the device was compared with
    sa.Column("segment_z", sa.Float, nullable=False),
    sa.Column("detector", sa.String(16), nullable=False),
    sa.Column("detector_z", sa.Float, nullable=False),
    sa.Column("scored_at", UtcDateTime, nullable=False),
    # The role of the keys that drove a flag (health, behaviour, context, …); NULL when not flagged.
    sa.Column("kind", sa.String(16)),
    sa.Column("p_value", sa.Float),  # calibrated: the share of normal devices at least this strange
    sa.Index("ix_anomaly_scores_flag", "is_anomaly"),
)

# What anomaly_scores fitted at its last scoring of the whole fleet (pickled: the segment norms,
# the fitted detector, each role's reference evidence and the segments' typical values), so the
# days between segment fits score only the devices that changed (revision 0009). One row, signed
# with the deployment's key: an unsigned or foreign blob is never unpickled.
anomaly_norms = sa.Table(
    "anomaly_norms",
    metadata,
    sa.Column("space", sa.String(64), primary_key=True),
    sa.Column("segments_fitted_at", UtcDateTime, nullable=False),  # the segment fit they belong to
    sa.Column("settings", sa.Text, nullable=False),  # anomaly_scores' config, as JSON
    sa.Column("fitted_at", UtcDateTime, nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),  # the libraries that pickled them, as JSON
    sa.Column("signature", sa.String(64), nullable=False),  # HMAC-SHA256 of `norms`, hex
    sa.Column("norms", sa.LargeBinary, nullable=False),
)

service_recommendations = sa.Table(
    "service_recommendations",
    metadata,
    sa.Column("offer_id", sa.String(64), primary_key=True),  # hash of (device, service, offer_day)
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("service_id", sa.Text, nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("offer_day", sa.String(10), nullable=False),  # event-time day the offer belongs to
    sa.Column("priority", sa.Float, nullable=False),
    sa.Column("cluster_id", sa.Integer),  # the device's segment when offered
    sa.Column("weights_version", sa.Integer),  # the key_weights version behind its vector
    sa.Column("space", sa.String(64)),  # the feature space of `persona_vector`
    sa.Column("persona_vector", sa.LargeBinary),  # the device's vector when offered (for learning)
    sa.Column("propensity", sa.Float),  # the probability with which the offer was chosen
    # A candidate's last offer day is read from the index alone (revision 0014).
    sa.Index("ix_service_recommendations_contact", "device_id", "service_id", "offer_day"),
    sa.Index("ix_service_recommendations_day", "offer_day"),
)

# An outbox: the support system reads new rows; one open ticket per device and fault.
support_tickets = sa.Table(
    "support_tickets",
    metadata,
    sa.Column("ticket_id", sa.String(64), primary_key=True),  # hash of (device, first cause, opening day)
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("severity", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("cause", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # open | resolved
    sa.Column("updated_at", UtcDateTime),
    sa.Column("resolved_at", UtcDateTime),
    sa.Column("last_seen_day", sa.String(10)),  # the last day the fault was seen
    sa.Index("ix_support_tickets_status", "status"),
)

offer_feedback = sa.Table(
    "offer_feedback",
    metadata,
    sa.Column("batch_id", sa.Text, primary_key=True),
    sa.Column("offer_id", sa.String(64), primary_key=True),
    sa.Column("response", sa.String(16), primary_key=True),
    sa.Column("responded_at", UtcDateTime, nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_row", sa.Integer),
    # One id per write of the batch's rows (NULL: written before revision 0005); key_weights
    # learns again from a batch whose rows were written again since it last learned.
    sa.Column("load_id", sa.String(32)),
)

offer_feedback_rejects = sa.Table(
    "offer_feedback_rejects",
    metadata,
    sa.Column("batch_id", sa.Text, nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_row", sa.Integer),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("reason_code", sa.String(32), nullable=False),
    sa.Column("rejected_at", UtcDateTime, nullable=False),
    sa.Index("ix_offer_feedback_rejects_batch", "batch_id"),
)

# Responses to offers not made yet (or not yet in the store): retried by every offer_feedback
# run until the offer exists (they become responses of their batch) or `hold_until` passes
# (they become rejects of their batch, reason code unknown_offer). The fields are the text read.
offer_feedback_held = sa.Table(
    "offer_feedback_held",
    metadata,
    sa.Column("batch_id", sa.Text, nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_row", sa.Integer),
    sa.Column("offer_id", sa.Text),
    sa.Column("response", sa.Text),
    sa.Column("responded_at", sa.Text),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("first_seen_at", UtcDateTime, nullable=False),
    sa.Column("hold_until", UtcDateTime, nullable=False),
    sa.Index("ix_offer_feedback_held_batch", "batch_id"),
)

# One row per key_weights refresh that had feedback to learn from, whether or not it changed
# the weights: the version in use after it, the batches and the writes of their rows it learned.
key_weight_refreshes = sa.Table(
    "key_weight_refreshes",
    metadata,
    sa.Column("refresh_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("batches", sa.Text, nullable=False),  # JSON list of batch ids
    sa.Column("loads", sa.Text),  # JSON list of offer_feedback.load_id (NULL before revision 0005)
    sa.Column("responses", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    # The gate (revision 0007): the candidate version the refresh made (NULL: none, nothing
    # changed), "accepted" or "rejected", why, and the evidence as JSON.
    sa.Column("candidate_version", sa.Integer),
    sa.Column("decision", sa.String(16)),
    sa.Column("reason", sa.Text),
    sa.Column("evidence", sa.Text),
)

# Data erasure (right to be forgotten): one audit row per request, counts only, no ids.
erasure_requests = sa.Table(
    "erasure_requests",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("requested_by", sa.Text, nullable=False),
    sa.Column("requested_at", UtcDateTime, nullable=False),
    sa.Column("completed_at", UtcDateTime),
    sa.Column("device_ids_requested", sa.Integer, nullable=False),
    sa.Column("customer_ids_requested", sa.Integer, nullable=False),
    sa.Column("devices_erased", sa.Integer, nullable=False),
    sa.Column("rows_deleted", sa.Integer, nullable=False),
    sa.Column("points_deleted", sa.Integer, nullable=False),
    sa.Column("rows_by_table", sa.Text, nullable=False),  # JSON {table: rows deleted}
)

# Subjects that must never come back: SHA-256 of the id, never the id itself. Ingest drops
# rows whose device or customer is listed here.
suppressed_subjects = sa.Table(
    "suppressed_subjects",
    metadata,
    sa.Column("subject_kind", sa.String(16), primary_key=True),  # device | customer
    sa.Column("subject_hash", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(32), nullable=False),
    sa.Column("suppressed_at", UtcDateTime, nullable=False),
)
