"""SURGE layers on two CPU ranks (gloo). Under DistributedDataParallel, with `lambda_placement="previous"` each rank
applies the lam of its own previous batch, never rank 0's (DDP broadcasts buffers from rank 0 at every forward).
Under torch's FSDP2 (`fully_shard`), a training step equals the step of the averaged per-rank gradients, each with
its own rank's lam."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

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
    del model  # before its process group: a DDP model freed after destroy_process_group can hang the rank's exit
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


def _tiny_surge_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return binarize(BertForSequenceClassification(config), SurgeConfig(eta=0.3))


def _rank_batch(rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(20 + rank)
    return {"input_ids": torch.randint(0, 64, (3, 7), generator=generator),
            "labels": torch.randint(0, 2, (3,), generator=generator)}


def _fsdp_rank_run(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = _tiny_surge_bert()
    mesh = init_device_mesh("cpu", (2,))
    for block in model.bert.encoder.layer:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # a step proportional to the gradient
    model(**_rank_batch(rank)).loss.backward()
    optimizer.step()
    state = {name: value.full_tensor() for name, value in model.state_dict().items()}
    if rank == 0:
        torch.save(state, f"{results}/fsdp.pt")
    del model, optimizer  # before their process group, as in `_rank_run`
    dist.destroy_process_group()


def test_fsdp2_step_on_two_cpu_ranks_equals_the_step_of_the_averaged_rank_gradients(tmp_path):
    mp.start_processes(_fsdp_rank_run, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")
    sharded = torch.load(tmp_path / "fsdp.pt")
    model = _tiny_surge_bert()
    gradients = []
    for rank in range(2):  # each rank's gradient, with that rank's own lam per layer
        model.zero_grad()
        model(**_rank_batch(rank)).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, param in model.named_parameters():
        param.grad = (gradients[0][name] + gradients[1][name]) / 2
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    reference = model.state_dict()
    assert set(sharded) == set(reference)
    assert any(not torch.equal(reference[name], _tiny_surge_bert().state_dict()[name]) for name in reference)
    for name, value in reference.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)
