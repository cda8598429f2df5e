"""Shared fixtures: every test gets its own PERSONA_HOME with real embedded stores."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.evaluate import DemoEvaluation, evaluate_demo_fleet
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore, VectorIndex

ENV_VARIABLES = (
    "PERSONA_HOME",
    "PERSONA_DB_URL",
    "PERSONA_LANDING_DIR",
    "PERSONA_CONFIG_DIR",
    "PERSONA_SOURCE_DB_URL",
    "QDRANT_URL",
    "QDRANT_API_KEY",
    "DAGSTER_HOME",
)
POSTGRES = "postgresql+psycopg://postgres:{password}@127.0.0.1:5432/{database}"


@pytest.fixture
def persona_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("PERSONA_HOME", str(home))
    return home


@pytest.fixture
def landing(persona_home: Path) -> Path:
    return persona_home / "landing"


def resources_for(home: Path) -> dict[str, dg.ConfigurableResource]:
    """The real embedded stores under `home`."""
    return {
        "persona_store": PersonaStore(url=f"sqlite:///{home / 'persona.db'}"),
        "vector_index": VectorIndex(path=str(home / "qdrant")),
        "landing_zone": LandingZone(path=str(home / "landing")),
        "persona_config": PersonaConfig(),
    }


@pytest.fixture
def resources(persona_home: Path) -> dict[str, dg.ConfigurableResource]:
    return resources_for(persona_home)


def evaluated_fleet(home: Path, devices: int, days: int, seed: int) -> Iterator[DemoEvaluation]:
    """A generated fleet run through every asset in its own home (environment restored after)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ENV_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("PERSONA_HOME", str(home))
        yield evaluate_demo_fleet(devices=devices, days=days, seed=seed, home=home)


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


@pytest.fixture
def postgres_database() -> Iterator[Callable[[str], str]]:
    """Makes fresh databases on the loopback PostgreSQL, which trusts any password, and drops
    them after the test: `create(password)` returns the URL. Skips where there is none."""
    admin = sa.create_engine(POSTGRES.format(password="", database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sa.exc.OperationalError:
        admin.dispose()
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    created: list[str] = []

    def create(password: str = "") -> str:
        name = f"persona_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(sa.text(f"CREATE DATABASE {name}"))
        created.append(name)
        return POSTGRES.format(password=password, database=name)

    try:
        yield create
    finally:
        with admin.connect() as connection:
            for name in created:
                connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
