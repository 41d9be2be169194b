"""The pairs table (its schema is defined here, once) and the composition report, written atomically.

An output folder holds:

    pairs.parquet   PAIRS_SCHEMA_CHAT or PAIRS_SCHEMA_TEXT: TRL's DPOTrainer reads it with no conversion
    report.json     composition: per category asked vs got, per phase, problems, pass rates, lengths, warnings
    report.md       the same for people

Chat format is TRL's conversational form: prompt = the chat messages the samples were generated from, chosen and
rejected = one assistant message each. Text format: prompt = the exact prompt string sent to the engine, chosen
and rejected = the completions (TRL appends the EOS token). In both, an assistant turn that gen pre-filled with an
opening fence (the run's `response_prefix`) and stopped at the closing one is given back whole: in chat format the
assistant content is prefix + completion + "```"; in text format the prefix is already the prompt's end.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gen.shards import write_files_atomic
from pairs.pool import OUTCOMES, PHASE_NAMES, Pool
from pairs.select import Plan, Selection
from tasks.leakage import PROVENANCE_KEY

PAIRS_SCHEMA_VERSION = 1
MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))

_PROVENANCE = [
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("adapter", pa.string(), nullable=True),  # null for the base model
    pa.field("category", pa.string(), nullable=False),  # the balancing category of the rejected side
    pa.field("rejected_outcome", pa.string(), nullable=False),  # sandbox.Outcome name
    pa.field("rejected_phase", pa.string(), nullable=True),  # "definition" | "test" | null
    pa.field("problem_pass_rate", pa.float64(), nullable=False),  # PASS / non-INFRA samples of this group
    pa.field("problem_samples", pa.int32(), nullable=False),  # non-INFRA samples behind that rate
    pa.field("chosen_run_id", pa.string(), nullable=False),
    pa.field("chosen_sample_index", pa.int32(), nullable=False),
    pa.field("chosen_seed", pa.int64(), nullable=False),
    pa.field("chosen_tokens", pa.int32(), nullable=False),  # completion_tokens of the sample
    pa.field("rejected_run_id", pa.string(), nullable=False),
    pa.field("rejected_sample_index", pa.int32(), nullable=False),
    pa.field("rejected_seed", pa.int64(), nullable=False),
    pa.field("rejected_tokens", pa.int32(), nullable=False),
]


def _schema(fmt: str, turn: pa.DataType) -> pa.Schema:
    return pa.schema(
        [pa.field("prompt", turn, nullable=False), pa.field("chosen", turn, nullable=False),
         pa.field("rejected", turn, nullable=False), *_PROVENANCE],
        metadata={"pairloop.schema": f"pairs/v{PAIRS_SCHEMA_VERSION}", "pairloop.format": fmt},
    )


PAIRS_SCHEMA_CHAT = _schema("chat", MESSAGES)
PAIRS_SCHEMA_TEXT = _schema("text", pa.string())
PAIRS_SCHEMAS = {"chat": PAIRS_SCHEMA_CHAT, "text": PAIRS_SCHEMA_TEXT}
PAIRS_FILE, REPORT_JSON, REPORT_MD = "pairs.parquet", "report.json", "report.md"


def check_pairs_schema(schema: pa.Schema, where: str) -> str:
    """The format ("chat" or "text") of a pairs table; ValueError naming `where` if it is neither."""
    for fmt, want in PAIRS_SCHEMAS.items():
        if all(n in schema.names and schema.field(n).type.equals(want.field(n).type) for n in want.names):
            return fmt
    problems = []
    for n in PAIRS_SCHEMA_TEXT.names:
        if n not in schema.names:
            problems.append(f"missing {n!r}")
        elif n not in ("prompt", "chosen", "rejected") and not schema.field(n).type.equals(
            PAIRS_SCHEMA_TEXT.field(n).type
        ):
            problems.append(f"{n}: {schema.field(n).type} (want {PAIRS_SCHEMA_TEXT.field(n).type})")
    turns = {n: str(schema.field(n).type) for n in ("prompt", "chosen", "rejected") if n in schema.names}
    raise ValueError(
        f"{where}: not a pairloop pairs table ({'; '.join(problems) or 'prompt/chosen/rejected types ' + str(turns)}); "
        f"prompt/chosen/rejected must all be string or all be {MESSAGES}"
    )


def assistant_text(completion: str, finish_reason: str | None, prefix: str) -> str:
    """The completion as the model produced it after `prefix`: + the closing fence its stop string cut off."""
    if prefix.lstrip().startswith("```") and finish_reason == "stop" and "```" not in completion:
        return completion + "```"
    return completion


def _response_prefix(pool: Pool, row: int) -> str:
    """What gen pre-filled the assistant turn with (the end of the prompt); "" for base-style runs."""
    return str(pool.runs[pool.file_input[pool.file[row]]].identity.get("response_prefix") or "")


def pairs_table(
    pool: Pool,
    plan: Plan,
    sel: Selection,
    texts: dict[int, tuple[str, str | None]],
    fmt: str,
    messages_for: Callable[[str], list[dict[str, str]]] | None = None,
) -> pa.Table:
    """The selected pairs as a PAIRS_SCHEMAS[fmt] table. `texts`: pool row -> (completion, finish_reason)."""
    if fmt not in PAIRS_SCHEMAS:
        raise ValueError(f"pairs format {fmt!r}: must be one of {sorted(PAIRS_SCHEMAS)}")
    if fmt != "text" and messages_for is None:
        raise ValueError(f"pairs format {fmt!r} needs messages_for (problem id -> chat messages), got None")
    cols: dict[str, list[Any]] = {f.name: [] for f in PAIRS_SCHEMAS[fmt]}
    checked: dict[int, list[dict[str, str]]] = {}
    for c, r, k in sel.pairs:
        g = int(pool.group[r])
        key = pool.groups[g]
        prefix = _response_prefix(pool, c)
        if _response_prefix(pool, r) != prefix:
            raise ValueError(
                f"problem {key.problem_id!r}: the chosen and rejected samples share a prompt but their runs' "
                f"response_prefix differ ({prefix!r} vs {_response_prefix(pool, r)!r})"
            )
        chosen = assistant_text(texts[c][0], texts[c][1], prefix)
        rejected = assistant_text(texts[r][0], texts[r][1], prefix)
        if fmt == "chat":
            if g not in checked:
                if not key.prompt.endswith(prefix):
                    raise ValueError(f"problem {key.problem_id!r}: the run's response_prefix {prefix!r} is not the end "
                                     f"of its samples' prompt (...{key.prompt[-40:]!r})")
                messages = messages_for(key.problem_id)
                for m in messages:
                    if m["content"].strip() not in key.prompt:
                        raise ValueError(
                            f"problem {key.problem_id!r}: its {m['role']} message is not in the samples' prompt; "
                            "the problem set used to rebuild chat messages (pairs.problems) is not the one gen "
                            f"used. Message starts {m['content'][:80]!r}; prompt starts {key.prompt[:80]!r}"
                        )
                checked[g] = [{"role": m["role"], "content": m["content"]} for m in messages]
            cols["prompt"].append(checked[g])
            cols["chosen"].append([{"role": "assistant", "content": prefix + chosen}])
            cols["rejected"].append([{"role": "assistant", "content": prefix + rejected}])
        else:
            cols["prompt"].append(key.prompt)
            cols["chosen"].append(chosen)
            cols["rejected"].append(rejected)
        cols["problem_id"].append(key.problem_id)
        cols["model"].append(key.model)
        cols["adapter"].append(key.adapter)
        cols["category"].append(plan.categories[k])
        cols["rejected_outcome"].append(OUTCOMES[pool.outcome[r]])
        cols["rejected_phase"].append(PHASE_NAMES[pool.phase[r]])
        cols["problem_pass_rate"].append(float(plan.pass_rate[g]))
        cols["problem_samples"].append(int(plan.n_scored[g]))
        for side, row in (("chosen", c), ("rejected", r)):
            cols[f"{side}_run_id"].append(pool.run_ids[pool.run[row]])
            cols[f"{side}_sample_index"].append(int(pool.sample_index[row]))
            cols[f"{side}_seed"].append(int(pool.seed[row]))
            cols[f"{side}_tokens"].append(int(pool.tokens[row]))
    schema = PAIRS_SCHEMAS[fmt]
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)


def attach_provenance(table: pa.Table, record: dict[str, Any]) -> pa.Table:
    """`table` with the problem provenance record (tasks.leakage.provenance_record) in its schema metadata, so the
    record travels with pairs.parquet: eval/ follows an adapter's train manifest to it for its leakage guard."""
    meta = dict(table.schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(record, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    return {"min": float(np.min(x)), "p10": float(np.percentile(x, 10)), "median": float(np.median(x)),
            "mean": round(float(np.mean(x)), 3), "p90": float(np.percentile(x, 90)), "max": float(np.max(x))}


# Code that reaches into the interpreter instead of computing an answer. The executor's verdict does not depend on
# what a program can reach (docs/sandbox.md), but a chosen side that uses these is worth a human look before a model
# is trained to prefer it: defence in depth, in the data.
INTROSPECTION = {
    "frame": re.compile(r"sys\._getframe|inspect\.(currentframe|stack|getouterframes|trace)\b|\bf_(locals|globals|back|"
                        r"builtins|code)\b|\btb_frame\b|\bgi_frame\b"),
    "trace": re.compile(r"\bsys\.(settrace|setprofile|monitoring)\b|\bthreading\.(settrace|setprofile)\b"),
    "gc": re.compile(r"\bgc\.(get_objects|get_referrers|get_referents)\b"),
    "ctypes": re.compile(r"\bctypes\b"),
    "sys.modules": re.compile(r"\bsys\.modules\b"),
}


def _text(value: Any) -> str:
    """A completion as text, whether stored as a string or as chat messages."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value or "")


def introspection_tricks(text: str) -> list[str]:
    return [name for name, pattern in INTROSPECTION.items() if pattern.search(text)]


def suspicious_chosen(table: pa.Table) -> list[dict[str, Any]]:
    """Chosen completions that use frame, trace, gc, ctypes or sys.modules tricks (INTROSPECTION)."""
    out = []
    cols = [table.column(c).to_pylist() for c in ("problem_id", "chosen_run_id", "chosen_sample_index", "chosen")]
    for pid, run, idx, chosen in zip(*cols):
        tricks = introspection_tricks(_text(chosen))
        if tricks:
            out.append({"problem_id": pid, "chosen_run_id": run, "chosen_sample_index": idx, "tricks": tricks})
    return out


def build_report(
    cfg_dict: dict[str, Any],
    pool: Pool,
    plan: Plan,
    sel: Selection,
    table: pa.Table,
    fmt: str,
    dedup_stats: dict[str, int],
    leakage: dict[str, Any],
    warnings: list[str],
    elapsed_s: float,
    finish: dict[int, str | None] | None = None,
) -> dict[str, Any]:
    """`finish`: pool row -> the engine's finish reason, for every chosen and rejected row (None: not known)."""
    n = table.num_rows
    cut = None if finish is None else {  # completions the engine cut at its token limit
        side: sum(1 for p in sel.pairs if finish.get(p[i]) == "length") for i, side in ((0, "chosen"), (1, "rejected"))}
    suspicious = suspicious_chosen(table)
    outcome_counts = np.bincount(pool.outcome, minlength=len(OUTCOMES))
    categories = {}
    for k in sel.categories:
        if k in sel.weights or k in cfg_dict.get("weights", {}):
            categories[k] = {"pool": sel.pool_counts.get(k, 0), "weight": sel.weights.get(k, 0.0),
                             "asked": sel.asked.get(k, 0), "got": sel.got.get(k, 0),
                             "exhausted": k in sel.exhausted and sel.got.get(k, 0) < sel.asked.get(k, 0)}
    phases: dict[str, int] = {}
    for ph in table.column("rejected_phase").to_pylist():
        phases[ph or "none"] = phases.get(ph or "none", 0) + 1
    outcomes: dict[str, int] = {}
    for o in table.column("rejected_outcome").to_pylist():
        outcomes[o] = outcomes.get(o, 0) + 1
    problems = table.column("problem_id").to_pylist()
    per_problem: dict[str, int] = {}
    for p in problems:
        per_problem[p] = per_problem.get(p, 0) + 1
    bins = np.linspace(0.0, 1.0, 11)
    used_groups = np.unique(pool.group[[r for _, r, _ in sel.pairs]]) if sel.pairs else np.zeros(0, dtype=np.int64)
    pool_groups = np.flatnonzero(plan.n_scored > 0)
    ct = np.asarray(table.column("chosen_tokens").to_pylist(), dtype=np.float64)
    rt = np.asarray(table.column("rejected_tokens").to_pylist(), dtype=np.float64)
    ratio = np.maximum(ct, 1) / np.maximum(rt, 1)
    chosen_uses: dict[tuple, int] = {}
    rejected_uses: dict[tuple, int] = {}
    for c, r, _ in sel.pairs:
        chosen_uses[c] = chosen_uses.get(c, 0) + 1
        rejected_uses[r] = rejected_uses.get(r, 0) + 1
    return {
        "schema": f"pairs-report/v{PAIRS_SCHEMA_VERSION}",
        "format": fmt,
        "pairs": n,
        "asked": cfg_dict["num_pairs"],
        "config": cfg_dict,
        # The model identity of each run, from its gen manifest: train checks its base model against these.
        "inputs": [{"uri": r.uri, "run_id": r.run_id, "shards": r.shards, "rows": r.rows,
                    "model": r.identity.get("model"), "model_fingerprint": r.identity.get("model_fingerprint")}
                   for r in pool.runs],
        "pool": {
            "rows": len(pool),
            "outcomes": {OUTCOMES[i]: int(v) for i, v in enumerate(outcome_counts) if v},
            "infra_errors_ignored": int(outcome_counts[OUTCOMES.index("INFRA_ERROR")]),
            "problems": len(pool.problems),
            "groups": len(pool.groups),
            "groups_in_window": int(plan.in_window.sum()),
            "groups_eligible": int(sel.eligible_groups.sum()),
            "rejected_rows_no_length_match": sel.stats.get("rejected_rows_no_length_match", 0),
            "dedup": dedup_stats,
        },
        "categories": categories,
        "redistribution": sel.notes,
        "rejected_outcomes": dict(sorted(outcomes.items())),
        "phases": dict(sorted(phases.items())),
        "problems_covered": len(per_problem),
        "groups_covered": int(len(used_groups)),
        "pairs_per_problem": _stats(np.asarray(list(per_problem.values()), dtype=np.float64)),
        "pass_rate_histogram": {
            "bins": [round(float(b), 2) for b in bins],
            "pair_groups": np.histogram(plan.pass_rate[used_groups], bins=bins)[0].tolist(),
            "pool_groups": np.histogram(plan.pass_rate[pool_groups], bins=bins)[0].tolist(),
        },
        "lengths": {
            "unit": "completion_tokens",
            "chosen": _stats(ct),
            "rejected": _stats(rt),
            "chosen_over_rejected": _stats(ratio),
            "chosen_shorter_fraction": round(float(np.mean(ct < rt)), 4) if n else None,
            "cut_at_token_limit": cut,
        },
        "reuse": {
            "distinct_chosen": len(chosen_uses),
            "distinct_rejected": len(rejected_uses),
            "max_chosen_uses": max(chosen_uses.values(), default=0),
            "max_rejected_uses": max(rejected_uses.values(), default=0),
        },
        "leakage": leakage,
        "suspicious_chosen": suspicious,
        "warnings": warnings + ([f"{len(suspicious)} chosen completion(s) use interpreter tricks "
                                 f"({', '.join(sorted({t for x in suspicious for t in x['tricks']}))}): see "
                                 "'Suspicious chosen completions'"] if suspicious else []),
        "elapsed_s": round(elapsed_s, 3),
    }


def report_markdown(rep: dict[str, Any]) -> str:
    lines = [f"**WARNING: {w}**" for w in rep["warnings"]] + ([""] if rep["warnings"] else [])  # first, loudly
    lines += [f"# Pairs: {rep['pairs']} of {rep['asked']} asked ({rep['format']} format)", ""]
    pool = rep["pool"]
    lines += [
        "## Pool", "",
        f"{pool['rows']} rows from {len(rep['inputs'])} run(s); {pool['problems']} problems, {pool['groups']} "
        f"(problem, model, adapter, prompt) groups; {pool['groups_in_window']} in the pass-rate window "
        f"[{rep['config']['pass_rate_min']}, {rep['config']['pass_rate_max']}], {pool['groups_eligible']} with both "
        f"a PASS and a usable failure. INFRA_ERROR rows ignored: {pool['infra_errors_ignored']}.", "",
        "Dedup (groups the selection touched): " + ", ".join(f"{k} {v}" for k, v in pool["dedup"].items()), "",
        "## Categories (rejected side)", "",
        "| category | pool | weight | asked | got |", "|---|---:|---:|---:|---:|",
    ]
    for k, v in rep["categories"].items():
        flag = " (exhausted)" if v["exhausted"] else ""
        lines.append(f"| {k} | {v['pool']} | {v['weight']:g} | {v['asked']} | {v['got']}{flag} |")
    lines.append("")
    if rep["redistribution"]:
        lines += ["Redistribution:", ""] + [f"- {n}" for n in rep["redistribution"]] + [""]
    lines += ["## Phases", "", "| phase | pairs |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rep["phases"].items()] + [""]
    ppp = rep["pairs_per_problem"]
    lines += [
        "## Problems", "",
        f"{rep['problems_covered']} problems covered ({rep['groups_covered']} groups); pairs per problem: "
        + ", ".join(f"{k} {v:g}" for k, v in ppp.items()), "",
        "| pass rate | groups with pairs | groups in pool |", "|---|---:|---:|",
    ]
    h = rep["pass_rate_histogram"]
    for i in range(len(h["bins"]) - 1):
        lines.append(f"| {h['bins'][i]:.1f}-{h['bins'][i + 1]:.1f} | {h['pair_groups'][i]} | {h['pool_groups'][i]} |")
    ln = rep["lengths"]
    lines += ["", f"## Lengths ({ln['unit']})", "", "| | min | median | mean | max |", "|---|---:|---:|---:|---:|"]
    for k in ("chosen", "rejected", "chosen_over_rejected"):
        s = ln[k]
        if s:
            lines.append(f"| {k} | {s['min']:g} | {s['median']:g} | {s['mean']:g} | {s['max']:g} |")
    lines += ["", f"Chosen shorter than rejected in {ln['chosen_shorter_fraction']} of pairs."]
    if ln.get("cut_at_token_limit"):
        c = ln["cut_at_token_limit"]
        lines += [f"Cut at the token limit (finish reason `length`): {c['chosen']} chosen (passing: the cut fell after "
                  f"the program, so the text trains on trailing output up to the limit), {c['rejected']} rejected."]
    lines += [""]
    ru = rep["reuse"]
    lines += [f"Reuse: {ru['distinct_chosen']} distinct chosen (max {ru['max_chosen_uses']} uses), "
              f"{ru['distinct_rejected']} distinct rejected (max {ru['max_rejected_uses']} uses).", ""]
    lk = rep["leakage"]
    lines += ["## Leakage guard", ""]
    if lk["eval_set"] is None:
        lines += ["No eval set named (allow_no_eval_set=true): NOT checked.", ""]
    else:
        c = lk["compared"]
        lines += [f"Eval set: {lk['eval_set']} ({lk['eval_problems']} problems, {c['listed_eval_ids']} of them listed "
                  f"ids only); compared against the {c['train_problems']} pool problems that can yield pairs: "
                  f"{c['method']}. Matches: " + ", ".join(f"{k} {v}" for k, v in c["found"].items())
                  + f"; pair problems in the eval set: {lk['pair_problems_in_eval']}"
                  + (" (allowed by allow_leakage=true)" if lk["pair_problems_in_eval"] else "") + ".", ""]
        lines += [f"- {f['kind']}: eval {f['eval_id']} ~ pool {f['train_id']} (score {f['score']:g})"
                  for f in lk["findings"]] + ([""] if lk["findings"] else [])
    unverified = [s for s in lk["problem_sets"] if not s["verified"]]
    if unverified:
        lines += ["Problem provenance recorded without prompts/tests for run(s) "
                  + "; ".join(f"{s['run_id']}: {s['note']}" for s in unverified)
                  + " (the exact prompts trained on are recorded).", ""]
    sus = rep.get("suspicious_chosen", [])
    lines += ["## Suspicious chosen completions", "",
              f"Chosen completions that use frame, trace, gc, ctypes or sys.modules tricks: {len(sus)}.", ""]
    lines += [f"- {x['problem_id']} (run {x['chosen_run_id']}, sample {x['chosen_sample_index']}): "
              + ", ".join(x["tricks"]) for x in sus] + ([""] if sus else [])
    return "\n".join(lines)


def write_outputs(out: str, table: pa.Table, report: dict[str, Any], markdown: str) -> dict[str, str]:
    """Write the three files atomically (temp names first, then renames); nothing half-written on error."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    pairs_bytes = sink.getvalue().to_pybytes()
    report = {**report, "pairs_sha256": hashlib.sha256(pairs_bytes).hexdigest()}  # ties the report to its table
    payloads = {
        PAIRS_FILE: pairs_bytes,
        REPORT_JSON: (json.dumps(report, indent=1, default=_json_default) + "\n").encode(),
        REPORT_MD: markdown.encode(),
    }
    return write_files_atomic(out, payloads)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        v = float(x)
        return None if math.isnan(v) else v
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
