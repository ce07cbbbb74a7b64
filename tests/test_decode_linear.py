"""The compiled decode-linear kernel (rollout/decode_linear.py) against linears worked out in float64."""

from __future__ import annotations

import pytest
import torch

from grpo.rollout.decode_linear import available, kernel_lanes, linear, pack

pytestmark = pytest.mark.skipif(not available(), reason="no C compiler to build the kernel with")


def reference(x, weight, bias):
    return torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())


# rows: one tile of 1, 3 and 16 rows (a block by all rows), 29 several (with AVX-512 a group of blocks by 8 or 6
# rows a pass), 70 more than one 64-row pass over a group of weight blocks.
# out_features 37 and 90: a last block the kernel writes only in part (8 and 16 lanes); with AVX-512's groups of 3
# blocks (4 for gate and up) 64 and 80 end in a group of 1 and 2 blocks, 37's gate and up in a group of one pair.
@pytest.mark.parametrize("rows", [1, 3, 16, 29, 70])
@pytest.mark.parametrize("out_features,in_features", [(37, 24), (90, 48), (64, 200), (80, 40)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_each_epilogue_equals_the_linear_worked_out_in_float64(rows, out_features, in_features, with_bias):
    torch.manual_seed(rows * out_features)
    weight, up = torch.randn(out_features, in_features), torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    up_bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(rows, in_features + 5)[:, 2:-3]  # rows a stride apart wider than the row
    expected = reference(x, weight, bias)
    # float32 sums of up to 200 products of N(0, 1) values: about 1e-5 of rounding
    torch.testing.assert_close(linear(x, pack([(weight, bias)])).double(), expected, rtol=1e-5, atol=1e-4)

    residual = torch.randn(rows, out_features)
    before = residual.clone()
    out = linear(x, pack([(weight, bias)]), add_to=residual)
    assert out is residual  # added in place
    torch.testing.assert_close(residual.double(), before.double() + expected, rtol=1e-5, atol=1e-4)

    gated = linear(x, pack([(weight, bias), (up, up_bias)], gated=True))
    assert gated.shape == (rows, out_features)
    expected_gated = torch.nn.functional.silu(expected) * reference(x, up, up_bias)
    torch.testing.assert_close(gated.double(), expected_gated, rtol=1e-5, atol=1e-3)


def test_silu_by_hand_and_far_from_zero():
    """gate = identity, up = 0 x + 1: the outputs are silu(g) for g = 0, 2, -100, 100: 0, 2 / (1 + e^-2),
    -100 e^-100 (0 in float32), 100."""
    values = torch.tensor([[0.0, 2.0, -100.0, 100.0]])
    out = linear(values, pack([(torch.eye(4), None), (torch.zeros(4, 4), torch.ones(4))], gated=True))
    expected = torch.tensor([[0.0, 2.0 / (1.0 + torch.tensor(-2.0).exp().item()), 0.0, 100.0]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_a_rows_result_does_not_depend_on_the_other_rows_or_the_threads():
    """Each output is one thread's sum over the inputs in order: a completion's logits are the same whichever
    rows decode beside it and on any number of threads."""
    torch.manual_seed(0)
    weight, up, x = torch.randn(200, 96), torch.randn(200, 96), torch.randn(37, 96)
    threads = torch.get_num_threads()
    for packed in (pack([(weight, None)]), pack([(weight, None), (up, None)], gated=True)):
        together = linear(x, packed)
        assert torch.equal(together, torch.cat([linear(row, packed) for row in x.split(1)]))
        assert torch.equal(together[5:21], linear(x[5:21], packed))
        for rows in range(1, 18):  # each tile size, one pass or two
            assert torch.equal(together[:rows], linear(x[:rows], packed))
        try:
            torch.set_num_threads(3)
            assert torch.equal(together, linear(x, packed))
        finally:
            torch.set_num_threads(threads)


def test_packing_pads_the_outputs_to_whole_blocks_and_interleaves_gate_and_up():
    lanes = kernel_lanes()
    weight, up = torch.randn(lanes + 3, 5), torch.randn(lanes + 3, 5)
    packed = pack([(weight, torch.ones(lanes + 3)), (up, None)], gated=True)
    assert packed.blocks.shape == (4, 5, lanes) and packed.out_features == lanes + 3 and packed.gated
    assert torch.equal(packed.blocks[0], weight[:lanes].t()) and torch.equal(packed.blocks[1], up[:lanes].t())
    assert torch.equal(packed.blocks[3, :, :3], up[lanes:].t()) and not packed.blocks[3, :, 3:].any()
    assert packed.bias.tolist() == [1.0] * lanes + [0.0] * lanes + [1.0] * 3 + [0.0] * (lanes - 3) + [0.0] * lanes


@pytest.mark.parametrize("sizes", [(32, 16, 16), (20, 16, 7), (16, 16, 9)])
def test_fused_linears_and_an_input_scale_equal_the_concatenated_linear(sizes):
    """q, k and v as one projection: whole blocks each (written in place), a first one ending inside a block
    (concatenated first), a last one ending inside a block; the norm's weight folded into the columns."""
    torch.manual_seed(sum(sizes))
    linears = [(torch.randn(size, 24), torch.randn(size) if i != 1 else None) for i, size in enumerate(sizes)]
    scale, x = torch.rand(24) + 0.5, torch.randn(5, 24)
    weight = torch.cat([w for w, _ in linears]) * scale
    bias = torch.cat([b if b is not None else torch.zeros(w.size(0)) for w, b in linears])
    torch.testing.assert_close(linear(x, pack(linears, scale)).double(), reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


def test_mismatched_inputs_are_refused_before_the_kernel_reads_them():
    packed = pack([(torch.randn(16, 8), None)])
    with pytest.raises(ValueError, match="rows of 8"):
        linear(torch.randn(2, 9), packed)
    with pytest.raises(ValueError, match="rows of 8"):
        linear(torch.randn(2, 8, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="cannot add"):
        linear(torch.randn(2, 8), packed, add_to=torch.zeros(2, 15))


def test_no_rows_give_no_rows():
    packed = pack([(torch.randn(16, 8), None)])
    assert linear(torch.empty(0, 8), packed, norm_eps=1e-5).shape == (0, 16)
