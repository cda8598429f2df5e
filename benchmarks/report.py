"""The printed tables: one per fleet size (medians of the repeats), and the growth between sizes."""

from __future__ import annotations

import itertools
import statistics

from benchmarks.measure import Measured, human_bytes
from benchmarks.run import CHAIN, Results
from benchmarks.stages import DAY_STAGES, LEARNING_STAGES, STAGES

ROWS = (*DAY_STAGES, *LEARNING_STAGES, CHAIN)
INGEST_TO_VECTORS = ("read_validate", "profiles", "vectors")

# The targets of the scale-out issue, on this machine: the chain's day at a million devices, its
# peak memory, the incremental day's share of the full day for every stage, the speed-up over the
# naive design on its own work, and each stage's growth from 100,000 devices on.
CHAIN_SECONDS_TARGET = 300.0
CHAIN_SECONDS_STRETCH = 180.0
CHAIN_PEAK_TARGET = 4 * 1024**3
TARGET_DEVICES = 1_000_000
INCREMENTAL_SHARE_TARGET = 0.15
SPEED_UP_TARGET = 20.0
GROWTH_TARGET = 1.2
GROWTH_FROM_DEVICES = 100_000
LARGEST_DEVICES = 10_000_000  # run as LARGEST_SHARDS device shards one after another
LARGEST_SHARDS = 16
LARGEST_PEAK_TARGET = 3 * 1024**3
LARGEST_PER_DEVICE_TARGET = 1.2  # its time per device against the TARGET_DEVICES chain's


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
    (1.00: exactly linear in devices; the target is at most GROWTH_TARGET)."""
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


def targets_table(all_results: list[Results]) -> str:
    """Each target this run measured, the figure and whether it holds; a target the run did not
    measure (too small a fleet, no baseline, a single size) says so."""
    rows = [_chain_target(all_results), _incremental_target(all_results), _speed_up_target(all_results)]
    rows += [_growth_target(all_results), _largest_target(all_results)]
    width = max(len(target) for target, _, _ in rows)
    lines = ["targets:"]
    lines += [f"  {target:<{width}}  {verdict:<12}  {figure}" for target, figure, verdict in rows]
    return "\n".join(lines)


def _verdict(holds: bool) -> str:
    return "met" if holds else "MISSED"


def _chain_target(all_results: list[Results]) -> tuple[str, str, str]:
    target = (
        f"the chain at {TARGET_DEVICES:,} devices <= {CHAIN_SECONDS_TARGET:.0f} s "
        f"(stretch {CHAIN_SECONDS_STRETCH:.0f} s), peak <= {human_bytes(CHAIN_PEAK_TARGET)}"
    )
    runs = [r for r in all_results if r.options.devices >= TARGET_DEVICES and CHAIN in r.full]
    if not runs:
        return target, f"no chain run at {TARGET_DEVICES:,} devices or more", "not measured"
    results = runs[0]
    taken = seconds(results.full[CHAIN])
    peak = statistics.median(m.peak_rss for m in results.full[CHAIN])
    stretch = " (stretch met)" if taken <= CHAIN_SECONDS_STRETCH else ""
    figure = f"{results.options.devices:,} devices: {taken:.1f} s{stretch}, peak {human_bytes(peak)}"
    return target, figure, _verdict(taken <= CHAIN_SECONDS_TARGET and peak <= CHAIN_PEAK_TARGET)


def _incremental_target(all_results: list[Results]) -> tuple[str, str, str]:
    target = f"the incremental day <= {INCREMENTAL_SHARE_TARGET:.0%} of the full day, every stage"
    results = max(all_results, key=lambda r: r.options.devices)
    shares = {
        name: seconds(results.incremental[name]) / max(seconds(results.full[name]), 1e-9)
        for name in ROWS
        if results.incremental.get(name) and results.full.get(name)
    }
    if not shares:
        return target, "no incremental day measured", "not measured"
    over = [f"{label(name)} {s:.1%}" for name, s in shares.items() if s > INCREMENTAL_SHARE_TARGET]
    figure = f"{results.options.devices:,} devices: " + (
        "over: " + ", ".join(over) if over else f"largest {max(shares.values()):.1%}"
    )
    return target, figure, _verdict(not over)


def _speed_up_target(all_results: list[Results]) -> tuple[str, str, str]:
    target = f"ingest -> vectors in the index >= {SPEED_UP_TARGET:.0f}x the naive design, on its work"
    measured = [r for r in all_results if r.naive and r.in_memory and "index" in r.full]
    if not measured:
        return target, "no naive baseline and in-memory run with an index write", "not measured"
    results = measured[-1]
    naive = statistics.median(m.seconds for m in results.naive) + statistics.median(
        m.result["upsert_seconds_all"] for m in results.naive
    )
    ours = statistics.median(m.seconds for m in results.in_memory) + seconds(results.full["index"])
    speed_up = naive / max(ours, 1e-9)
    figure = f"{results.options.devices:,} devices: {naive:,.1f} s / {ours:,.1f} s = {speed_up:.1f}x"
    return target, figure, _verdict(speed_up >= SPEED_UP_TARGET)


def _growth_target(all_results: list[Results]) -> tuple[str, str, str]:
    target = f"every stage <= {GROWTH_TARGET}x linear from {GROWTH_FROM_DEVICES:,} devices on"
    sized = sorted(
        (r for r in all_results if r.options.devices >= GROWTH_FROM_DEVICES), key=lambda r: r.options.devices
    )
    if len(sized) < 2:
        return target, f"not two fleet sizes of {GROWTH_FROM_DEVICES:,} devices or more", "not measured"
    growth = {}
    for small, large in itertools.pairwise(sized):
        ratio = large.options.devices / small.options.devices
        for name in ROWS:
            if small.full.get(name) and large.full.get(name):
                grown = seconds(large.full[name]) / max(seconds(small.full[name]), 1e-9) / ratio
                growth[name] = max(growth.get(name, 0.0), grown)
    if not growth:
        return target, "no stage measured at two sizes", "not measured"
    over = [f"{label(name)} {grown:.2f}" for name, grown in growth.items() if grown > GROWTH_TARGET]
    figure = "over: " + ", ".join(over) if over else f"largest {max(growth.values()):.2f}"
    return target, figure, _verdict(not over)


def _largest_target(all_results: list[Results]) -> tuple[str, str, str]:
    target = (
        f"{LARGEST_DEVICES:,} devices on {LARGEST_SHARDS} shards: every step's peak <= "
        f"{human_bytes(LARGEST_PEAK_TARGET)}, time per device <= {LARGEST_PER_DEVICE_TARGET}x the "
        f"{TARGET_DEVICES:,}-device chain's"
    )
    largest = [
        r
        for r in all_results
        if r.options.devices >= LARGEST_DEVICES
        and r.options.device_shards >= LARGEST_SHARDS
        and CHAIN in r.full
    ]
    reference = [r for r in all_results if r.options.devices == TARGET_DEVICES and CHAIN in r.full]
    if not largest or not reference:
        missing = f"needs chain runs at {TARGET_DEVICES:,} and at {LARGEST_DEVICES:,} devices"
        return target, missing, "not measured"
    large, one = largest[0], reference[0]
    per_device = seconds(large.full[CHAIN]) / large.options.devices
    ratio = per_device / (seconds(one.full[CHAIN]) / one.options.devices)
    peak = statistics.median(m.peak_rss for m in large.full[CHAIN])
    figure = f"{seconds(large.full[CHAIN]):,.0f} s ({ratio:.2f}x per device), peak {human_bytes(peak)}"
    return target, figure, _verdict(ratio <= LARGEST_PER_DEVICE_TARGET and peak <= LARGEST_PEAK_TARGET)
