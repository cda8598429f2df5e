"""The shape of the code: imports run one way (foundation, resources, domains, definitions,
application), no module imports itself in a circle, and nothing imports Dagster's private modules.
Read from the source files' import statements, so a new file is checked the day it lands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("persona_pipeline", "benchmarks")

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "persona_pipeline.__init__",
            "persona_pipeline.config",
            "persona_pipeline.deploy",
            "persona_pipeline.settings",
            "persona_pipeline.secrets",
            "persona_pipeline.file_store",
            "persona_pipeline.formatting",
            "persona_pipeline.metadata",
            "persona_pipeline.retries",
            "persona_pipeline.config_files",
            "persona_pipeline.feature_schema",
            "persona_pipeline.service_catalog",
            "persona_pipeline.device_shards",
            "persona_pipeline.partitions",
            "persona_pipeline.store",
            "persona_pipeline.run_health",
            "persona_pipeline.executors",
            "persona_pipeline.automation",
        ),
    ),
    ("resources", ("persona_pipeline.resources",)),
    # The domains: erasure first (ingest drops suppressed subjects), then in the order the chain
    # runs them; a domain reads the ones before it.
    ("erasure", ("persona_pipeline.erasure",)),
    ("ingest", ("persona_pipeline.ingest",)),
    ("personas", ("persona_pipeline.personas",)),
    ("segments", ("persona_pipeline.segments",)),
    ("anomalies", ("persona_pipeline.anomalies",)),
    ("offers", ("persona_pipeline.offers",)),
    ("feedback", ("persona_pipeline.feedback",)),
    ("simulation", ("persona_pipeline.demo",)),
    ("definitions", ("persona_pipeline.definitions", "persona_pipeline.worker")),
    ("benchmarks", ("benchmarks",)),
    ("application", ("persona_pipeline.app",)),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (imports inside functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> int | None:
    if name == "persona_pipeline":
        name = "persona_pipeline.__init__"
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def project_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (a name imported from a package that is itself
    a module counts as that module)."""
    modules = {module_name(p): p for p in source_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_every_module_has_a_layer():
    assert [name for name in project_graph() if layer_of(name) is None] == []


def test_imports_run_from_higher_layers_to_lower_ones_only():
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in project_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(source)
    ]
    assert upward == []


def test_no_module_imports_itself_through_others():
    graph = project_graph()
    circles = []
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        visiting.add(node)
        for target in sorted(graph[node]):
            if target in visiting:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                visit(target, [*path, target])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    assert circles == []


@pytest.mark.parametrize("folder", [*PACKAGES, "persona_pipeline_tests"])
def test_no_private_dagster_module_is_imported(folder):
    private = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in sorted(imported_modules(path))
        if name.startswith("dagster._core")
        or (folder != "persona_pipeline_tests" and name.split(".")[0].startswith("dagster") and "._" in name)
    ]
    assert private == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above are only worth their silence if they can fail."""
    assert layer_of("persona_pipeline.app.cli") > layer_of("persona_pipeline.resources.landing_zone")
    package = tmp_path / "persona_pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "settings.py").write_text("from persona_pipeline.app import cli\n")
    (package / "app").mkdir()
    (package / "app" / "__init__.py").write_text("")
    (package / "app" / "cli.py").write_text("import persona_pipeline.settings\nimport dagster._core.x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGES"]), "PACKAGES", ("persona_pipeline",))
    with pytest.raises(AssertionError):
        test_imports_run_from_higher_layers_to_lower_ones_only()
    with pytest.raises(AssertionError):
        test_no_module_imports_itself_through_others()
    with pytest.raises(AssertionError):
        test_no_private_dagster_module_is_imported("persona_pipeline")


def doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` in docs/architecture.md, cells stripped."""
    text = (ROOT / "docs" / "architecture.md").read_text().split(f"## {heading}\n", 1)[1]
    rows = [line for line in text.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_map_of_the_code_names_the_layers_the_test_checks():
    assert [row[0] for row in doc_table("Layers")] == [name for name, _ in LAYERS]


def test_the_map_of_the_code_names_every_table_once_with_an_asset_that_exists():
    from persona_pipeline.definitions import defs
    from persona_pipeline.store.tables import metadata

    writers = {row[0].strip("`"): re.findall(r"`([a-z_]+)`", row[1]) for row in doc_table("Who writes what")}
    assets = {key.path[-1] for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(writers) <= assets | {job.name for job in defs.jobs}
    named = [table for tables in writers.values() for table in tables if table in metadata.tables]
    assert sorted(named) == sorted(metadata.tables)  # every table, each with one writer
