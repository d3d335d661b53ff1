"""The halo exchange (cwtflow.halo): every tile task sees the tile `dask.array.overlap` gives,
for uneven chunks, axes without halo and a periodic x axis; pieces are copies."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwtflow import halo
from cwtflow.halo import overlapped_tiles, tile_chunks, window


@given(
    chunks=st.lists(st.integers(1, 30), min_size=1, max_size=12).map(tuple),
    depth=st.integers(0, 40),
)
def test_tile_chunks_merge_small_chunks(chunks: tuple[int, ...], depth: int) -> None:
    merged = tile_chunks(chunks, depth)
    assert sum(merged) == sum(chunks)
    assert len(merged) == 1 or min(merged) >= depth
    # boundaries kept are boundaries of the input
    assert set(np.cumsum(merged).tolist()) <= set(np.cumsum(chunks).tolist())
    if min(chunks) >= depth:
        assert merged == chunks


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize(
    ("chunks", "depth"),
    [(((5, 7, 6), (4, 9, 8, 5)), (3, 4)), (((18,), (9, 8, 9)), (0, 2))],
)
def test_tiles_get_the_halo_of_dask_overlap(chunks, depth, periodic: bool) -> None:
    """Each tile task sees its block with the halo `dask.array.overlap` would give it."""
    rng = np.random.default_rng(3)
    images = [da.from_array(rng.normal(size=[sum(c) for c in chunks]), chunks=chunks)]
    images.append(images[0] * 2.0)
    boundary = {0: 0, 1: "periodic" if periodic else 0}

    def tiles(first, second, block_id):
        return np.stack([first, second, np.full(first.shape, block_id[1] * 10 + block_id[2])])

    ours = overlapped_tiles(tiles, images, depth, periodic, planes=3, block_id=True)
    assert ours.chunks == ((3,), *chunks)  # declared: the tile interiors
    expected = da.overlap.overlap(
        images[0], depth=dict(enumerate(depth)), boundary=boundary, allow_rechunk=False
    )
    blocks = ours.to_delayed()[0]
    for (i, j), block in np.ndenumerate(expected.to_delayed()):
        got = blocks[i, j].compute()
        want = block.compute()
        np.testing.assert_array_equal(got[0], want)
        np.testing.assert_array_equal(got[1], 2.0 * want)
        assert (got[2] == i * 10 + j).all()


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    chunks=st.tuples(
        st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
        st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    ),
    periodic=st.booleans(),
)
def test_window_reads_the_tile_of_dask_overlap(data, chunks, periodic: bool) -> None:
    """A window read from the stored array is the tile `dask.array.overlap` gives the block
    (any chunking whose blocks hold the depth; zeros beyond the map or periodic in x)."""
    depth = tuple(data.draw(st.integers(0, min(c))) if len(c) > 1 else 0 for c in chunks)
    image = np.random.default_rng(len(chunks[0])).normal(size=[sum(c) for c in chunks])
    expected = da.overlap.overlap(
        da.from_array(image, chunks=chunks),
        depth=dict(enumerate(depth)),
        boundary={0: 0, 1: "periodic" if periodic else 0},
        allow_rechunk=False,
    )
    ey, ex = (np.cumsum([0, *c]) for c in chunks)
    for (i, j), block in np.ndenumerate(expected.to_delayed()):
        rows, cols = slice(ey[i], ey[i + 1]), slice(ex[j], ex[j + 1])
        got = window(image, rows, cols, depth, periodic)
        np.testing.assert_array_equal(got, block.compute())


def test_halo_pieces_are_copies_of_the_edges() -> None:
    block = np.arange(30.0).reshape(5, 6)
    pieces = halo.pieces(block, (2, 3))
    assert set(pieces) == {(sy, sx) for sy in (-1, 0, 1) for sx in (-1, 0, 1)} - {(0, 0)}
    np.testing.assert_array_equal(pieces[(-1, 1)], block[3:, :3])
    np.testing.assert_array_equal(pieces[(1, 0)], block[:2])
    assert not any(np.shares_memory(piece, block) for piece in pieces.values())
