"""Driver run INSIDE nnU-Net 2.8.1's venv by the benchmarks (never imported by autoplan; imports only nnU-Net, torch,
numpy and the standard library). It uses nnU-Net's own classes, unmodified (one setting aside, see below):

* ``train-steps``: ``nnUNetTrainer(plans, configuration, fold, dataset_json, device)``, ``on_train_start()``, then
  times ``next(dataloader_train)`` and ``train_step(batch)`` separately for warm-up + timed iterations, and finally a
  few iterations with the body of ``train_step`` split into forward / loss / backward / clip+step.
* ``dataloader``: ``initialize()`` + ``get_dataloaders()`` (the NonDetMultiThreadedAugmenter with
  ``nnUNet_n_proc_DA`` workers), then batches per second of ``next()`` alone.
* ``epochs``: the same two augmenters consumed the way ``run_training()`` consumes them (a training epoch of
  ``next(dataloader_train)``, then a validation of ``next(dataloader_val)``), with sleeps for the steps.
* ``make-checkpoint``: a freshly initialised network (``torch.manual_seed(--seed)`` first) saved by the trainer's
  own ``save_checkpoint`` as ``fold_F/checkpoint_final.pth`` in a model folder that ``nnUNetPredictor`` can load.
* ``predict``: ``nnUNetPredictor.initialize_from_trained_model_folder`` + ``predict_from_files_sequential`` one case
  at a time (single process, no multiprocessing), with or without mirroring.
* ``train``: a short full training (``run_training()`` + ``perform_actual_validation()``) with a budget given on the
  command line, via a trainer subclass that only sets ``num_epochs`` / iterations (the shared README's recipe) and,
  with ``--initial-weights``, loads a checkpoint's every weight after ``initialize()`` (nnU-Net's own
  ``-pretrained_weights`` would keep the heads' random draw).

``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` must be set by the caller; ``BENCH_THREADS`` sets torch's
thread count (``nnUNetv2_train -device cpu`` uses all cores). Every subcommand writes its figures to ``--result``.

One change to nnU-Net's behaviour: ``get_allowed_n_proc_DA()`` caps ``nnUNet_n_proc_DA`` at ``os.cpu_count()``, so
on a 2-core machine "12 workers" would silently be 2 (and 1 validation worker) while the bundle runs 12 (and 6).
The benchmarks give both systems the same worker count, so the drivers take ``nnUNet_n_proc_DA`` as it is (as nnU-Net
itself does wherever the cores suffice, e.g. 12 workers on a 16-core GPU machine) and report the counts they ran.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STARTED = time.time()  # before the heavy imports: with the runner's wall time this shows start-up and exit costs

import numpy as np
import torch
import benchutil as bu
from treemem import TreeMemoryMonitor, cuda_peak_mb


def _workers_as_asked() -> None:
    """Lets ``nnUNet_n_proc_DA`` exceed the core count (see the module docstring)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    if "nnUNet_n_proc_DA" in os.environ:
        trainer_module.get_allowed_n_proc_DA = lambda: int(os.environ["nnUNet_n_proc_DA"])


def _worker_counts(*loaders) -> list:
    """Worker processes of each augmenter (0 for a single-threaded one)."""
    return [getattr(dl, "num_processes", 0) for dl in loaders]


def _preprocessed(dataset: str) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / dataset


def _trainer(cls, dataset: str, plans_name: str, configuration: str, fold, device: str):
    pre = _preprocessed(dataset)
    plans = json.loads((pre / f"{plans_name}.json").read_text())
    plans["continue_training"] = False  # what run_training.get_trainer_from_args adds
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
               device=torch.device(device))


def _shapes(batch) -> dict:
    def shape(x):
        return [shape(v) for v in x] if isinstance(x, (list, tuple)) else list(x.shape)
    return {"data": shape(batch["data"]), "target": shape(batch["target"])}


def _finish(*loaders):
    for dl in loaders:
        if hasattr(dl, "_finish"):
            dl._finish()


def cmd_train_steps(args) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    threads = bu.driver_threads()
    memory = TreeMemoryMonitor(0.2)
    memory.phase("setup")
    t0 = time.perf_counter()
    tr = _trainer(nnUNetTrainer, args.dataset, args.plans, args.configuration, args.fold, args.device)
    tr.on_train_start()
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    setup_s = time.perf_counter() - t0
    data_s, step_s, step_cpu_s, losses = [], [], [], []
    batch = None
    for i in range(args.warmup + args.iterations):
        if i == args.warmup:
            memory.phase("timed")
        a = time.perf_counter()
        batch = next(tr.dataloader_train)
        b, cpu = time.perf_counter(), time.process_time()
        out = tr.train_step(batch)
        c = time.perf_counter()
        step_cpu_s.append(time.process_time() - cpu)
        data_s.append(b - a)
        step_s.append(c - b)
        losses.append(float(out["loss"]))
    shapes = _shapes(batch)
    memory.phase("breakdown")
    # the same step split into its parts (identical code path to train_step on a CPU device), on batches drawn
    # first, with the loaders stopped, so that no worker competes for the cores meanwhile
    batches = [next(tr.dataloader_train) for _ in range(args.breakdown)]
    _finish(tr.dataloader_train, tr.dataloader_val)
    breakdown = []
    for batch in batches:
        t = [time.perf_counter()]
        data = batch["data"].to(tr.device)
        target = [i.to(tr.device) for i in batch["target"]] if isinstance(batch["target"], list) \
            else batch["target"].to(tr.device)
        tr.optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        output = tr.network(data)
        t.append(time.perf_counter())
        loss = tr.loss(output, target)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(tr.network.parameters(), 12)
        tr.optimizer.step()
        t.append(time.perf_counter())
        breakdown.append(dict(zip(("prepare", "forward", "loss", "backward", "clip_and_optimizer"),
                                  np.diff(t).tolist())))
    n_params = sum(p.numel() for p in tr.network.parameters())
    return {"setup_s": setup_s, "warmup": args.warmup, "data_s": data_s, "step_s": step_s,
            "step_cpu_s": step_cpu_s, "losses": losses,
            "breakdown": breakdown, "batch_shapes": shapes, "batch_size": tr.batch_size, "threads": threads,
            "workers": _worker_counts(tr.dataloader_train, tr.dataloader_val), "network": type(tr.network).__name__,
            "n_parameters": n_params, "memory_by_phase": memory.stop(), **cuda_peak_mb(tr.device),
            "split_file": str(_preprocessed(args.dataset) / "splits_final.json")}


def cmd_dataloader(args) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    threads = bu.driver_threads()
    tr = _trainer(nnUNetTrainer, args.dataset, args.plans, args.configuration, args.fold, args.device)
    tr.initialize()
    t0 = time.perf_counter()
    dl_tr, dl_val = tr.get_dataloaders()  # starts the workers and draws one batch from each
    setup_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        batch = next(dl_tr)
    times = []
    t_start = time.perf_counter()
    for _ in range(args.batches):
        a = time.perf_counter()
        batch = next(dl_tr)
        times.append(time.perf_counter() - a)
    total = time.perf_counter() - t_start
    shapes = _shapes(batch)
    _finish(dl_tr, dl_val)
    return {"setup_s": setup_s, "warmup": args.warmup, "batches": args.batches, "total_s": total,
            "batches_per_s": args.batches / total, "next_s": times, "batch_shapes": shapes,
            "batch_size": tr.batch_size, "workers": _worker_counts(dl_tr, dl_val), "threads": threads,
            "num_cached": getattr(dl_tr, "num_cached", None)}


def cmd_epochs(args) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    threads = bu.driver_threads()
    tr = _trainer(nnUNetTrainer, args.dataset, args.plans, args.configuration, args.fold, args.device)
    tr.initialize()
    dl_tr, dl_val = tr.get_dataloaders()
    epochs = []
    for _ in range(args.epochs):
        start, record = time.perf_counter(), {"train_wait_s": [], "val_wait_s": []}
        for loader, key, n, step in ((dl_tr, "train_wait_s", args.batches_per_epoch, args.step_s),
                                     (dl_val, "val_wait_s", args.val_batches, args.val_step_s)):
            for _ in range(n):
                a = time.perf_counter()
                next(loader)
                record[key].append(time.perf_counter() - a)
                time.sleep(step)
        record["epoch_s"] = time.perf_counter() - start
        epochs.append(record)
    _finish(dl_tr, dl_val)
    return {**bu.epoch_loop_result(args, epochs), "workers": _worker_counts(dl_tr, dl_val), "threads": threads}


def cmd_make_checkpoint(args) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    bu.driver_threads()
    torch.manual_seed(args.seed)
    tr = _trainer(nnUNetTrainer, args.dataset, args.plans, args.configuration, args.fold, "cpu")
    tr.num_input_channels = len(tr.dataset_json.get("channel_names", tr.dataset_json.get("modality", {})))
    tr.network = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, tr.num_input_channels,
                                               tr.label_manager.num_segmentation_heads, tr.enable_deep_supervision)
    tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
    tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    tr.current_epoch = 0
    Path(tr.output_folder).mkdir(parents=True, exist_ok=True)
    (Path(tr.output_folder_base) / "plans.json").write_text(json.dumps(tr.plans_manager.plans, indent=4))
    (Path(tr.output_folder_base) / "dataset.json").write_text(json.dumps(tr.dataset_json, indent=4))
    checkpoint = Path(tr.output_folder) / "checkpoint_final.pth"
    tr.save_checkpoint(str(checkpoint))
    return {"model_dir": tr.output_folder_base, "checkpoint": str(checkpoint),
            "mirror_axes": list(tr.inference_allowed_mirroring_axes or []),
            "n_parameters": sum(p.numel() for p in tr.network.parameters())}


def cmd_predict(args) -> dict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    threads = bu.driver_threads()
    cases = json.loads(Path(args.cases).read_text())  # [{"case": id, "image": [channel files]}]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(args.tta),
                                perform_everything_on_device=args.device == "cuda", device=torch.device(args.device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model_dir, (args.fold,), "checkpoint_final.pth")
    setup_s = time.perf_counter() - t0
    per_case = []
    for item in cases:
        a = time.perf_counter()
        predictor.predict_from_files_sequential([item["image"]], [str(out / item["case"])], save_probabilities=False,
                                                overwrite=True)
        per_case.append({"case": item["case"], "seconds": time.perf_counter() - a})
    return {"setup_s": setup_s, "per_case": per_case, "tta": bool(args.tta), "threads": threads,
            "mirror_axes": list(predictor.allowed_mirroring_axes or []),
            "outputs": sorted(p.name for p in out.glob("*.nii.gz")), **cuda_peak_mb(torch.device(args.device))}


def cmd_train(args) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_Bench(nnUNetTrainer):
        """nnUNetTrainer with the benchmark's budget; nothing else changes."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = args.epochs
            self.num_iterations_per_epoch = args.iterations
            self.num_val_iterations_per_epoch = args.val_iterations

        def initialize(self):
            super().initialize()
            if args.initial_weights:
                net = self.network.module if self.is_ddp else self.network
                net = getattr(net, "_orig_mod", net)  # compiled
                weights = torch.load(args.initial_weights, map_location="cpu", weights_only=False)
                net.load_state_dict(weights["network_weights"])

    threads = bu.driver_threads()
    if args.device == "cuda":  # what nnUNetv2_train does
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        torch.backends.cudnn.benchmark = True
    tr = _trainer(nnUNetTrainer_Bench, args.dataset, args.plans, args.configuration, args.fold, args.device)
    t0 = time.perf_counter()
    tr.run_training()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr.perform_actual_validation(False)
    val_s = time.perf_counter() - t0
    log = tr.logger.my_fantastic_logging if hasattr(tr.logger, "my_fantastic_logging") else {}
    if not log and hasattr(tr.logger, "get_checkpoint"):
        log = tr.logger.get_checkpoint()
    starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
    summary = Path(tr.output_folder) / "validation" / "summary.json"
    return {"train_s": train_s, "validation_s": val_s, "threads": threads,
            "epoch_seconds": [e - s for s, e in zip(starts, ends)],
            "train_losses": [float(v) for v in log.get("train_losses", [])],
            "val_losses": [float(v) for v in log.get("val_losses", [])],
            "pseudo_dice": [[float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)
                            for v in log.get("dice_per_class_or_region", [])],
            "summary": str(summary), "output_folder": tr.output_folder}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, device=True):
        p.add_argument("--dataset", required=True, help="DatasetXXX_Name under nnUNet_preprocessed")
        p.add_argument("--plans", default="nnUNetPlans")
        p.add_argument("--configuration", default="3d_fullres")
        p.add_argument("--fold", type=int, default=0)
        if device:
            p.add_argument("--device", default="cpu")
        p.add_argument("--result", required=True, type=Path)

    p = sub.add_parser("train-steps")
    common(p)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--breakdown", type=int, default=2)
    p = sub.add_parser("dataloader")
    common(p)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p = sub.add_parser("epochs")
    common(p)
    bu.add_epoch_loop_arguments(p)
    p = sub.add_parser("make-checkpoint")
    common(p, device=False)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("predict")
    common(p)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--cases", required=True, help="JSON file: [{case, image: [channel files]}]")
    p.add_argument("--out", required=True)
    p.add_argument("--tta", type=int, default=1)
    p = sub.add_parser("train")
    common(p)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--val-iterations", type=int, required=True)
    p.add_argument("--initial-weights", default=None, help="checkpoint whose network_weights start the training")
    args = ap.parse_args(argv)
    _workers_as_asked()
    fn = {"train-steps": cmd_train_steps, "dataloader": cmd_dataloader, "epochs": cmd_epochs,
          "make-checkpoint": cmd_make_checkpoint,
          "predict": cmd_predict, "train": cmd_train}[args.command]
    return bu.run_driver_command(fn, args, STARTED)


if __name__ == "__main__":
    raise SystemExit(main())
