"""Where things live on disk, resolved from environment variables.

One home folder (`PERSONA_HOME`, default `./.persona`) holds the embedded default:
the landing zone, the SQLite persona store, the local Qdrant path and Dagster's
instance. Every location can be overridden on its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path


def persona_home() -> Path:
    return Path(os.environ.get("PERSONA_HOME") or ".persona").expanduser().resolve()


STORAGE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_storage_url(text: str) -> bool:
    """An object-store URL (`s3://bucket/prefix`); a `file://` URL is a local path."""
    return bool(STORAGE_URL.match(text)) and not text.lower().startswith("file://")


def landing_location() -> str:
    """The landing zone (PERSONA_LANDING_DIR, default $PERSONA_HOME/landing): a local folder, made
    absolute, or an object-store URL as given."""
    override = (os.environ.get("PERSONA_LANDING_DIR") or "").strip()
    if is_storage_url(override):
        return override
    return str(Path(override).expanduser().resolve() if override else persona_home() / "landing")


def landing_dir() -> Path:
    """The landing zone as a local folder, for what writes one (the demo generator)."""
    location = landing_location()
    if is_storage_url(location):
        raise ValueError(
            "PERSONA_LANDING_DIR is an object-store URL: this command writes a local folder (give --out, "
            "then copy it to the store)"
        )
    return Path(location)


def persona_db_url() -> str:
    return os.environ.get("PERSONA_DB_URL") or f"sqlite:///{persona_home() / 'persona.db'}"


NORMS_KEY_MIN_CHARACTERS = 32


def norms_signing_key() -> bytes | None:
    """The key that signs the anomaly norms kept in the persona store (they are loaded with
    pickle, so only what this deployment signed is ever loaded). PERSONA_NORMS_KEY (a secret of
    at least 32 characters, the same for every process of a deployment); unset on the embedded
    default, a key file made once in the home folder; unset beside PERSONA_DB_URL, no key: the
    norms are not kept and every run scores every device."""
    configured = os.environ.get("PERSONA_NORMS_KEY")
    if configured is not None:
        if len(configured.strip()) < NORMS_KEY_MIN_CHARACTERS:
            raise ValueError(f"PERSONA_NORMS_KEY: expected at least {NORMS_KEY_MIN_CHARACTERS} characters")
        return configured.strip().encode()
    if os.environ.get("PERSONA_DB_URL"):
        return None
    path = persona_home() / "norms.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(os.urandom(32).hex())
    return path.read_text().strip().encode()


def history_location() -> str:
    """The update history's root (PERSONA_HISTORY_DIR, default $PERSONA_HOME/history): a local
    folder, made absolute, or an object-store URL as given."""
    override = (os.environ.get("PERSONA_HISTORY_DIR") or "").strip()
    if is_storage_url(override):
        return override
    return str(Path(override).expanduser().resolve() if override else persona_home() / "history")


SHARD_LIMITS = (1, 1024)


def _shard_count(variable: str) -> int | None:
    text = (os.environ.get(variable) or "").strip()
    if not text:
        return None
    low, high = SHARD_LIMITS
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{variable}={text!r}: expected a whole number from {low} to {high}")
    return int(text)


def device_shards() -> int:
    """Device shards (PERSONA_DEVICE_SHARDS, default 1): above 1, ingest and profiles are
    partitioned by day and shard, a device's shard a stable hash of its id."""
    return _shard_count("PERSONA_DEVICE_SHARDS") or 1


def history_shards() -> int:
    """Files per day of the update history: one per device shard when there are several
    (PERSONA_HISTORY_SHARDS may only repeat that count); else PERSONA_HISTORY_SHARDS, default 1."""
    configured = _shard_count("PERSONA_HISTORY_SHARDS")
    devices = device_shards()
    if devices > 1:
        if configured is not None and configured != devices:
            raise ValueError(
                f"PERSONA_HISTORY_SHARDS={configured} differs from PERSONA_DEVICE_SHARDS={devices}: "
                "with device shards the history keeps one file per shard (leave it unset)"
            )
        return devices
    return configured or 1


def qdrant_path() -> Path:
    return persona_home() / "qdrant"


def dagster_home() -> Path:
    override = os.environ.get("DAGSTER_HOME")
    return Path(override).expanduser().resolve() if override else persona_home() / "dagster"


def ground_truth_dir() -> Path:
    return persona_home() / "ground_truth"


def sensor_interval_seconds(default: int) -> int:
    """How often a sensor ticks: `default`, or PERSONA_SENSOR_INTERVAL_SECONDS for every sensor
    (read when the code location loads)."""
    override = os.environ.get("PERSONA_SENSOR_INTERVAL_SECONDS")
    if not override:
        return default
    if not override.isdigit() or int(override) < 1:
        raise ValueError(
            f"PERSONA_SENSOR_INTERVAL_SECONDS={override!r}: expected a whole number of seconds >= 1"
        )
    return int(override)


def automation_on() -> bool:
    """Whether the schedule and sensors start running (default) or stopped, e.g. in a staging
    deployment that only backfills: PERSONA_AUTOMATION=off. Either way they can be toggled in
    the UI."""
    value = os.environ.get("PERSONA_AUTOMATION", "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"PERSONA_AUTOMATION={value!r}: expected on or off")
    return value == "on"


SERVER_LAYOUT_VARIABLES = {
    "PERSONA_QDRANT_SHARDS": "shards",
    "PERSONA_QDRANT_REPLICAS": "replicas",
    "PERSONA_QDRANT_VECTORS_ON_DISK": "vectors_on_disk",
    "PERSONA_QDRANT_QUANTIZATION": "quantization",
    "PERSONA_QDRANT_WRITE_PARALLELISM": "write_parallelism",
}
# The bounds of the whole-number settings (VectorIndex's fields use them too) and the choices.
QDRANT_LIMITS = {"shards": (1, 256), "replicas": (1, 16), "write_parallelism": (1, 64)}
QDRANT_QUANTIZATIONS = ("none", "scalar")


def qdrant_server_layout(environ: Mapping[str, str]) -> dict[str, object]:
    """The VectorIndex settings of a Qdrant server's collections that `environ` sets; a value
    that is not one of its kind is a one-line error naming the variable."""
    found: dict[str, object] = {}
    for variable, field in SERVER_LAYOUT_VARIABLES.items():
        text = (environ.get(variable) or "").strip()
        if not text:
            continue
        if field in QDRANT_LIMITS:
            low, high = QDRANT_LIMITS[field]
            if not text.isdigit():
                raise ValueError(f"{variable}={text!r} is not a whole number")
            if not low <= int(text) <= high:
                raise ValueError(f"{variable}={int(text)}: expected {low} to {high}")
            found[field] = int(text)
        elif field == "vectors_on_disk":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{variable}={text!r}: expected true or false")
            found[field] = text.lower() in ("true", "1", "yes")
        else:
            if text not in QDRANT_QUANTIZATIONS:
                raise ValueError(f"{variable}={text!r}: expected {' or '.join(QDRANT_QUANTIZATIONS)}")
            found[field] = text
    return found
