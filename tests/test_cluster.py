"""Cluster scale: ray_cluster.yaml, engine placement, Ray executors, s3:// shards, a multi-node run that loses a
node, and `ray job submit` against a local head — everything one machine can show.

The multi-node run and the job submission start their own Ray clusters, so they run in subprocesses (Ray allows one
`ray.init` per process, and this session already holds a local Ray for the engine fixtures).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from gen.engine import EngineConfig, EnginePool, cpu_slice
from gen.plan import sample_seed
from gen.config import ExecutionConfig, GenConfig, SamplingConfig
from gen.run import run_generation
from gen.shards import ShardStore, join_uri

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _cfg(out, problems, **kw) -> GenConfig:
    base = dict(out=str(out), problems=problems, n=5, problems_per_unit=2, samples_per_unit=3, progress=False,
                sampling=SamplingConfig(max_tokens=16),
                execution=ExecutionConfig(workers=1, cpu_timeout_s=2.0, executor=kw.pop("executor", "local")))
    base.update(kw)
    return GenConfig(**base)


def _keys(table) -> list:
    return sorted(zip(table.column("problem_id").to_pylist(), table.column("sample_index").to_pylist(),
                      table.column("seed").to_pylist()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- ray_cluster.yaml ---------------------------------------------------------------------------------------

def _cluster_yaml() -> dict:
    with open(ROOT / "ray_cluster.yaml") as f:
        return yaml.safe_load(f)


def test_ray_cluster_yaml_passes_rays_own_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster_yaml()))  # what `ray up` runs first
    broken = copy.deepcopy(_cluster_yaml())
    broken["available_node_types"]["gpu_1x_a10g"]["min_worker"] = 0  # a typo `ray up` must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_ray_cluster_head_has_no_gpus_and_gpu_workers_scale_from_zero():
    cfg = _cluster_yaml()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, types
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 < t["max_workers"], (name, t)
    assert sum(t["max_workers"] for k, t in types.items() if k != cfg["head_node_type"]) <= cfg["max_workers"]


def test_ray_cluster_nodes_install_the_synced_repo_with_the_gpu_extra():
    cfg = _cluster_yaml()
    assert cfg["file_mounts"] == {"~/pairloop": "."}
    assert any('-e "$HOME/pairloop[gpu]"' in c for c in cfg["setup_commands"]), cfg["setup_commands"]


# ---- engine placement (pure) --------------------------------------------------------------------------------

@pytest.mark.parametrize("ncores", [1, 2, 3, 8, 13])
def test_cpu_slices_of_one_node_are_disjoint_and_cover_it(ncores):
    avail = list(range(100, 100 + ncores))
    for slots in range(1, ncores + 1):
        slices = [cpu_slice(avail, s, slots) for s in range(slots)]
        flat = [c for sl in slices for c in sl]
        assert sorted(flat) == avail and len(set(flat)) == len(flat), slices
        assert max(map(len, slices)) - min(map(len, slices)) <= 1, slices


def test_cpu_slices_with_fixed_cores_per_engine():
    assert [cpu_slice(range(8), s, 3, cores=2) for s in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="engine.cpu_cores=3"):
        cpu_slice(range(8), 0, 3, cores=3)
    with pytest.raises(ValueError, match="3 CPU engines placed on one node with only 2 cores"):
        cpu_slice([0, 1], 0, 3)


@pytest.mark.parametrize("cls,field,value", [(EngineConfig, "cpu_cores", -1), (EngineConfig, "device", "tpu"),
                                             (ExecutionConfig, "executor", "dask")])
def test_cluster_config_fields_reject_bad_values(cls, field, value):
    with pytest.raises(ValueError, match=rf"\.{field}"):
        cls(**{field: value})


def test_join_uri_keeps_the_query_string_last():
    uri = "s3://bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(uri, "gen") == "s3://bucket/runs/x/gen?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("s3://bucket/runs/x", "gen", "a") == "s3://bucket/runs/x/gen/a"
    assert join_uri("runs/x", "gen") == os.path.join("runs/x", "gen")


# ---- runtime checks -----------------------------------------------------------------------------------------

def test_no_stage_checks_at_runtime_with_assert():
    """`python -O` strips asserts: a runtime check written as one silently stops checking. Tests keep theirs."""
    import ast

    found = []
    for pkg in ("gen", "pairs", "train", "eval", "tasks", "sandbox"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert not found, found


# ---- placement groups on the session's local Ray -----------------------------------------------------------

def _pg_state(pg) -> str:
    from ray.util.placement_group import placement_group_table

    return placement_group_table()[pg.id.hex()]["state"]


def test_replacing_an_engines_placement_group_removes_the_old_one(ray_local):
    from gen.engine import reserve_placement_group
    from ray.util.placement_group import remove_placement_group

    old = reserve_placement_group([{"CPU": 1}], "STRICT_PACK", 60, "engine 0")
    assert _pg_state(old) == "CREATED"
    new = reserve_placement_group([{"CPU": 1}], "STRICT_PACK", 60, "engine 0", old=old)
    try:
        assert _pg_state(old) == "REMOVED"
        assert _pg_state(new) == "CREATED"
    finally:
        remove_placement_group(new)


def test_an_unsatisfiable_placement_group_times_out_naming_engine_and_resources(ray_local):
    from gen.engine import PlacementTimeout, reserve_placement_group

    old = reserve_placement_group([{"CPU": 1}], "STRICT_PACK", 60, "engine 3")
    # this local Ray has no GPU: the request can never be satisfied, whatever the machine's speed
    with pytest.raises(PlacementTimeout, match=r"engine 3 \(tensor_parallel_size=2\).*'GPU': 2") as e:
        reserve_placement_group([{"GPU": 2, "CPU": 1}], "STRICT_PACK", 1.0, "engine 3 (tensor_parallel_size=2)",
                                old=old)
    assert "engine.placement_timeout_s" in str(e.value)
    assert _pg_state(old) == "REMOVED"
    from ray.util.placement_group import placement_group_table

    pending = [v for v in placement_group_table().values() if v["state"] not in ("REMOVED", "CREATED")]
    assert not pending, pending  # the group that timed out was removed too, not left queued


def test_engine_config_rejects_a_nonpositive_placement_timeout():
    with pytest.raises(ValueError, match=r"engine\.placement_timeout_s.*-1"):
        EngineConfig(placement_timeout_s=-1)


# ---- real engines on the session's local Ray ----------------------------------------------------------------

def _thread_affinity(pid: int, tid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        line = next(ln for ln in f if ln.startswith("Cpus_allowed_list"))
    cores = set()
    for part in line.split()[1].split(","):
        a, _, b = part.partition("-")
        cores.update(range(int(a), int(b or a) + 1))
    return cores


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")
def test_two_cpu_engines_on_one_node_pin_disjoint_core_slices(ray_local, engine_config, tiny_model):
    pool = EnginePool(replace(engine_config, engines=2, cpu_kv_cache_gib=0.25), tiny_model, use_gpu=False)
    try:
        infos = pool.infos
        assert infos[0]["node"] == infos[1]["node"]  # one node here: the engines must share it
        slices = [set(i["cores"]) for i in infos]
        assert not slices[0] & slices[1], slices
        assert slices[0] | slices[1] == os.sched_getaffinity(0)
        for info, cores in zip(infos, slices):
            # the actor's thread (which runs vLLM and starts its OpenMP threads) really is pinned there
            assert _thread_affinity(info["pid"], info["pid"]) == cores
            omp = [int(t) for t in os.listdir(f"/proc/{info['pid']}/task")]
            assert sum(_thread_affinity(info["pid"], t) == cores for t in omp) >= len(cores)
    finally:
        pool.shutdown()


def test_ray_executor_labels_rows_like_the_local_executor(tmp_path, engine_pool, engine_config, toy_problems):
    import gen.run as gen_run

    cols = ["completion", "outcome", "phase", "error_type"]

    def labels(res):
        t = ShardStore(res.out).read_table()
        keys = zip(t.column("problem_id").to_pylist(), t.column("sample_index").to_pylist())
        return dict(zip(keys, zip(*(t.column(c).to_pylist() for c in cols))))

    local = run_generation(_cfg(tmp_path / "local", toy_problems, executor="local"), engine_config, pool=engine_pool)
    remote = run_generation(_cfg(tmp_path / "ray", toy_problems, executor="ray"), engine_config, pool=engine_pool)
    assert local.complete and remote.complete
    got, want = labels(remote), labels(local)
    assert len(want) == 30 and got == want
    assert len({o for _, o, _, _ in want.values()}) > 1  # the comparison covers several outcomes
    assert not gen_run._WORKER_SANDBOXES  # the sandboxes lived in Ray workers, not in this driver


# ---- s3:// output against a real S3 server on loopback ------------------------------------------------------

BUCKET = "pairloop-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 in server mode (HTTP on 127.0.0.1); yields (boto3 client, uri maker)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)

    def uri(prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    yield client, uri
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _objects(client, prefix: str) -> list[str]:
    got = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix):] for o in got if not o["Key"].endswith("/"))  # "/" keys: dir markers


@pytest.fixture(scope="module")
def s3_run(s3, engine_pool, engine_config, toy_problems):
    _, uri = s3
    res = run_generation(_cfg(uri("runs/first"), toy_problems), engine_config, pool=engine_pool)
    return res, ShardStore(res.out)


def test_s3_run_holds_every_planned_sample_once(s3_run):
    res, store = s3_run
    assert res.complete and res.rows == 30
    keys = _keys(store.read_table())
    assert len(set(keys)) == len(keys) == 30
    assert all(seed == sample_seed(0, pid, i) for pid, i, seed in keys)


def test_s3_bucket_holds_the_manifest_and_exactly_one_object_per_unit(s3, s3_run):
    client, _ = s3
    _, store = s3_run
    units = store.read_manifest().units
    assert len(units) == 6  # 6 problems / 2 per unit x 5 samples / 3 per unit
    assert _objects(client, "runs/first/") == sorted(["manifest.json"] + [u["file"] for u in units.values()])


def test_s3_rerun_regenerates_only_the_units_missing_from_the_manifest(s3, engine_pool, engine_config,
                                                                      toy_problems):
    client, uri = s3
    cfg = _cfg(uri("runs/resume"), toy_problems)
    run_generation(cfg, engine_config, pool=engine_pool)
    store = ShardStore(cfg.out)
    m = store.read_manifest()
    for key in _objects(client, "runs/resume/shards/"):  # tag every shard object; a rewrite drops the tag
        k = f"runs/resume/shards/{key}"
        client.copy_object(Bucket=BUCKET, Key=k, CopySource={"Bucket": BUCKET, "Key": k},
                           Metadata={"generation": "first"}, MetadataDirective="REPLACE")
    lost = sorted(m.units)[1:3]  # as if the run died before recording these two units
    for uid in lost:
        del m.units[uid]
    m.complete = False
    store.write_manifest(m)

    again = run_generation(cfg, engine_config, pool=engine_pool)
    assert again.complete and again.rows == 30
    rewritten = sorted(k[:-len(".parquet")] for k in _objects(client, "runs/resume/shards/")
                       if "generation" not in client.head_object(Bucket=BUCKET, Key=f"runs/resume/shards/{k}")
                       ["Metadata"])
    assert rewritten == lost
    keys = _keys(store.read_table())
    assert len(set(keys)) == len(keys) == 30


def test_pairs_reads_an_s3_run(s3_run):
    import numpy as np

    from pairs.pool import fetch_columns, scan_pool

    _, store = s3_run
    pool = scan_pool([store.uri], progress=False)
    assert len(pool) == 30
    texts = fetch_columns(pool, np.arange(len(pool)), ["completion"])["completion"]
    assert sorted(texts) == sorted(store.read_table().column("completion").to_pylist())


@pytest.fixture(scope="module")
def s3_eval(s3, engine_pool, engine_config, toy_problems):
    from eval.run import EvalConfig, run_eval

    _, uri = s3
    cfg = EvalConfig(out=uri("eval/x"), problems=toy_problems, seeds=[0, 1], k=1, progress=False,
                     sampling=SamplingConfig(max_tokens=16), execution=ExecutionConfig(workers=1, cpu_timeout_s=2.0))
    return run_eval(cfg, engine_config, pool=engine_pool)


def test_eval_into_s3_writes_per_seed_results_and_the_report_there(s3, s3_eval):
    client, _ = s3
    objects = _objects(client, "eval/x/")
    for seed in (0, 1):
        assert f"base/seed-{seed}/manifest.json" in objects
        assert any(o.startswith(f"base/seed-{seed}/shards/") and o.endswith(".parquet") for o in objects)
    report_files = sorted(o for o in objects if o.startswith("report/"))
    assert report_files == ["report/report.json", "report/report.md", "report/report.png"]  # no temp objects left
    saved = json.loads(client.get_object(Bucket=BUCKET, Key="eval/x/report/report.json")["Body"].read())
    assert [i["rows"] for i in saved["inputs"]] == [6, 6]
    assert client.get_object(Bucket=BUCKET, Key="eval/x/report/report.png")["Body"].read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_reads_s3_results_and_writes_to_an_s3_out(s3, s3_eval):
    from eval.report import build_report, default_out, render_markdown, write_report

    client, uri = s3
    dirs = s3_eval.result_dirs["base"]
    rep = build_report(dirs)
    assert [i["source"] for i in rep["inputs"]] == dirs and rep["variants"][0]["seeds"] == [0, 1]
    paths = write_report(rep, uri("reports/again"))
    assert paths["md"] == uri("reports/again/report.md")
    assert _objects(client, "reports/again/") == ["report.json", "report.md", "report.png"]
    md = client.get_object(Bucket=BUCKET, Key="reports/again/report.md")["Body"].read().decode()
    assert md == render_markdown(rep)
    assert default_out(dirs[0]) == uri("eval/x/base/report")  # next to the first input, query string kept


# ---- a multi-node cluster on this machine -------------------------------------------------------------------

def test_multi_node_run_spreads_engines_and_survives_losing_a_node(tmp_path, tiny_model, toy_problems):
    """Head + 2 worker nodes; 2 engines land on different nodes; the node of one is killed mid-run: its units are
    requeued, the run ends with exactly the rows of an uninterrupted run, and the lost engine restarts on a
    surviving node."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_scenario.py"), "--model", tiny_model,
                           "--problems", toy_problems, "--out", str(tmp_path), "--wait-restart"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(r["engine_nodes"])) == 2, r["engine_nodes"]
    assert r["removed"] and r["removed_node"] in r["engine_nodes"]
    assert r["removed_node"] not in r["alive_nodes"]
    assert set(r["engine_nodes_after_restart"]) <= set(r["alive_nodes"])  # the lost engine came back elsewhere
    assert r["removed_after_units"] < r["units_total"]  # it really was mid-run
    ref, run = r["reference"], r["run"]
    assert ref["complete"] and len(ref["keys"]) == 16
    assert run["complete"], run["failed_units"]
    assert run["requeued"] >= 1  # the lost node's in-flight units went back to the queue
    assert run["keys"] == ref["keys"]
    assert len({tuple(k) for k in run["keys"]}) == len(run["keys"])


# ---- `ray job submit` against a local head ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on loopback ports in its own temp dir; yields the job server's URL. Stopped by
    signalling the processes it started (never `ray stop`, which would stop every Ray on the machine)."""
    import psutil

    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                                       "ray-client-server-port", "node-manager-port", "object-manager-port")}
    temp = tempfile.mkdtemp(prefix="plray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=3",
                             f"--temp-dir={temp}", "--disable-usage-stats"]
                            + [f"--{k}={v}" for k, v in ports.items()],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError(f"Ray head did not come up: {open(log.name).read()[-2000:]}")
                time.sleep(1)
        yield url, env
    finally:
        started = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        for p in started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_pairloop_gen_on_the_cluster_into_s3(ray_head, s3, tiny_model, toy_problems):
    url, env = ray_head
    _, uri = s3
    out = uri("runs/job")
    runtime_env = {"env_vars": AWS_ENV}  # how credentials reach the job's driver on a real cluster, too
    # `ray job submit` shell-quotes each argument after `--` (shlex.join): a URI with '&' stays one argument
    entry = ["pairloop", "gen", f"gen.out={out}", f"gen.problems={toy_problems}", "gen.n=3", "gen.sampling.max_tokens=16",
             "gen.execution.executor=ray", "gen.progress=false", f"engine.model={tiny_model}", "engine.dtype=float32", "engine.max_model_len=512",
             "engine.cpu_kv_cache_gib=0.25"]
    proc = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT),
                           "--runtime-env-json", json.dumps(runtime_env), "--"] + entry,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    store = ShardStore(out)
    m = store.read_manifest()
    assert m is not None and m.complete, (proc.stdout + proc.stderr)[-3000:]
    keys = _keys(store.read_table())
    assert len(set(keys)) == len(keys) == 6 * 3


# ---- outputs of a `ray job submit --working-dir` job --------------------------------------------------------

def test_a_relative_output_is_refused_inside_rays_working_dir_copy(tmp_path, monkeypatch):
    from gen.shards import check_output_path

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_output_path("pairs.out", "runs/x")  # outside a job: relative is fine
    monkeypatch.chdir(copy)
    with pytest.raises(ValueError, match=r"pairs\.out='runs/x' is a relative path.*working-dir"):
        check_output_path("pairs.out", "runs/x")
    check_output_path("pairs.out", "/mnt/efs/runs/x")
    check_output_path("pairs.out", "s3://bucket/runs/x?endpoint_override=h:1")


@pytest.mark.parametrize("job_config", ['{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}', "{not json"])
def test_a_relative_output_is_refused_in_a_job_driver_with_a_working_dir(monkeypatch, job_config):
    from pairs.config import PairsConfig
    from train.dpo import TrainConfig

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job_config)  # what Ray's job supervisor gives the driver
    with pytest.raises(ValueError, match=r"pairs\.out='runs/p'"):
        PairsConfig(inputs=["s3://b/gen"], out="runs/p", allow_no_eval_set=True)
    with pytest.raises(ValueError, match=r"train\.out='runs/a'"):
        TrainConfig(pairs=("/mnt/efs/p",), out="runs/a")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # a job without a working dir
    PairsConfig(inputs=["s3://b/gen"], out="runs/p", allow_no_eval_set=True)


def test_a_real_ray_job_driver_knows_it_runs_in_a_working_dir_copy(ray_head):
    url, env = ray_head
    probe = ("from gen.shards import check_output_path, ray_working_dir_copy; print('WHY:', ray_working_dir_copy()); "
             "check_output_path('pairs.out', 'runs/x')")
    proc = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
                           "python", "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0, logs[-3000:]
    assert "WHY: None" not in logs and "pairs.out='runs/x' is a relative path" in logs, logs[-3000:]


def test_seed_3b_config_runs_as_its_header_says(tmp_path, monkeypatch):
    """One `ray job submit` runs the whole loop: outputs survive a `ray job` (absolute, accepted inside a
    working-dir copy), on the shared mount every node reads (train reads pairs folders, engines load adapters), and
    the driver, which trains, gets a GPU."""
    from gen.shards import check_output_path
    from pairloop.loop import loop_configs

    path = ROOT / "configs" / "seed-3b.yaml"
    header = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    (job,) = [ln for ln in header if ln.startswith("ray job submit")]
    assert "--working-dir ." in job and "--entrypoint-num-gpus 1" in job, job
    assert job.endswith("-- pairloop run --config configs/seed-3b.yaml"), job
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)  # where the job's driver runs
    c = loop_configs(["--config", str(path)])
    shared = "/mnt/efs/"  # the mount point of ray_cluster.yaml's shared filesystem
    assert re.search(r"sudo mount .* /mnt/efs$", (ROOT / "ray_cluster.yaml").read_text(), re.M)
    outs = [c.gen.out, c.eval.out] + [x for p, t in c.arms.values() for x in (p.out, t.out)]
    for value in outs:
        check_output_path("out", value)
        assert value.startswith(shared), value
    for p, t in c.arms.values():
        assert list(p.inputs) == [c.gen.out] and list(t.pairs) == [p.out]