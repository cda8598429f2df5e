"""The application's home: the folders a command works in, and how a command reports failure."""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from persona_pipeline import settings


class CommandError(RuntimeError):
    """A failure the command reports in one line."""


INSTANCE_FILES = {"sqlite": "dagster.yaml", "postgres": "dagster-postgres.yaml"}


def init_home(instance_storage: str = "sqlite") -> Path:
    """Create $PERSONA_HOME and a Dagster home with this project's dagster.yaml (or its
    PostgreSQL variant); an existing dagster.yaml is kept."""
    home = settings.persona_home()
    os.environ["PERSONA_HOME"] = str(home)
    dagster_home = settings.dagster_home()
    dagster_home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance_file = dagster_home / "dagster.yaml"
    if not instance_file.exists():
        shipped = resources.files("persona_pipeline.deploy").joinpath(INSTANCE_FILES[instance_storage])
        with resources.as_file(shipped) as source:
            shutil.copyfile(source, instance_file)
    _create_instance_storage(dagster_home)
    return home


def _create_instance_storage(dagster_home: Path) -> None:
    """Create Dagster's storage once, here: the webserver and the daemon started together on an
    empty home both try to, and one fails ("table alembic_version already exists")."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)):
        pass


def say_on_stderr(line: str) -> None:
    print(f"persona-pipeline: {line}", file=sys.stderr, flush=True)


def write_failure_log(name: str, text: str) -> Path | None:
    """Write what went wrong, credentials masked, to $PERSONA_HOME/logs/<name>.log; None when that
    cannot be written."""
    from persona_pipeline.secrets import mask_url

    try:
        folder = settings.persona_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.log"
        path.write_text(mask_url(text) + "\n")
    except OSError:
        return None
    return path
