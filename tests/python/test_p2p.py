"""Point-to-point: send/recv and isend/irecv for every dtype and size, tags, ordering, rings,
simultaneous bidirectional traffic and a 64 MiB message."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from testlib import (DTYPE_NAMES, DTYPES, SMALL_SIZE_CLASSES, assert_equal, case_seed, data_kind,
                     garbage_like, gen_input, maybe_skip_gloo, numel_of, skip_if_gloo)


def _expected(seed, src, dtype, n):
    return gen_input(seed, src, dtype, n, data_kind(dtype))


# ---------------------------------------------------------------------------------------------
# every dtype x size, each ordered pair of ranks in turn
# ---------------------------------------------------------------------------------------------

def rank_send_recv_pairs(rank, ws, *, dtype, size, seed, mode):
    dt = DTYPES[dtype]
    n = numel_of(size, dt)
    for src in range(ws):
        for dst in range(ws):
            if src == dst or rank not in (src, dst):
                continue
            s = seed + 31 * src + dst
            ctx = f"{mode} {src}->{dst} {dtype} n={n}"
            if rank == src:
                t = _expected(s, src, dtype, n)
                if mode == "blocking":
                    dist.send(t, dst=dst)
                else:
                    dist.isend(t, dst=dst, tag=5).wait()
                assert_equal(t, _expected(s, src, dtype, n), ctx + ": send buffer modified")
            else:
                t = garbage_like(torch.empty(n, dtype=dt), s)
                ptr = t.data_ptr()
                if mode == "blocking":
                    dist.recv(t, src=src)
                else:
                    dist.irecv(t, src=src, tag=5).wait()
                assert t.data_ptr() == ptr, ctx + ": receive buffer replaced"
                assert_equal(t, _expected(s, src, dtype, n), ctx)


def _pair_cases():
    for ws in (2, 3):
        for mode in ("blocking", "async"):
            for size in SMALL_SIZE_CLASSES:
                for dtype in DTYPE_NAMES:
                    yield pytest.param(ws, mode, size, dtype, id=f"ws{ws}-{mode}-{size}-{dtype}")


@pytest.mark.parametrize("ws,mode,size,dtype", list(_pair_cases()))
def test_send_recv(pools, ws, mode, size, dtype):
    """send/recv (tag 0) or isend/irecv (tag 5) between every ordered pair deliver exact bytes."""
    pools.get(ws).run(rank_send_recv_pairs, dtype=dtype, size=size, mode=mode,
                      seed=case_seed("p2p", ws, mode, size, dtype))


# ---------------------------------------------------------------------------------------------
# tags
# ---------------------------------------------------------------------------------------------

def rank_tags_out_of_order(rank, ws, *, n, seed, wait_between):
    # rank 0 isends tag 1 then tag 2; rank 1 receives tag 2 first, then tag 1.
    if rank == 0:
        a = _expected(seed, 1, "float32", n)
        b = _expected(seed, 2, "float32", n)
        w1 = dist.isend(a, dst=1, tag=1)
        w2 = dist.isend(b, dst=1, tag=2)
        w2.wait()
        w1.wait()
    elif rank == 1:
        ra = torch.full((n,), -1.0)
        rb = torch.full((n,), -2.0)
        w2 = dist.irecv(rb, src=0, tag=2)
        if wait_between:  # tag 2 must complete although tag 1 has not even been posted
            w2.wait()
        w1 = dist.irecv(ra, src=0, tag=1)
        w1.wait()
        w2.wait()
        assert_equal(rb, _expected(seed, 2, "float32", n), "tag 2 message")
        assert_equal(ra, _expected(seed, 1, "float32", n), "tag 1 message")


@pytest.mark.parametrize("wait_between", [False, True], ids=["post-both", "wait-tag2-first"])
@pytest.mark.parametrize("size", ["n1023", "1MiB+3"])
def test_tags_out_of_order(pools, size, wait_between):
    """Messages with different tags match by tag, not by arrival order (no head-of-line block)."""
    # "wait-tag2-first" goes beyond "post both receives, then wait": the tag-2 receive must
    # complete before the tag-1 receive is even posted.  gloo deadlocks there.
    maybe_skip_gloo("a receive for tag 2 does not complete while an earlier tag-1 message waits "
                    "unmatched (deadlock)" if wait_between else None)
    pools.get(2).run(rank_tags_out_of_order, n=numel_of(size, torch.float32),
                     seed=case_seed("tags", size, wait_between), wait_between=wait_between)


def rank_same_tag_in_order(rank, ws, *, seed, tag):
    sizes = [1023, 1, 0, (1 << 20) // 4 + 3, 5, 4096, 1, 77]
    if rank == 0:
        works = [dist.isend(_expected(seed + i, 0, "float32", k), dst=1, tag=tag)
                 for i, k in enumerate(sizes)]
        for w in works:
            w.wait()
    elif rank == 1:
        bufs = [torch.full((k,), -1.0) for k in sizes]
        works = [dist.irecv(b, src=0, tag=tag) for b in bufs]
        for w in reversed(works):
            w.wait()
        for i, (b, k) in enumerate(zip(bufs, sizes)):
            assert_equal(b, _expected(seed + i, 0, "float32", k), f"message {i} (n={k})")


@pytest.mark.parametrize("tag", [0, 7])
def test_same_tag_in_order(pools, tag):
    """Several messages with the same (peer, tag) are matched in the order they were sent."""
    pools.get(2).run(rank_same_tag_in_order, seed=case_seed("same_tag", tag), tag=tag)


# ---------------------------------------------------------------------------------------------
# simultaneous traffic
# ---------------------------------------------------------------------------------------------

def rank_bidirectional(rank, ws, *, n, seed):
    partner = rank ^ 1
    if partner >= ws:
        return
    send = _expected(seed, rank, "float32", n)
    recv = torch.full((n,), -1.0)
    # Both sides post the send first and the receive second, then wait: must not deadlock.
    ws_ = dist.isend(send, dst=partner)
    wr = dist.irecv(recv, src=partner)
    wr.wait()
    ws_.wait()
    assert_equal(recv, _expected(seed, partner, "float32", n), f"{partner}->{rank}")


@pytest.mark.parametrize("size", ["n1023", "1MiB+3", "16MiB"])
@pytest.mark.parametrize("ws", [2, 4])
def test_bidirectional(pools, ws, size):
    """Pairs that isend and irecv to each other at the same time complete (no deadlock)."""
    n = (16 << 20) // 4 if size == "16MiB" else numel_of(size, torch.float32)
    pools.get(ws).run(rank_bidirectional, n=n, seed=case_seed("bidir", ws, size))


def rank_ring(rank, ws, *, dtype, n, seed):
    # A ring all-gather by forwarding: after ws - 1 steps every rank holds every block.
    right, left = (rank + 1) % ws, (rank - 1) % ws
    blocks = {rank: _expected(seed, rank, dtype, n)}
    current = rank
    for step in range(ws - 1):
        incoming = garbage_like(blocks[rank], seed + step)
        works = [dist.isend(blocks[current], dst=right), dist.irecv(incoming, src=left)]
        for w in works:
            w.wait()
        current = (current - 1) % ws
        blocks[current] = incoming
    for r in range(ws):
        assert_equal(blocks[r], _expected(seed, r, dtype, n), f"ring block of rank {r}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "bool"])
@pytest.mark.parametrize("size", ["n1", "n1023", "1MiB+3"])
@pytest.mark.parametrize("ws", [2, 3, 4])
def test_ring(pools, ws, size, dtype):
    """A ring of isend/irecv over all ranks forwards every block intact."""
    pools.get(ws).run(rank_ring, dtype=dtype, n=numel_of(size, DTYPES[dtype]),
                      seed=case_seed("ring", ws, size, dtype))


# ---------------------------------------------------------------------------------------------
# large and non-contiguous
# ---------------------------------------------------------------------------------------------

def rank_big_message(rank, ws, *, dtype, seed):
    dt = DTYPES[dtype]
    n = numel_of("64MiB", dt)
    if rank == 0:
        t = _expected(seed, 0, dtype, n)
        dist.send(t, dst=1)
        back = garbage_like(t, seed)
        dist.irecv(back, src=1).wait()
        assert_equal(back, _expected(seed, 1, dtype, n), "64 MiB 1->0")
    elif rank == 1:
        t = garbage_like(torch.empty(n, dtype=dt), seed)
        dist.recv(t, src=0)
        assert_equal(t, _expected(seed, 0, dtype, n), "64 MiB 0->1")
        dist.isend(_expected(seed, 1, dtype, n), dst=0).wait()


@pytest.mark.big
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_64mib_message(pools, dtype):
    """A 64 MiB message goes through intact in each direction."""
    pools.get(2).run(rank_big_message, timeout=240, dtype=dtype, seed=case_seed("big", dtype))


def rank_noncontig_p2p(rank, ws, *, dtype, seed):
    dt = DTYPES[dtype]
    kind = data_kind(dtype)
    for n_rows, n_cols in ((31, 33), (1031, 259)):
        n = n_rows * n_cols
        if rank == 0:
            base = gen_input(seed, 0, dtype, 2 * n, kind)
            dist.send(base[::2], dst=1)                      # stride-2 source
            assert_equal(base, gen_input(seed, 0, dtype, 2 * n, kind), "send modified the source")
        elif rank == 1:
            base = garbage_like(torch.empty(n_cols, n_rows, dtype=dt), seed)
            view = base.t()                                  # transposed destination
            dist.recv(view, src=0)
            expected = gen_input(seed, 0, dtype, 2 * n, kind)[::2].reshape(n_rows, n_cols)
            assert_equal(view.contiguous(), expected, "received into a transposed view")


@skip_if_gloo("send/recv require contiguous tensors ('input tensor has to be contiguous')")
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int64", "bool"])
def test_noncontiguous_send_recv(pools, dtype):
    """send from a stride-2 view and recv into a transposed view move the right elements."""
    pools.get(2).run(rank_noncontig_p2p, dtype=dtype, seed=case_seed("nc_p2p", dtype))
