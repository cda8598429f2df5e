"""Which executor runs a job's steps: the same code, chosen by environment variables.

`PERSONA_EXECUTOR` unset (or `multiprocess`) keeps Dagster's default, one process per step;
`in_process` runs every step in the run's process; `celery` sends each step as a task to Celery
workers (`celery -A persona_pipeline.worker worker`) through the broker `PERSONA_CELERY_BROKER`,
on the queue `PERSONA_CELERY_QUEUE` (default `dagster`). The run launcher's process orchestrates
and the workers execute, so every worker needs this package, the same environment and a Dagster
instance it can reach (the instance reference travels with each task). `k8s` (Kubernetes, with
the `k8s` extra) runs each step as a Kubernetes Job of its own, with the image, environment and
Secrets of the run's pod under the K8sRunLauncher (`deploy/helm/values.yaml`); the launchpad's
`execution.config` can limit the step pods per run (`max_concurrent`).
"""

from __future__ import annotations

import os
import warnings

import dagster as dg

EXECUTOR_VARIABLE = "PERSONA_EXECUTOR"
BROKER_VARIABLE = "PERSONA_CELERY_BROKER"
BACKEND_VARIABLE = "PERSONA_CELERY_BACKEND"
QUEUE_VARIABLE = "PERSONA_CELERY_QUEUE"
EXECUTORS = ("multiprocess", "in_process", "celery", "k8s")
DEFAULT_QUEUE = "dagster"
DEFAULT_BACKEND = "rpc://"


class ExecutorSettingsError(ValueError):
    """The executor variables name an unknown executor or leave out the broker."""


def executor_name() -> str:
    name = (os.environ.get(EXECUTOR_VARIABLE) or "multiprocess").strip().lower().replace("-", "_")
    if name not in EXECUTORS:
        raise ExecutorSettingsError(f"{EXECUTOR_VARIABLE}={name!r}: expected one of {', '.join(EXECUTORS)}")
    return name


def distributed() -> bool:
    """Whether steps run outside the process that launched the run."""
    return executor_name() in ("celery", "k8s")


def celery_queue() -> str:
    return os.environ.get(QUEUE_VARIABLE) or DEFAULT_QUEUE


def executor_from_env() -> dg.ExecutorDefinition | None:
    """The Definitions' executor; None keeps Dagster's default (multiprocess)."""
    name = executor_name()
    if name == "multiprocess":
        return None
    if name == "in_process":
        return dg.in_process_executor
    if name == "k8s":
        return _k8s_executor()
    from dagster_celery import celery_executor

    if not os.environ.get(BROKER_VARIABLE):
        raise ExecutorSettingsError(
            f"{EXECUTOR_VARIABLE}=celery needs {BROKER_VARIABLE} (e.g. redis://host:6379/0)"
        )
    # dagster-celery registers its task again for each step it submits, and Celery (5.7) warns
    # each time; it is the same task, so the warning says nothing.
    warnings.filterwarnings("ignore", message="Task name 'execute_plan' is already registered")
    # The URLs are passed by variable name, so run configs, the UI and the logs never hold them.
    backend = {"env": BACKEND_VARIABLE} if os.environ.get(BACKEND_VARIABLE) else DEFAULT_BACKEND
    return celery_executor.configured(
        {
            "broker": {"env": BROKER_VARIABLE},
            "backend": backend,
            "config_source": {"task_default_queue": celery_queue()},
        },
        name="celery",
    )


def _k8s_executor() -> dg.ExecutorDefinition:
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ExecutorSettingsError(
            f"{EXECUTOR_VARIABLE}=k8s needs dagster-k8s: install this project with its k8s extra "
            "(pip install '.[k8s]')"
        ) from None
    return k8s_job_executor


def celery_app_args() -> dict:
    """The Celery app settings of a worker, read from the same variables as the executor's."""
    from dagster_celery.config import DEFAULT_CONFIG

    broker = os.environ.get(BROKER_VARIABLE)
    if not broker:
        raise ExecutorSettingsError(f"a Celery worker needs {BROKER_VARIABLE} (e.g. redis://host:6379/0)")
    return {
        "broker": broker,
        "backend": os.environ.get(BACKEND_VARIABLE) or DEFAULT_BACKEND,
        "include": [],
        "config_source": {**DEFAULT_CONFIG, "task_default_queue": celery_queue()},
    }
