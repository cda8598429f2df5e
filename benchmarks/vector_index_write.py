"""Write throughput of the embedded vector index, per engine, through the VectorIndex resource.

    .venv/bin/python benchmarks/vector_index_write.py [--points 100000] [--dimensions 80]

Each run writes `points` persona-like points (float32 vectors, the pipeline's four payload
fields) into a new collection in a fresh folder, in persona_index's batches, and closes the index
(which flushes it); then writes them all again over the same ids. Point ids are computed before
the clock starts, as persona_index has them. Prints the median of the runs per engine.

`edge-bare` is Edge with the same ids and vectors and no payload: the difference to `edge` is
what the payloads cost (mostly qdrant-edge-py converting each value from Python).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from persona_pipeline.resources.vector_index import VectorIndex, point_id


def fleet(points: int, dimensions: int, seed: int = 7) -> tuple[list[str], np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    devices = [f"dev-{i:07d}" for i in range(points)]
    vectors = rng.random((points, dimensions), dtype=np.float32)
    payloads = [
        {
            "device_id": device,
            "customer_id": f"cust-{i // 2:07d}",
            "weights_version": 3,
            "cluster_id": int(i % 12),
        }
        for i, device in enumerate(devices)
    ]
    return [point_id(d) for d in devices], vectors, payloads


def write(
    engine: str, ids: list[str], vectors: np.ndarray, payloads: list[dict], batch: int
) -> tuple[float, float]:
    """Seconds to fill a new collection, and to overwrite every point of it (each with close)."""
    if engine == "edge-bare":
        engine, payloads = "edge", [{}] * len(ids)
    with tempfile.TemporaryDirectory(prefix=f"vector-bench-{engine}-") as folder:
        index = VectorIndex(path=folder, embedded_engine=engine)
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            with index.open() as store:
                store.ensure_collection("personas_bench-w1", vectors.shape[1])
                store.upsert("personas_bench-w1", ids, vectors, payloads, batch)
            timings.append(time.perf_counter() - start)
        with index.open() as store:
            assert store.count("personas_bench-w1") == len(ids)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--local-points", type=int, default=5_000, help="qdrant-client's local mode is slow")
    parser.add_argument("--dimensions", type=int, default=80)
    parser.add_argument("--batch", type=int, default=512, help="points per upsert (persona_index's default)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default="edge,edge-bare,local")
    args = parser.parse_args()

    rows = []
    for engine in args.engines.split(","):
        points = min(args.points, args.local_points) if engine == "local" else args.points
        ids, vectors, payloads = fleet(points, args.dimensions)
        runs = [write(engine, ids, vectors, payloads, args.batch) for _ in range(args.runs)]
        fill = statistics.median(r[0] for r in runs)
        overwrite = statistics.median(r[1] for r in runs)
        rows.append((engine, points, fill, points / fill, points / overwrite))

    setup = f"{args.dimensions} dimensions, 4 payload fields, batches of {args.batch}"
    print(f"\n{setup}, median of {args.runs} runs")
    print(f"{'engine':<10}{'points':>10}{'seconds':>10}{'new points/s':>15}{'overwrites/s':>15}")
    for engine, points, seconds, fill_rate, overwrite_rate in rows:
        print(f"{engine:<10}{points:>10,}{seconds:>10.2f}{fill_rate:>15,.0f}{overwrite_rate:>15,.0f}")


if __name__ == "__main__":
    main()
