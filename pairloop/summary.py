"""What a loop run did, beside its evaluation report: `<run.out>/report/run.md` and `run.json`.

The evaluation report (eval/report.py) says how the variants scored; this says how they came to be: the command,
each stage's wall time, the pool (gen: rows, outcomes, usable problems, tokens), each arm's pairs (categories and
phases of the rejected side, problems covered), each adapter's training (final metrics, its curves copied beside as
`train-<arm>.png`), and content digests of the pool, of each arm's pairs and of the report's numbers. Digests are
over content, not files (no paths, times or Parquet layout), so a rerun with the same seeds can be checked against
them: equal digests = the same pool, the same pairs, the same results.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gen.shards import MANIFEST_NAME, ShardStore, join_uri, resolve, write_files_atomic

POOL_COLUMNS = ("problem_id", "sample_index", "completion", "outcome", "phase")
PAIR_COLUMNS = ("problem_id", "chosen", "rejected")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(uri: str) -> dict[str, Any]:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _read_bytes(uri: str) -> bytes | None:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def pool_digest(gen_out: str) -> str:
    """sha256 over every gen row's (problem, sample index, completion, outcome, phase), sorted."""
    t = ShardStore(gen_out).read_table(columns=list(POOL_COLUMNS)).to_pylist()
    return _sha(sorted((tuple(r[c] for c in POOL_COLUMNS) for r in t), key=lambda x: (x[0], x[1])))


def pairs_digest(pairs_out: str) -> str:
    """sha256 over the pairs' (problem, chosen, rejected), in the file's order (selection order is data too)."""
    import pyarrow.parquet as pq

    fs, path = resolve(join_uri(pairs_out, "pairs.parquet"))
    t = pq.read_table(path, filesystem=fs, columns=list(PAIR_COLUMNS)).to_pylist()
    return _sha([[r[c] for c in PAIR_COLUMNS] for r in t])


def report_digest(report: dict[str, Any]) -> str:
    """sha256 over the report's numbers: every variant's summary and every comparison (no inputs, no paths)."""
    return _sha({"variants": report["variants"], "comparisons": report["comparisons"]})


def build(command: str, log_state: dict[str, Any], gen_out: str, arms: dict[str, tuple[Any, Any]],
          report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The run summary (JSON-ready) and the training-curve images to write beside it."""
    gen = _read_json(join_uri(gen_out, MANIFEST_NAME))
    out: dict[str, Any] = {
        "command": command,
        "stages": {k: v.get("seconds") for k, v in log_state.get("stages", {}).items()},
        "pool": {**{k: gen.get("summary", {}).get(k) for k in (
            "rows", "pass_rate", "outcomes", "infra_errors", "problems", "problems_pass_and_fail", "usable_problems",
            "usable_pairs", "tokens", "tokens_per_usable_pair", "policy", "engine_dtype")}, "digest": pool_digest(gen_out)},
        "arms": {},
        "report_digest": report_digest(report),
    }
    images: dict[str, bytes] = {}
    for arm, (pcfg, tcfg) in arms.items():
        rep = _read_json(join_uri(pcfg.out, "report.json"))
        man = _read_json(join_uri(tcfg.out, "train_manifest.json"))
        name = arm or "adapter"
        png = _read_bytes(join_uri(tcfg.out, "metrics.png"))
        if png is not None:
            images[f"train-{name}.png"] = png
        out["arms"][name] = {
            "balance": pcfg.balance, "pairs": rep["pairs"], "asked": rep["asked"],
            "categories": {k: {"pool": v["pool"], "asked": v["asked"], "got": v["got"]}
                           for k, v in rep["categories"].items()},
            "rejected_outcomes": rep["rejected_outcomes"], "phases": rep["phases"],
            "problems_covered": rep["problems_covered"], "pairs_digest": pairs_digest(pcfg.out),
            "train": {"precision": man.get("precision"), "device": man.get("device"),
                      "metrics": man.get("metrics", {}), "seed": man.get("config", {}).get("seed")},
            "curves": f"train-{name}.png" if png is not None else None,
        }
    return out, images


def render(s: dict[str, Any]) -> str:
    lines = ["# Run summary", "", f"Command: `{s['command']}`", "", "## Wall time per stage", "",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in s["stages"].items()]
    total = sum(v for v in s["stages"].values() if v)
    lines += [f"| total | {total:.1f} ({total / 60:.1f} min) |", "", "## Pool (gen, train problems)", ""]
    p = s["pool"]
    rate = f"{p['pass_rate']:.3f}" if p.get("pass_rate") is not None else "n/a"
    lines += [f"{p['rows']} samples over {p['problems']} problems, pass rate {rate}; problems with >= 1 pass and "
              f">= 1 fail: {p['problems_pass_and_fail']}; INFRA_ERROR: {p['infra_errors']}."]
    dt = p.get("engine_dtype") or {}
    lines.append(f"- engine dtype: {dt.get('dtype', 'not recorded')}" + (f" ({dt['why']})" if dt.get("why") else ""))
    for k in ("policy", "usable_problems", "usable_pairs", "tokens", "tokens_per_usable_pair"):
        if p.get(k) is not None:
            lines.append(f"- {k}: {round(p[k], 1) if isinstance(p[k], float) else p[k]}")
    lines += ["", "| outcome | samples |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in (p["outcomes"] or {}).items()]
    lines += ["", f"Pool digest: `{p['digest']}`", ""]
    for arm, a in s["arms"].items():
        lines += [f"## Arm `{arm}` (balance: {a['balance']})", "",
                  f"{a['pairs']} pairs (asked {a['asked']}) from {a['problems_covered']} problems; pairs digest "
                  f"`{a['pairs_digest']}`.", "", "| rejected category | pool | asked | got |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['pool']} | {v['asked']} | {v['got']} |" for k, v in a["categories"].items()]
        lines += ["", "Rejected side by phase: " + ", ".join(f"{k} {v}" for k, v in a["phases"].items()), ""]
        m = a["train"]["metrics"]
        shown = {k: m[k] for k in ("train_loss", "global_step", "wall_s") if k in m}
        lines += [f"Training ({a['train']['device']}, {a['train']['precision']}, seed {a['train']['seed']}): "
                  + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())]
        if a["curves"]:
            lines += ["", f"![training curves]({a['curves']})"]
        lines.append("")
    lines += [f"Report digest (every variant's numbers and every comparison): `{s['report_digest']}`", ""]
    return "\n".join(lines)


def write(report_dir: str, summary: dict[str, Any], images: dict[str, bytes]) -> None:
    files = {"run.json": json.dumps(summary, indent=1, sort_keys=True).encode(), "run.md": render(summary).encode(),
             **images}
    write_files_atomic(report_dir, files)
