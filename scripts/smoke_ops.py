"""Quick smoke test of the collectives added in issue 3, for a new machine (e.g. the GPU host):

    torchrun --standalone --nproc-per-node 3 scripts/smoke_ops.py

Each rank checks reduce, reduce_scatter(_tensor), all_to_all(_single) with uneven splits, gather,
scatter, recv from any source, a coalesced block and batch_isend_irecv against values it computes
itself, and prints "rank R OK". The real tests are tests/python/test_collectives_more.py.
"""
import os, sys, torch, torch.distributed as dist, torch_tcpx
def main():
    rank=int(os.environ["RANK"]); ws=int(os.environ["WORLD_SIZE"])
    dist.init_process_group("tcpx")
    # reduce
    for n in (0,1,1023,300000):
        for root in range(ws):
            t=torch.arange(n,dtype=torch.float32)+rank
            orig=t.clone()
            dist.reduce(t,dst=root)
            exp=sum(torch.arange(n,dtype=torch.float32)+r for r in range(ws))
            if rank==root: assert torch.equal(t,exp),(n,root)
            else: assert torch.equal(t,orig)
    # reduce_scatter_tensor
    for n in (0,1,1023,300000):
        inp=torch.arange(n*ws,dtype=torch.float32)*(rank+1)
        out=torch.empty(n)
        dist.reduce_scatter_tensor(out,inp)
        exp=(torch.arange(n*ws,dtype=torch.float32)*sum(r+1 for r in range(ws)))[rank*n:(rank+1)*n]
        assert torch.equal(out,exp),n
        inl=[torch.full((n,),float(rank*10+i)) for i in range(ws)]
        out=torch.empty(n)
        dist.reduce_scatter(out,inl,op=dist.ReduceOp.AVG)
        exp=torch.full((n,), sum(r*10+rank for r in range(ws))/ws)
        assert torch.allclose(out,exp),n
    # all_to_all_single uneven
    ins=[(rank+i)%3+ (1 if i==0 else 0) for i in range(ws)]  # rows rank sends to i
    outs=[(r+rank)%3+(1 if rank==0 else 0) for r in range(ws)]
    inp=torch.cat([torch.full((ins[i],2),float(rank*100+i)) for i in range(ws)])
    out=torch.empty(sum(outs),2)
    dist.all_to_all_single(out,inp,outs,ins)
    exp=torch.cat([torch.full((outs[r],2),float(r*100+rank)) for r in range(ws)])
    assert torch.equal(out,exp)
    # alltoall lists
    il=[torch.full((i+1,),float(rank)) for i in range(ws)]
    ol=[torch.empty(rank+1) for _ in range(ws)]
    dist.all_to_all(ol,il)
    for r in range(ws): assert torch.equal(ol[r],torch.full((rank+1,),float(r)))
    # gather/scatter
    for root in range(ws):
        t=torch.full((5,),float(rank))
        gl=[torch.empty(5) for _ in range(ws)] if rank==root else None
        dist.gather(t,gl,dst=root)
        if rank==root:
            for r in range(ws): assert torch.equal(gl[r],torch.full((5,),float(r)))
        sl=[torch.full((3,),float(i*7)) for i in range(ws)] if rank==root else None
        o=torch.empty(3)
        dist.scatter(o,sl,src=root)
        assert torch.equal(o,torch.full((3,),float(rank*7)))
    # recv any source
    if rank==0:
        seen=set()
        for _ in range(ws-1):
            t=torch.empty(4)
            src=dist.recv(t)
            assert torch.equal(t,torch.full((4,),float(src))); seen.add(src)
        assert seen==set(range(1,ws))
    else:
        dist.send(torch.full((4,),float(rank)),0)
    # coalescing
    ts=[torch.full((k*100,),float(rank)) for k in range(5)]
    with dist._coalescing_manager(device=torch.device("cpu"), async_ops=True) as cm:
        for t in ts: dist.all_reduce(t)
    cm.wait()
    for t in ts: assert torch.equal(t,torch.full_like(t,float(sum(range(ws)))))
    # batch isend irecv
    sb=torch.full((10,),float(rank)); rb=torch.empty(10)
    ops=[dist.P2POp(dist.isend,sb,(rank+1)%ws),dist.P2POp(dist.irecv,rb,(rank-1)%ws)]
    for w in dist.batch_isend_irecv(ops): w.wait()
    assert torch.equal(rb,torch.full((10,),float((rank-1)%ws)))
    dist.barrier()
    print("rank",rank,"OK",flush=True)
    dist.destroy_process_group()
main()
