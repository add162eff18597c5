"""Driver for OUR side of the benchmarks: works on an emitted bundle through its own configs, the way
``python -m monai.bundle run`` does (``monai.bundle.ConfigParser`` / ``ConfigWorkflow``), with timers around it.

* ``preprocess``: ``scripts.data.preprocess_to_cache`` over every labelled case (the cache that training builds on
  first use), with the bundle's ``num_workers`` processes.
* ``probe-label-dtype``: whether ``train#preprocessing`` returns labels of different dtypes with and without the
  spatial (affine) augmentation, which makes ``DataLoader``'s collation fail (see ``--label-float``).
* ``train-steps``: ``train#trainer`` (MONAI's ``SupervisedTrainer``, the bundle's network/loss/optimizer/dataloader,
  after the config's ``initialize`` list) run for warm-up + timed iterations with the train handlers removed (no
  validation, checkpoints, TensorBoard; the validation loader's workers are started, as in training); data time
  (get-batch events) and step time (iteration events) are recorded per iteration; then a few iterations split into
  forward / loss / backward / optimizer (with the clip hook).
* ``dataloader``: batches per second of ``train#dataloader`` alone (the validation loader's workers started too, as
  nnU-Net's ``get_dataloaders()`` starts both augmenters).
* ``epochs``: the loaders the bundle's trainer and evaluator are given (``train#trainer#train_data_loader``,
  ``validate#evaluator#val_data_loader``), driven by ignite engines whose steps are sleeps, validation after every
  epoch: what the loaders cost the training loop at epoch starts and validations.
* ``make-checkpoint``: ``models/model.pt`` = ``torch.save(network_def.state_dict())`` of a fresh network.
* ``predict``: ``configs/inference.json`` through ``ConfigWorkflow`` on a given case list; per-case seconds from
  the evaluator's events (load + preprocess + sliding window + restore + save).

``BENCH_THREADS`` sets torch's thread count. Every subcommand writes its figures to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # before the heavy imports: with the runner's wall time this shows start-up and exit costs

import numpy as np
import torch
import benchutil as bu
from treemem import TreeMemoryMonitor, cuda_peak_mb


def _enter_bundle(bundle: Path):
    bundle = bundle.resolve()
    os.chdir(bundle)
    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))
    return bundle


def _ensure_typed_index(config: dict) -> int | None:
    """Index of the last EnsureTyped in train#preprocessing (where --label-float puts its dtype)."""
    transforms = config["train"]["preprocessing"]["transforms"]
    idx = [i for i, t in enumerate(transforms) if str(t.get("_target_", "")).endswith("EnsureTyped")]
    return idx[-1] if idx else None


def _train_parser(bundle: Path, overrides: dict, label_float: bool):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in overrides.items():
        parser[k] = v
    if label_float:
        i = _ensure_typed_index(parser.config)
        if i is None:
            raise RuntimeError("--label-float: train#preprocessing has no EnsureTyped")
        parser[f"train#preprocessing#transforms#{i}#dtype"] = "$torch.float32"
    return parser


def cmd_preprocess(args) -> dict:
    bundle = _enter_bundle(args.bundle)
    bu.driver_threads()
    import scripts.data as data

    parser = _train_parser(bundle, {}, False)
    cfg = lambda k: parser.get_parsed_content(k)  # noqa: E731
    dataset_dir = cfg("dataset_dir")
    datalist = data.list_cases(os.path.join(dataset_dir, "imagesTr"), cfg("file_ending"), cfg("num_channels"),
                               os.path.join(dataset_dir, "labelsTr"))
    cache_root = Path(args.cache_dir) if args.cache_dir else Path(cfg("cache_dir"))
    t0 = time.perf_counter()
    folder = data.preprocess_to_cache(datalist, cfg("plans"), cfg("configuration"), cache_root,
                                      cfg("foreground_labels"), cfg("ignore_label"), args.workers)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    return {"seconds": seconds, "cases": len(datalist), "cache_folder": str(folder), "workers": args.workers,
            "cache_mb": size / 2 ** 20}


def cmd_probe_label_dtype(args) -> dict:
    """Apply train#preprocessing to one real patch twice: spatial augmentation forced on, then forced off."""
    bundle = _enter_bundle(args.bundle)
    bu.driver_threads()
    parser = _train_parser(bundle, {"num_workers": 0, "iterations_per_epoch": 1}, False)
    dataset = parser.get_parsed_content("train#dataset")
    transform = dataset.transform
    dataset.transform = None
    item = dataset[0]
    spatial = transform.transforms[0]
    dtypes = {}
    try:
        for name, p in (("augmented", 1.0), ("not_augmented", 0.0)):
            spatial.p_rotation = spatial.p_scaling = p
            out = transform(dict(item))
            dtypes[name] = str(out["label"].dtype)
    except AttributeError as e:
        return {"probe": f"not applicable ({e})", "mixed": False}
    return {"probe": "ok", "label_dtypes": dtypes, "mixed": len(set(dtypes.values())) > 1,
            "spatial_transform": type(spatial).__name__}


class _EventTimer:
    """Per-iteration data time (GET_BATCH_STARTED -> GET_BATCH_COMPLETED) and step time (ITERATION_STARTED ->
    ITERATION_COMPLETED) of an ignite engine, and the whole iteration (GET_BATCH_STARTED -> ITERATION_COMPLETED)."""

    def __init__(self, engine):
        from ignite.engine import Events

        self.data, self.step, self.total, self.step_cpu, self.losses = [], [], [], [], []
        self._t = {}
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._mark, "get")
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._mark, "got")
        engine.add_event_handler(Events.ITERATION_STARTED, self._mark, "start")
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._done)

    def _mark(self, engine, key):
        self._t[key] = time.perf_counter()
        self._t[key + "_cpu"] = time.process_time()

    def _done(self, engine):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # count the queued GPU work in this iteration (nnU-Net's .cpu() loss does)
        now = time.perf_counter()
        self.data.append(self._t["got"] - self._t["get"])
        self.step.append(now - self._t["start"])
        self.total.append(now - self._t["get"])
        self.step_cpu.append(time.process_time() - self._t["start_cpu"])
        out = engine.state.output
        if isinstance(out, (list, tuple)) and out and isinstance(out[0], dict):
            out = out[0]
        if isinstance(out, dict) and "loss" in out:
            self.losses.append(float(out["loss"]))


def _shapes(batch) -> dict:
    return {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _start_validation_workers(parser):
    """Starts the validation loader's workers, as the bundle's training does at its start (and nnU-Net's
    ``get_dataloaders()``), so that both systems' measurements hold the same processes."""
    batches = parser.get_parsed_content("validate#batches")
    batches.start()
    return batches


def _worker_counts(parser) -> list:
    """Worker processes of the training and the validation loader."""
    return [parser.get_parsed_content(f"{k}#dataloader").num_workers for k in ("train", "validate")]


def cmd_train_steps(args) -> dict:

    bundle = _enter_bundle(args.bundle)
    threads = bu.driver_threads()
    memory = TreeMemoryMonitor(0.2)
    memory.phase("setup")
    n = args.warmup + args.iterations
    overrides = {"iterations_per_epoch": n, "epochs": 1, "num_workers": args.workers, "train#handlers": [],
                 "device": f"$torch.device('{args.device}')", "compile": False}  # nnU-Net's side runs eagerly too
    parser = _train_parser(bundle, overrides, args.label_float)
    t0 = time.perf_counter()
    parser.get_parsed_content("initialize")  # determinism + the gradient-clipping hook, as the bundle's run does
    trainer = parser.get_parsed_content("train#trainer")
    setup_s = time.perf_counter() - t0
    timer = _EventTimer(trainer)
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=args.warmup) if args.warmup else Events.STARTED,
                              lambda engine: memory.phase("timed"))
    validation = _start_validation_workers(parser)
    trainer.run()
    validation.release()
    memory.phase("breakdown")
    network, loss_fn, optimizer = (parser.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
    device = torch.device(args.device)
    decollate = bool(parser.config["train"]["trainer"].get("decollate", True))
    breakdown, shapes = [], {}
    if args.breakdown:
        # batches drawn first and the loader stopped, so that no worker competes for the cores meanwhile
        loader = iter(parser.get_parsed_content("train#dataloader"))
        batches = [next(loader) for _ in range(args.breakdown)]
        del loader
        for batch in batches:
            shapes = _shapes(batch)
            t = [time.perf_counter()]
            image, label = batch["image"].to(device), batch["label"].to(device)
            network.train()
            optimizer.zero_grad(set_to_none=getattr(trainer, "optim_set_to_none", False))
            t.append(time.perf_counter())
            output = network(image)
            t.append(time.perf_counter())
            loss = loss_fn(output, label)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            optimizer.step()  # the clip hook registered by `initialize` runs here
            t.append(time.perf_counter())
            if decollate:  # what MONAI's Workflow does after each step when decollate is on (its default)
                from monai.data import decollate_batch

                decollate_batch(batch, detach=True)
                decollate_batch({"image": image, "label": label, "pred": output, "loss": loss.detach()}, detach=True)
            t.append(time.perf_counter())
            row = dict(zip(("prepare", "forward", "loss", "backward", "clip_and_optimizer", "decollate"),
                           np.diff(t).tolist()))
            row["output_shape"] = list(output.shape) if isinstance(output, torch.Tensor) else \
                [list(o.shape) for o in output]
            breakdown.append(row)
    return {"setup_s": setup_s, "warmup": args.warmup, "data_s": timer.data, "step_s": timer.step,
            "step_cpu_s": timer.step_cpu, "iteration_s": timer.total, "losses": timer.losses,
            "breakdown": breakdown, "batch_shapes": shapes,
            "batch_size": parser.get_parsed_content("batch_size"), "threads": threads,
            "workers": _worker_counts(parser), "label_float": args.label_float, "network": type(network).__name__,
            "n_parameters": sum(p.numel() for p in network.parameters()),
            "decollate": decollate, "memory_by_phase": memory.stop(), **cuda_peak_mb(device)}


def cmd_dataloader(args) -> dict:
    bundle = _enter_bundle(args.bundle)
    threads = bu.driver_threads()
    overrides = {"iterations_per_epoch": args.warmup + args.batches + 1, "num_workers": args.workers}
    parser = _train_parser(bundle, overrides, args.label_float)
    t0 = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")
    validation = _start_validation_workers(parser)
    it = iter(loader)
    batch = next(it)  # as nnU-Net's get_dataloaders() draws one batch before returning
    setup_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        batch = next(it)
    times = []
    t_start = time.perf_counter()
    for _ in range(args.batches):
        a = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - a)
    total = time.perf_counter() - t_start
    shapes = _shapes(batch)
    del it
    validation.release()
    return {"setup_s": setup_s, "warmup": args.warmup, "batches": args.batches, "total_s": total,
            "batches_per_s": args.batches / total, "next_s": times, "batch_shapes": shapes,
            "batch_size": parser.get_parsed_content("batch_size"), "workers": _worker_counts(parser),
            "threads": threads,
            "prefetch_factor": getattr(loader, "prefetch_factor", None), "label_float": args.label_float}


def cmd_epochs(args) -> dict:
    from ignite.engine import Engine, Events

    bundle = _enter_bundle(args.bundle)
    threads = bu.driver_threads()
    overrides = {"epochs": args.epochs, "iterations_per_epoch": args.batches_per_epoch,
                 "val_iterations": args.val_batches, "num_workers": args.workers,
                 "device": f"$torch.device('{args.device}')"}  # pinned memory on CUDA, as in training
    parser = _train_parser(bundle, overrides, args.label_float)
    train_data = parser.get_parsed_content("train#trainer#train_data_loader")
    val_data = parser.get_parsed_content("validate#evaluator#val_data_loader")
    trainer = Engine(lambda engine, batch: time.sleep(args.step_s))
    evaluator = Engine(lambda engine, batch: time.sleep(args.val_step_s))
    epochs, marks = [], {}

    def waits(engine, key):
        engine.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.__setitem__("get", time.perf_counter()))
        engine.add_event_handler(Events.GET_BATCH_COMPLETED,
                                 lambda e: epochs[-1][key].append(time.perf_counter() - marks["get"]))

    waits(trainer, "train_wait_s")
    waits(evaluator, "val_wait_s")
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(
        {"start": time.perf_counter(), "train_wait_s": [], "val_wait_s": []}))

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        evaluator.run(val_data, epoch_length=args.val_batches)
        epochs[-1]["epoch_s"] = time.perf_counter() - epochs[-1].pop("start")

    from scripts.handlers import DataWorkers  # the bundle's own, as its training starts and ends its loaders

    DataWorkers([train_data, val_data]).attach(trainer)
    trainer.run(train_data, max_epochs=args.epochs, epoch_length=args.batches_per_epoch)
    return {**bu.epoch_loop_result(args, epochs), "workers": _worker_counts(parser), "threads": threads,
            "label_float": args.label_float}


def cmd_make_checkpoint(args) -> dict:
    bundle = _enter_bundle(args.bundle)
    bu.driver_threads()
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    path = bundle / "models" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return {"checkpoint": str(path), "n_parameters": sum(p.numel() for p in network.parameters()),
            "network": type(network).__name__}


def cmd_predict(args) -> dict:
    bundle = _enter_bundle(args.bundle)
    threads = bu.driver_threads()
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    cases = json.loads(Path(args.cases).read_text())
    datalist = [{"image": item["image"]} for item in cases]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                              meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="infer", bundle_root=str(bundle), output_dir=str(out),
                              datalist=datalist, use_tta=bool(args.tta), device=torch.device(args.device),
                              network_backend=args.backend)
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    setup_s = time.perf_counter() - t0
    marks = {}
    per_case = []

    def started(engine):
        marks["t"] = time.perf_counter()

    def done(engine):
        per_case.append({"case": cases[len(per_case)]["case"], "seconds": time.perf_counter() - marks["t"]})

    evaluator.add_event_handler(Events.GET_BATCH_STARTED, started)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, done)
    workflow.run()
    workflow.finalize()
    inferer = workflow.parser.get_parsed_content("inferer")
    return {"setup_s": setup_s, "per_case": per_case, "tta": bool(args.tta), "threads": threads,
            "backend": args.backend,
            "mirror_axes": list(getattr(inferer, "mirror_axes", ())),
            "outputs": sorted(p.name for p in out.glob("*.nii.gz")), **cuda_peak_mb(torch.device(args.device))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--bundle", required=True, type=Path)
        p.add_argument("--result", required=True, type=Path)

    p = sub.add_parser("preprocess")
    common(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p = sub.add_parser("probe-label-dtype")
    common(p)
    for name in ("train-steps", "dataloader"):
        p = sub.add_parser(name)
        common(p)
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--warmup", type=int, default=2 if name == "train-steps" else 8)
        p.add_argument("--label-float", action="store_true",
                       help="EnsureTyped(dtype=float32) at the end of train#preprocessing (collation workaround)")
        if name == "train-steps":
            p.add_argument("--iterations", type=int, default=10)
            p.add_argument("--breakdown", type=int, default=2)
            p.add_argument("--device", default="cpu")
        else:
            p.add_argument("--batches", type=int, default=20)
    p = sub.add_parser("epochs")
    common(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--label-float", action="store_true")
    p.add_argument("--device", default="cpu")
    bu.add_epoch_loop_arguments(p)
    p = sub.add_parser("make-checkpoint")
    common(p)
    p = sub.add_parser("predict")
    common(p)
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tta", type=int, default=1)
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="network_backend of inference.json (onnxruntime needs models/model.onnx)")
    p.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    fn = {"preprocess": cmd_preprocess, "probe-label-dtype": cmd_probe_label_dtype, "train-steps": cmd_train_steps,
          "dataloader": cmd_dataloader, "epochs": cmd_epochs, "make-checkpoint": cmd_make_checkpoint, "predict": cmd_predict}[args.command]
    return bu.run_driver_command(fn, args, STARTED)


if __name__ == "__main__":
    raise SystemExit(main())
