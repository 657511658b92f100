"""A 2-process data-parallel step (gloo, CPU) — DistributedDataParallel, and FSDP2's
``fully_shard`` — gives the single-process gradients."""
import faulthandler
import gc
import os
import pathlib
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tiny import TinyVideoViT, clip_for

WORLD = 2


def _model():
    torch.manual_seed(0)
    return TinyVideoViT(sttm=False)  # HSDA, TGI, TEAM and the group-averaged head


def _data():
    model = _model()
    return clip_for(model, batch=4, seed=1), torch.tensor([0, 3, 5, 6])


def _wrap(model, kind):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in list(model.far) + [model.late]:   # shard per block, then the rest at the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


def _worker(rank, port, out_dir, kind):
    out_dir = pathlib.Path(out_dir)
    # A worker that dies of a signal leaves its threads' Python stacks here; the test prints them.
    crash_log = open(out_dir / f"rank{rank}.crash", "w")
    faulthandler.enable(file=crash_log, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, inner = _wrap(_model(), kind)
        clips, labels = _data()
        shard = slice(rank * 2, rank * 2 + 2)
        F.cross_entropy(model(clips[shard]), labels[shard]).backward()
        # FSDP2 keeps each gradient as a DTensor shard; gather the full one (a collective: all ranks)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in inner.named_parameters()}
        if rank == 0:
            torch.save(grads, out_dir / "grads.pt")
        dist.barrier()      # no rank tears the group down while another still has collectives in flight
        (out_dir / f"rank{rank}.done").touch()
        # Drop every holder of the process group (DDP's reducer, FSDP's mesh and parameter groups)
        # so that it is destroyed here, in order, not during interpreter shutdown.
        del model, inner, grads
        gc.collect()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path, kind):
    """Runs the two ranks. A rank that dies before it passed the final barrier fails the test
    with its stacks. One that dies after it (a crash tearing gloo down, seen in CI) leaves complete
    results — every rank reached the barrier, so every collective is done and rank 0 has saved the
    gradients — and is reported as a warning with its stacks; the gradients are still checked.
    (The other rank may be killed by mp.spawn before it marks itself done, so only the rank that
    died is asked.)"""
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path), kind), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:
        stacks = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("rank*.crash")))
        if not (tmp_path / f"rank{error.error_index}.done").exists():
            pytest.fail(f"{kind}: {error}\n{stacks}")
        warnings.warn(f"{kind}: a rank died in process-group teardown after the step completed "
                      f"on every rank ({error}); gradients checked from the saved results.\n{stacks}")
    return torch.load(tmp_path / "grads.pt")


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_data_parallel_gradients_equal_single_process(tmp_path, kind):
    distributed = _run_workers(tmp_path, kind)
    model = _model()
    clips, labels = _data()
    F.cross_entropy(model(clips), labels).backward()
    assert distributed.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        torch.testing.assert_close(distributed[name], p.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
