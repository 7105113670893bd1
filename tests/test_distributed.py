"""SURGE layers under DistributedDataParallel on two CPU ranks (gloo): with `lambda_placement="previous"` each rank
applies the lam of its own previous batch, never rank 0's (DDP broadcasts buffers from rank 0 at every forward)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from surge_hf import SurgeConfig, binarize

RECIPE = SurgeConfig(target_modules=["0"], lambda_placement="previous", binarize_activations=False)


def _rank_run(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same model on both ranks
    model = DistributedDataParallel(binarize(nn.Sequential(nn.Linear(6, 4)), RECIPE))
    layer = model.module[0]
    generator = torch.Generator().manual_seed(10 + rank)  # a different batch on each rank
    record = {}
    for step in range(2):
        x = torch.randn(5, 6, generator=generator)
        model(x).pow(3).sum().backward()
        record[f"applied_{step}"] = layer.scaler.stats.lam.item()
        record[f"stored_{step}"] = layer.previous_lambda.item()
    torch.save(record, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_each_rank_keeps_its_own_previous_lambda(tmp_path):
    mp.start_processes(_rank_run, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0]["stored_0"] != ranks[1]["stored_0"]  # the batches differ, so do their lam
    for record in ranks:
        assert record["applied_0"] == 0.0
        assert record["applied_1"] == record["stored_0"]  # this rank's lam of step 0, not rank 0's
        assert record["stored_1"] > 0


def test_binarize_names_the_previous_lambda_buffers_for_ddp_to_skip():
    recipe = RECIPE.replace(target_modules=["0", "2"])
    model = binarize(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), recipe)
    assert model._ddp_params_and_buffers_to_ignore == ["0.previous_lambda", "2.previous_lambda"]
