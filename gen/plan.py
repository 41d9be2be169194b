"""Sampling plans: problems x n samples cut into work units, with seeds that are data.

Pure functions, no Ray, no vLLM: testable on their own.

Seeds. vLLM gives child k of an n>1 request the seed `seed + k`. A unit asks for samples [start, start+size) of a
problem with one request of n=size and seed `problem_seed_base(run_seed, problem_id) + start`, so the sample with
index i gets seed `base + i` exactly, whatever the unit size. Bases are spaced 2**SEED_SPACING_BITS apart, so no two
(problem, sample index) pairs of a run share a seed as long as n < 2**20; `make_plan` asserts bases are distinct.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SEED_SPACING_BITS = 20  # room for 1,048,576 samples per problem
PROBLEM_HASH_BITS = 42  # 2**42 bases x 2**20 offsets < 2**63 (int64, torch.Generator)


def problem_seed_base(run_seed: int, problem_id: str) -> int:
    h = hashlib.sha256(f"{run_seed}\x00{problem_id}".encode()).digest()
    return (int.from_bytes(h[:8], "big") % (1 << PROBLEM_HASH_BITS)) << SEED_SPACING_BITS


def sample_seed(run_seed: int, problem_id: str, sample_index: int) -> int:
    return problem_seed_base(run_seed, problem_id) + sample_index


@dataclass(frozen=True)
class Request:
    problem_id: str
    start: int  # first sample index
    size: int  # n of the vLLM request
    seed: int  # seed of the request; sample start+k gets seed+k

    def sample_indices(self) -> range:
        return range(self.start, self.start + self.size)


@dataclass(frozen=True)
class Unit:
    unit_id: str
    requests: tuple[Request, ...]

    @property
    def num_samples(self) -> int:
        return sum(r.size for r in self.requests)


def seed_bases(problem_ids: list[str], n: int, run_seed: int) -> dict[str, int]:
    """Each problem's seed base, after checking that the problems and budget `n` fit the seed layout."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if n >= 1 << SEED_SPACING_BITS:
        raise ValueError(f"n must be < {1 << SEED_SPACING_BITS} (seed spacing), got {n}")
    if not problem_ids:
        raise ValueError("problem set is empty: nothing to sample")
    if len(set(problem_ids)) != len(problem_ids):
        raise ValueError("problem ids are not unique")
    bases = {pid: problem_seed_base(run_seed, pid) for pid in problem_ids}
    if len(set(bases.values())) != len(bases):
        raise RuntimeError(f"seed base collision between problems (run seed {run_seed}, {len(bases)} problems, "
                           f"{len(set(bases.values()))} distinct bases)")
    return bases


def problem_blocks(problem_ids: list[str], problems_per_unit: int) -> list[tuple[int, list[str]]]:
    """(index of the block's first problem, its problem ids): the problem side of a unit."""
    if problems_per_unit <= 0:
        raise ValueError(f"problems_per_unit must be > 0, got {problems_per_unit}")
    return [(pb, problem_ids[pb : pb + problems_per_unit]) for pb in range(0, len(problem_ids), problems_per_unit)]


def block_unit(pb: int, problem_ids: list[str], start: int, size: int, bases: dict[str, int]) -> Unit:
    """Samples [start, start+size) of each of these problems of block `pb`. The id names (problem block, sample
    block) only, so it is the same whichever problems of the block the unit holds."""
    return Unit(f"p{pb:06d}-s{start:07d}", tuple(Request(pid, start, size, bases[pid] + start) for pid in problem_ids))


def make_plan(
    problem_ids: list[str], n: int, run_seed: int, problems_per_unit: int, samples_per_unit: int
) -> list[Unit]:
    """Units over (problem block) x (sample block). Unit ids are stable: they name the block, not an order."""
    bases = seed_bases(problem_ids, n, run_seed)
    blocks = problem_blocks(problem_ids, problems_per_unit)
    if samples_per_unit <= 0:
        raise ValueError(f"samples_per_unit must be > 0, got {samples_per_unit}")
    return [block_unit(pb, block, sb, min(samples_per_unit, n - sb), bases)
            for pb, block in blocks for sb in range(0, n, samples_per_unit)]
