"""Train/eval leakage by content: an exact key per problem and a near-duplicate check by token n-grams.

    from tasks.leakage import find_overlap
    result = find_overlap(train_problems, eval_problems)   # Problems, or ProblemText(id, prompt, test)
    result.findings   # [Finding(eval_id, train_id, kind="id"|"exact"|"near", score)]
    result.compared   # what was compared: counts, method, n, threshold

What it catches:
- the same id on both sides (kind "id");
- the same problem under another id, or reformatted: the exact key is the sha256 of the prompt's and the test's
  token streams (identifiers, numbers, single punctuation characters) after dropping `#` comments, so whitespace,
  indentation, blank lines, docstring line breaks and comments do not change it (kind "exact");
- a lightly edited copy of a training prompt (renamed function or parameters, a sentence removed, the
  prompt wrapped in a chat template or a code fence): the share of the eval prompt's token 8-grams that occur in
  one training prompt is >= NEAR_THRESHOLD (kind "near"). Only prompts are compared this way: the model trains on
  prompts and completions, never on tests, and HumanEval's tests share boilerplate (`METADATA`, `def check(
  candidate):`, `assert candidate(`) that would raise the score of unrelated problems.

What it does not catch: a paraphrase (same task, other words), a translation into another language or another
prompt format (an MBPP row restated HumanEval-style with a different docstring), a problem whose prompt is
shorter than a few n-grams and was edited (its score moves in large steps), and leakage through the completions
(a training completion that solves an eval problem under another name). A score is a share of distinct n-grams,
not of text: a long eval prompt that embeds a whole short training prompt scores low.

Standard library only (plus tasks.problems for the Problem type), like the rest of the foundation.
"""

from __future__ import annotations

import hashlib
import io
import re
import tokenize
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

from tasks.problems import Problem

# Measured on HumanEval against itself (164 x 163 pairs, tests/test_leakage.py) and against copies of itself:
# with n=8 the highest score of two different problems is 0.766 (HumanEval/43 vs /40, triples vs pairs summing to
# zero: one template), n=6 reaches 0.812; a copy with its function and first parameter renamed and its
# indentation changed scores 1.0 for all 164, and 90% still score >= 0.8 with the docstring's first line dropped.
NGRAM = 8  # tokens per n-gram (~ one short clause of a docstring)
NEAR_THRESHOLD = 0.8  # share of the eval prompt's 8-grams found in one training prompt; above HumanEval's 0.766
KINDS = ("id", "exact", "near")

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+(?:\.\d+)?|\S")
_IDENT = re.compile(r"[A-Za-z_]")


class ProblemLike(Protocol):
    id: str
    prompt: str
    test: str


@dataclass(frozen=True)
class ProblemText:
    """What the check needs of a problem. `test` may be "" when only the prompt is known (e.g. a rendered prompt)."""

    id: str
    prompt: str
    test: str = ""


@dataclass(frozen=True)
class Finding:
    eval_id: str
    train_id: str
    kind: str  # one of KINDS
    score: float  # 1.0 for "id" and "exact"; the n-gram share for "near"

    def describe(self) -> str:
        if self.kind == "id":
            return f"{self.eval_id} (same id)"
        if self.kind == "exact":
            return f"{self.eval_id} = {self.train_id} (same content)"
        return f"{self.eval_id} ~ {self.train_id} ({self.score:.0%} of its prompt's {NGRAM}-grams)"


@dataclass(frozen=True)
class OverlapResult:
    findings: list[Finding]  # at most one per eval problem: the strongest (id, then exact, then the best near)
    compared: dict[str, Any]  # JSON-ready: counts, method, n, threshold

    @property
    def eval_ids(self) -> list[str]:
        return sorted({f.eval_id for f in self.findings})


def strip_comments(code: str) -> str:
    """`code` without its `#` comments; unchanged when it does not tokenize as Python (then '#' may be text)."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return code
    lines = code.splitlines(keepends=True)
    out = list(lines)
    for t in reversed([t for t in toks if t.type == tokenize.COMMENT]):
        (row, col), (_, end) = t.start, t.end
        line = out[row - 1]
        out[row - 1] = line[:col] + line[end:]
    return "".join(out)


def tokens(text: str) -> list[str]:
    """Identifiers, numbers and single punctuation characters of `text` (comments dropped where it is Python),
    with the names it binds (`def`/`class` names, a def's parameters) replaced by placeholders numbered in order
    of first binding, everywhere they occur (docstring included): renaming a function or its arguments changes
    nothing."""
    toks = _TOKEN.findall(strip_comments(text))
    names: dict[str, str] = {}

    def bind(name: str) -> None:
        if name not in names and name not in ("self", "cls"):
            names[name] = f"<{len(names)}>"  # never a token of _TOKEN: no clash with real text

    for i in range(len(toks) - 1):
        if toks[i] not in ("def", "class") or not _IDENT.match(toks[i + 1]):
            continue
        bind(toks[i + 1])
        if toks[i] == "def" and i + 2 < len(toks) and toks[i + 2] == "(":
            depth = 0
            for j in range(i + 2, len(toks)):
                t = toks[j]
                if t in "([{":
                    depth += 1
                elif t in ")]}":
                    depth -= 1
                    if depth == 0:
                        break
                elif depth == 1 and _IDENT.match(t) and toks[j - 1] in ("(", ",", "*"):
                    bind(t)  # a parameter name (annotations and defaults follow ':' and '=')
    return [names.get(t, t) for t in toks]


def content_key(problem: ProblemLike) -> str:
    """sha256 hex of the prompt's and the test's token streams: blind to whitespace, indentation and comments."""
    h = hashlib.sha256()
    for part in (problem.prompt, problem.test):
        data = "\x00".join(tokens(part)).encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def ngrams(toks: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """Distinct n-grams of a token list; a list shorter than n is one n-gram (itself), an empty one none."""
    if not toks:
        return set()
    if len(toks) < n:
        return {tuple(toks)}
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def find_overlap(train: Iterable[ProblemLike], evals: Iterable[ProblemLike], n: int = NGRAM,
                 threshold: float = NEAR_THRESHOLD, exclude_self: bool = False) -> OverlapResult:
    """Every eval problem that is a training problem by id, exact content key or near-duplicate prompt.

    exclude_self: skip (eval, train) pairs with the same id (to check a set against itself)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"leakage n-gram size n must be an int >= 1, got {n!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"leakage threshold must be in (0, 1], got {threshold!r}")
    train, evals = list(train), list(evals)
    train_ids = {p.id for p in train}
    by_key: dict[str, list[str]] = defaultdict(list)
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)  # n-gram -> training problems holding it
    for i, p in enumerate(train):
        by_key[content_key(p)].append(p.id)
        for g in ngrams(tokens(p.prompt), n):
            index[g].append(i)
    findings: list[Finding] = []
    for e in evals:
        if not exclude_self and e.id in train_ids:
            findings.append(Finding(e.id, e.id, "id", 1.0))
            continue
        same = [t for t in by_key.get(content_key(e), []) if not (exclude_self and t == e.id)]
        if same:
            findings.append(Finding(e.id, sorted(same)[0], "exact", 1.0))
            continue
        grams = ngrams(tokens(e.prompt), n)
        hits: dict[int, int] = defaultdict(int)
        for g in grams:
            for i in index.get(g, ()):
                hits[i] += 1
        best: tuple[float, str] | None = None
        for i, c in hits.items():
            if exclude_self and train[i].id == e.id:
                continue
            score = c / len(grams)
            if best is None or (score, train[i].id) > best:  # deterministic: the highest score, then the id
                best = (score, train[i].id)
        if best is not None and best[0] >= threshold:
            findings.append(Finding(e.id, best[1], "near", round(best[0], 4)))
    compared = {
        "eval_problems": len(evals), "train_problems": len(train),
        "method": f"ids; exact key (sha256 of prompt+test tokens, comments and whitespace ignored); near-duplicate "
                  f"prompts (share of the eval prompt's token {n}-grams in one training prompt >= {threshold})",
        "ngram": n, "threshold": threshold,
        "found": {k: sum(f.kind == k for f in findings) for k in KINDS},
    }
    return OverlapResult(findings, compared)


def problem_texts(problems: Iterable[Problem]) -> list[ProblemText]:
    return [ProblemText(p.id, p.prompt, p.test) for p in problems]


# ------------------------------------------------------------------------------------- provenance record
# pairs/ writes this JSON into the key-value metadata of every pairs.parquet it writes, so the record travels
# with the file; eval/ reads it back through the adapter's train_manifest.json. Defined here, once, because both
# stages need it and neither may import the other.

PROVENANCE_KEY = b"pairloop.problem_provenance"
PROVENANCE_SCHEMA = "pairloop.problem-provenance/v1"


def provenance_record(problem_sets: list[dict[str, Any]], problems: list[dict[str, Any]]) -> dict[str, Any]:
    """problem_sets: where the problems came from (spec, fingerprint, split, ..., verified, note), one per gen run;
    problems: per trained problem {"id", "prompt", "test" (None when the problem set was not available),
    "trained_prompts" (the exact prompt strings the pairs carry)}."""
    return {"schema": PROVENANCE_SCHEMA, "problem_sets": problem_sets, "problems": problems}


def parse_provenance(raw: bytes | str | None, where: str) -> tuple[list[ProblemText], dict[str, Any]]:
    """The training problems a provenance record names, as texts to compare (each problem's prompt + test when
    known, and every prompt string it was trained on), and the record; ValueError naming `where` if it is absent
    or malformed."""
    import json

    if raw is None:
        raise ValueError(f"{where}: no problem provenance record ({PROVENANCE_KEY.decode()}); written by an older "
                         "pairloop pairs, or not by pairloop")
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: problem provenance record is not JSON ({e})") from None
    if not isinstance(rec, dict) or rec.get("schema") != PROVENANCE_SCHEMA:
        got = rec.get("schema") if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"{where}: problem provenance schema is {got!r}, want {PROVENANCE_SCHEMA!r}")
    problems = rec.get("problems")
    if not isinstance(problems, list) or not problems:
        raise ValueError(f"{where}: problem provenance lists no problems ({problems!r:.80})")
    for i, p in enumerate(problems):
        ok = (isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("trained_prompts"), list)
              and all(isinstance(t, str) for t in p["trained_prompts"])
              and all(p.get(k) is None or isinstance(p.get(k), str) for k in ("prompt", "test")))
        if not ok:
            raise ValueError(f"{where}: problem provenance entry {i} is malformed: {p!r:.120}")
    return record_texts(problems), rec


def record_texts(problems: list[dict[str, Any]]) -> list[ProblemText]:
    """The texts to compare for provenance entries: the problem (prompt + test) when known, and each prompt string
    it was trained on (the test unknown there), all under the problem's id."""
    texts: list[ProblemText] = []
    for p in problems:
        if p.get("prompt") is not None:
            texts.append(ProblemText(p["id"], p["prompt"], p.get("test") or ""))
        texts += [ProblemText(p["id"], t, "") for t in p["trained_prompts"]]
    return texts
