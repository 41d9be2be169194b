"""A multi-node gen run on one machine: a Ray head + 2 worker nodes (ray.cluster_utils.Cluster), 2 CPU engines
spread over the nodes, executors as Ray tasks; a node hosting an engine is removed mid-run.

    python tests/cluster_scenario.py --model TINY_MODEL_DIR --problems toy.jsonl --out DIR

Prints one JSON line (the last line of stdout) for tests/test_cluster.py to check. Runs in its own process because
Ray allows one `ray.init` per process and the test session already holds a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A killed node is declared dead after ~3 missed 1 s health checks instead of Ray's default ~30 s.
FAST_HEALTH_CHECK = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                     "health_check_failure_threshold": 3}


def _keys(table) -> list:
    return sorted(zip(table.column("problem_id").to_pylist(), table.column("sample_index").to_pylist(),
                      table.column("seed").to_pylist()))


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--problems", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--wait-restart", action="store_true", help="also wait for the lost engine to come back")
    a = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from gen.engine import EngineConfig, EnginePool
    from gen.config import ExecutionConfig, GenConfig, SamplingConfig
    from gen.run import run_generation
    from gen.shards import ShardStore

    t = {"start": time.perf_counter()}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH_CHECK})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    head_id = cluster.head_node.node_id
    t["cluster_up"] = time.perf_counter()
    pool = None
    try:
        ecfg = EngineConfig(model=a.model, engines=2, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.25, max_num_seqs=32,
                            max_restarts=3)
        pool = EnginePool(ecfg, a.model, use_gpu=False)
        before = [i["node"] for i in pool.infos]
        t["engines_up"] = time.perf_counter()

        def cfg(out: str) -> GenConfig:
            return GenConfig(out=out, problems=a.problems, limit=4, n=4, problems_per_unit=1, samples_per_unit=1,
                             sampling=SamplingConfig(max_tokens=32),
                             execution=ExecutionConfig(executor="ray", cpu_timeout_s=2.0), progress=False)

        ref = run_generation(cfg(os.path.join(a.out, "uninterrupted")), ecfg, pool=pool)
        ref_keys = _keys(ShardStore(ref.out).read_table())
        t["reference_run"] = time.perf_counter()

        # the engine to lose: one that is not on the head (the head can't be removed: the driver is attached)
        victim_engine = next(k for k, n in enumerate(before) if n != head_id)
        victim = next(w for w in workers if w.node_id == before[victim_engine])
        out = os.path.join(a.out, "node-removed")
        removed = threading.Event()
        removed_after_units: list[int] = []

        def remover() -> None:
            deadline = time.time() + 300
            while time.time() < deadline:
                m = ShardStore(out).read_manifest() if os.path.exists(os.path.join(out, "manifest.json")) else None
                if m is not None and len(m.units) >= 2:
                    removed_after_units.append(len(m.units))
                    cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
                    removed.set()
                    return
                time.sleep(0.02)

        th = threading.Thread(target=remover, daemon=True)
        th.start()
        res = run_generation(cfg(out), ecfg, pool=pool)
        th.join()
        t["interrupted_run"] = time.perf_counter()
        got = ShardStore(out).read_table()
        keys = _keys(got)
        # the GCS marks a crashed node dead only after its health checks fail: wait for it (bounded)
        deadline = time.time() + 120
        while True:
            alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
            if victim.node_id not in alive or time.time() > deadline:
                break
            time.sleep(1)
        after = None
        if a.wait_restart:  # the lost engine's bundle is rescheduled to a live node and the actor restarts there
            after, deadline = [], time.time() + 300
            for actor in pool.actors:
                while True:
                    try:
                        after.append(ray.get(actor.info.remote(), timeout=30)["node"])
                        break
                    except ray.exceptions.ActorUnavailableError:  # still restarting
                        if time.time() > deadline:
                            raise
                        time.sleep(1)
        return {
            "head": head_id,
            "workers": [w.node_id for w in workers],
            "engine_nodes": before,
            "engine_cores": [i["cores"] for i in pool.infos],
            "removed_node": victim.node_id,
            "removed": removed.is_set(),
            "removed_after_units": removed_after_units[0] if removed_after_units else None,
            "units_total": 4 * 4,
            "alive_nodes": alive,
            "engine_nodes_after_restart": after,
            "reference": {"complete": ref.complete, "rows": ref.rows, "keys": ref_keys},
            "phase_s": {k: round(v - prev, 1) for (k, v), prev in zip(list(t.items())[1:], list(t.values()))},
            "run": {"complete": res.complete, "rows": res.rows, "keys": keys, "requeued": res.requeued,
                    "failed_units": res.failed_units, "outcomes": sorted(set(got.column("outcome").to_pylist()))},
        }
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    t0 = time.perf_counter()
    result = main()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
