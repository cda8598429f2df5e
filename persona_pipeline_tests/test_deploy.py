"""The Helm values in deploy/helm pass deploy/helm/check_values.py, and the checker fails, with one
line naming the key path, on each mistake it is there for. No cluster, helm binary or chart is used:
the checker reads the files against the chart keys the project lists and its own settings code."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml

pytestmark = pytest.mark.store_agnostic

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / "deploy" / "helm" / "check_values.py"


def load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_helm_values", CHECKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check_values = load_checker()
SHIPPED_VALUES = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())
SHIPPED_QDRANT = yaml.safe_load((ROOT / "deploy" / "helm" / "qdrant-values.yaml").read_text())
DEPLOYMENT = "dagster-user-deployments.deployments[0]"


def code_location(values: dict) -> dict:
    return values["dagster-user-deployments"]["deployments"][0]


def set_env(values: dict, name: str, value: object) -> None:
    env = code_location(values)["env"]
    for entry in env:
        if entry["name"] == name:
            entry.clear()
            entry.update({"name": name, "value": value})
            return
    env.append({"name": name, "value": value})


def drop_env(values: dict, name: str) -> None:
    code_location(values)["env"] = [entry for entry in code_location(values)["env"] if entry["name"] != name]


def env_index(name: str) -> int:
    return [entry["name"] for entry in code_location(SHIPPED_VALUES)["env"]].index(name)


def test_the_shipped_values_have_no_problem():
    assert check_values.check_files() == []


def test_the_command_line_prints_one_line_per_problem_and_fails(tmp_path, capsys):
    values = copy.deepcopy(SHIPPED_VALUES)
    values["dagsterDeamon"] = {"enabled": True}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    assert check_values.main([str(path), str(CHECKER.parent / "qdrant-values.yaml")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "values.yaml: dagsterDeamon.enabled: "
        "not a key of chart dagster/dagster 1.13.27 that this project uses"
    ]


def misspelled_nested_key(values: dict) -> None:
    values["dagsterDaemon"]["runRetries"]["maxRetry"] = 1


def misspelled_deployment_key(values: dict) -> None:
    code_location(values)["includeConfigInLaunchedRun"] = {"enabled": True}


def inline_persona_db_url(values: dict) -> None:
    set_env(values, "PERSONA_DB_URL", "postgresql+psycopg://persona:hunter2@db:5432/persona")


def qdrant_api_key_from_a_config_map(values: dict) -> None:
    for entry in code_location(values)["env"]:
        if entry["name"] == "QDRANT_API_KEY":
            entry["valueFrom"] = {"configMapKeyRef": {"name": "persona-settings", "key": "qdrant-api-key"}}


def inline_qdrant_api_key_in_the_run_launcher(values: dict) -> None:
    values["runLauncher"]["config"] = {"k8sRunLauncher": {"envVars": ["QDRANT_API_KEY=k-1"]}}


def a_password_in_a_url_of_another_name(values: dict) -> None:
    values["dagsterDaemon"]["env"] = {"ERROR_REPORT_URL": "https://reporter:pw-2@errors.example/7"}


def the_dagster_database_password_in_values(values: dict) -> None:
    values["postgresql"]["postgresqlPassword"] = "pw-3"


def too_many_qdrant_replicas(values: dict) -> None:
    set_env(values, "PERSONA_QDRANT_REPLICAS", "17")


def no_device_shard(values: dict) -> None:
    set_env(values, "PERSONA_DEVICE_SHARDS", "0")


def history_shards_other_than_the_device_shards(values: dict) -> None:
    set_env(values, "PERSONA_HISTORY_SHARDS", "8")


def automation_neither_on_nor_off(values: dict) -> None:
    set_env(values, "PERSONA_AUTOMATION", "sometimes")


def a_partition_start_that_is_no_day(values: dict) -> None:
    set_env(values, "PERSONA_PARTITION_START", "2026-02-30")


def an_unquoted_boolean(values: dict) -> None:
    set_env(values, "PERSONA_QDRANT_VECTORS_ON_DISK", False)


def a_misspelled_variable(values: dict) -> None:
    set_env(values, "PERSONA_QDRANT_REPLICA", "2")


def no_partition_start(values: dict) -> None:
    drop_env(values, "PERSONA_PARTITION_START")


def no_store_url(values: dict) -> None:
    drop_env(values, "PERSONA_DB_URL")


def a_landing_dir_on_no_volume(values: dict) -> None:
    set_env(values, "PERSONA_LANDING_DIR", "/srv/landing")


def a_history_dir_on_no_volume(values: dict) -> None:
    set_env(values, "PERSONA_HISTORY_DIR", "/srv/history")


def a_history_url_with_credentials(values: dict) -> None:
    set_env(values, "PERSONA_HISTORY_DIR", "s3://AKIAEXAMPLE:hunter2@bucket/history")


def no_history_dir(values: dict) -> None:
    drop_env(values, "PERSONA_HISTORY_DIR")


def celery_steps_under_the_k8s_run_launcher(values: dict) -> None:
    set_env(values, "PERSONA_EXECUTOR", "celery")


def the_celery_k8s_run_launcher(values: dict) -> None:
    values["runLauncher"]["type"] = "CeleryK8sRunLauncher"


def two_run_limits(values: dict) -> None:
    values["dagsterDaemon"]["runCoordinator"] = {"config": {"queuedRunCoordinator": {"maxConcurrentRuns": 2}}}


def a_pool_limit_that_is_no_number(values: dict) -> None:
    values["concurrency"]["pools"]["defaultLimit"] = "four"


def no_pool_slot(values: dict) -> None:
    values["concurrency"]["pools"]["defaultLimit"] = 0


def an_underscore_in_the_deployment_name(values: dict) -> None:
    code_location(values)["name"] = "persona_pipeline"


MISTAKES: list[tuple[Callable[[dict], None], str, str]] = [
    (
        misspelled_nested_key,
        "dagsterDaemon.runRetries.maxRetry",
        "not a key of chart dagster/dagster 1.13.27 that this project uses "
        "(known under dagsterDaemon.runRetries: enabled, maxRetries)",
    ),
    (misspelled_deployment_key, f"{DEPLOYMENT}.includeConfigInLaunchedRun.enabled", "not a key of chart"),
    (
        inline_persona_db_url,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_DB_URL')}] (PERSONA_DB_URL)",
        "a secret given inline; take it from a Secret (valueFrom.secretKeyRef)",
    ),
    (
        qdrant_api_key_from_a_config_map,
        f"{DEPLOYMENT}.env[{env_index('QDRANT_API_KEY')}] (QDRANT_API_KEY)",
        "a secret given from elsewhere than a Secret; take it from a Secret (valueFrom.secretKeyRef)",
    ),
    (
        inline_qdrant_api_key_in_the_run_launcher,
        "runLauncher.config.k8sRunLauncher.envVars[0] (QDRANT_API_KEY)",
        "a secret given inline",
    ),
    (
        a_password_in_a_url_of_another_name,
        "dagsterDaemon.env.ERROR_REPORT_URL (ERROR_REPORT_URL)",
        "the value carries a credential",
    ),
    (the_dagster_database_password_in_values, "postgresql.postgresqlPassword", "a password given inline"),
    (
        too_many_qdrant_replicas,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_QDRANT_REPLICAS')}] (PERSONA_QDRANT_REPLICAS)",
        "PERSONA_QDRANT_REPLICAS=17: expected 1 to 16",
    ),
    (
        no_device_shard,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_DEVICE_SHARDS')}] (PERSONA_DEVICE_SHARDS)",
        "PERSONA_DEVICE_SHARDS='0': expected a whole number from 1 to 1024",
    ),
    (
        history_shards_other_than_the_device_shards,
        f"{DEPLOYMENT}.env",
        "PERSONA_HISTORY_SHARDS=8 differs from PERSONA_DEVICE_SHARDS=4",
    ),
    (
        automation_neither_on_nor_off,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_AUTOMATION')}] (PERSONA_AUTOMATION)",
        "PERSONA_AUTOMATION='sometimes': expected on or off",
    ),
    (
        a_partition_start_that_is_no_day,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_PARTITION_START')}] (PERSONA_PARTITION_START)",
        "PERSONA_PARTITION_START='2026-02-30' is not a day (YYYY-MM-DD)",
    ),
    (
        an_unquoted_boolean,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_QDRANT_VECTORS_ON_DISK')}] (PERSONA_QDRANT_VECTORS_ON_DISK)",
        "False is not a string: quote it",
    ),
    (
        a_misspelled_variable,
        f"{DEPLOYMENT}.env[{len(code_location(SHIPPED_VALUES)['env'])}] (PERSONA_QDRANT_REPLICA)",
        "not a variable persona_pipeline reads",
    ),
    (no_partition_start, f"{DEPLOYMENT}.env", "PERSONA_PARTITION_START is not pinned"),
    (no_store_url, f"{DEPLOYMENT}.env", "PERSONA_DB_URL is not set from a Secret"),
    (
        a_landing_dir_on_no_volume,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_LANDING_DIR')}] (PERSONA_LANDING_DIR)",
        "/srv/landing is on no volumeMount",
    ),
    (
        a_history_dir_on_no_volume,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_HISTORY_DIR')}] (PERSONA_HISTORY_DIR)",
        "/srv/history is on no volumeMount",
    ),
    (
        a_history_url_with_credentials,
        f"{DEPLOYMENT}.env[{env_index('PERSONA_HISTORY_DIR')}] (PERSONA_HISTORY_DIR)",
        "the value carries a credential",
    ),
    (
        no_history_dir,
        f"{DEPLOYMENT}.env",
        "PERSONA_HISTORY_DIR is not set: the update history must be shared",
    ),
    (
        celery_steps_under_the_k8s_run_launcher,
        "runLauncher.type",
        "K8sRunLauncher with PERSONA_EXECUTOR=celery",
    ),
    (
        the_celery_k8s_run_launcher,
        "runLauncher.type",
        "celery_k8s_job_executor, which PERSONA_EXECUTOR does not offer",
    ),
    (
        two_run_limits,
        "concurrency with dagsterDaemon.runCoordinator.config.queuedRunCoordinator",
        "incompatible with the `concurrency > runs` config",
    ),
    (
        a_pool_limit_that_is_no_number,
        "concurrency",
        "the instance's dagster.yaml would not load: Object 'four' is not a int",
    ),
    (no_pool_slot, "concurrency.pools.defaultLimit", "the vector_index pool's steps would never start"),
    (an_underscore_in_the_deployment_name, f"{DEPLOYMENT}.name", "lower-case letters, digits and '-'"),
]


@pytest.mark.parametrize(("mistake", "path", "message"), MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_each_mistake_is_one_line_naming_its_key_path(mistake, path, message, monkeypatch):
    # The code location's import runs in its own process and is tested apart.
    monkeypatch.setattr(check_values, "check_code_location", lambda deployment, path: [])
    values = copy.deepcopy(SHIPPED_VALUES)
    mistake(values)
    problems = [str(problem) for problem in check_values.check_dagster_values(values)]
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    assert problems[0].startswith(f"{path}: "), problems[0]
    assert message in problems[0]


def test_a_landing_zone_and_history_on_an_object_store_need_no_volume(monkeypatch):
    monkeypatch.setattr(check_values, "check_code_location", lambda deployment, path: [])
    values = copy.deepcopy(SHIPPED_VALUES)
    set_env(values, "PERSONA_LANDING_DIR", "s3://bucket/landing")
    set_env(values, "PERSONA_HISTORY_DIR", "s3://bucket/history")
    assert [str(problem) for problem in check_values.check_dagster_values(values)] == []
    set_env(values, "PERSONA_HISTORY_DIR", "/srv/history")
    [problem] = check_values.check_dagster_values(values)
    assert "/srv/history is on no volumeMount" in str(problem)


def test_a_code_location_attribute_that_is_no_definitions_is_named():
    deployment = copy.deepcopy(code_location(SHIPPED_VALUES))
    deployment["codeServerArgs"] = ["-m", "persona_pipeline.definitions", "-a", "job_named"]
    assert [str(p) for p in check_values.check_code_location(deployment, DEPLOYMENT)] == [
        f"{DEPLOYMENT}.codeServerArgs: persona_pipeline.definitions:job_named does not load with these "
        "settings: persona_pipeline.definitions:job_named is a function, not a Definitions"
    ]


def test_a_code_location_that_fails_on_its_settings_is_named():
    """The settings reach the code location's process: an executor it does not know stops the import."""
    deployment = copy.deepcopy(code_location(SHIPPED_VALUES))
    for entry in deployment["env"]:
        if entry["name"] == "PERSONA_EXECUTOR":
            entry["value"] = "k9s"
    [problem] = check_values.check_code_location(deployment, DEPLOYMENT)
    assert str(problem).endswith(
        "PERSONA_EXECUTOR='k9s': expected one of multiprocess, in_process, celery, k8s"
    )


def test_steps_as_kubernetes_jobs_pass_under_the_k8s_run_launcher():
    """PERSONA_EXECUTOR=k8s: the code location loads with dagster-k8s's executor (each step a
    Kubernetes Job), and the values that select it have no problem, code location included."""
    values = copy.deepcopy(SHIPPED_VALUES)
    set_env(values, "PERSONA_EXECUTOR", "k8s")
    assert [str(problem) for problem in check_values.check_dagster_values(values)] == []


def wrong_api_key_secret(qdrant: dict) -> None:
    qdrant["apiKey"]["valueFrom"]["secretKeyRef"]["name"] = "another-secret"


def inline_api_key(qdrant: dict) -> None:
    qdrant["apiKey"] = "k-4"


def fewer_nodes_than_replicas(qdrant: dict) -> None:
    qdrant["replicaCount"] = 1


def misspelled_persistence(qdrant: dict) -> None:
    qdrant["persistance"] = qdrant.pop("persistence")


QDRANT_MISTAKES: list[tuple[Callable[[dict], None], list[str]]] = [
    (
        wrong_api_key_secret,
        [
            "apiKey.valueFrom.secretKeyRef: Secret another-secret/api-key, but the code location reads "
            "QDRANT_API_KEY from persona-qdrant-api-key/api-key"
        ],
    ),
    (
        inline_api_key,
        [
            "apiKey: not a key of chart qdrant/qdrant 1.16.0 that this project uses",
            "apiKey: take the API key from a Secret (apiKey.valueFrom.secretKeyRef)",
        ],
    ),
    (
        fewer_nodes_than_replicas,
        ["replicaCount: 1 Qdrant nodes cannot hold PERSONA_QDRANT_REPLICAS=2 copies"],
    ),
    (
        misspelled_persistence,
        [
            "persistance.accessModes[0]: not a key of chart qdrant/qdrant 1.16.0 that this project uses",
            "persistance.size: not a key of chart qdrant/qdrant 1.16.0 that this project uses",
            "persistence.size: size each node's persistent volume",
        ],
    ),
]


@pytest.mark.parametrize(
    ("mistake", "expected"), QDRANT_MISTAKES, ids=[m[0].__name__ for m in QDRANT_MISTAKES]
)
def test_each_qdrant_mistake_is_named(mistake, expected):
    qdrant = copy.deepcopy(SHIPPED_QDRANT)
    mistake(qdrant)
    assert [str(problem) for problem in check_values.check_qdrant_values(qdrant, SHIPPED_VALUES)] == expected


def test_the_variables_the_checker_knows_are_the_documented_ones():
    documented = set(
        re.findall(r"`((?:PERSONA|QDRANT)_[A-Z_]+)`", (ROOT / "docs" / "configuration.md").read_text())
    )
    assert documented == check_values.PROJECT_VARIABLES
