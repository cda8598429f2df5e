"""The persona store's schema is made and upgraded by migrations, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from persona_pipeline.device_shards import DeviceShard, device_hash
from persona_pipeline.store import tables
from persona_pipeline.store.schema import (
    BASELINE,
    BASELINE_TABLES,
    SchemaError,
    alembic_config,
    current_revision,
    head_revision,
    upgrade_to_head,
)
from persona_pipeline_tests.conftest import fresh_postgres_url

pytestmark = pytest.mark.store_agnostic


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'schema.db'}"
    else:
        url = fresh_postgres_url(f"schema-{request.node.name}-{tmp_path}")
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


def test_a_new_store_is_at_head_and_matches_the_table_definitions(engine):
    before, after = upgrade_to_head(engine)
    assert (before, after) == (None, head_revision())
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        drift = compare_metadata(context, tables.metadata)
    assert drift == []  # a change to tables.py without a migration shows up here
    assert upgrade_to_head(engine) == (head_revision(), head_revision())


def test_an_upgrade_keeps_the_rows_of_the_previous_revision(engine):
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
        connection.execute(
            sa.text(
                "insert into index_update_rejects (partition_date, source_file, source_row, raw, "
                "reason, reason_code, rejected_at) values ('2026-03-01', 'a.jsonl', 3, '{}', "
                "'no device_id', 'missing', '2026-03-01 10:00:00+00:00')"
            )
        )
        connection.execute(
            sa.text(
                "insert into key_weights values "
                "(1, 'device.model', 0.2, '2026-03-01 10:00:00+00:00', 'config')"
            )
        )
    assert upgrade_to_head(engine) == (BASELINE, head_revision())
    with engine.connect() as connection:
        rejects = pd.DataFrame(connection.execute(sa.text("select * from index_update_rejects")).mappings())
        weights = connection.execute(sa.text("select weight from key_weights")).scalar()
        audit = connection.execute(sa.text("select count(*) from erasure_requests")).scalar()
    kept = rejects[["source_file", "source_row", "reason"]].to_numpy().tolist()
    assert kept == [["a.jsonl", 3, "no device_id"]]
    assert rejects["device_id"].isna().all()
    assert weights == 0.2 and audit == 0


def test_every_migration_downgrades_to_nothing_and_upgrades_again(engine):
    upgrade_to_head(engine)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade_to_head(engine)
    assert set(tables.metadata.tables) <= set(sa.inspect(engine).get_table_names())


def test_a_store_made_before_migrations_is_adopted_at_the_baseline(engine):
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
        connection.execute(sa.text("drop table alembic_version"))
        connection.execute(
            sa.text("insert into segments values (4, 'Berlin', 10, '', true, '2026-03-01', '2026-03-02')")
        )
    assert upgrade_to_head(engine) == (BASELINE, head_revision())
    with engine.connect() as connection:
        assert connection.execute(sa.text("select name from segments")).scalar() == "Berlin"


def test_a_partial_or_newer_store_is_refused_with_the_reason(engine):
    with engine.begin() as connection:
        connection.execute(sa.text("create table device_profiles (device_id text)"))
    with pytest.raises(SchemaError, match=r"not .*index_updates.* and no schema revision"):
        upgrade_to_head(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("drop table device_profiles"))
        command.upgrade(alembic_config(connection), "head")
        connection.execute(sa.text("update alembic_version set version_num = '0099_from_the_future'"))
    with pytest.raises(SchemaError, match=r"0099_from_the_future.*does not know"):
        upgrade_to_head(engine)


def test_the_baseline_makes_exactly_the_tables_that_recognise_an_old_store():
    engine = sa.create_engine("sqlite://")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
        assert set(sa.inspect(connection).get_table_names()) - {"alembic_version"} == BASELINE_TABLES


def test_the_refreshes_of_an_older_store_are_kept_and_a_version_can_be_refreshed_again(engine):
    """0005: the weights refreshes get their own key, so a refresh that keeps the version in use
    is recorded as often as it happens; the rows of before keep their order and their content."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0004_segment_centres")
        for version, batch in ((2, "b1"), (3, "b2")):
            connection.execute(
                sa.text(
                    "insert into key_weight_refreshes values "
                    f"({version}, '[\"{batch}\"]', 40, '2026-03-0{version} 10:00:00+00:00')"
                )
            )
    upgrade_to_head(engine)
    with engine.begin() as connection:
        for _ in range(2):
            connection.execute(
                tables.key_weight_refreshes.insert().values(
                    version=3,
                    batches='["b3"]',
                    loads='["x"]',
                    responses=5,
                    created_at=pd.Timestamp.now(tz="UTC"),
                )
            )
        rows = connection.execute(
            sa.select(tables.key_weight_refreshes).order_by(tables.key_weight_refreshes.c.refresh_id)
        ).all()
    assert [(row.refresh_id, row.version, row.batches, row.loads) for row in rows] == [
        (1, 2, '["b1"]', None),
        (2, 3, '["b2"]', None),
        (3, 3, '["b3"]', '["x"]'),
        (4, 3, '["b3"]', '["x"]'),
    ]


@pytest.mark.parametrize("pending_erasure", [False, True])
def test_an_upgrade_gives_every_device_row_its_hash_and_keeps_the_vector_run_as_the_unsharded_one(
    engine, pending_erasure
):
    """0012: the rows of device_profiles, profile_changes and persona_vectors get device_hash, the
    hash a shard is found by; the last vector run becomes shard 0 of 1, unless an erasure's
    every-device mark was pending: then no run stays, so every shard's next run computes all."""
    devices = ["d1", "d2", "café-3"]
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0011_device_shards")
        for device in devices:
            connection.execute(
                sa.text(
                    "insert into device_profiles (device_id, key, value, observed_at) values "
                    f"('{device}', 'device.model', 'X', '2026-03-01 10:00:00+00:00')"
                )
            )
            connection.execute(
                sa.text(
                    "insert into persona_vectors (device_id, space, weights_version, vector, fingerprint, "
                    f"computed_at) values ('{device}', 's-w1', 1, :blob, 7, '2026-03-01 11:00:00+00:00')"
                ),
                {"blob": b"\x00" * 8},
            )
        # 0003 left the mark, so the first vectors run computes every device; a run took it.
        connection.execute(sa.text("delete from profile_changes"))
        connection.execute(sa.text("insert into profile_changes (device_id) values ('d2')"))
        if pending_erasure:
            connection.execute(sa.text("insert into profile_changes (device_id) values (null)"))
        connection.execute(
            sa.text(
                "insert into persona_vector_runs values "
                "('s-w1', '2026-03-01 10:00:00+00:00', '2026-03-01 11:00:00+00:00', 3)"
            )
        )
    upgrade_to_head(engine)
    expected = dict(zip(devices, device_hash(pd.Series(devices)).tolist(), strict=True))
    with engine.connect() as connection:
        for name in ("device_profiles", "persona_vectors"):
            rows = dict(connection.execute(sa.text(f"select device_id, device_hash from {name}")).all())
            assert rows == expected, name
        changes = connection.execute(sa.text("select device_id, device_hash from profile_changes")).all()
        runs = connection.execute(
            sa.text("select space, device_shard, device_shards, devices from persona_vector_runs")
        ).all()
    assert [tuple(row) for row in changes] == [("d2", expected["d2"])]  # the mark is gone
    assert [tuple(row) for row in runs] == ([] if pending_erasure else [("s-w1", 0, 1, 3)])


def test_a_shard_is_found_in_sql_as_in_python(engine):
    """DeviceShard.holds_hash, the SQL form of a shard (signed int64 hashes, SQL's % keeping the
    dividend's sign), picks the devices DeviceShard.holds picks, on either backend."""
    upgrade_to_head(engine)
    ids = pd.Series([f"device-{i}" for i in range(400)] + ["", "café", "ü" * 40])
    hashes = device_hash(ids)
    assert (hashes < 0).any() and (hashes >= 0).any()
    with engine.begin() as connection:
        connection.execute(
            tables.profile_changes.insert(),
            [{"device_id": d, "device_hash": int(h)} for d, h in zip(ids, hashes, strict=True)],
        )
    for count in (1, 3, 7, 16, 1024):
        for index in sorted({0, 1 % count, count - 1}):
            shard = DeviceShard(index, count)
            query = sa.select(tables.profile_changes.c.device_id).where(
                shard.holds_hash(tables.profile_changes.c.device_hash)
            )
            with engine.connect() as connection:
                found = sorted(connection.execute(query).scalars())
            assert found == sorted(ids[shard.holds(ids)]), (index, count)


def test_an_upgrade_marks_the_segments_of_a_store_from_before_as_of_its_last_fit(engine):
    """0013: the last fit of each space becomes a segment_fits row and the devices' segments belong
    to it (the single step wrote both at once), so the next assignment reads no device of it."""
    from persona_pipeline.resources import PersonaStore
    from persona_pipeline.segments import storage as segment_storage

    fitted = pd.Timestamp("2026-03-01T12:00:00.123456Z").to_pydatetime()
    later = pd.Timestamp("2026-03-02T08:00:00Z").to_pydatetime()
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0012_device_hash")
        for cluster_id in (1, 2):
            connection.execute(
                sa.insert(tables.segment_centres).values(
                    space="s-w1", cluster_id=cluster_id, centre=b"\x00" * 8, fitted_at=fitted, settings="{}"
                )
            )
        for device, space, clustered_at in (
            ("d1", "s-w1", fitted),
            ("d2", "s-w1", later),
            ("d3", "old", fitted),
        ):
            connection.execute(
                sa.insert(tables.device_clusters).values(
                    device_id=device, cluster_id=1, distance=0.5, space=space, clustered_at=clustered_at
                )
            )
            connection.execute(
                sa.insert(tables.persona_vectors).values(
                    device_id=device,
                    space="s-w1",
                    weights_version=1,
                    vector=b"\x00" * 8,
                    fingerprint=7,
                    computed_at=pd.Timestamp("2026-03-01T11:00:00Z").to_pydatetime(),
                    device_hash=int(device_hash(pd.Series([device]))[0]),
                )
            )
    upgrade_to_head(engine)
    store = PersonaStore(url=engine.url.render_as_string(hide_password=False))
    fit = segment_storage.read_fit(store, "s-w1", 1)
    assert fit is not None and fit.fitted_at == pd.Timestamp(fitted) and fit.settings == "{}"
    assert fit.cluster_ids.tolist() == [1, 2]
    # d1 and d2 hold the last fit's segments; d3's row is of another space.
    assert segment_storage.count_not_current(store, None, "s-w1", fit.fitted_at) == 1
