"""pytest options must be registered at the root: `--store` picks the persona store's backend
for persona_pipeline_tests (see its conftest)."""

import os

import pytest

# The daily partitions are built when persona_pipeline is imported, from the landing folder of the
# working directory's home when this is unset: pinned, the tests do not depend on a `make demo` run.
os.environ.setdefault("PERSONA_PARTITION_START", "2026-01-01")
# Signs the anomaly norms the stores keep. On the embedded default a key file is made in the home
# folder; a test that sets PERSONA_DB_URL would otherwise keep none and behave unlike SQLite.
os.environ.setdefault("PERSONA_NORMS_KEY", "persona-pipeline-tests-norms-signing-key-0123456789")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        choices=("sqlite", "postgresql"),
        default=os.environ.get("PERSONA_TEST_STORE", "sqlite"),
        help="backend of the persona store in the tests (default sqlite)",
    )
