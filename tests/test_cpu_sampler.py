"""gen/cpu_sampler.py: top-p from the top candidates keeps the same nucleus as vLLM's sort, row by row."""

from __future__ import annotations

import pytest
import torch

from gen import cpu_sampler

ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
STOCK = ops.apply_top_k_top_p
V = 5000  # the rule does not depend on the vocabulary's size; the candidates are a small part of it


def peaked(rows: int, seed: int = 0, head: int = 12) -> torch.Tensor:
    """Logits like a code model's: a few likely tokens over a long flat tail (float32: no ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g) * 1.5
    x[:, :head] += torch.rand(rows, head, generator=g) * 12
    return x[:, torch.randperm(V, generator=g)]


def kept(logits: torch.Tensor) -> torch.Tensor:
    return logits > float("-inf")


@pytest.mark.parametrize("temperature", [1.0, 0.8, 0.2])
@pytest.mark.parametrize("p", [0.95, 0.5, 0.999])
def test_the_nucleus_is_vllms_and_the_kept_logits_are_untouched(temperature, p):
    x = peaked(48) / temperature
    pp = torch.full((48,), p)
    want = STOCK(x.clone(), None, pp)
    got = cpu_sampler.top_p(x.clone(), pp, STOCK, candidates=64)
    assert torch.equal(kept(got), kept(want))
    assert torch.equal(got[kept(got)], x[kept(got)])


def test_rows_it_does_not_cover_go_to_vllms_sort_and_rows_do_not_depend_on_each_other():
    """A flat row (its nucleus larger than the candidates) and a row with p = 1 are vLLM's; every other row is the
    same whether it is sampled alone or beside them."""
    x = peaked(6) * 2
    x[1] = torch.randn(V, generator=torch.Generator().manual_seed(9)) * 0.1  # flat: thousands of tokens in p
    pp = torch.tensor([0.95, 0.95, 1.0, 0.9, 0.95, 0.6])
    calls = []

    def spy(logits, k, p):
        calls.append(p.tolist())
        return STOCK(logits, k, p)

    want = kept(STOCK(x.clone(), None, pp))
    sizes = want.sum(-1)
    fast = [r for r in range(6) if sizes[r] < 64 and pp[r] < 1]
    assert 1 not in fast and 2 not in fast and len(fast) >= 3
    got = cpu_sampler.top_p(x.clone(), pp, spy, candidates=64)
    assert len(calls) == 1 and len(calls[0]) == 6 - len(fast)  # the others, in one call of vLLM's sort
    assert torch.equal(kept(got), want)
    for r in fast:
        alone = cpu_sampler.top_p(x[r:r + 1].clone(), pp[r:r + 1], STOCK, candidates=64)
        assert torch.equal(alone[0], got[r])


def test_a_tie_at_the_boundary_is_kept_whole():
    """bf16 logits tie often: where the boundary token shares its logit with others, all of them are kept (vLLM's
    unstable sort keeps some); nothing else differs, and a tie reaching past the candidates goes to vLLM's sort."""
    x = torch.full((1, V), -20.0)
    x[0, [3, 7, 11, 19, 23]] = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0])
    # masses: 5.0 -> 0.70, then three tokens at 3.0 of 0.095 each: p = 0.75 stops at the first of the tie
    got = kept(cpu_sampler.top_p(x.clone(), torch.tensor([0.75]), STOCK, candidates=16))[0]
    assert got.nonzero().squeeze(1).tolist() == [3, 7, 11, 19]
    stock = kept(STOCK(x.clone(), None, torch.tensor([0.75])))[0]
    assert stock[3] and int(stock[[7, 11, 19]].sum()) == 1 and not stock[23]  # one of the tie, whichever
    calls = []
    out = cpu_sampler.top_p(x.clone(), torch.tensor([0.75]), lambda *a: calls.append(1) or STOCK(*a), candidates=3)
    assert calls == [1] and torch.equal(kept(out)[0], stock)  # the tie straddles the 3 candidates: vLLM decides


def test_p_of_one_is_vllms():
    """p = 1 keeps what vLLM keeps: every token whose probability is not 0 in float32, however peaked the row."""
    x = torch.full((2, V), -28.0)
    x[:, 5] = 0.0  # the top token's probability rounds to 1 in float32; every other one is ~7e-13, not 0
    pp = torch.tensor([1.0, 1.0])
    assert torch.equal(kept(cpu_sampler.top_p(x.clone(), pp, STOCK, 16)), kept(STOCK(x.clone(), None, pp)))


def test_a_far_tail_does_not_change_the_nucleus():
    """Logits clamped 80 below the row's max for the log-sum-exp (no denormals): the far tail's mass is lost only
    where it is below float32's rounding."""
    x = peaked(8) * 20  # temperature 0.05: most of the tail lies 80+ below the max
    pp = torch.full((8,), 0.95)
    assert torch.equal(kept(cpu_sampler.top_p(x.clone(), pp, STOCK, 64)), kept(STOCK(x.clone(), None, pp)))


def test_install_replaces_only_a_checked_vllm_and_keeps_top_k_with_vllm(monkeypatch):
    saved = ops.apply_top_k_top_p
    try:
        monkeypatch.setenv(cpu_sampler.ENV, "vllm")
        assert cpu_sampler.install() == "vllm" == cpu_sampler.planned(False) and ops.apply_top_k_top_p is saved
        monkeypatch.setenv(cpu_sampler.ENV, "topk")
        monkeypatch.setattr(cpu_sampler, "vllm_version", lambda: "0.99.1")
        assert cpu_sampler.install() == "vllm" and ops.apply_top_k_top_p is saved
        monkeypatch.setattr(cpu_sampler, "vllm_version", lambda: "0.32.0")
        assert cpu_sampler.install() == cpu_sampler.NAME == cpu_sampler.planned(False)
        assert cpu_sampler.planned(True) == "vllm"
        x, k = peaked(4), torch.tensor([5, 5, 5, 5])
        assert torch.equal(ops.apply_top_k_top_p(x.clone(), k, None), saved(x.clone(), k, None))  # top-k: vLLM's
        monkeypatch.setenv(cpu_sampler.ENV, "fast")
        with pytest.raises(ValueError, match="PAIRLOOP_TOP_P='fast'"):
            cpu_sampler.planned(False)
    finally:
        ops.apply_top_k_top_p = saved
