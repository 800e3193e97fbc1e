"""Block-wise draws: z is drawn in fixed blocks of rows, each from its own seed, so a draw is
the same bits on one thread or several, and the blocks are independent."""

import pytest
import torch
from helpers import bits_equal
from hypothesis import given
from hypothesis import strategies as st

from flatopt._arming import _parallel
from flatopt.noise import BLOCK_ELEMENTS, blocks, draw_noise, perturbed_weight

pytestmark = pytest.mark.cpu_only(
    reason="blocks and the thread pool are the CPU draw; other devices draw one block"
)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 700),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**63 - 1),
)
def test_parallel_blocks_give_the_serial_bits(rows, cols, transposed, dtype, seed):
    g = torch.Generator().manual_seed(seed % 1000)
    weight = torch.randn(rows, cols, generator=g).to(dtype)
    std = torch.rand(cols if transposed else rows, generator=g)
    kwargs = {"transposed": transposed, "generator": torch.Generator(), "seed": seed}
    serial = perturbed_weight(weight, std, **kwargs)
    before = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert bits_equal(perturbed_weight(weight, std, run=_parallel, **kwargs), serial)
    finally:
        torch.set_num_threads(before)


@given(rows=st.integers(1, 5000), cols=st.integers(1, 3000))
def test_blocks_tile_the_rows_and_depend_on_the_shape_only(rows, cols):
    parts = blocks(torch.empty(rows, cols))
    assert parts[0].start == 0 and parts[-1].stop == rows
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert all(p.stop > p.start for p in parts)
    per_block = max(1, BLOCK_ELEMENTS // cols)
    assert all(p.stop - p.start == per_block for p in parts[:-1])


def test_the_blocks_of_one_draw_are_uncorrelated(threads):
    threads(2)
    weight = torch.zeros(4 * BLOCK_ELEMENTS // 256, 256)
    eps = draw_noise(weight, torch.ones(weight.shape[0]), generator=torch.Generator(), seed=3)
    parts = blocks(weight)
    assert len(parts) == 4
    first, second = eps[parts[0]].flatten(), eps[parts[1]].flatten()
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1].item()
    assert abs(correlation) < 6 / first.numel() ** 0.5  # 6 standard errors of a correlation
    assert not torch.equal(first, second)


def test_draw_noise_is_what_perturbed_weight_adds():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(700, 300, generator=g)
    std = torch.rand(700, generator=g)
    eps = draw_noise(weight, std, generator=torch.Generator(), seed=11)
    perturbed = perturbed_weight(weight, std, generator=torch.Generator(), seed=11, run=_parallel)
    assert len(blocks(weight)) > 1
    torch.testing.assert_close(perturbed - weight, eps, rtol=1e-5, atol=1e-6)
