"""DDP as ``multi_gpu_train.json`` runs it, against one process on the same global batch.

Two processes (torch.distributed, gloo, CPU) each take their part of a fixed global batch, split by
``scripts.data.rank_batch`` (9 on 2 ranks: 5 + 4), and make one training step with the bundle's loss, SGD settings,
gradient clipping and MONAI's ``SupervisedTrainer`` on a ``DistributedDataParallel`` network. What nnU-Net's DDP
training computes, and the bundles too:

- each rank's loss is its own batch's: cross-entropy over its voxels, per-sample Dice over its samples; a batch
  Dice is the exception: nnU-Net adds its sums over the ranks, so the Dice term is the global batch's;
- DDP averages the ranks' gradients with equal weights, so the step minimises the mean of the ranks' losses. With
  ranks of 5 and 4 samples that is *not* the mean over the global batch (a sample of the 4-sample rank weighs 5/4 of
  one of the other); with equal ranks (8 = 4 + 4) it is;
- the logged epoch loss is the mean of every rank's iteration losses (nnU-Net gathers them).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bundles.scripts.data import rank_batch
from bundles.scripts.handlers import clip_gradients_hook, mean_over_ranks
from bundles.scripts.losses import DeepSupervisedLoss, nnunet_loss

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
CASES = [(9, False), (9, True), (8, False), (8, True)]  # (global batch, batch Dice)


def tiny_network() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(0.01),
                               torch.nn.Conv3d(4, 3, 1))


def global_batch(size: int):
    generator = torch.Generator().manual_seed(size)
    image = torch.randn(size, 1, 6, 6, 6, generator=generator)
    image *= torch.linspace(0.5, 4, size).view(-1, 1, 1, 1, 1)  # samples unlike each other: how ranks weigh shows
    label = torch.randint(0, 3, (size, 1, 6, 6, 6), generator=generator).float()
    return image, label


def rank_slices(size: int) -> list[slice]:
    sizes = [rank_batch(size, 0.33, r, WORLD)[0] for r in range(WORLD)]
    starts = [sum(sizes[:r]) for r in range(WORLD)]
    return [slice(a, a + b) for a, b in zip(starts, sizes)]


def bundle_loss(batch_dice: bool):
    """train.json's ``loss``: nnU-Net's Dice + CE in the deep-supervision wrapper (one output here)."""
    return DeepSupervisedLoss(nnunet_loss(batch_dice=batch_dice), num_outputs=1)


def one_step(network, loss_function, image, label):
    """One iteration of train.json's trainer: SGD (0.01, momentum 0.99, Nesterov, weight decay 3e-5) with the
    gradient-norm clipping hook at 12."""
    from monai.engines import SupervisedTrainer

    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    optimizer.register_step_pre_hook(clip_gradients_hook(network, 12.0))
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=1, network=network,
                                train_data_loader=[{"image": image, "label": label}], optimizer=optimizer,
                                loss_function=loss_function, optim_set_to_none=True, decollate=False)
    trainer.run()
    return trainer.state.output["loss"].item()


def ddp_worker(rank: int, init_file: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for size, batch_dice in CASES:
            assert rank_batch(size, 0.33, rank, WORLD)[0] == rank_slices(size)[rank].stop - rank_slices(size)[
                rank].start
            image, label = global_batch(size)
            part = rank_slices(size)[rank]
            network = torch.nn.parallel.DistributedDataParallel(tiny_network())
            loss = one_step(network, bundle_loss(batch_dice), image[part], label[part])
            results[f"{size}_{batch_dice}"] = {"loss": loss, "logged": mean_over_ranks([loss]),
                                               "weights": network.module.state_dict()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def soft_dice(logits, label, axes) -> torch.Tensor:
    """Soft Dice of the foreground classes (softmax, smooth 1e-5), summed over ``axes``: (classes) or (B, classes)."""
    probabilities = torch.softmax(logits, 1)
    onehot = F.one_hot(label[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(logits)
    intersection = (probabilities * onehot).sum(axes)
    dice = (2 * intersection + 1e-5) / (probabilities.sum(axes) + onehot.sum(axes) + 1e-5)
    return dice[..., 1:]


def nnunet_ddp_objective(logits, label, slices, batch_dice):
    """What one step of nnU-Net's DDP training minimises, written out: the mean over the ranks of each rank's
    CE (mean over its voxels) - Dice (mean over its samples and classes; a batch Dice is the global batch's)."""
    parts = [(logits[s], label[s]) for s in slices]
    ce = sum(F.cross_entropy(x, y[:, 0].long()) for x, y in parts) / len(parts)
    if batch_dice:
        dice = soft_dice(logits, label, (0, 2, 3, 4)).mean()
    else:
        dice = sum(soft_dice(x, y, (2, 3, 4)).mean() for x, y in parts) / len(parts)
    return ce - dice


def changes(weights: dict, initial: dict) -> torch.Tensor:
    return torch.cat([(weights[k] - initial[k]).flatten() for k in initial])


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_multi_gpu_config_wraps_the_network_in_ddp_and_splits_the_batch_with_rank_batch():
    config = json.loads((ROOT / "bundles/templates/multi_gpu_train.json").read_text())
    assert config["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert set(config["network"]) == {"_target_", "module", "device_ids"}  # DDP's default gradient averaging
    assert config["rank_batch"].startswith("$scripts.data.rank_batch(@batch_size, @oversample_foreground_percent")
    assert config["train#dataloader#batch_size"] == config["train#dataset#batch_size"] == "$@rank_batch[0]"
    assert [s.stop - s.start for s in rank_slices(9)] == [5, 4]


@pytest.mark.parametrize("size, batch_dice", CASES)
def test_first_ddp_step_is_nnunets_step_on_the_global_batch(ddp_results, size, batch_dice):
    key = f"{size}_{batch_dice}"
    ranks = [r[key] for r in ddp_results]
    initial = tiny_network().state_dict()
    for name in initial:  # DDP keeps the replicas identical
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    ddp_change = changes(ranks[0]["weights"], initial)
    image, label = global_batch(size)
    slices = rank_slices(size)

    # each rank's loss is the bundle loss of its own part (with a batch Dice: the global batch's Dice term)
    with torch.no_grad():
        logits = tiny_network()(image)
    for rank, part in enumerate(slices):
        own = float(bundle_loss(batch_dice)(logits[part], label[part]))
        if batch_dice:
            own += float(soft_dice(logits[part], label[part], (0, 2, 3, 4)).mean()
                         - soft_dice(logits, label, (0, 2, 3, 4)).mean())
        assert ranks[rank]["loss"] == pytest.approx(own, rel=1e-5)
    # the logged loss is the mean of the ranks' losses, which is the objective written out above
    objective = float(nnunet_ddp_objective(logits, label, slices, batch_dice))
    for rank in ranks:
        assert rank["logged"] == pytest.approx((ranks[0]["loss"] + ranks[1]["loss"]) / 2, rel=1e-12)
        assert rank["logged"] == pytest.approx(objective, rel=1e-5)

    # the step is one single-process step on that objective
    reference = tiny_network()
    one_step(reference, lambda output, target: nnunet_ddp_objective(output, target, slices, batch_dice), image, label)
    expected = changes(reference.state_dict(), initial)
    assert expected.abs().max() > 1e-4  # the step moved the weights
    torch.testing.assert_close(ddp_change, expected, rtol=1e-4, atol=1e-8)

    # compared with the bundle's loss on the whole global batch in one process
    single = tiny_network()
    single_loss = one_step(single, bundle_loss(batch_dice), image, label)
    single_change = changes(single.state_dict(), initial)
    if size % WORLD == 0:  # equal ranks: the same loss and the same step
        assert ranks[0]["logged"] == pytest.approx(single_loss, rel=1e-5)
        torch.testing.assert_close(ddp_change, single_change, rtol=1e-4, atol=1e-8)
    else:  # 5 + 4: equally weighted ranks are not the global mean, in nnU-Net as here
        assert abs(ranks[0]["logged"] - single_loss) > 1e-3 * abs(single_loss)
        assert (ddp_change - single_change).abs().max() > 100 * 1e-8 + 1e-4 * single_change.abs().max()
