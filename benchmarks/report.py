"""The printed tables: one per fleet size (medians of the repeats), and the growth between sizes."""

from __future__ import annotations

import itertools
import statistics

from benchmarks.measure import Measured, human_bytes
from benchmarks.run import CHAIN, Results
from benchmarks.stages import DAY_STAGES, LEARNING_STAGES, STAGES

ROWS = (*DAY_STAGES, *LEARNING_STAGES, CHAIN)
INGEST_TO_VECTORS = ("read_validate", "profiles", "vectors")


def label(name: str) -> str:
    return "whole chain (Dagster)" if name == CHAIN else STAGES[name][0]


def seconds(runs: list[Measured]) -> float:
    """Median seconds; a sampled stage counts at its extrapolated whole-fleet time."""
    return statistics.median(r.result.get("extrapolated_seconds") or r.seconds for r in runs)


def measured_seconds(runs: list[Measured]) -> float:
    return statistics.median(r.seconds for r in runs)


def rows_in(runs: list[Measured], results: Results, name: str, phase: str) -> int:
    if name == CHAIN:
        return results.generated["rows" if phase == "full" else "changed_rows"]
    return int(statistics.median(r.result.get("rows_in", 0) for r in runs))


def size_table(results: Results) -> str:
    o, g = results.options, results.generated
    lines = [
        f"persona_pipeline benchmark: {o.devices:,} devices x {o.updates_per_device} = {g['rows']:,} updates "
        f"on {o.day}; incremental day {o.next_day}: {g['changed_devices']:,} devices "
        f"({o.changed_share:.0%}, {o.moved_share:.0%} of them moving city) changed, {g['changed_rows']:,} "
        f"updates; median of {o.repeats} run(s)"
        + (f"; the chain on {o.device_shards} device shards" if o.device_shards > 1 else ""),
        f"{'':<22} {'full day':-^63}  {'incremental day':-^32}",
        f"{'stage':<22} {'rows in':>10} {'unit':<9} {'seconds':>9} {'rows/s':>10} {'peak RSS':>10}   "
        f"{'rows in':>10} {'seconds':>9} {'% of full':>10}",
    ]
    notes = []
    for name in ROWS:
        full = results.full.get(name)
        if not full:
            continue
        unit = full[0].result.get("unit", "updates")
        rows = rows_in(full, results, name, "full")
        taken = measured_seconds(full)
        mark = ""
        if full[0].result.get("extrapolated_seconds"):
            mark = "*"
            notes.append(
                f"* {label(name)}: {full[0].result.get('note')} -> ~{seconds(full):,.1f} s for the "
                f"whole fleet ({rows / max(taken, 1e-9):,.0f} points/s)"
            )
        line = (
            f"{label(name) + mark:<22} {rows:>10,} {unit:<9} {taken:>9.2f} {rows / max(taken, 1e-9):>10,.0f} "
            f"{human_bytes(statistics.median(r.peak_rss for r in full)):>10}"
        )
        incremental = results.incremental.get(name)
        if incremental:
            share = seconds(incremental) / max(seconds(full), 1e-9)
            line += (
                f"   {rows_in(incremental, results, name, 'incremental'):>10,} "
                f"{measured_seconds(incremental):>9.2f} {share:>10.1%}"
            )
        lines.append(line)
    assigned = results.incremental.get("clustering")
    if assigned and assigned[0].result.get("note") == "assigned to the last fit":
        notes.append(
            "clustering, incremental day: the changed devices assigned to the nearest segment of the "
            "last fit (segments refits weekly, refit_every_days=7, or when >20% changed)"
        )
    lines += notes
    lines += baseline_lines(results)
    return "\n".join(lines)


def baseline_lines(results: Results) -> list[str]:
    if not results.naive:
        return []
    loop = statistics.median(r.seconds for r in results.naive)
    first = results.naive[0].result
    naive_rss = human_bytes(statistics.median(r.peak_rss for r in results.naive))
    upserts = statistics.median(r.result["upsert_seconds_all"] for r in results.naive)
    lines = [
        f"naive baseline (benchmarks/naive.py): Python loop over {first['rows']:,} updates into a dict per "
        f"device {loop:.2f} s (peak RSS {naive_rss}); one upsert per device: {first['upserted']:,} timed "
        f"in {first['upsert_seconds']:.1f} s, ~{upserts:,.0f} s for {first['devices']:,} devices "
        "(extrapolated)"
    ]
    if results.in_memory:
        vectorized = statistics.median(r.seconds for r in results.in_memory)
        lines.append(
            "speed-up, ingest -> vectors in memory (the naive loop's work, vectorized, nothing stored; "
            f"stages.py in_memory): {loop:.2f} s / {vectorized:.2f} s = {loop / max(vectorized, 1e-9):.1f}x"
        )
    ours = sum(seconds(results.full[name]) for name in INGEST_TO_VECTORS)
    lines.append(
        "speed-up, ingest -> vectors through the store (read+validate + profiles merge + vectors, every "
        f"row written and read back): {loop:.2f} s / {ours:.2f} s = {loop / max(ours, 1e-9):.2f}x"
    )
    if "index" in results.full:
        index_write = seconds(results.full["index"])
        naive_indexed = loop + upserts
        if results.in_memory:
            same_work = statistics.median(r.seconds for r in results.in_memory) + index_write
            lines.append(
                "speed-up, ingest -> vectors in the index, the naive design's work (in memory + index "
                f"write, against the loop + one upsert per device): {naive_indexed:,.1f} s / "
                f"{same_work:,.1f} s = {naive_indexed / max(same_work, 1e-9):.1f}x"
            )
        ours_indexed = ours + index_write
        lines.append(
            "speed-up, ingest -> vectors in the index through the store (+ index write, against the loop "
            f"+ one upsert per device): {naive_indexed:,.1f} s / {ours_indexed:,.1f} s = "
            f"{naive_indexed / max(ours_indexed, 1e-9):.2f}x"
        )
    return lines


def growth_table(all_results: list[Results]) -> str:
    """Seconds per stage at each size, and the growth against linear between neighbouring sizes
    (1.00: exactly linear in devices; the target is at most 1.3)."""
    sizes = [r.options.devices for r in all_results]
    header = f"{'stage':<22}" + "".join(f"{f'{s:,}':>12}" for s in sizes)
    header += "".join(f"{f'{a // 1000}k->{b // 1000}k':>14}" for a, b in itertools.pairwise(sizes))
    lines = ["seconds per stage by fleet size (full day), and growth against linear:", header]
    for name in ROWS:
        if not all(name in r.full for r in all_results):
            continue
        times = [seconds(r.full[name]) for r in all_results]
        line = f"{label(name):<22}" + "".join(f"{t:>12.2f}" for t in times)
        for (a, ta), (b, tb) in itertools.pairwise(zip(sizes, times, strict=True)):
            line += f"{(tb / max(ta, 1e-9)) / (b / a):>14.2f}"
        lines.append(line)
    return "\n".join(lines)
