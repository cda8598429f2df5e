"""Shared fixtures: every test gets its own PERSONA_HOME with real stores.

The persona store is SQLite in the home by default; `pytest --store postgresql` runs the same
tests with a fresh PostgreSQL database per home (PERSONA_TEST_PG_URL, default the loopback
server's `test` database, is where databases are created and dropped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.fs as pafs
import pytest
import sqlalchemy as sa

from persona_pipeline.app.evaluate import DemoEvaluation, evaluate_demo_fleet
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore, VectorIndex

ENV_VARIABLES = (
    "PERSONA_HOME",
    "PERSONA_DB_URL",
    "PERSONA_HISTORY_DIR",
    "PERSONA_HISTORY_SHARDS",
    "PERSONA_LANDING_DIR",
    "PERSONA_CONFIG_DIR",
    "PERSONA_SOURCE_DB_URL",
    "QDRANT_URL",
    "QDRANT_API_KEY",
    "PERSONA_QDRANT_ENGINE",
    "DAGSTER_HOME",
    "PERSONA_EXECUTOR",
)


ADMIN_URL = os.environ.get("PERSONA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# CI sets this: a service that does not answer fails the run instead of skipping tests.
REQUIRE_SERVICES = os.environ.get("PERSONA_REQUIRE_SERVICES") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only(reason): the test is about the embedded SQLite store")
    config.addinivalue_line(
        "markers",
        "store_agnostic: the same whatever --store says (no persona store, or both backends "
        "parametrized inside); only the SQLite run collects it",
    )
    global STORE_BACKEND
    STORE_BACKEND = config.getoption("--store")


def pytest_report_header(config: pytest.Config) -> str:
    return f"persona store: {STORE_BACKEND}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if STORE_BACKEND != "postgresql":
        return
    pure = [item for item in items if item.get_closest_marker("store_agnostic")]
    if pure:
        config.hook.pytest_deselected(items=pure)
        items[:] = [item for item in items if not item.get_closest_marker("store_agnostic")]
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {marker.kwargs.get('reason', '')}"))


STORE_BACKEND = "sqlite"
_created_databases: set[str] = set()


def postgres_admin_engine() -> sa.Engine:
    """An AUTOCOMMIT engine on the loopback server; skips (fails in CI) when none answers."""
    engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        message = f"no PostgreSQL answers at {sa.make_url(ADMIN_URL).render_as_string()}: {exc.orig}"
        if REQUIRE_SERVICES:
            pytest.fail(message + " (PERSONA_REQUIRE_SERVICES=1: not skipping)")
        pytest.skip(message)
    return engine


def fresh_postgres_url(label: str) -> str:
    """A new, empty database on the test server; dropped at the end of the session."""
    name = "persona_t_" + hashlib.sha1(label.encode()).hexdigest()[:16]
    engine = postgres_admin_engine()
    with engine.connect() as connection:
        connection.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        connection.execute(sa.text(f'create database "{name}"'))
    engine.dispose()
    _created_databases.add(name)
    return sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def store_url(home: Path) -> str:
    """The persona store of a test home on the backend under test (created on first use)."""
    if STORE_BACKEND == "sqlite":
        return f"sqlite:///{home / 'persona.db'}"
    if str(home) not in _store_urls:
        _store_urls[str(home)] = fresh_postgres_url(str(home))
    return _store_urls[str(home)]


_store_urls: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    yield
    if not _created_databases:
        return
    from persona_pipeline.resources.persona_store import _engine

    _engine.cache_clear()
    engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for name in sorted(_created_databases):
            connection.execute(sa.text(f'drop database if exists "{name}" with (force)'))
    engine.dispose()


@pytest.fixture
def persona_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("PERSONA_HOME", str(home))
    if STORE_BACKEND != "sqlite":
        monkeypatch.setenv("PERSONA_DB_URL", store_url(home))
    return home


@pytest.fixture
def landing(persona_home: Path) -> Path:
    return persona_home / "landing"


# Engines of the embedded vector index. Tests about the index run on both by parametrizing
# `embedded_engine` (e.g. `pytestmark = pytest.mark.parametrize("embedded_engine", ENGINES)`).
ENGINES = ("edge", "local")


def resources_for(home: Path, engine: str = "edge") -> dict[str, dg.ConfigurableResource]:
    """The real embedded stores under `home`."""
    return {
        "persona_store": PersonaStore(url=store_url(home), history_dir=str(home / "history")),
        "vector_index": VectorIndex(path=str(home / "qdrant"), embedded_engine=engine),
        "landing_zone": LandingZone(path=str(home / "landing")),
        "persona_config": PersonaConfig(),
    }


@pytest.fixture
def embedded_engine() -> str:
    """The embedded vector index's engine: the default, unless a test parametrizes it."""
    return "edge"


@pytest.fixture
def resources(persona_home: Path, embedded_engine: str) -> dict[str, dg.ConfigurableResource]:
    return resources_for(persona_home, embedded_engine)


def evaluated_fleet(home: Path, devices: int, days: int, seed: int) -> Iterator[DemoEvaluation]:
    """A generated fleet run through every asset in its own home (environment restored after)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ENV_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("PERSONA_HOME", str(home))
        db_url = None if STORE_BACKEND == "sqlite" else store_url(home)
        yield evaluate_demo_fleet(devices=devices, days=days, seed=seed, home=home, db_url=db_url)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def update(device: str, key: str, value, at: str, customer: str | None = None) -> dict:
    row = {"device_id": device, "key": key, "value": value, "observed_at": at}
    if customer is not None:
        row["customer_id"] = customer
    return row


def write_jsonl(landing: Path, day: str, rows: list[dict], name: str = "part-0.jsonl") -> Path:
    folder = landing / "index_updates" / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_file(landing: Path, day: str, name: str, content: bytes | str) -> Path:
    folder = landing / "index_updates" / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def table(store: PersonaStore, name: str, order_by: list[str] | None = None) -> pd.DataFrame:
    import sqlalchemy as sa

    from persona_pipeline.store.tables import metadata

    frame = store.read_frame(sa.select(metadata.tables[name]))
    if order_by:
        frame = frame.sort_values(order_by).reset_index(drop=True)
    return frame


def accepted_updates(store: PersonaStore) -> pd.DataFrame:
    """Every row of the update history (the accepted updates) beside `store`."""
    return store.history.read()


@pytest.fixture
def postgres_database() -> Callable[[str], str]:
    """Makes fresh databases on the loopback PostgreSQL, which trusts any password (dropped at
    the end of the session): `create(password)` returns the URL with that password in it.
    Skips where no server answers, fails instead in CI."""
    postgres_admin_engine().dispose()

    def create(password: str = "") -> str:
        url = sa.make_url(fresh_postgres_url(f"database-{uuid.uuid4()}"))
        return url.set(password=password or None).render_as_string(hide_password=False)

    return create


@dataclass(frozen=True)
class ObjectStore:
    """A bucket of its own on the S3-compatible server the tests start on loopback; the test's
    environment points AWS's variables at the server, so pyarrow and child processes reach it."""

    bucket: str
    endpoint: str
    filesystem: pafs.S3FileSystem

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def upload(self, folder: Path, prefix: str) -> None:
        """Every file under `folder`, to `prefix` with the same relative names."""
        pafs.copy_files(str(folder), f"{self.bucket}/{prefix}", destination_filesystem=self.filesystem)

    def names(self, prefix: str) -> list[str]:
        """The objects under `prefix`, relative to it."""
        selector = pafs.FileSelector(f"{self.bucket}/{prefix}", allow_not_found=True, recursive=True)
        root = f"{self.bucket}/{prefix}/"
        return sorted(
            info.path.removeprefix(root)
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File
        )


OBJECT_STORE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "persona-test",
    "AWS_SECRET_ACCESS_KEY": "persona-test-secret",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto's) on a free loopback port: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def object_store(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    for name, value in {
        **OBJECT_STORE_CREDENTIALS,
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    filesystem = pafs.S3FileSystem(
        access_key=OBJECT_STORE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=OBJECT_STORE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=s3_server,
        region="us-east-1",
        allow_bucket_creation=True,
    )
    bucket = f"persona-{uuid.uuid4().hex[:12]}"
    filesystem.create_dir(bucket)
    return ObjectStore(bucket, s3_server, filesystem)


def check_named(result, name: str):
    """The one evaluation of the asset check `name` in a materialize result."""
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation
