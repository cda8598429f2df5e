"""Feedback batches: validation, the offer_feedback partitions and the sensor that adds them."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from persona_pipeline.feedback.assets import key_weights, offer_feedback
from persona_pipeline.feedback.jobs import weights_job
from persona_pipeline.feedback.sensors import configured_weights_sensor, offer_feedback_sensor
from persona_pipeline.feedback.validation import validate_feedback
from persona_pipeline.partitions import offer_feedback_batches
from persona_pipeline.personas.assets import persona_vectors
from persona_pipeline.personas.weights import (
    WeightsNotRecorded,
    configured_weights_recorded,
    current_weights,
    record_configured_weights,
)
from persona_pipeline.resources import PersonaConfig, PersonaStore
from persona_pipeline_tests.conftest import evaluated_fleet, resources_for, table

# Responses to unknown offers are rejected at once instead of held (see test_feedback_hardening).
NO_HOLD = {"ops": {"offer_feedback": {"config": {"hold_unknown_offers_days": 0}}}}


@pytest.fixture(scope="module")
def offered(tmp_path_factory):
    """A small demo fleet run through the chain, so offers exist to respond to."""
    yield from evaluated_fleet(tmp_path_factory.mktemp("feedback"), devices=300, days=3, seed=4)


def write_batch(home: Path, batch: str, lines: list[str], complete: bool = True) -> Path:
    folder = home / "landing" / "offer_feedback" / f"batch={batch}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-0.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if complete:
        (folder / "_SUCCESS").touch()
    return folder


# After the offers of the evaluated fleet (its days end yesterday), before now.
JUST_NOW = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def response(offer_id: str, answer: str, at: str = JUST_NOW) -> str:
    return json.dumps({"offer_id": offer_id, "response": answer, "responded_at": at})


def test_validation_rejects_unknown_responses_and_timestamps_and_sets_unknown_offers_apart():
    rows = pd.DataFrame(
        {
            "batch_id": "b1",
            "offer_id": ["o1", "o1", "nope", "o2", "o2", None],
            "response": ["accepted", "accepted", "accepted", "maybe", "used", "used"],
            "responded_at": [
                "2026-03-08T10:00Z",
                "2026-03-08T11:00Z",
                "2026-03-08T10:00Z",
                "2026-03-08T10:00Z",
                "yesterday",
                "2026-03-08T10:00Z",
            ],
            "source_file": "f.jsonl",
            "source_row": [1, 2, 3, 4, 5, 6],
            "raw": None,
        }
    )
    offers = pd.DataFrame(
        {"created_at": pd.Timestamp("2026-03-08T01:00Z"), "offer_day": "2026-03-07"}, index=["o1", "o2"]
    )
    checked = validate_feedback(rows, offers, pd.Timestamp("2026-03-09T00:00Z"), pd.Timedelta(minutes=5))
    responses, rejects = checked.responses, checked.rejects
    assert responses[["offer_id", "response"]].values.tolist() == [["o1", "accepted"]]  # one, the latest
    assert responses["responded_at"].iloc[0] == pd.Timestamp("2026-03-08T11:00Z")
    assert rejects.set_index("source_row")["reason_code"].to_dict() == {
        4: "unknown_response",
        5: "bad_timestamp",
        6: "missing_offer_id",
    }
    assert checked.unknown[["source_row", "offer_id"]].values.tolist() == [[3, "nope"]]  # held, not lost
    assert (rejects["batch_id"] == "b1").all()


def test_sensor_adds_each_complete_batch_once_and_the_run_loads_it(offered):
    home = offered.home
    resources = resources_for(home)
    offers = table(resources["persona_store"], "service_recommendations")["offer_id"].tolist()
    assert len(offers) >= 4
    write_batch(
        home,
        "2026-03-08-a",
        [
            response(offers[0], "accepted"),
            response(offers[1], "rejected"),
            response(offers[2], "used"),
            response("offer-unknown", "accepted"),
            '{"offer_id": "' + offers[3] + '", "respo',  # truncated line
        ],
    )
    write_batch(home, "2026-03-08-b", [response(offers[3], "dismissed")], complete=False)

    with dg.instance_for_test() as instance:
        landing = {"landing_zone": resources["landing_zone"], "persona_store": resources["persona_store"]}
        first = offer_feedback_sensor(dg.build_sensor_context(instance=instance, resources=landing))
        assert [r.run_key for r in first.run_requests] == ["2026-03-08-a"]  # b is still being written
        assert first.run_requests[0].partition_key == "2026-03-08-a"
        (added,) = first.dynamic_partitions_requests
        assert added.partition_keys == ["2026-03-08-a"]
        instance.add_dynamic_partitions(offer_feedback_batches.name, added.partition_keys)
        run = dg.materialize(
            [offer_feedback],
            partition_key="2026-03-08-a",
            resources=resources,
            instance=instance,
            run_config=NO_HOLD,
        )
        assert run.success

        again = offer_feedback_sensor(
            dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=landing)
        )
        assert not again.run_requests

        (home / "landing" / "offer_feedback" / "batch=2026-03-08-b" / "_SUCCESS").touch()
        later = offer_feedback_sensor(
            dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=landing)
        )
        assert [r.run_key for r in later.run_requests] == ["2026-03-08-b"]

    store = resources["persona_store"]
    feedback = table(store, "offer_feedback")
    assert sorted(feedback["response"]) == ["accepted", "rejected", "used"]
    rejects = table(store, "offer_feedback_rejects").set_index("reason_code")
    assert set(rejects.index) == {"unknown_offer", "unreadable"}
    assert "not valid JSON" in rejects.loc["unreadable", "reason"]
    metadata = run.asset_materializations_for_node("offer_feedback")[0].metadata
    assert metadata["responses"].value == 3 and metadata["rejected"].value == 2
    (check,) = run.get_asset_check_evaluations()
    assert not check.passed  # 2 of 5 rows rejected is above the 5% threshold

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(offer_feedback_batches.name, ["2026-03-08-a"])
        dg.materialize(
            [offer_feedback],
            partition_key="2026-03-08-a",
            resources=resources,
            instance=instance,
            run_config=NO_HOLD,
        )
    assert len(table(store, "offer_feedback")) == 3  # re-processing a batch replaces it
    assert len(table(store, "offer_feedback_rejects")) == 2


def test_run_processes_new_feedback_and_refreshes_the_weights_before_the_vectors(persona_home, instance):
    from persona_pipeline.app.runner import run_chain, simulate_feedback, summary
    from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing

    fleet = generate_fleet(300, 4, seed=6, start="2026-03-01")
    write_landing(fleet, persona_home / "landing")
    write_ground_truth(fleet, persona_home / "ground_truth")
    first = run_chain("2026-03-01", "2026-03-03", instance=instance)
    assert first.feedback_batches == []
    said = simulate_feedback(seed=1, batch_id=None)
    assert said.startswith("feedback batch sim-2026-03-03-1:")

    second = run_chain(None, None, instance=instance)
    assert second.feedback_batches == ["sim-2026-03-03-1"]
    assert list(second.run_ids)[:3] == ["ingest_job", "feedback_job[sim-2026-03-03-1]", "weights_job"]
    store = resources_for(persona_home)["persona_store"]
    weights = table(store, "key_weights")
    assert set(weights["source"]) == {"config", "feedback"}
    live = int(weights.loc[weights["status"] == "accepted", "version"].max())
    vectors = table(store, "persona_vectors")
    assert (vectors["weights_version"] == live).all()  # the day's vectors use the live weights
    said = summary(second)
    assert "weights v1" in said
    # The summary names the refresh's candidate and the gate's decision on it.
    candidate = int(weights["version"].max())
    decision = table(store, "key_weight_refreshes")["decision"].dropna().iloc[-1]
    assert f"v{candidate:<3} {decision:<8} " in said, said
    offers = table(store, "service_recommendations")
    lookalike = offers[offers["trigger"] == "lookalike"]
    assert len(lookalike) > 0 and lookalike["reason"].str.startswith("close in persona to the ").all()
    # Qdrant never proposes a device that was already offered the service before.
    earlier = offers[offers["offer_day"] < lookalike["offer_day"].min()]
    assert not set(zip(lookalike["device_id"], lookalike["service_id"], strict=True)) & set(
        zip(earlier["device_id"], earlier["service_id"], strict=True)
    )

    third = run_chain(None, None, instance=instance)
    assert third.feedback_batches == []  # a batch is processed once: no new candidate
    assert int(table(store, "key_weights")["version"].max()) == candidate


def test_responses_to_offers_never_made_are_rejected_and_the_rest_kept(offered):
    home = offered.home
    resources = resources_for(home)
    store = resources["persona_store"]
    made = table(store, "service_recommendations")["offer_id"].tolist()
    batch = "2026-03-09-unknown"
    never_made = "0" * len(made[0])
    write_batch(
        home,
        batch,
        [
            response(made[4], "accepted"),
            response(never_made, "accepted"),
            response(f"  {made[5]} ", "used"),  # blanks around a real id
            response(made[6].upper(), "rejected"),  # ids are case-sensitive
            response(made[7], "dismissed"),
        ],
    )

    with dg.instance_for_test() as instance:
        landing = {"landing_zone": resources["landing_zone"], "persona_store": resources["persona_store"]}
        ticked = offer_feedback_sensor(dg.build_sensor_context(instance=instance, resources=landing))
        (request,) = [r for r in ticked.run_requests if r.run_key == batch]
        instance.add_dynamic_partitions(offer_feedback_batches.name, [request.partition_key])
        run = dg.materialize(
            [offer_feedback],
            partition_key=request.partition_key,
            resources=resources,
            instance=instance,
            run_config=NO_HOLD,
        )
    assert run.success

    kept = table(store, "offer_feedback").query("batch_id == @batch").sort_values("offer_id")
    assert kept[["offer_id", "response"]].values.tolist() == sorted(
        [[made[4], "accepted"], [made[5], "used"], [made[7], "dismissed"]]
    )
    rejects = table(store, "offer_feedback_rejects").query("batch_id == @batch").set_index("source_row")
    assert rejects["reason"].to_dict() == {
        2: f"offer_id {never_made!r} names no offer that was made",
        4: f"offer_id {made[6].upper()!r} names no offer that was made",
    }
    assert (rejects["reason_code"] == "unknown_offer").all()
    assert (rejects["source_file"] == f"offer_feedback/batch={batch}/part-0.jsonl").all()
    assert json.loads(rejects.loc[2, "raw"]) == json.loads(response(never_made, "accepted"))
    metadata = run.asset_materializations_for_node("offer_feedback")[0].metadata
    assert (metadata["rows_read"].value, metadata["responses"].value, metadata["rejected"].value) == (5, 3, 2)


def test_reading_the_live_weights_writes_nothing_and_key_weights_records_the_configured_ones(
    resources, instance
):
    store = resources["persona_store"]
    configured = resources["persona_config"].feature_schema().initial_weights()
    with pytest.raises(WeightsNotRecorded, match="no key weights are recorded yet: materialize key_weights"):
        current_weights(store)
    assert not configured_weights_recorded(store, configured)
    assert table(store, "key_weights").empty  # reading wrote nothing

    for _ in range(2):  # the second run finds them recorded and adds nothing
        run = dg.materialize([key_weights], resources=resources, instance=instance)
        assert run.success
    rows = table(store, "key_weights")
    assert set(rows["version"]) == {1} and set(rows["source"]) == {"config"} and len(rows) == len(configured)
    assert current_weights(store).version == 1 and configured_weights_recorded(store, configured)
    [first, second] = run_metadata(instance, key_weights.key)
    assert first["live_version_changed"] is True and second["live_version_changed"] is False

    edited = {**configured, next(iter(configured)): 0.123}
    assert not configured_weights_recorded(store, edited)
    assert current_weights(store).version == 1  # an edit stays out until it is recorded
    assert record_configured_weights(store, edited) == 2
    assert current_weights(store).weights == edited


def run_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[dict]:
    """The metadata values of every materialization of `key`, oldest first."""
    records = instance.fetch_materializations(key, limit=100, ascending=True).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records]


def test_vectors_before_the_weights_are_recorded_fail_saying_what_to_run(resources, instance):
    alone = dg.materialize([persona_vectors], resources=resources, instance=instance, raise_on_error=False)
    assert not alone.success
    [failure] = [e for e in alone.all_events if e.is_step_failure]
    assert "materialize key_weights first" in failure.step_failure_data.error.message
    assert table(resources["persona_store"], "key_weights").empty
    both = dg.materialize([key_weights, persona_vectors], resources=resources, instance=instance)
    assert both.success


def test_edited_weights_keep_the_chain_going_until_the_sensor_has_them_recorded(
    resources, instance, tmp_path
):
    shipped = Path(__file__).parents[1] / "persona_pipeline" / "config" / "feature_schema.yaml"
    text = shipped.read_text()
    (tmp_path / "feature_schema.yaml").write_text(text.replace("weight: 0.3", "weight: 0.35", 1))
    edited = {**resources, "persona_config": PersonaConfig(config_dir=str(tmp_path))}
    assert edited["persona_config"].feature_schema().initial_weights() != (
        resources["persona_config"].feature_schema().initial_weights()
    )
    assert dg.materialize([key_weights, persona_vectors], resources=resources, instance=instance).success

    vectors = dg.materialize([persona_vectors], resources=edited, instance=instance)
    assert vectors.success  # the day's chain goes on with the live version
    metadata = vectors.asset_materializations_for_node("persona_vectors")[0].metadata
    assert metadata["weights_version"].value == 1
    assert metadata["configured_weights"].value.startswith("edited, not recorded yet: v1 in use")

    def tick(config: dict) -> dg.SensorResult | dg.SkipReason:
        with dg.build_sensor_context(instance=instance, resources=config) as context:
            return configured_weights_sensor(context)

    assert isinstance(tick(resources), dg.SkipReason)  # the shipped weights are recorded
    assert len(tick(edited).run_requests) == 1
    weights = dg.materialize([key_weights], resources=edited, instance=instance)
    assert weights.success
    assert weights.asset_materializations_for_node("key_weights")[0].metadata["live_version_changed"].value
    assert current_weights(resources["persona_store"]).version == 2
    assert "recorded" in tick(edited).skip_message


def test_the_weights_sensor_waits_after_a_failed_run_instead_of_asking_every_tick(
    resources, instance, tmp_path
):
    def tick() -> dg.SensorResult | dg.SkipReason:
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            return configured_weights_sensor(context)

    assert len(tick().run_requests) == 1  # a new store: the configured weights are not recorded
    (tmp_path / "a-file").write_text("not a folder")
    unreachable = PersonaStore(url=f"sqlite:///{tmp_path / 'a-file' / 'persona.db'}")
    broken = {**resources, "persona_store": unreachable}
    job = dg.Definitions(assets=[offer_feedback, key_weights], jobs=[weights_job], resources=broken)
    failed = job.resolve_job_def(weights_job.name).execute_in_process(instance=instance, raise_on_error=False)
    assert not failed.success
    assert "failed less than" in tick().skip_message
