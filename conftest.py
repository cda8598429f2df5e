"""pytest options must be registered at the root: `--store` picks the persona store's backend
for persona_pipeline_tests (see its conftest)."""

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        choices=("sqlite", "postgresql"),
        default=os.environ.get("PERSONA_TEST_STORE", "sqlite"),
        help="backend of the persona store in the tests (default sqlite)",
    )
