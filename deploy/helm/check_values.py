"""Checks the two Helm values files beside it without a cluster, a helm binary or the charts.

    python deploy/helm/check_values.py [VALUES [QDRANT_VALUES]]

`values.yaml` (chart dagster/dagster) and `qdrant-values.yaml` (chart qdrant/qdrant) are checked for:
- keys: every key path they set is one of the chart keys this project uses, listed below with the
  chart version they were read from (the charts' own schemas leave many levels open, so a
  misspelled key is otherwise dropped without a word);
- settings: every PERSONA_*/QDRANT_* value given inline parses with persona_pipeline's own
  functions, and names a variable the project reads;
- secrets: database URLs, API keys, broker URLs and passwords come from Kubernetes Secrets only;
- the code location: its module and attribute load, with the file's settings, as a Definitions;
- the run launcher: PERSONA_EXECUTOR is one that launcher can run;
- the Dagster instance settings the chart writes into dagster.yaml (concurrency, run retries,
  the run queue, additionalInstanceConfig) load with dagster.DagsterInstance.from_config;
- Qdrant: the API key Secret is the one the code location reads, and there are at least as many
  nodes as PERSONA_QDRANT_REPLICAS.

One line per problem, each naming the file and the key path; the exit status is 1 when there is any.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from persona_pipeline import executors, partitions, settings
from persona_pipeline.secrets import mask_url

HERE = Path(__file__).resolve().parent
DAGSTER_VALUES = HERE / "values.yaml"
QDRANT_VALUES = HERE / "qdrant-values.yaml"

DAGSTER_CHART_VERSION = "1.13.27"
# The keys of chart dagster/dagster this project sets, from the chart's values.yaml, its schema
# models and templates. `[]` stands for any list item; a trailing `.*` allows anything below.
DAGSTER_CHART_KEYS = frozenset(
    (
        "global.postgresqlSecretName",
        "generatePostgresqlPasswordSecret",
        "postgresql.enabled",
        "postgresql.postgresqlHost",
        "postgresql.postgresqlUsername",
        "postgresql.postgresqlPassword",
        "postgresql.postgresqlDatabase",
        "postgresql.postgresqlParams.*",
        "postgresql.service.port",
        "rabbitmq.enabled",
        "redis.enabled",
        "telemetry.enabled",
        "concurrency.enabled",
        "concurrency.pools.defaultLimit",
        "concurrency.pools.granularity",
        "concurrency.runs.maxConcurrentRuns",
        "concurrency.runs.tagConcurrencyLimits[].*",
        "additionalInstanceConfig.*",
        "dagsterWebserver.replicaCount",
        "dagsterWebserver.env.*",
        "dagsterWebserver.resources.*",
        "dagsterDaemon.enabled",
        "dagsterDaemon.env.*",
        "dagsterDaemon.resources.*",
        "dagsterDaemon.runRetries.enabled",
        "dagsterDaemon.runRetries.maxRetries",
        "dagsterDaemon.runMonitoring.enabled",
        "dagsterDaemon.runCoordinator.config.queuedRunCoordinator.maxConcurrentRuns",
        "dagsterDaemon.runCoordinator.config.queuedRunCoordinator.tagConcurrencyLimits[].*",
        "runLauncher.type",
        "runLauncher.config.k8sRunLauncher.envSecrets[].name",
        "runLauncher.config.k8sRunLauncher.envVars[]",
        "runLauncher.config.k8sRunLauncher.resources.*",
        "runLauncher.config.celeryK8sRunLauncher.image.repository",
        "runLauncher.config.celeryK8sRunLauncher.image.tag",
        "runLauncher.config.celeryK8sRunLauncher.image.pullPolicy",
        "runLauncher.config.celeryK8sRunLauncher.workerQueues[].name",
        "runLauncher.config.celeryK8sRunLauncher.workerQueues[].replicaCount",
        "runLauncher.config.celeryK8sRunLauncher.env.*",
        "runLauncher.config.celeryK8sRunLauncher.envSecrets[].name",
        "dagster-user-deployments.enabled",
        "dagster-user-deployments.enableSubchart",
        "dagster-user-deployments.deployments[].name",
        "dagster-user-deployments.deployments[].image.repository",
        "dagster-user-deployments.deployments[].image.tag",
        "dagster-user-deployments.deployments[].image.pullPolicy",
        "dagster-user-deployments.deployments[].codeServerArgs[]",
        "dagster-user-deployments.deployments[].dagsterApiGrpcArgs[]",
        "dagster-user-deployments.deployments[].port",
        "dagster-user-deployments.deployments[].includeConfigInLaunchedRuns.enabled",
        "dagster-user-deployments.deployments[].env[].name",
        "dagster-user-deployments.deployments[].env[].value",
        "dagster-user-deployments.deployments[].env[].valueFrom.secretKeyRef.name",
        "dagster-user-deployments.deployments[].env[].valueFrom.secretKeyRef.key",
        "dagster-user-deployments.deployments[].env[].valueFrom.configMapKeyRef.name",
        "dagster-user-deployments.deployments[].env[].valueFrom.configMapKeyRef.key",
        "dagster-user-deployments.deployments[].envSecrets[].name",
        "dagster-user-deployments.deployments[].envConfigMaps[].name",
        "dagster-user-deployments.deployments[].volumes[].name",
        "dagster-user-deployments.deployments[].volumes[].persistentVolumeClaim.claimName",
        "dagster-user-deployments.deployments[].volumes[].configMap.name",
        "dagster-user-deployments.deployments[].volumeMounts[].name",
        "dagster-user-deployments.deployments[].volumeMounts[].mountPath",
        "dagster-user-deployments.deployments[].volumeMounts[].readOnly",
        "dagster-user-deployments.deployments[].resources.*",
    )
)

QDRANT_CHART_VERSION = "1.16.0"
# The keys of chart qdrant/qdrant this project sets, from the chart's values.yaml and schema.
QDRANT_CHART_KEYS = frozenset(
    (
        "replicaCount",
        "image.repository",
        "image.tag",
        "image.pullPolicy",
        "config.*",
        "apiKey.valueFrom.secretKeyRef.name",
        "apiKey.valueFrom.secretKeyRef.key",
        "persistence.accessModes[]",
        "persistence.size",
        "persistence.storageClassName",
        "persistence.annotations.*",
        "snapshotPersistence.enabled",
        "snapshotPersistence.accessModes[]",
        "snapshotPersistence.size",
        "snapshotPersistence.storageClassName",
        "resources.*",
        "nodeSelector.*",
        "tolerations[].*",
        "affinity.*",
        "topologySpreadConstraints[].*",
        "podDisruptionBudget.enabled",
        "podDisruptionBudget.maxUnavailable",
        "podDisruptionBudget.minAvailable",
    )
)

# Every PERSONA_*/QDRANT_* variable persona_pipeline reads (docs/configuration.md).
PROJECT_VARIABLES = frozenset(
    {
        "PERSONA_HOME",
        "PERSONA_LANDING_DIR",
        "PERSONA_SOURCE_DB_URL",
        "PERSONA_DB_URL",
        "PERSONA_HISTORY_DIR",
        "PERSONA_HISTORY_SHARDS",
        "PERSONA_DEVICE_SHARDS",
        "QDRANT_URL",
        "QDRANT_API_KEY",
        "PERSONA_QDRANT_ENGINE",
        *settings.SERVER_LAYOUT_VARIABLES,
        "PERSONA_CONFIG_DIR",
        "PERSONA_PARTITION_START",
        executors.EXECUTOR_VARIABLE,
        executors.BROKER_VARIABLE,
        executors.QUEUE_VARIABLE,
        executors.BACKEND_VARIABLE,
        "PERSONA_SENSOR_INTERVAL_SECONDS",
        "PERSONA_AUTOMATION",
        "PERSONA_NORMS_KEY",
    }
)
SECRET_VARIABLES = frozenset(
    {
        "PERSONA_NORMS_KEY",
        "PERSONA_DB_URL",
        "PERSONA_SOURCE_DB_URL",
        "QDRANT_URL",
        "QDRANT_API_KEY",
        executors.BROKER_VARIABLE,
        executors.BACKEND_VARIABLE,
        "DAGSTER_PG_URL",
        "DAGSTER_PG_PASSWORD",
    }
)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|CREDENTIAL", re.IGNORECASE)
# Without these the code location falls back to the embedded default inside its pod: SQLite and a
# Qdrant path on the pod's own disk, different in every pod; without the norms key no anomaly
# norms are kept, and every run scores every device.
REQUIRED_FROM_SECRETS = ("PERSONA_DB_URL", "QDRANT_URL", "QDRANT_API_KEY", "PERSONA_NORMS_KEY")
# Local folders, or object-store URLs (s3://bucket/prefix) every pod reaches.
STORAGE_URL_VARIABLES = ("PERSONA_LANDING_DIR", "PERSONA_HISTORY_DIR")
PATH_VARIABLES = ("PERSONA_HOME", "PERSONA_LANDING_DIR", "PERSONA_HISTORY_DIR", "PERSONA_CONFIG_DIR")

# What PERSONA_EXECUTOR may be under each run launcher of the chart.
EXECUTORS_BY_RUN_LAUNCHER: dict[str, tuple[str, ...]] = {
    "K8sRunLauncher": ("multiprocess", "in_process", "k8s"),
    "CeleryK8sRunLauncher": (),
}
RUN_LAUNCHER_MISFITS = {
    ("K8sRunLauncher", "celery"): "it sends steps to `celery -A persona_pipeline.worker` workers, "
    "which this chart does not run; use multiprocess, in_process or k8s",
    "CeleryK8sRunLauncher": "its Celery workers run only dagster-celery-k8s's celery_k8s_job_executor, "
    f"which PERSONA_EXECUTOR does not offer (it offers {', '.join(executors.EXECUTORS)})",
}
# Kubernetes object names (RFC 1123 labels); the chart prefixes the release's name.
KUBERNETES_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")
DEPLOYMENTS = "dagster-user-deployments.deployments"


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class EnvEntry:
    """One environment variable a values file gives a container: inline or from a Secret."""

    path: str
    name: str
    value: Any = None
    inline: bool = False
    secret: tuple[str, str] | None = None


def key_paths(node: Any, shown: str = "", pattern: str = "") -> Iterator[tuple[str, str]]:
    """The leaf key paths of a YAML tree (an empty mapping or list is a leaf), each as shown to a
    person (`env[2].name`) and as matched against the chart keys (`env[].name`)."""
    if isinstance(node, Mapping) and node:
        for key, child in node.items():
            yield from key_paths(
                child, f"{shown}.{key}" if shown else str(key), f"{pattern}.{key}" if pattern else str(key)
            )
    elif isinstance(node, list) and node:
        for index, child in enumerate(node):
            yield from key_paths(child, f"{shown}[{index}]", f"{pattern}[]")
    else:
        yield shown, pattern


def is_known(pattern: str, known: frozenset[str]) -> bool:
    if pattern in known:
        return True
    return any(
        entry.endswith(".*")
        and (pattern == entry[:-2] or pattern.startswith((entry[:-2] + ".", entry[:-2] + "[")))
        for entry in known
    )


def check_keys(values: Mapping, known: frozenset[str], chart: str) -> list[Problem]:
    problems = []
    for shown, pattern in key_paths(values):
        if pattern and not is_known(pattern, known):
            problems.append(
                Problem(
                    shown, f"not a key of {chart} that this project uses{known_keys_hint(pattern, known)}"
                )
            )
    return problems


def known_keys_hint(pattern: str, known: frozenset[str]) -> str:
    """The known keys beside the first unknown one, under its deepest known parent."""
    parts = pattern.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:depth])
        children = {
            entry[len(parent) + 1 :].split(".")[0] for entry in known if entry.startswith(parent + ".")
        }
        if children:
            return f" (known under {parent}: {', '.join(sorted(children))})"
    return ""


def dig(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def env_entries(env: Any, path: str) -> list[EnvEntry]:
    """The variables of a chart `env` field: a list of Kubernetes EnvVars or a name-to-value map."""
    if isinstance(env, Mapping):
        return [EnvEntry(f"{path}.{name}", str(name), value, inline=True) for name, value in env.items()]
    entries = []
    for index, item in enumerate(env or []):
        if not isinstance(item, Mapping):
            continue
        reference = dig(item, "valueFrom", "secretKeyRef")
        secret = (
            (str(reference.get("name")), str(reference.get("key")))
            if isinstance(reference, Mapping)
            else None
        )
        entries.append(
            EnvEntry(f"{path}[{index}]", str(item.get("name")), item.get("value"), "value" in item, secret)
        )
    return entries


def launcher_env_entries(values: Mapping) -> list[EnvEntry]:
    """envVars of the K8sRunLauncher (`NAME` passes the daemon's variable on, `NAME=value` sets one)."""
    path = "runLauncher.config.k8sRunLauncher.envVars"
    entries = []
    for index, item in enumerate(dig(values, *path.split(".")) or []):
        name, equals, value = str(item).partition("=")
        entries.append(EnvEntry(f"{path}[{index}]", name, value if equals else None, bool(equals)))
    return entries


def all_env_entries(values: Mapping) -> list[EnvEntry]:
    entries = []
    for index, deployment in enumerate(dig(values, *DEPLOYMENTS.split(".")) or []):
        entries += env_entries(dig(deployment, "env"), f"{DEPLOYMENTS}[{index}].env")
    for section in ("dagsterWebserver", "dagsterDaemon"):
        entries += env_entries(dig(values, section, "env"), f"{section}.env")
    entries += env_entries(
        dig(values, "runLauncher", "config", "celeryK8sRunLauncher", "env"),
        "runLauncher.config.celeryK8sRunLauncher.env",
    )
    return entries + launcher_env_entries(values)


@contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `variables` set, for the settings functions that read it; restored after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def absolute_path(name: str, value: str) -> None:
    if not value.startswith("/") and not (name in STORAGE_URL_VARIABLES and settings.is_storage_url(value)):
        raise ValueError(f"{name}={value!r}: expected an absolute path (a relative one depends on the image)")


SETTING_PARSERS: dict[str, Callable[[str, str], object]] = {
    **{
        name: (lambda name, value: settings.qdrant_server_layout({name: value}))
        for name in settings.SERVER_LAYOUT_VARIABLES
    },
    "PERSONA_PARTITION_START": lambda name, value: partitions.partition_start(value, None),
    "PERSONA_AUTOMATION": lambda name, value: settings.automation_on(),
    "PERSONA_DEVICE_SHARDS": lambda name, value: settings.device_shards(),
    "PERSONA_HISTORY_SHARDS": lambda name, value: settings.history_shards(),
    "PERSONA_SENSOR_INTERVAL_SECONDS": lambda name, value: settings.sensor_interval_seconds(30),
    executors.EXECUTOR_VARIABLE: lambda name, value: executors.executor_name(),
    **{name: absolute_path for name in PATH_VARIABLES},
}


def check_env_entry(entry: EnvEntry) -> list[Problem]:
    where = f"{entry.path} ({entry.name})"
    if entry.secret is not None:
        return []
    if entry.name in SECRET_VARIABLES or SECRET_NAME.search(entry.name):
        given = "inline" if entry.inline else "from elsewhere than a Secret"
        return [Problem(where, f"a secret given {given}; take it from a Secret (valueFrom.secretKeyRef)")]
    if not entry.inline:
        return []
    if not isinstance(entry.value, str):
        return [Problem(where, f"{entry.value!r} is not a string: quote it, Kubernetes takes only strings")]
    if mask_url(entry.value) != entry.value:
        return [
            Problem(where, "the value carries a credential; take it from a Secret (valueFrom.secretKeyRef)")
        ]
    if entry.name.startswith(("PERSONA_", "QDRANT_")) and entry.name not in PROJECT_VARIABLES:
        return [Problem(where, "not a variable persona_pipeline reads (docs/configuration.md lists them)")]
    parse = SETTING_PARSERS.get(entry.name)
    if parse is not None:
        try:
            with environment({entry.name: entry.value}):
                parse(entry.name, entry.value)
        except ValueError as error:
            return [Problem(where, str(error))]
    return []


def check_chart_secrets(values: Mapping) -> list[Problem]:
    problems = []
    if dig(values, "postgresql", "postgresqlPassword") is not None:
        problems.append(Problem("postgresql.postgresqlPassword", "a password given inline; leave it out"))
    if dig(values, "generatePostgresqlPasswordSecret") is not False:
        problems.append(
            Problem(
                "generatePostgresqlPasswordSecret",
                "must be false: the chart would write the password from values into a Secret",
            )
        )
    if not dig(values, "global", "postgresqlSecretName"):
        problems.append(
            Problem("global.postgresqlSecretName", "name the Secret that holds postgresql-password")
        )
    return problems


def grpc_target(arguments: list[str]) -> tuple[str | None, str | None]:
    """The module and attribute of `dagster api grpc` / `dagster code-server start` arguments."""
    found: dict[str, str] = {}
    options = {"-m": "module", "--module-name": "module", "-a": "attribute", "--attribute": "attribute"}
    for index, argument in enumerate(arguments):
        option, equals, value = str(argument).partition("=")
        if option in options:
            found[options[option]] = (
                value if equals else str(arguments[index + 1]) if index + 1 < len(arguments) else ""
            )
    return found.get("module"), found.get("attribute")


LOAD_DEFINITIONS = """
import importlib, sys
import dagster as dg
found = getattr(importlib.import_module(sys.argv[1]), sys.argv[2], None)
if not isinstance(found, dg.Definitions):
    sys.exit(f"{sys.argv[1]}:{sys.argv[2]} is a {type(found).__name__}, not a Definitions")
"""


@functools.lru_cache(maxsize=8)
def definitions_load_error(
    module: str, attribute: str, settings_given: tuple[tuple[str, str], ...]
) -> str | None:
    """Why `module:attribute` does not load as a Definitions in a fresh process with only these
    PERSONA_*/QDRANT_* settings (the rest of the pod's environment is unknown here), or None."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PERSONA_", "QDRANT_"))}
    env.update(settings_given)
    with tempfile.TemporaryDirectory() as empty_folder:
        result = subprocess.run(
            [sys.executable, "-c", LOAD_DEFINITIONS, module, attribute],
            env=env,
            cwd=empty_folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def check_code_location(deployment: Mapping, path: str) -> list[Problem]:
    arguments_key = "codeServerArgs" if "codeServerArgs" in deployment else "dagsterApiGrpcArgs"
    module, attribute = grpc_target(list(deployment.get(arguments_key) or []))
    where = f"{path}.{arguments_key}"
    if not module or not attribute:
        return [Problem(where, "name the module and the attribute: -m persona_pipeline.definitions -a defs")]
    given = tuple(
        sorted(
            (entry.name, entry.value)
            for entry in env_entries(deployment.get("env"), path)
            if entry.inline
            and entry.name.startswith(("PERSONA_", "QDRANT_"))
            and isinstance(entry.value, str)
        )
    )
    error = definitions_load_error(module, attribute, given)
    return (
        [Problem(where, f"{module}:{attribute} does not load with these settings: {error}")] if error else []
    )


def check_deployment(deployment: Mapping, path: str) -> list[Problem]:
    problems = []
    name = str(deployment.get("name"))
    if not KUBERNETES_NAME.fullmatch(name):
        problems.append(Problem(f"{path}.name", f"{name!r}: lower-case letters, digits and '-', at most 40"))
    if dig(deployment, "includeConfigInLaunchedRuns", "enabled") is False:
        problems.append(
            Problem(f"{path}.includeConfigInLaunchedRuns.enabled", "run pods would start without this env")
        )
    entries = {entry.name: entry for entry in env_entries(deployment.get("env"), f"{path}.env")}
    has_env_secrets = bool(deployment.get("envSecrets"))
    for variable in REQUIRED_FROM_SECRETS:
        if variable not in entries and not has_env_secrets:
            problems.append(
                Problem(
                    f"{path}.env", f"{variable} is not set from a Secret: the pods would use their own disk"
                )
            )
    start = entries.get("PERSONA_PARTITION_START")
    if start is None or not start.inline:
        problems.append(
            Problem(f"{path}.env", "PERSONA_PARTITION_START is not pinned (docs/configuration.md)")
        )
    mounts = [str(mount.get("mountPath", "")).rstrip("/") for mount in deployment.get("volumeMounts") or []]
    landing = entries.get("PERSONA_LANDING_DIR")
    if landing is None and "PERSONA_SOURCE_DB_URL" not in entries:
        problems.append(
            Problem(f"{path}.env", "PERSONA_LANDING_DIR is not set: the landing zone must be shared")
        )
    history = entries.get("PERSONA_HISTORY_DIR")
    if history is None:
        problems.append(
            Problem(f"{path}.env", "PERSONA_HISTORY_DIR is not set: the update history must be shared")
        )
    shard_counts = {
        name: entries[name].value
        for name in ("PERSONA_DEVICE_SHARDS", "PERSONA_HISTORY_SHARDS")
        if name in entries and isinstance(entries[name].value, str)
    }
    if len(shard_counts) == 2:
        try:
            with environment(shard_counts):
                settings.history_shards()
        except ValueError as error:
            problems.append(Problem(f"{path}.env", str(error)))
    for entry, variable in ((landing, "PERSONA_LANDING_DIR"), (history, "PERSONA_HISTORY_DIR")):
        if entry is None or not isinstance(entry.value, str):
            continue
        if settings.is_storage_url(entry.value):  # an object store: every pod reaches it
            continue
        if not any(mount and (entry.value + "/").startswith(mount + "/") for mount in mounts):
            problems.append(
                Problem(f"{entry.path} ({variable})", f"{entry.value} is on no volumeMount: not shared")
            )
    return problems + check_code_location(deployment, path)


def executor_of(deployment: Mapping) -> str:
    for entry in env_entries(deployment.get("env"), ""):
        if entry.name == executors.EXECUTOR_VARIABLE and isinstance(entry.value, str):
            return entry.value.strip().lower().replace("-", "_")
    return "multiprocess"


def check_run_launcher(values: Mapping) -> list[Problem]:
    launcher = dig(values, "runLauncher", "type") or "K8sRunLauncher"
    if launcher not in EXECUTORS_BY_RUN_LAUNCHER:
        return [
            Problem("runLauncher.type", f"{launcher}: expected one of {', '.join(EXECUTORS_BY_RUN_LAUNCHER)}")
        ]
    problems = []
    for index, deployment in enumerate(dig(values, *DEPLOYMENTS.split(".")) or []):
        executor = executor_of(deployment)
        if executor in EXECUTORS_BY_RUN_LAUNCHER[launcher]:
            continue
        reason = RUN_LAUNCHER_MISFITS.get((launcher, executor)) or RUN_LAUNCHER_MISFITS.get(launcher)
        if reason is None:
            continue  # not an executor at all: the settings check names it
        problems.append(
            Problem(
                "runLauncher.type",
                f"{launcher} with PERSONA_EXECUTOR={executor} ({DEPLOYMENTS}[{index}]): {reason}",
            )
        )
    return problems


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def instance_sections(values: Mapping) -> dict[str, dict[str, Any]]:
    """The sections of the instance's dagster.yaml that the chart writes from these values'
    concurrency, run retries, run queue and telemetry keys, and additionalInstanceConfig as it
    stands, each under the key path of the values it comes from."""
    sections: dict[str, dict[str, Any]] = {}
    concurrency = dig(values, "concurrency") or {}
    if concurrency.get("enabled"):
        sections["concurrency"] = {
            "concurrency": {
                part: {
                    snake_case(key): value
                    for key, value in (concurrency.get(part) or {}).items()
                    if value not in (None, [])
                }
                for part in ("pools", "runs")
                if concurrency.get(part)
            }
        }
    daemon_on = dig(values, "dagsterDaemon", "enabled") is not False
    retries = dig(values, "dagsterDaemon", "runRetries") or {}
    if daemon_on and retries.get("enabled"):
        run_retries: dict[str, Any] = {"enabled": True}
        if retries.get("maxRetries"):
            run_retries["max_retries"] = retries["maxRetries"]
        sections["dagsterDaemon.runRetries"] = {"run_retries": run_retries}
    queue_path = "dagsterDaemon.runCoordinator.config.queuedRunCoordinator"
    queue = dig(values, *queue_path.split(".")) or {}
    queue = {snake_case(key): value for key, value in queue.items() if value not in (None, [])}
    if daemon_on and queue:
        sections[queue_path] = {
            "run_coordinator": {
                "module": "dagster.core.run_coordinator",
                "class": "QueuedRunCoordinator",
                "config": queue,
            }
        }
    if "telemetry" in values:
        sections["telemetry"] = {"telemetry": {"enabled": bool(dig(values, "telemetry", "enabled"))}}
    for key, section in (dig(values, "additionalInstanceConfig") or {}).items():
        sections[f"additionalInstanceConfig.{key}"] = {key: section}
    return sections


@functools.cache
def scratch_instance_home() -> Path:
    """One folder for every instance this process loads: its SQLite storage is made once."""
    folder = tempfile.TemporaryDirectory(prefix="check-values-")
    atexit.register(folder.cleanup)
    return Path(folder.name)


def instance_load_error(settings_yaml: Mapping[str, Any]) -> str | None:
    """Why a dagster.yaml holding `settings_yaml` would not load, in one line, or None."""
    import dagster as dg

    home = scratch_instance_home()
    (home / "dagster.yaml").write_text(yaml.safe_dump(dict(settings_yaml)))
    try:
        with dg.DagsterInstance.from_config(str(home)):
            return None
    except Exception as error:  # Dagster's config errors, and its checks of values past the schema
        return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def check_instance_settings(values: Mapping) -> list[Problem]:
    """Each section alone, then all together: a conflict is named by the two sections that make it."""
    problems = []
    default_limit = dig(values, "concurrency", "pools", "defaultLimit")
    if isinstance(default_limit, int) and default_limit < 1:
        problems.append(
            Problem(
                "concurrency.pools.defaultLimit",
                f"{default_limit}: the vector_index pool's steps would never start",
            )
        )
    sections = instance_sections(values)
    loading = {}
    for path, section in sections.items():
        error = instance_load_error(section)
        if error:
            problems.append(Problem(path, f"the instance's dagster.yaml would not load: {error}"))
        else:
            loading[path] = section
    if len(loading) > 1 and instance_load_error({k: v for s in loading.values() for k, v in s.items()}):
        for first, second in itertools.combinations(loading, 2):
            error = instance_load_error({**loading[first], **loading[second]})
            if error:
                problems.append(
                    Problem(f"{first} with {second}", f"the instance's dagster.yaml would not load: {error}")
                )
    return problems


def check_dagster_values(values: Mapping) -> list[Problem]:
    problems = check_keys(values, DAGSTER_CHART_KEYS, f"chart dagster/dagster {DAGSTER_CHART_VERSION}")
    problems += check_chart_secrets(values)
    for entry in all_env_entries(values):
        problems += check_env_entry(entry)
    deployments = dig(values, *DEPLOYMENTS.split(".")) or []
    if not deployments:
        problems.append(Problem(DEPLOYMENTS, "no code location"))
    for index, deployment in enumerate(deployments):
        problems += check_deployment(deployment, f"{DEPLOYMENTS}[{index}]")
    return problems + check_run_launcher(values) + check_instance_settings(values)


def check_qdrant_values(qdrant: Mapping, values: Mapping) -> list[Problem]:
    problems = check_keys(qdrant, QDRANT_CHART_KEYS, f"chart qdrant/qdrant {QDRANT_CHART_VERSION}")
    api_key = dig(qdrant, "apiKey", "valueFrom", "secretKeyRef")
    if not isinstance(api_key, Mapping):
        problems.append(Problem("apiKey", "take the API key from a Secret (apiKey.valueFrom.secretKeyRef)"))
    nodes = qdrant.get("replicaCount", 1)
    for index, deployment in enumerate(dig(values, *DEPLOYMENTS.split(".")) or []):
        entries = {
            entry.name: entry for entry in env_entries(deployment.get("env"), f"{DEPLOYMENTS}[{index}].env")
        }
        read_key = entries.get("QDRANT_API_KEY")
        if isinstance(api_key, Mapping) and read_key is not None and read_key.secret is not None:
            served = (str(api_key.get("name")), str(api_key.get("key")))
            if read_key.secret != served:
                problems.append(
                    Problem(
                        "apiKey.valueFrom.secretKeyRef",
                        f"Secret {served[0]}/{served[1]}, but the code location reads QDRANT_API_KEY from "
                        f"{read_key.secret[0]}/{read_key.secret[1]}",
                    )
                )
        replicas = entries.get("PERSONA_QDRANT_REPLICAS")
        wanted = str(replicas.value) if replicas is not None else "1"
        if wanted.isdigit() and isinstance(nodes, int) and int(wanted) > nodes:
            problems.append(
                Problem(
                    "replicaCount",
                    f"{nodes} Qdrant nodes cannot hold PERSONA_QDRANT_REPLICAS={wanted} copies",
                )
            )
    if isinstance(nodes, int) and nodes > 1 and dig(qdrant, "config", "cluster", "enabled") is not True:
        problems.append(Problem("config.cluster.enabled", f"must be true for {nodes} nodes"))
    if not dig(qdrant, "persistence", "size"):
        problems.append(Problem("persistence.size", "size each node's persistent volume"))
    return problems


def load_yaml(path: Path) -> Mapping:
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a mapping of values")
    return loaded


def check_files(values_path: Path = DAGSTER_VALUES, qdrant_path: Path = QDRANT_VALUES) -> list[str]:
    """Every problem of the two files, one line each, prefixed with the file's name."""
    values, qdrant = load_yaml(values_path), load_yaml(qdrant_path)
    return [f"{values_path.name}: {problem}" for problem in check_dagster_values(values)] + [
        f"{qdrant_path.name}: {problem}" for problem in check_qdrant_values(qdrant, values)
    ]


def main(arguments: list[str]) -> int:
    paths = [Path(argument) for argument in arguments[:2]]
    problems = check_files(*paths)
    for line in problems:
        print(line)
    if not problems:
        print(f"{(paths or [DAGSTER_VALUES])[0]} and {(paths[1:] or [QDRANT_VALUES])[0]}: no problem found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
