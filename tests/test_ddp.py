"""A 2-process data-parallel step (gloo, CPU) — DistributedDataParallel, and FSDP2's
``fully_shard`` — gives the single-process gradients."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tiny import TinyVideoViT, clip_for


def _model():
    torch.manual_seed(0)
    return TinyVideoViT(sttm=False)  # HSDA, TGI, TEAM and the group-averaged head


def _data():
    model = _model()
    return clip_for(model, batch=4, seed=1), torch.tensor([0, 3, 5, 6])


def _wrap(model, kind, world):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for block in list(model.far) + [model.late]:   # shard per block, then the rest at the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


def _worker(rank, world, port, out_path, kind):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, inner = _wrap(_model(), kind, world)
        clips, labels = _data()
        shard = slice(rank * 2, rank * 2 + 2)
        F.cross_entropy(model(clips[shard]), labels[shard]).backward()
        # FSDP2 keeps each gradient as a DTensor shard; gather the full one (a collective: all ranks)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in inner.named_parameters()}
        if rank == 0:
            torch.save(grads, out_path)
        dist.barrier()      # no rank tears the group down while another still has collectives in flight
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_data_parallel_gradients_equal_single_process(tmp_path, kind):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), kind), nprocs=2, join=True)
    ddp = torch.load(out)
    model = _model()
    clips, labels = _data()
    F.cross_entropy(model(clips), labels).backward()
    assert ddp.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
