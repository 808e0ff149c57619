"""Process groups other than the default one: new_group (subsets, rank order, one member, local
synchronisation), new_subgroups / new_subgroups_by_enumeration, several groups used at once with
interleaved async ops, sequence numbers, the backend's options (getBackendOptions), splitting
(Backend::split through ProcessGroup.split_group), TORCH_DISTRIBUTED_DEBUG=DETAIL (the
ProcessGroupWrapper) and profiler record names ("<backend>:<op>").

Every rank computes the expected results itself from the inputs of the group's members
(testlib.gen_input); the backend's output is never the reference.  Group-specific seeds make the
data of every (group, op) distinct, so traffic that reaches the wrong group shows up as a wrong
result.

torch 2.13 facts these tests rely on (see distributed_c10d.py and c10d/ProcessGroup.hpp):
  * ProcessGroup._get_sequence_number_for_group() only forwards to the backend for GLOO, NCCL,
    XCCL and UCC (ProcessGroup::backendSupportsSequenceNumbers); a plugin backend is CUSTOM, so the
    tests ask the backend itself: pg._get_backend(cpu)._get_sequence_number_for_group().
  * dist.split_group() needs a default group bound to an accelerator (init_process_group(device_id=
    cuda:N)) and torch.accelerator.is_available(); on CPU it always raises.  What it calls,
    ProcessGroup.split_group() -> Backend::split for each device type, works on CPU and is what
    test_split_* exercise.
  * Python reads a backend's options through its ``options`` property (ProcessGroupGloo and
    ProcessGroupNCCL bind getBackendOptions() that way; dist.split_group reads
    ``parent_backend.options``).  The base Backend binding has no such property.
"""

from __future__ import annotations

import itertools
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from harness import RankPool
from testlib import (BACKEND, assert_equal, case_seed, check_all_reduce, check_group_usable,
                     gen_input, gloo_lacks, maybe_skip_gloo, skip_if_gloo)

CPU = torch.device("cpu")
F32 = "float32"
BIG = (1 << 20) // 4 + 3  # 1 MiB + 3 elements of float32

# Group names given to ProcessGroup.split_group must be new on every call (the backend
# rendezvouses under "<name>/" in the store); the parent process numbers the calls.
_SPLIT_CALLS = itertools.count()


def _is_member(g) -> bool:
    return g is not None and g != dist.GroupMember.NON_GROUP_MEMBER


def _backend_of(g):
    """The group's cpu backend, unwrapped if TORCH_DISTRIBUTED_DEBUG=DETAIL wrapped it."""
    be = g._get_backend(CPU)
    return getattr(be, "wrapped_pg", be)


def _seq(g) -> int:
    """The group's sequence number, asked from the backend (see the module docstring)."""
    return g._get_backend(CPU)._get_sequence_number_for_group()


def _options(g):
    be = _backend_of(g)
    if not hasattr(be, "options"):
        raise AssertionError(
            f"{type(be).__name__} has no 'options' property: Python reaches "
            f"Backend::getBackendOptions() through it (as for ProcessGroupGloo/NCCL; "
            f"dist.split_group reads parent_backend.options)")
    return be.options


def _destroy(groups) -> None:
    for g in groups:
        if _is_member(g):
            dist.destroy_process_group(g)


# ---------------------------------------------------------------------------------------------
# checked collectives on a group given by its ordered member list (index = group rank)
# ---------------------------------------------------------------------------------------------

def _check_collectives(rank, g, members, seed, ctx, n=1023):
    """all_reduce, broadcast (src and group_src), all_gather, all_gather_into_tensor on ``g``."""
    size = len(members)
    grank = members.index(rank)
    # all_reduce
    inputs = [gen_input(seed, m, F32, n, "small") for m in members]
    t = inputs[grank].clone()
    dist.all_reduce(t, group=g)
    check_all_reduce(t, inputs, size, F32, "SUM", None, True, f"{ctx}: all_reduce")
    # broadcast from every member, named by global rank and by group rank in turn
    for groot, root in enumerate(members):
        s = seed + 17 * (groot + 1)
        t = gen_input(s, rank, F32, n, "randn")
        if groot % 2 == 0:
            dist.broadcast(t, src=root, group=g)
        else:
            dist.broadcast(t, group=g, group_src=groot)
        assert_equal(t, gen_input(s, root, F32, n, "randn"),
                     f"{ctx}: broadcast from global rank {root} (group rank {groot})")
    # all_gather: output[i] is group rank i's input
    s = seed + 1001
    outs = [torch.full((n,), -1.0) for _ in range(size)]
    dist.all_gather(outs, gen_input(s, rank, F32, n, "randn"), group=g)
    for i, m in enumerate(members):
        assert_equal(outs[i], gen_input(s, m, F32, n, "randn"),
                     f"{ctx}: all_gather output[{i}] (global rank {m})")
    # all_gather_into_tensor: block i is group rank i's input
    s = seed + 2002
    out = torch.full((size * n,), -1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in 2.13
        dist.all_gather_into_tensor(out, gen_input(s, rank, F32, n, "randn"), group=g)
    for i, m in enumerate(members):
        assert_equal(out[i * n:(i + 1) * n], gen_input(s, m, F32, n, "randn"),
                     f"{ctx}: all_gather_into_tensor block {i} (global rank {m})")


def _check_non_member(rank, g, ctx):
    """A non-member gets NON_GROUP_MEMBER, rank -1, and collectives on it are no-ops."""
    assert g is dist.GroupMember.NON_GROUP_MEMBER, \
        f"{ctx}: rank {rank} is not a member but got {g!r}, not GroupMember.NON_GROUP_MEMBER"
    assert dist.get_rank(g) == -1, f"{ctx}: get_rank on a non-member gave {dist.get_rank(g)}"
    t = torch.full((7,), float(rank))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Running all_reduce on global rank ... not in group"
        work = dist.all_reduce(t, group=g)
    assert work is None, f"{ctx}: all_reduce on a non-member returned {work!r}"
    assert_equal(t, torch.full((7,), float(rank)), f"{ctx}: non-member's tensor changed")


# ---------------------------------------------------------------------------------------------
# 1. new_group with subsets
# ---------------------------------------------------------------------------------------------

# (name, ranks as passed, sort_ranks): with sort_ranks=False the list order is the group rank order
NEW_GROUP_SPECS_WS4 = [
    ("pair01", [0, 1], True),
    ("pair23", [2, 3], True),
    ("tail123", [1, 2, 3], True),
    ("pair31-sorted", [3, 1], True),
    ("pair31-as-given", [3, 1], False),
    ("single2", [2], True),
    ("all-reversed", [3, 2, 1, 0], False),
    ("all-shuffled", [2, 0, 3, 1], False),
]


def rank_new_group_subsets(rank, ws, *, seed):
    created = []
    for name, ranks, sort in NEW_GROUP_SPECS_WS4:  # every rank creates every group, in order
        created.append(dist.new_group(ranks, sort_ranks=sort, timeout=timedelta(seconds=60)))
    report = {}
    for (name, ranks, sort), g in zip(NEW_GROUP_SPECS_WS4, created):
        members = sorted(ranks) if sort else list(ranks)
        ctx = f"rank {rank} group {name} {members}"
        if rank not in members:
            _check_non_member(rank, g, ctx)
            continue
        grank = members.index(rank)
        assert dist.get_rank(g) == grank, f"{ctx}: get_rank {dist.get_rank(g)} != {grank}"
        assert dist.get_world_size(g) == len(members), f"{ctx}: size {dist.get_world_size(g)}"
        assert dist.get_process_group_ranks(g) == members, \
            f"{ctx}: get_process_group_ranks {dist.get_process_group_ranks(g)}"
        assert g.rank() == grank and g.size() == len(members), \
            f"{ctx}: ProcessGroup.rank()/size() = {g.rank()}/{g.size()}"
        _check_collectives(rank, g, members, case_seed(seed, name), ctx)
        report[name] = grank
    # the default group is unaffected
    check_group_usable(rank, ws, "creating and using subgroups")
    _destroy(created)
    check_group_usable(rank, ws, "destroying subgroups")
    return report


def test_new_group_subsets(pool4):
    """new_group over subsets and orders of ranks: members get correct all_reduce, broadcast
    (src and group_src), all_gather and all_gather_into_tensor results in group-rank order;
    non-members get NON_GROUP_MEMBER and their collectives on it are no-ops."""
    results = pool4.run(rank_new_group_subsets, seed=case_seed("new_group_subsets"))
    for name, ranks, sort in NEW_GROUP_SPECS_WS4:
        members = sorted(ranks) if sort else list(ranks)
        for r in range(4):
            assert results[r].get(name) == (members.index(r) if r in members else None), \
                f"group {name}: rank {r} reported {results[r].get(name)}"


def rank_new_group_local_sync(rank, ws, *, seed):
    # use_local_synchronization=True: only the members call new_group.  Ranks 0 and 2 build
    # and use one group while ranks 1 and 3 build and use another, without waiting for each other.
    members = [0, 2] if rank % 2 == 0 else [1, 3]
    g = dist.new_group(members, use_local_synchronization=True, timeout=timedelta(seconds=60))
    ctx = f"rank {rank} local-sync group {members}"
    assert _is_member(g), f"{ctx}: got {g!r}"
    assert dist.get_process_group_ranks(g) == members
    _check_collectives(rank, g, members, case_seed(seed, *members), ctx)
    dist.destroy_process_group(g)
    check_group_usable(rank, ws, "local-sync subgroups")


def test_new_group_local_synchronization(pool4):
    """new_group(use_local_synchronization=True) called by the members only: two disjoint groups
    are created and used concurrently, each without the other group's ranks."""
    pool4.run(rank_new_group_local_sync, seed=case_seed("new_group_local_sync"))


# ---------------------------------------------------------------------------------------------
# 2. new_subgroups, new_subgroups_by_enumeration
# ---------------------------------------------------------------------------------------------

def _check_subgroups(rank, ws, cur, subgroups, expected, seed, ctx):
    assert len(subgroups) == len(expected), \
        f"{ctx}: {len(subgroups)} subgroups, not {len(expected)}"
    mine = [m for m in expected if rank in m]
    for g, members in zip(subgroups, expected):
        if rank in members:
            assert g is cur, f"{ctx}: the current subgroup is not the one listing rank {rank}"
        else:
            assert not _is_member(g), f"{ctx}: rank {rank} is a member of {members}?"
    if not mine:
        assert cur is None, f"{ctx}: rank {rank} is in no subgroup but got {cur!r}"
        return None
    members = sorted(mine[0])  # new_group sorts the ranks
    assert dist.get_process_group_ranks(cur) == members, \
        f"{ctx}: current subgroup ranks {dist.get_process_group_ranks(cur)} != {members}"
    _check_collectives(rank, cur, members, case_seed(seed, *members), ctx, n=777)
    return members


def rank_new_subgroups(rank, ws, *, group_size, seed):
    cur, subgroups = dist.new_subgroups(group_size=group_size, timeout=timedelta(seconds=60))
    expected = [list(range(i, i + group_size)) for i in range(0, ws, group_size)]
    members = _check_subgroups(rank, ws, cur, subgroups, expected, seed,
                               f"rank {rank} new_subgroups(group_size={group_size})")
    _destroy(subgroups)
    check_group_usable(rank, ws, "new_subgroups")
    return members


@pytest.mark.parametrize("ws,group_size", [(4, 2), (3, 1), (4, 4), (3, 3)])
def test_new_subgroups(pools, ws, group_size):
    """new_subgroups(group_size): consecutive blocks of ranks; collectives in each block."""
    results = pools.get(ws).run(rank_new_subgroups, group_size=group_size,
                                seed=case_seed("new_subgroups", ws, group_size))
    for r in range(ws):
        start = r - r % group_size
        assert results[r] == list(range(start, start + group_size)), f"rank {r}: {results[r]}"


ENUMERATIONS_WS4 = {
    "interleaved": [[0, 2], [1, 3]],
    "uneven": [[3, 0, 1], [2]],
    "rank2-left-out": [[3, 0], [1]],
}


def rank_new_subgroups_by_enumeration(rank, ws, *, which, seed):
    spec = ENUMERATIONS_WS4[which]
    cur, subgroups = dist.new_subgroups_by_enumeration(spec, timeout=timedelta(seconds=60))
    members = _check_subgroups(rank, ws, cur, subgroups, spec, seed,
                               f"rank {rank} new_subgroups_by_enumeration({spec})")
    _destroy(subgroups)
    check_group_usable(rank, ws, "new_subgroups_by_enumeration")
    return members


@pytest.mark.parametrize("which", list(ENUMERATIONS_WS4))
def test_new_subgroups_by_enumeration(pool4, which):
    """new_subgroups_by_enumeration: interleaved, uneven, and with a rank in no subgroup."""
    results = pool4.run(rank_new_subgroups_by_enumeration, which=which,
                        seed=case_seed("enumeration", which))
    for r in range(4):
        mine = [sorted(m) for m in ENUMERATIONS_WS4[which] if r in m]
        assert results[r] == (mine[0] if mine else None), f"rank {r}: {results[r]}"


# ---------------------------------------------------------------------------------------------
# 3. several groups at once, interleaved async ops
# ---------------------------------------------------------------------------------------------

INTERLEAVE_GROUPS_WS4 = {"A": [0, 1, 2, 3], "B": [0, 1], "C": [2, 3], "D": [0, 2], "WORLD": None}
INTERLEAVE_OPS_PER_GROUP = 50


def _interleave_op(gi, i):
    """(kind, numel) of op i of group gi: 1 MiB-class all_reduces every 10th op, a broadcast
    every 5th, small all_reduces of varying length otherwise."""
    if i % 10 == 3:
        return "all_reduce", BIG + gi
    if i % 5 == 1:
        return "broadcast", 1 + (i * 53 + gi * 7) % 4099
    return "all_reduce", 1 + (i * 37 + gi * 11) % 3001


def rank_interleaved_groups(rank, ws, *, seed, order):
    names = list(INTERLEAVE_GROUPS_WS4)
    groups = {}
    members_of = {}
    for name in names:  # created in the same order on every rank
        ranks = INTERLEAVE_GROUPS_WS4[name]
        groups[name] = dist.group.WORLD if ranks is None else \
            dist.new_group(ranks, timeout=timedelta(seconds=120))
        members_of[name] = list(range(ws)) if ranks is None else ranks
    mine = [n for n in names if rank in members_of[n]]
    pending = []
    for i in range(INTERLEAVE_OPS_PER_GROUP):
        # "global": the same group order on every rank.  "rotated": each rank starts the round
        # with a different group; every group still sees its own ops in the same order on all
        # of its members, which is all that c10d requires of a CPU backend.
        turn = mine if order == "global" else \
            mine[(rank + i) % len(mine):] + mine[:(rank + i) % len(mine)]
        for name in turn:
            gi = names.index(name)
            members = members_of[name]
            kind, n = _interleave_op(gi, i)
            s = case_seed(seed, name, i)
            if kind == "all_reduce":
                t = gen_input(s, rank, F32, n, "small")
                w = dist.all_reduce(t, group=groups[name], async_op=True)
            else:
                root = members[i % len(members)]
                t = gen_input(s, rank, F32, n, "randn")
                w = dist.broadcast(t, src=root, group=groups[name], async_op=True)
            pending.append((w, t, name, i, kind, n, s))
    # wait in a rank-specific shuffled order, then check everything
    gen = torch.Generator().manual_seed(seed + rank)
    for j in torch.randperm(len(pending), generator=gen).tolist():
        pending[j][0].wait()
    for w, t, name, i, kind, n, s in pending:
        members = members_of[name]
        ctx = f"rank {rank} group {name} {members} op #{i} {kind} n={n}"
        if kind == "all_reduce":
            check_all_reduce(t, [gen_input(s, m, F32, n, "small") for m in members],
                             len(members), F32, "SUM", None, True, ctx)
        else:
            root = members[i % len(members)]
            assert_equal(t, gen_input(s, root, F32, n, "randn"), f"{ctx} from {root}")
    _destroy(g for name, g in groups.items() if name != "WORLD")
    check_group_usable(rank, ws, "interleaved groups")
    return len(pending)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("order", ["global", "rotated"])
def test_interleaved_groups(pool4, order):
    """Groups A=[0..3], B=[0,1], C=[2,3], D=[0,2] and WORLD used at once: 50 async ops per group
    (all_reduce and broadcast, 1 B .. 1 MiB + 3 elements) issued round-robin across the groups
    a rank belongs to, waited in a random order, all results checked; data is group-specific."""
    results = pool4.run(rank_interleaved_groups, timeout=200, order=order,
                        seed=case_seed("interleaved", order))
    expected = [sum(1 for m in INTERLEAVE_GROUPS_WS4.values() if m is None or r in m)
                * INTERLEAVE_OPS_PER_GROUP for r in range(4)]
    assert results == expected, f"ops issued per rank {results}, expected {expected}"


# ---------------------------------------------------------------------------------------------
# 4. sequence numbers
# ---------------------------------------------------------------------------------------------

def _world_collectives(rank, ws):
    """(label, issue function) pairs: one collective each on the default group."""
    n = 33
    t = torch.ones(n)
    outs = [torch.zeros(n) for _ in range(ws)]
    big = torch.zeros(ws * n)

    def all_gather_into_tensor():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(big, t)

    return [
        ("all_reduce", lambda: dist.all_reduce(t)),
        ("broadcast", lambda: dist.broadcast(t, src=ws - 1)),
        ("all_gather", lambda: dist.all_gather(outs, t)),
        ("all_gather_into_tensor", all_gather_into_tensor),
        ("barrier", lambda: dist.barrier()),
    ]


def rank_sequence_numbers(rank, ws):
    W = dist.group.WORLD
    S = dist.new_group([0, 1], timeout=timedelta(seconds=60))
    T = dist.new_group([1, 2, 3], timeout=timedelta(seconds=60))
    subs = {"S": S, "T": T}
    trace = []  # (step, {group: seq}) on this rank

    def snap(step):
        values = {"W": _seq(W)}
        for name, g in subs.items():
            if _is_member(g):
                values[name] = _seq(g)
        trace.append((step, values))
        return values

    fresh = snap("created")
    for name, g in subs.items():
        if _is_member(g):
            assert fresh[name] == 0, f"rank {rank}: new group {name} starts at {fresh[name]}"
            # dist.split_group and the DETAIL wrapper call this on a new backend: must work.
            g._get_backend(CPU)._set_sequence_number_for_group()
            assert _seq(g) == 0, f"rank {rank}: _set_sequence_number_for_group changed {name}"

    def expect_step(prev, now, bumped, label):
        for key in now:
            want = prev[key] + (1 if key == bumped else 0)
            assert now[key] == want, \
                f"rank {rank}: after {label} the sequence number of {key} is {now[key]}, " \
                f"expected {want} (before: {prev})"

    prev = fresh
    for label, issue in _world_collectives(rank, ws):
        issue()
        now = snap(f"W:{label}")
        expect_step(prev, now, "W", f"{label} on the default group")
        prev = now
    # async: the number moves when the op is issued, not when it completes
    w = dist.all_reduce(torch.ones(5), async_op=True)
    now = snap("W:async all_reduce issued")
    expect_step(prev, now, "W", "an async all_reduce (before wait)")
    w.wait()
    prev = snap("W:async all_reduce waited")
    assert prev == now, f"rank {rank}: wait() moved the sequence numbers: {now} -> {prev}"
    for name in ("S", "T"):
        g = subs[name]
        if not _is_member(g):
            continue
        for k in range(3):
            dist.all_reduce(torch.ones(9), group=g)
            now = snap(f"{name}:all_reduce {k}")
            expect_step(prev, now, name, f"all_reduce #{k} on subgroup {name}")
            prev = now
        dist.broadcast(torch.ones(9), group=g, group_src=0)
        now = snap(f"{name}:broadcast")
        expect_step(prev, now, name, f"broadcast on subgroup {name}")
        prev = now
    _destroy([S, T])
    return trace


def test_sequence_numbers(pool4):
    """The backend's sequence number grows by exactly one per collective (all_reduce, broadcast,
    all_gather, all_gather_into_tensor, barrier; at issue time for async ops) on every rank of
    the group, starts at 0 in a new group, is counted per group, and agrees across ranks."""
    traces = pool4.run(rank_sequence_numbers)
    # Steps are labelled identically on every rank: at each step, every rank that reports a
    # group's number must report the same one.
    by_step = {}
    for r, trace in enumerate(traces):
        for step, values in trace:
            for key, value in values.items():
                by_step.setdefault((step, key), {})[r] = value
    for (step, key), per_rank in by_step.items():
        assert len(set(per_rank.values())) == 1, \
            f"group {key}: ranks disagree after {step}: {per_rank}"


def rank_sequence_p2p(rank, ws):
    W = dist.group.WORLD
    before = _seq(W)
    t = torch.ones(17)
    if rank == 0:
        dist.send(t, dst=1)
        dist.isend(t, dst=1).wait()
    elif rank == 1:
        dist.recv(t, src=0)
        dist.irecv(t, src=0).wait()
    after_p2p = _seq(W)
    dist.all_reduce(t)
    return before, after_p2p, _seq(W)


@skip_if_gloo("gloo counts send/recv in the group's sequence number, so point-to-point traffic "
              "between some of the ranks makes the ranks' numbers disagree")
def test_sequence_number_ignores_p2p(pool3):
    """Point-to-point ops between ranks 0 and 1 do not move the group's sequence number (as in
    ProcessGroupNCCL, which returns seqCollective_): the ranks still agree afterwards, which the
    DETAIL wrapper's fingerprint check relies on."""
    results = pool3.run(rank_sequence_p2p)
    for r, (before, after_p2p, after) in enumerate(results):
        assert after_p2p == before, f"rank {r}: send/recv moved the sequence number " \
                                    f"{before} -> {after_p2p}"
        assert after == before + 1, f"rank {r}: all_reduce moved it {before} -> {after}"
    assert len({res[2] for res in results}) == 1, f"ranks disagree: {results}"


# ---------------------------------------------------------------------------------------------
# 5. getBackendOptions
# ---------------------------------------------------------------------------------------------

def _check_options(opts, *, backend, timeout, group_name, global_ranks, ctx):
    base = torch._C._distributed_c10d.Backend.Options
    assert isinstance(opts, base), f"{ctx}: options is {type(opts).__name__}, not Backend.Options"
    assert opts.backend == backend, f"{ctx}: options.backend {opts.backend!r} != {backend!r}"
    assert opts._timeout == timeout, f"{ctx}: options._timeout {opts._timeout} != {timeout}"
    assert opts.group_name == group_name, \
        f"{ctx}: options.group_name {opts.group_name!r} != {group_name!r}"
    got = list(opts.global_ranks_in_group)
    assert got in global_ranks, f"{ctx}: options.global_ranks_in_group {got} not in {global_ranks}"


def rank_backend_options(rank, ws, *, backend, world_timeout_s):
    W = dist.group.WORLD
    # The default group: Python passes an empty global_ranks_in_group for it.
    _check_options(_options(W), backend=backend, timeout=timedelta(seconds=world_timeout_s),
                   group_name=W.group_name, global_ranks=[[], list(range(ws))],
                   ctx=f"rank {rank} default group")
    g1 = dist.new_group([1, 3], timeout=timedelta(seconds=37))
    g2 = dist.new_group([3, 1], sort_ranks=False, timeout=timedelta(seconds=38))
    g3 = dist.new_group([0, 1, 2])  # no timeout: torch's default for non-NCCL backends
    specs = [(g1, [1, 3], timedelta(seconds=37)), (g2, [3, 1], timedelta(seconds=38)),
             (g3, [0, 1, 2], dist.default_pg_timeout)]
    for g, ranks, timeout in specs:
        if rank not in ranks:
            continue
        ctx = f"rank {rank} group {ranks}"
        _check_options(_options(g), backend=backend, timeout=timeout, group_name=g.group_name,
                       global_ranks=[ranks], ctx=ctx)
        # ProcessGroup.set_timeout -> Backend::setTimeout: the options follow.
        g.set_timeout(timedelta(seconds=45))
        got = _options(g)._timeout
        assert got == timedelta(seconds=45), f"{ctx}: after set_timeout(45 s) options say {got}"
    _destroy([g1, g2, g3])
    return True


def test_backend_options(pool4):
    """Backend::getBackendOptions, read through the backend's ``options`` property: backend name,
    timeout (init_process_group's, new_group's, the default, then set_timeout's), group name and
    global ranks of the default group and of subgroups (sorted and as given)."""
    pool4.run(rank_backend_options, backend=BACKEND, world_timeout_s=pool4.timeout_s)


# ---------------------------------------------------------------------------------------------
# 6. splitting: ProcessGroup.split_group -> Backend::split
# ---------------------------------------------------------------------------------------------
# dist.split_group(parent_pg, split_ranks, timeout, pg_options, group_desc, backend) raises on a
# CPU-only torch ("No device associated with the default pg ..." unless init_process_group got an
# accelerator device_id, and it also requires torch.accelerator.is_available()).  After its checks
# it calls parent_pg.split_group(my_group, timeout=, opts=, group_name=, group_desc=,
# device_types=) -- ProcessGroup::splitGroup, which for each device type of the parent calls
# parent_backend->getBackendOptions() (when opts is None), sets group_name and timeout on the
# result, and calls parent_backend->split(store, sorted_group_ranks_in_parent, options).  A rank
# that is in none of the splits passes the first split's ranks and must get None back (the
# backend returns nullptr).  Then dist.split_group calls _set_sequence_number_for_group() on the
# new backend and registers the group in torch.distributed's tables.  These tests call
# ProcessGroup.split_group directly and use the new group's own methods.
#
# device_types=None (what dist.split_group passes unless `backend=` filters): torch 2.13 loops
# over every device type registered for the parent -- cpu and cuda for both gloo and tcpx -- and
# calls Backend::split once for each, on the same store prefix; ProcessGroup::setBackend then keeps
# the first child for both device types and drops the second.

def _split(parent, my_ranks, name, device_types, timeout=None):
    kw = {"group_name": name}
    if timeout is not None:
        kw["timeout"] = timeout
    if device_types == "cpu":
        kw["device_types"] = [CPU]
    return parent.split_group(my_ranks, **kw)


def _check_split_collectives(rank, sp, members, seed, ctx):
    """Collectives through the ProcessGroup's own methods (the group is not registered with
    torch.distributed, as dist.split_group would do)."""
    size = len(members)
    grank = members.index(rank)
    assert sp.rank() == grank and sp.size() == size, \
        f"{ctx}: rank()/size() = {sp.rank()}/{sp.size()}, expected {grank}/{size}"
    n = 1023
    inputs = [gen_input(seed, m, F32, n, "small") for m in members]
    t = inputs[grank].clone()
    sp.allreduce([t]).wait()
    check_all_reduce(t, inputs, size, F32, "SUM", None, True, f"{ctx}: allreduce")
    for groot, root in enumerate(members):
        s = seed + 31 * (groot + 1)
        t = gen_input(s, rank, F32, BIG if groot == 0 else n, "randn")
        sp.broadcast(t, groot).wait()
        assert_equal(t, gen_input(s, root, F32, t.numel(), "randn"),
                     f"{ctx}: broadcast from group rank {groot}")
    s = seed + 777
    outs = [torch.full((n,), -1.0) for _ in range(size)]
    sp.allgather(outs, gen_input(s, rank, F32, n, "randn")).wait()
    for i, m in enumerate(members):
        assert_equal(outs[i], gen_input(s, m, F32, n, "randn"), f"{ctx}: allgather[{i}]")


def rank_split(rank, ws, *, tag, device_types, seed, strict_options):
    W = dist.group.WORLD
    wbe = _backend_of(W)
    assert wbe.supports_splitting, f"rank {rank}: backend.supports_splitting is False"
    parent_opts_before = (_options(W).group_name, _options(W)._timeout)
    report = {}

    # (a) the default group into [[0, 1], [2, 3]], with a timeout
    mine = [0, 1] if rank < 2 else [2, 3]
    name = f"{tag}-halves-{mine[0]}{mine[1]}"
    sp = _split(W, mine, name, device_types, timeout=timedelta(seconds=33))
    ctx = f"rank {rank} split {mine} ({name})"
    assert sp is not None, f"{ctx}: member got None"
    assert sp.group_name == name, f"{ctx}: group_name {sp.group_name!r}"
    be = _backend_of(sp)
    assert _seq(sp) == 0, f"{ctx}: a new split group starts at sequence number {_seq(sp)}"
    sp._get_backend(CPU)._set_sequence_number_for_group()  # what dist.split_group calls
    opts = _options(sp)
    assert opts.backend == BACKEND and opts._timeout == timedelta(seconds=33) \
        and opts.group_name == name, \
        f"{ctx}: options ({opts.backend!r}, {opts._timeout}, {opts.group_name!r})"
    if strict_options:
        assert list(opts.global_ranks_in_group) == mine, \
            f"{ctx}: options.global_ranks_in_group {list(opts.global_ranks_in_group)} != {mine}"
    _check_split_collectives(rank, sp, mine, case_seed(seed, "halves", *mine), ctx)
    assert _seq(sp) == 1 + len(mine) + 1, \
        f"{ctx}: sequence number {_seq(sp)} after 1 allreduce, {len(mine)} broadcasts, 1 allgather"
    report["halves"] = (sp.rank(), sp.size(), type(be).__name__)

    # (b) only [0, 2, 3]: rank 1 takes part in the call with the first split's ranks (as
    # dist.split_group does for a rank in no split) and gets None
    name = f"{tag}-023"
    # (gloo's options object is the one splitGroup modified in (a), hence the fallback)
    inherited = parent_opts_before[1] if strict_options else _options(W)._timeout
    sp2 = _split(W, [0, 2, 3], name, device_types)
    ctx = f"rank {rank} split [0, 2, 3]"
    if rank == 1:
        assert sp2 is None, f"{ctx}: the non-member got {sp2!r}"
    else:
        assert sp2 is not None, f"{ctx}: member got None"
        # no timeout given: the child inherits the parent's, read from getBackendOptions()
        got = _options(sp2)._timeout
        assert got == inherited, f"{ctx}: inherited timeout {got} != the parent's {inherited}"
        _check_split_collectives(rank, sp2, [0, 2, 3], case_seed(seed, "023"), ctx)
    report["023"] = None if sp2 is None else sp2.rank()

    # (c) split a subgroup: P = [1, 2, 3]; split_ranks are P's group ranks: [0, 2] = global [1, 3]
    P = dist.new_group([1, 2, 3], timeout=timedelta(seconds=41))
    if _is_member(P):
        name = f"{tag}-P-13"
        sp3 = _split(P, [0, 2], name, device_types)
        ctx = f"rank {rank} split [0, 2] of [1, 2, 3]"
        if rank == 2:
            assert sp3 is None, f"{ctx}: the non-member got {sp3!r}"
        else:
            assert sp3 is not None, f"{ctx}: member got None"
            got = _options(sp3)._timeout
            assert got == timedelta(seconds=41), f"{ctx}: inherited timeout {got} != 41 s"
            if strict_options:
                assert list(_options(sp3).global_ranks_in_group) == [1, 3], \
                    f"{ctx}: global_ranks_in_group {list(_options(sp3).global_ranks_in_group)}"
            _check_split_collectives(rank, sp3, [1, 3], case_seed(seed, "P13"), ctx)
            report["P13"] = sp3.rank()
        # the parent subgroup still works
        _check_collectives(rank, P, [1, 2, 3], case_seed(seed, "P"), f"rank {rank} parent P")

    # splitting must not change the parent's options (ProcessGroup::splitGroup overwrites
    # group_name and timeout on the object getBackendOptions() returns: it must be a copy)
    if strict_options:
        after = (_options(W).group_name, _options(W)._timeout)
        assert after == parent_opts_before, \
            f"rank {rank}: the default group's options changed by split: " \
            f"{parent_opts_before} -> {after}"
    check_group_usable(rank, ws, "split_group")
    # split groups are not registered with torch.distributed: shut them down directly
    for g in (sp, sp2, sp3 if _is_member(P) else None):
        if g is not None:
            g.shutdown()
    _destroy([P])
    return report


@pytest.mark.timeout(240)
@pytest.mark.parametrize("device_types", ["cpu", "all"])
def test_split_group(pool4, device_types):
    """ProcessGroup.split_group (what dist.split_group calls): halves of the default group, a
    split that leaves a rank out (it gets None), a split of a subgroup (ranks given in the
    parent's numbering); timeouts given or inherited via getBackendOptions(); correct collectives
    on every split group; parent groups keep working.  device_types="all" is what
    dist.split_group passes: Backend::split is called once per registered device type."""
    if device_types == "all":
        maybe_skip_gloo("torch 2.13 splits gloo once per device type (cpu, cuda) on the same "
                        "store prefix; the second gloo rendezvous races with the first and can "
                        "hang")
    strict = not gloo_lacks("split children report garbage global_ranks_in_group for some "
                            "ranks, and splitting renames the parent's options")
    results = pool4.run(rank_split, timeout=200, tag=f"split{next(_SPLIT_CALLS)}-{device_types}",
                        device_types=device_types, seed=case_seed("split", device_types),
                        strict_options=strict)
    assert [r["halves"][:2] for r in results] == [(0, 2), (1, 2), (0, 2), (1, 2)], results
    assert [r["023"] for r in results] == [0, None, 1, 2], results


# ---------------------------------------------------------------------------------------------
# 7. TORCH_DISTRIBUTED_DEBUG=DETAIL
# ---------------------------------------------------------------------------------------------
# With DETAIL, _new_process_group_helper wraps every backend (a plugin's included) in
# _ProcessGroupWrapper(backend, helper gloo group).  Its constructor calls
# backend->setSequenceNumberForGroup(); before each collective it runs a monitored barrier and
# all-gathers a fingerprint (op type, backend->getSequenceNumberForGroup(), dtypes, devices,
# shapes) over the helper gloo group, and raises "Detected mismatch between collectives on
# ranks ..." when ranks disagree.  Point-to-point ops and startCoalescing/endCoalescing are
# forwarded unchecked.

DETAIL_WS = 3


@pytest.fixture(scope="module")
def _detail_pools():
    holder = {}
    yield holder
    if holder.get("pool") is not None:
        holder["pool"].close()


@pytest.fixture
def detail_pool(_detail_pools):
    """A pool whose ranks run with TORCH_DISTRIBUTED_DEBUG=DETAIL (recreated if a test broke it)."""
    pool = _detail_pools.get("pool")
    if pool is None or not pool.usable:
        if pool is not None:
            pool.close()
        _detail_pools["pool"] = None
        pool = RankPool(DETAIL_WS, BACKEND, timeout_s=60,
                        env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}, name="detail")
        _detail_pools["pool"] = pool
    return pool


def rank_detail_collectives(rank, ws, *, seed, backend):
    assert str(dist.get_debug_level()) == "DebugLevel.DETAIL", dist.get_debug_level()
    W = dist.group.WORLD
    wrapper = W._get_backend(CPU)
    assert type(wrapper).__name__ == "_ProcessGroupWrapper", \
        f"default group's backend is {type(wrapper).__name__}, not the DETAIL wrapper"
    assert wrapper.wrapped_pg.name() == backend, f"wrapped backend {wrapper.wrapped_pg.name()!r}"
    seqs = [_seq(W)]
    _check_collectives(rank, W, list(range(ws)), case_seed(seed, "W"), f"rank {rank} DETAIL")
    seqs.append(_seq(W))
    dist.barrier()
    seqs.append(_seq(W))
    g = dist.new_group([0, 2], timeout=timedelta(seconds=60))
    if _is_member(g):
        assert type(g._get_backend(CPU)).__name__ == "_ProcessGroupWrapper"
        _check_collectives(rank, g, [0, 2], case_seed(seed, "g"), f"rank {rank} DETAIL [0,2]")
    # batch_isend_irecv (coalesced when the wrapped backend supports it): a ring
    n = 4099
    s = case_seed(seed, "ring")
    recv = torch.full((n,), -1.0)
    reqs = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, gen_input(s, rank, F32, n, "randn"), (rank + 1) % ws),
        dist.P2POp(dist.irecv, recv, (rank - 1) % ws)])
    for req in reqs:
        req.wait()
    assert_equal(recv, gen_input(s, (rank - 1) % ws, F32, n, "randn"), f"rank {rank} DETAIL ring")
    check_group_usable(rank, ws, "DETAIL collectives")
    seqs.append(_seq(W))
    _destroy([g])
    return seqs


def test_detail_collectives(detail_pool):
    """Under TORCH_DISTRIBUTED_DEBUG=DETAIL the backend is wrapped; collectives on the default
    group and a subgroup and a batch_isend_irecv ring give correct results; the sequence numbers
    the wrapper reads agree across ranks."""
    results = detail_pool.run(rank_detail_collectives, timeout=120,
                              seed=case_seed("detail"), backend=BACKEND)
    assert all(r == results[0] for r in results), f"sequence numbers differ: {results}"


# case -> words one of which the wrapper's message must contain
MISMATCH_CASES = {
    "shape": ["Tensor shapes", "TensorShape"],
    "dtype": ["Tensor dtypes", "TensorDtypes"],
    "op": ["Op type", "OpType"],
}


def rank_detail_mismatch(rank, ws, *, case):
    odd = rank == ws - 1
    if case == "shape":
        call = lambda: dist.all_reduce(torch.ones(1023 + odd))  # noqa: E731
    elif case == "dtype":
        t = torch.ones(1023, dtype=torch.int32 if odd else torch.float32)
        call = lambda: dist.all_reduce(t)  # noqa: E731
    else:
        t = torch.ones(1023)
        call = (lambda: dist.broadcast(t, src=0)) if odd else (lambda: dist.all_reduce(t))  # noqa
    try:
        call()
    except RuntimeError as exc:
        msg = str(exc)
    else:
        raise AssertionError(f"rank {rank}: mismatched collective ({case}) did not raise")
    assert "Detected mismatch between collectives" in msg, f"rank {rank}: {msg!r}"
    names = MISMATCH_CASES[case]
    assert any(n in msg for n in names), f"rank {rank}: the message does not name {names}: {msg!r}"
    check_group_usable(rank, ws, f"a DETAIL mismatch ({case})")
    return msg[:200]


@pytest.mark.parametrize("case", list(MISMATCH_CASES))
def test_detail_mismatch_is_reported(detail_pool, case):
    """Under DETAIL, ranks that disagree on a collective (shape, dtype, op) get the wrapper's
    'Detected mismatch between collectives' error on every rank, not a hang; the group stays
    usable."""
    detail_pool.run(rank_detail_mismatch, timeout=90, case=case)


def rank_detail_p2p_then_collective(rank, ws, *, seed):
    n = 1023
    s = case_seed(seed, "p2p")
    if rank == 0:
        dist.send(gen_input(s, 0, F32, n, "randn"), dst=1)
    elif rank == 1:
        t = torch.zeros(n)
        dist.recv(t, src=0)
        assert_equal(t, gen_input(s, 0, F32, n, "randn"), "DETAIL recv")
    # a collective after traffic between some of the ranks: the fingerprints must agree
    check_group_usable(rank, ws, "p2p between ranks 0 and 1 under DETAIL")
    return _seq(dist.group.WORLD)


@skip_if_gloo("gloo counts send/recv in the sequence number, so under DETAIL a collective after "
              "p2p between some ranks fails with 'Sequence number: 1vs 0'")
def test_detail_p2p_between_some_ranks(detail_pool):
    """Under DETAIL, a collective after send/recv between ranks 0 and 1 only passes the wrapper's
    fingerprint check (p2p does not move the sequence number)."""
    results = detail_pool.run(rank_detail_p2p_then_collective, timeout=90,
                              seed=case_seed("detail_p2p"))
    assert len(set(results)) == 1, f"sequence numbers differ: {results}"


# ---------------------------------------------------------------------------------------------
# 8. profiler record names
# ---------------------------------------------------------------------------------------------

def rank_profiler(rank, ws, *, prefix, seed):
    from torch.profiler import ProfilerActivity, profile

    g = dist.new_group([0, ws - 1], timeout=timedelta(seconds=60))
    n = 1023
    issued = {"all_reduce": 0, "broadcast": 0, "all_gather": 0}
    t = gen_input(seed, rank, F32, n, "small")
    outs = [torch.zeros(n) for _ in range(ws)]
    dist.all_reduce(torch.ones(3))  # warm-up outside the profiled region
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dist.all_reduce(t)
        issued["all_reduce"] += 1
        dist.all_reduce(t, async_op=True).wait()
        issued["all_reduce"] += 1
        dist.broadcast(t, src=0)
        issued["broadcast"] += 1
        dist.all_gather(outs, t)
        issued["all_gather"] += 1
        if _is_member(g):
            dist.all_reduce(t, group=g)
            issued["all_reduce"] += 1
            dist.broadcast(t, group=g, group_src=1)
            issued["broadcast"] += 1
    counts = {}
    for e in prof.events():
        if e.name.startswith(prefix + ":"):
            counts[e.name] = counts.get(e.name, 0) + 1
    for op, k in issued.items():
        name = f"{prefix}:{op}"
        assert counts.get(name, 0) >= k, \
            f"rank {rank}: {k} {op} ops issued under the profiler but {counts.get(name, 0)} " \
            f"'{name}' events recorded; events with the backend's prefix: {counts}"
    _destroy([g])
    return counts


@pytest.mark.parametrize("ws", [2, 3])
def test_profiler_record_names(pools, ws):
    """Collectives under torch.profiler record events named '<backend>:all_reduce',
    '<backend>:broadcast', '<backend>:all_gather' (the Work's profiling title), at least one per
    op issued, on the default group and on a subgroup, sync and async."""
    pools.get(ws).run(rank_profiler, prefix=BACKEND, seed=case_seed("profiler", ws))
