"""anomaly_scores between segment fits: only the devices whose vector or segment changed are
scored, against the norms stored with the last scoring of every device."""

from __future__ import annotations

import hashlib
import hmac
import pickle
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.anomalies import storage as anomaly_storage
from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.anomalies.scoring import ROLE_ORDER, calibrated_flags, score_from_log_p
from persona_pipeline.resources import PersonaConfig
from persona_pipeline.segments.assets import device_clusters, segments
from persona_pipeline.settings import norms_signing_key
from persona_pipeline.store.tables import anomaly_norms, persona_vectors
from persona_pipeline.store.tables import anomaly_scores as scores_table
from persona_pipeline_tests.conftest import evaluated_fleet, resources_for, table


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from evaluated_fleet(tmp_path_factory.mktemp("incremental"), devices=1200, days=4, seed=11)


def vectors(store) -> pd.DataFrame:
    frame = table(store, "persona_vectors", order_by=["device_id"]).set_index("device_id")
    dimensions = len(PersonaConfig().feature_schema().dimension_names)
    matrix = np.frombuffer(b"".join(frame["vector"].tolist()), dtype="<f4").reshape(len(frame), dimensions)
    return pd.DataFrame(matrix.astype(np.float64), index=frame.index)


def set_vectors(store, rows: pd.DataFrame) -> None:
    """Store new vectors for `rows`' devices, as persona_vectors would after their profile changed."""
    now = pd.Timestamp.now(tz="UTC").to_pydatetime()
    with store.begin() as connection:
        for device_id, values in rows.iterrows():
            connection.execute(
                persona_vectors.update()
                .where(persona_vectors.c.device_id == device_id)
                .values(vector=values.to_numpy(dtype="<f4").tobytes(), computed_at=now)
            )


def give_a_value_no_device_had(store, devices: pd.Index) -> None:
    """New vectors for `devices`: the first context dimension far beyond any device's value."""
    matrix = vectors(store)
    context = np.flatnonzero(PersonaConfig().feature_schema().dimension_roles == "context")[0]
    changed = matrix.loc[devices].copy()
    changed[context] = matrix[context].max() + 5 * matrix[context].std()
    set_vectors(store, changed)


def materialize(resources, config: dict | None = None) -> dict:
    run_config = {"ops": {"anomaly_scores": {"config": config}}} if config else None
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [segments, device_clusters, anomaly_scores],
            resources=resources,
            instance=instance,
            run_config=run_config,
        )
    return result.asset_materializations_for_node("anomaly_scores")[0].metadata


def test_between_fits_only_changed_devices_are_scored_and_the_fleet_is_flagged_again(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    first = materialize(resources, {"rescore_all": True})
    assert first["scoring"].value == "every device: asked (rescore_all)"
    assert store.scalar(sa.select(sa.func.count()).select_from(anomaly_norms)) == 1
    before = table(store, "anomaly_scores").set_index("device_id")
    assert before["is_anomaly"].any()

    matrix = vectors(store)
    health = np.flatnonzero(PersonaConfig().feature_schema().dimension_roles == "health")
    healthy = before.index[~before["is_anomaly"].astype(bool)]
    failing, drifting = healthy[0], healthy[1]
    healed = before.index[before["is_anomaly"].astype(bool)][0]
    changed = matrix.loc[[failing, drifting, healed]].copy()
    changed.loc[failing, health] = matrix[health].max() + 10 * matrix[health].std()
    changed.loc[drifting] = matrix.loc[drifting] * 1.01
    same_segment = before.index[
        (before["cluster_id"] == before.loc[healed, "cluster_id"]) & ~before["is_anomaly"]
    ]
    changed.loc[healed] = matrix.loc[same_segment].median()
    set_vectors(store, changed)

    metadata = materialize(resources)

    assert metadata["devices_changed"].value == 3
    assert metadata["scoring"].value.startswith("the devices whose vector or segment changed")
    after = table(store, "anomaly_scores").set_index("device_id")
    assert len(after) == len(before)
    after = after.reindex(before.index)
    assert bool(after.loc[failing, "is_anomaly"]) and after.loc[failing, "kind"] == "health"
    assert after.loc[failing, "score"] >= 0.5 and isinstance(after.loc[failing, "reason"], str)
    assert not after.loc[drifting, "is_anomaly"] and not after.loc[healed, "is_anomaly"]
    rescored = after["scored_at"] > before["scored_at"]
    turned = after["is_anomaly"].astype(bool) != before["is_anomaly"].astype(bool)
    # Only the changed devices and those whose flag turned were written again.
    assert set(after.index[rescored]) == {failing, drifting, healed} | set(after.index[turned])
    assert metadata["devices_scored"].value == rescored.sum()
    assert metadata["anomalies"].value == after["is_anomaly"].sum()
    flagged = after["is_anomaly"].astype(bool)
    assert (after.loc[flagged, "score"] >= 0.5).all() and (after.loc[~flagged, "score"] < 0.5).all()
    assert after.loc[flagged, "reason"].notna().all()

    # Scoring every device anew flags the same devices.
    full = materialize(resources, {"rescore_all": True})
    again = table(store, "anomaly_scores").set_index("device_id")
    assert set(again.index[again["is_anomaly"].astype(bool)]) == set(after.index[flagged])
    assert full["anomalies"].value == metadata["anomalies"].value


def test_a_device_without_a_vector_leaves_and_nothing_changed_writes_nothing(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    before = table(store, "anomaly_scores").set_index("device_id")
    gone = before.index[5]
    with store.begin() as connection:
        connection.execute(persona_vectors.delete().where(persona_vectors.c.device_id == gone))

    metadata = materialize(resources)

    after = table(store, "anomaly_scores").set_index("device_id")
    assert gone not in after.index and metadata["devices_left"].value == 1
    assert metadata["devices_scored"].value == 0
    kept = before.drop(index=gone)
    assert after.reindex(kept.index)["scored_at"].equals(kept["scored_at"])
    unchanged = materialize(resources)
    assert unchanged["devices_scored"].value == 0 and unchanged["devices_left"].value == 0


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"fdr": 0.01}, "the anomaly settings changed"),
        ({"detector": "iforest"}, "the anomaly settings changed"),
    ],
)
def test_new_settings_or_new_segments_score_every_device(fleet, config, reason):
    resources = resources_for(fleet.home)
    materialize(resources)
    assert materialize(resources, config)["scoring"].value == f"every device: {reason}"
    assert materialize(resources, config)["devices_changed"].value == 0
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [segments, device_clusters, anomaly_scores],
            resources=resources,
            instance=instance,
            run_config={
                "ops": {"segments": {"config": {"refit": True}}, "anomaly_scores": {"config": config}}
            },
        )
    metadata = result.asset_materializations_for_node("anomaly_scores")[0].metadata
    assert metadata["scoring"].value == "every device: the segments were fitted anew"


def test_norms_a_new_library_cannot_read_mean_scoring_every_device(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    with store.begin() as connection:
        connection.execute(anomaly_norms.update().values(norms=b"not a pickle"))
    assert materialize(resources)["scoring"].value == "every device: the stored norms cannot be read"
    assert materialize(resources)["devices_changed"].value == 0


def test_devices_whose_flag_the_fleet_turns_are_written_again_with_their_p_value(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    before = table(store, "anomaly_scores").set_index("device_id")
    flagged = before["is_anomaly"].astype(bool)
    raised, lowered = before.index[~flagged][0], before.index[flagged][0]
    scores = scores_table
    with store.begin() as connection:  # as if an earlier run had found these p-values
        connection.execute(scores.update().where(scores.c.device_id == raised).values(p_value=1e-12))
        connection.execute(scores.update().where(scores.c.device_id == lowered).values(p_value=0.9))

    metadata = materialize(resources)

    after = table(store, "anomaly_scores").set_index("device_id")
    assert metadata["devices_changed"].value == 0 and metadata["flags_turned"].value == 2
    assert bool(after.loc[raised, "is_anomaly"]) and after.loc[raised, "score"] >= 0.5
    assert after.loc[raised, "p_value"] == pytest.approx(1e-12)
    assert isinstance(after.loc[raised, "reason"], str) and after.loc[raised, "kind"] in ROLE_ORDER
    assert not after.loc[lowered, "is_anomaly"] and after.loc[lowered, "score"] < 0.5
    assert pd.isna(after.loc[lowered, "kind"])
    assert set(after.index[after["scored_at"] > before["scored_at"].reindex(after.index)]) == {
        raised,
        lowered,
    }


def test_devices_that_change_alike_at_once_are_judged_with_the_whole_fleet_not_the_old_norms(fleet):
    """A new behaviour many devices share (a wave of moves, a new app) is normal for the fleet
    that has it; norms fitted before it would flag every one of them."""
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    before = table(store, "anomaly_scores").set_index("device_id")
    wave = before.index[~before["is_anomaly"].astype(bool)][:60]
    give_a_value_no_device_had(store, wave)

    metadata = materialize(resources)

    assert metadata["scoring"].value.startswith("every device: ")
    assert metadata["scoring"].value.endswith("the fleet moved")
    after = table(store, "anomaly_scores").set_index("device_id")
    assert after.loc[wave, "is_anomaly"].astype(bool).sum() < 10


def test_a_fleet_larger_than_the_sample_is_scored_against_norms_of_a_sample_page_by_page(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    exact = table(store, "anomaly_scores").set_index("device_id")
    failing = pd.read_csv(fleet.home / "ground_truth" / "devices.csv").set_index("device_id")["failing"]

    sampled = {"rescore_all": True, "norms_sample_size": 1_000}
    one_page = materialize(resources, {**sampled, "page_rows": 5_000})
    by_page = table(store, "anomaly_scores").set_index("device_id").sort_index()
    materialize(resources, {**sampled, "page_rows": 1_000})  # 1,200 devices: two pages
    two_pages = table(store, "anomaly_scores").set_index("device_id").sort_index()

    columns = ["score", "is_anomaly", "p_value", "kind", "reason", "cluster_id", "segment_z", "detector_z"]
    pd.testing.assert_frame_equal(by_page[columns], two_pages[columns])
    assert one_page["devices"].value == len(exact) == len(by_page)
    assert 900 <= one_page["norms_fitted_on"].value <= 1_100
    flagged = by_page.index[by_page["is_anomaly"].astype(bool)]
    assert by_page.loc[flagged, "reason"].notna().all() and (by_page.loc[flagged, "score"] >= 0.5).all()
    found_exactly = set(exact.index[exact["is_anomaly"].astype(bool)]) & set(failing.index[failing])
    assert found_exactly and found_exactly <= set(flagged)
    assert failing.reindex(flagged).fillna(False).mean() >= 0.8


def test_segment_profiles_of_a_fleet_larger_than_the_sample_come_from_a_sample_and_count_every_device(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]

    def refit(config: dict) -> pd.DataFrame:
        with dg.instance_for_test() as instance:
            dg.materialize(
                [segments, device_clusters],
                resources=resources,
                instance=instance,
                run_config={"ops": {"segments": {"config": {"refit": True, **config}}}},
            )
        registry = table(store, "segments")
        return registry[registry["active"]].set_index("cluster_id").sort_index()

    whole = refit({})
    sampled = refit({"profile_sample_size": 1_000})
    assert sampled.index.tolist() == whole.index.tolist()  # the same fit: only the profiles' rows differ
    assert sampled["devices"].tolist() == whole["devices"].tolist()
    assert sampled["devices"].sum() == len(table(store, "device_clusters"))
    assert (sampled["traits"] != "").all() and sampled["name"].notna().all()


def test_a_few_failing_devices_among_the_changed_ones_stay_between_fits(fleet):
    """Health is judged against the fleet's norm: faults do not make the fleet 'move'."""
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    before = table(store, "anomaly_scores").set_index("device_id")
    matrix = vectors(store)
    health = np.flatnonzero(PersonaConfig().feature_schema().dimension_roles == "health")
    failing = before.index[~before["is_anomaly"].astype(bool)][:6]
    changed = matrix.loc[failing].copy()
    changed.loc[:, health] = (matrix[health].max() + 10 * matrix[health].std()).to_numpy()
    set_vectors(store, changed)

    metadata = materialize(resources)

    assert metadata["devices_changed"].value == 6  # scored between fits, not anew
    after = table(store, "anomaly_scores").set_index("device_id")
    assert after.loc[failing, "is_anomaly"].astype(bool).all()
    assert (after.loc[failing, "kind"] == "health").all()
    assert metadata["anomalies_by_kind"].value["health"] >= 6


def resign(store, change) -> None:
    """Rewrite the stored norms after `change(norms)`, signed with this deployment's key."""
    row = store.read_frame(sa.select(anomaly_norms.c.norms))
    norms, stats = pickle.loads(bytes(row["norms"].iloc[0]))
    change(norms)
    blob = pickle.dumps((norms, stats))
    signature = hmac.new(norms_signing_key(), blob, hashlib.sha256).hexdigest()
    with store.begin() as connection:
        connection.execute(anomaly_norms.update().values(norms=blob, signature=signature))


class LeavesAMark:
    """Unpickling it writes a file: proof that a blob was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("loaded",))


def test_norms_that_no_longer_fit_the_schema_or_were_not_signed_here_are_never_applied(fleet, tmp_path):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})

    def other_roles(norms) -> None:  # as if the feature schema's roles had been edited since
        norms.roles = np.where(norms.roles == "health", "context", norms.roles)

    resign(store, other_roles)
    assert materialize(resources)["scoring"].value == "every device: the keys' roles changed"

    mark = tmp_path / "mark"
    with store.begin() as connection:  # a blob someone without the key put there
        connection.execute(anomaly_norms.update().values(norms=pickle.dumps(LeavesAMark(str(mark)))))
    assert materialize(resources)["scoring"].value == "every device: the stored norms cannot be read"
    assert not mark.exists()

    with store.begin() as connection:
        connection.execute(anomaly_norms.update().values(versions='{"pyod": "0.0"}'))
    reason = materialize(resources)["scoring"].value
    assert reason == "every device: the norms were stored by other library versions"
    assert materialize(resources)["devices_changed"].value == 0


def test_a_detector_that_keeps_its_training_data_keeps_no_norms(fleet):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    metadata = materialize(resources, {"detector": "ecod"})
    assert metadata["norms_kept"].value is False and table(store, "anomaly_norms").empty
    again = materialize(resources, {"detector": "ecod"})
    assert (
        again["scoring"].value
        == "every device: the ecod detector keeps its training data, so no norms are kept"
    )
    assert materialize(resources)["norms_kept"].value is True


def test_without_a_signing_key_beside_a_shared_store_no_norms_are_kept(fleet, monkeypatch):
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    monkeypatch.delenv("PERSONA_NORMS_KEY", raising=False)
    monkeypatch.setenv("PERSONA_DB_URL", resources["persona_store"].url)
    materialize(resources, {"rescore_all": True})
    assert table(store, "anomaly_norms").empty
    reason = materialize(resources)["scoring"].value
    assert reason == "every device: no key signs the norms (set PERSONA_NORMS_KEY), so none are kept"
    monkeypatch.setenv("PERSONA_NORMS_KEY", "too short")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [anomaly_scores], resources=resources, instance=instance, raise_on_error=False
        )
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "PERSONA_NORMS_KEY: expected at least 32 characters" in failure.message
    assert "too short" not in failure.message
    planted = "planted-norms-key-" + "7" * 30
    monkeypatch.setenv("PERSONA_NORMS_KEY", planted)
    materialize(resources, {"rescore_all": True})
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [segments, device_clusters, anomaly_scores], resources=resources, instance=instance
        )
        logged = " ".join(str(event) for event in instance.all_logs(result.run_id))
    assert result.asset_materializations_for_node("anomaly_scores")[0].metadata["devices_changed"].value == 0
    assert planted not in logged
    stored = table(store, "anomaly_norms")
    assert planted not in stored.drop(columns="norms").astype(str).to_json()
    assert planted.encode() not in bytes(stored["norms"].iloc[0])


def test_a_rare_new_behaviour_on_a_few_devices_is_flagged_between_fits(fleet):
    """Five devices (0.4 % of the fleet) with a value no device had: rare whatever the norms, so
    the run stays between fits and flags them."""
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    materialize(resources, {"rescore_all": True})
    before = table(store, "anomaly_scores").set_index("device_id")
    odd = before.index[~before["is_anomaly"].astype(bool)][:5]
    give_a_value_no_device_had(store, odd)

    metadata = materialize(resources)

    assert metadata["devices_changed"].value == 5
    after = table(store, "anomaly_scores").set_index("device_id")
    assert after.loc[odd, "is_anomaly"].astype(bool).all()


def stored_scores(rng: np.random.Generator, devices: int, fdr: float) -> pd.DataFrame:
    """Scores as a fleet's last runs left them: uniform p-values with ties at 0 and at exactly
    `fdr`, flags by Benjamini-Hochberg, and a few devices still flagged from an earlier cut."""
    p_value = rng.uniform(0, 1, devices)
    p_value[rng.choice(devices, 40, replace=False)] = 0.0
    p_value[rng.choice(devices, 15, replace=False)] = fdr
    p_value[rng.choice(devices, 200, replace=False)] = rng.uniform(0, fdr / 50, 200)
    log_p = np.log(np.maximum(p_value, 1e-300))
    is_anomaly, cut = calibrated_flags(log_p, fdr, None)
    is_anomaly[rng.choice(np.flatnonzero(p_value > 0.5), 5, replace=False)] = True
    return pd.DataFrame(
        {
            "device_id": [f"device-{i:05d}" for i in rng.permutation(devices)],
            "score": score_from_log_p(log_p, cut),
            "is_anomaly": is_anomaly,
            "cluster_id": 0,
            "segment_z": 0.0,
            "detector": "hbos",
            "detector_z": 0.0,
            "scored_at": pd.Timestamp("2026-03-01", tz="UTC"),
            "p_value": p_value,
        }
    )


@pytest.mark.parametrize(("fdr", "contamination"), [(0.05, None), (0.2, None), (0.05, 0.03)])
def test_the_fleet_flagged_from_the_flags_read_equals_the_fleet_flagged_from_every_device(
    resources, fdr, contamination
):
    """Between fits the fleet is flagged again from the stored p-values; with the false-discovery
    rate only the devices it could flag and those flagged are read whole. The flags, the cut, the
    devices whose flag turns and the highest scores equal those of every device read."""
    store = resources["persona_store"]
    rng = np.random.default_rng(7)
    scores = stored_scores(rng, 3000, fdr)
    with store.begin() as connection:
        store.insert_frame(connection, scores_table, scores)
    ids = scores["device_id"].to_numpy()
    changed, gone = ids[:60].tolist(), ids[60:70].tolist()
    changed_log_p = np.log(rng.uniform(0, 1, len(changed) + 4) ** 3)  # 4 devices new to the scores
    every = scores[~scores["device_id"].isin([*changed, *gone])].sort_values("device_id")
    log_p = np.log(np.maximum(every["p_value"].to_numpy(), 1e-300))
    flags, cut = calibrated_flags(np.concatenate([log_p, changed_log_p]), fdr, contamination)
    top = 25

    kept = anomaly_storage.read_stored_flags(
        store, [*changed, *gone], fdr if contamination is None else None, top
    )

    kept_log_p = np.log(np.maximum(kept.rows["p_value"].to_numpy(), 1e-300))
    read_flags, read_cut = calibrated_flags(
        np.concatenate([kept_log_p, np.zeros(kept.others), changed_log_p]), fdr, contamination
    )
    assert read_cut == cut
    assert read_flags[len(kept.rows) + kept.others :].tolist() == flags[len(every) :].tolist()
    assert len(kept.rows) + kept.others == len(every)
    assert kept.rows["device_id"].is_monotonic_increasing
    every_flag = pd.Series(flags[: len(every)], index=every["device_id"].to_numpy())
    read_flag = pd.Series(read_flags[: len(kept.rows)], index=kept.rows["device_id"].to_numpy())
    assert read_flag.equals(every_flag.reindex(read_flag.index))
    left_out = every[~every["device_id"].isin(kept.rows["device_id"])]
    assert not every_flag.reindex(left_out["device_id"]).any() and not left_out["is_anomaly"].any()
    if contamination is None:
        assert kept.others > len(every) / 2  # what is read follows the flags, not the fleet
        turned = every_flag.index[every_flag.to_numpy() != every["is_anomaly"].to_numpy()]
        assert len(turned) > 0
        assert set(turned) <= set(kept.rows["device_id"])
    else:
        assert kept.others == 0
    assert kept.top_scores.tolist() == np.sort(every["score"].to_numpy())[::-1][:top].tolist()


@pytest.mark.parametrize("fdr", [0.05, None], ids=["fdr", "contamination"])
def test_scores_an_erasure_deletes_between_the_reads_leave_no_negative_count(resources, fdr, monkeypatch):
    """An erasure deletes a stored score (a flagged device's) while the flags are read, after the
    rows and before the count: the devices left out are never fewer than none."""
    store = resources["persona_store"]
    scores = stored_scores(np.random.default_rng(3), 500, 0.05)
    with store.begin() as connection:
        store.insert_frame(connection, scores_table, scores)
    ids = sorted(scores["device_id"])
    real_read_in = store.read_frame_in

    def erase_one_then_read(query, column, values):
        with store.begin() as connection:
            connection.execute(scores_table.delete().where(scores_table.c.device_id == ids[-1]))
        return real_read_in(query, column, values)

    monkeypatch.setattr(type(store), "read_frame_in", lambda self, *args: erase_one_then_read(*args))
    kept = anomaly_storage.read_stored_flags(store, [ids[0], ids[1], ids[0]], fdr, 5)

    assert kept.others >= 0  # every stored device read: the count is one short, and no one is left out
    assert len(kept.rows) + kept.others == (497 if fdr is not None else 498)  # off by the one erased
