"""Distributed fine-tuning of an injected model: DDP and FSDP2 over 2 CPU processes (gloo).

Each rank injects SE into the same timm backbone, trains a few steps on its own data shard
with the SE parameters in their own optimizer group, and saves its weights; the ranks must end
with identical parameters, and the SE blocks must have moved away from their identity start.
Both wrappers run in the same two worker processes (spawning them is most of the cost).
FSDP1 (``FullyShardedDataParallel(use_orig_params=True)`` on CPU) also works; it is not
tested here to keep the suite short. ``torch.compile`` is covered outside this file.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _injected_model():
    import timm

    from se_inject import inject_se

    torch.manual_seed(0)  # the wrappers broadcast rank 0's weights anyway; same init keeps plans equal
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4, zero_init_last=False)
    return inject_se(model, example_input=torch.randn(2, 3, 32, 32))


def _train(wrapped: torch.nn.Module, model: torch.nn.Module, rank: int) -> None:
    import torch.nn.functional as F

    from se_inject.inject.finetune import param_groups

    optimizer = torch.optim.SGD(param_groups(model, lr=0.01, se_lr=0.1), lr=0.01, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(STEPS):
        x = torch.randn(4, 3, 32, 32, generator=data)
        y = torch.randint(0, 4, (4,), generator=data)
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()


def _summary(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict:
    from se_inject.inject.finetune import se_modules  # SE blocks by type, never by name

    fc2 = [params[f"{name}.fc2.weight"] for name, _ in se_modules(model)]
    return {"params": params, "se_moved": any(v.abs().sum() > 0 for v in fc2), "n_se": len(fc2)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        model = _injected_model()
        _train(DDP(model), model, rank)
        results["ddp"] = _summary(model, {n: p.detach().clone() for n, p in model.named_parameters()})

        model = _injected_model()
        fully_shard(model)  # FSDP2: parameters become DTensor shards across the two ranks
        _train(model, model, rank)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        names = {n for n, _ in model.named_parameters()}
        results["fsdp2"] = _summary(model, {k: v.detach().clone() for k, v in full.items() if k in names})
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    context = mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_ranks_end_with_identical_weights(rank_results, wrapper):
    first = rank_results[0][wrapper]
    assert first["n_se"] > 0 and first["se_moved"], "SE blocks should have trained away from identity"
    for other in (r[wrapper] for r in rank_results[1:]):
        assert other["params"].keys() == first["params"].keys()
        for name, value in first["params"].items():
            assert torch.equal(value, other["params"][name]), f"{name} differs between ranks"
