"""Training bookkeeping that MONAI's handlers do not cover together: resume, best-by-EMA, final weights, progress.png.

One handler so that resuming restores everything consistently: weights, optimizer, LR schedule, AMP scaler, epoch,
the pseudo-Dice EMA, the best EMA so far and the loss history. Every file is written atomically, so an interrupted
run resumes from the last completed epoch. ``DataWorkers`` starts the persistent loader workers with training and
ends them with it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from .data import RollingBatches, shutdown_workers

logger = logging.getLogger(__name__)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


def mean_over_ranks(values: list[float]) -> float:
    """The mean of ``values`` taken together with every DDP rank's (one process: their own mean), as nnU-Net logs
    an epoch's training loss: each rank's iteration losses gathered, then averaged, every rank's weighing the same."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, list(values))
        values = [v for rank_values in gathered for v in rank_values]
    return sum(values) / max(len(values), 1)


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """nnU-Net's poly schedule in closed form, stepped once per epoch: epoch ``e`` trains with
    ``lr * (1 - e / total_iters) ** power``.

    torch's ``PolynomialLR`` multiplies the current rate by a per-step factor and saves ``total_iters`` in its state,
    so a run resumed with more epochs would keep decaying towards the old end. Here a resumed run follows the
    configured ``total_iters``, ``power`` and learning rate, as nnU-Net recomputes the rate from its settings.
    """

    def __init__(self, optimizer, total_iters: int, power: float = 0.9, last_epoch: int = -1):
        self.total_iters, self.power = int(total_iters), float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = (1 - min(self.last_epoch, self.total_iters) / self.total_iters) ** self.power
        return [base * factor for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        configured = self.total_iters, self.power, self.base_lrs
        super().load_state_dict(state_dict)
        self.total_iters, self.power, self.base_lrs = configured
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr


class TrainingProgress:
    """Attach to the trainer after the ValidationHandler (so the epoch's validation has run).

    Writes ``models/resume/checkpoint_latest.pt`` (resume state; outside ``models/*.pt``, which MONAI Label offers
    as models) each epoch, ``models/model_best.pt`` when the EMA pseudo-Dice strictly improves, ``models/model.pt``
    (final weights, a plain state dict) at the end, and ``progress.png`` + ``progress.json`` in ``output_dir``. Only
    rank 0 writes (``enabled``).

    A run resumes only an interrupted run of the same length on the same training data (``data_key``); any other
    start (a finished run, another ``max_epochs``, other data: MONAI Label's next "Train") is a new run that starts
    from ``models/model.pt`` when it exists, so each request trains on from the last weights. The log says which.

    A multi-task bundle passes its ``classification_metric`` (``scripts.classification.ClassificationMetric``, None
    otherwise): each epoch's validation classification accuracy and macro-F1 are then logged, kept in the history
    (``val_class_accuracy``, ``val_class_macro_f1``) and plotted in a panel of their own.
    """

    def __init__(self, network, optimizer, lr_scheduler, metric, ckpt_dir, output_dir, enabled: bool = True,
                 resume: bool = True, data_key: str = "", classification_metric=None):
        self.network, self.optimizer, self.lr_scheduler, self.metric = network, optimizer, lr_scheduler, metric
        self.ckpt_dir, self.output_dir = Path(ckpt_dir), Path(output_dir)
        self.enabled, self.resume, self.data_key = enabled, resume, data_key
        self.classification_metric = classification_metric
        self.history = {"epoch": [], "train_loss": [], "val_pseudo_dice": [], "val_pseudo_dice_per_class": [],
                        "val_ema": [], "lr": [], "epoch_seconds": []}
        if classification_metric is not None:
            self.history.update(val_class_accuracy=[], val_class_macro_f1=[])
        self.best_ema = None
        self._losses: list[float] = []
        self._epoch_lr = None
        self._epoch_start = time.monotonic()

    @property
    def latest_path(self) -> Path:
        return self.ckpt_dir / "resume" / "checkpoint_latest.pt"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        state = torch.load(self.latest_path, map_location="cpu", weights_only=True) if (
            self.resume and self.latest_path.is_file()) else None
        why = self._why_not_resume(state, engine.state.max_epochs)
        if why:
            final = self.ckpt_dir / "model.pt"
            if state is not None and final.is_file():
                _unwrap(self.network).load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
                logger.info(f"new training from {final} ({why})")
            elif state is not None:
                logger.info(f"new training ({why})")
            return
        _unwrap(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") is not None and getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(state["scaler"])
        self.metric.ema, self.best_ema, self.history = state["ema"], state["best_ema"], state["history"]
        engine.state.epoch = state["epoch"]
        engine.state.iteration = state["epoch"] * engine.state.epoch_length
        logger.info(f"resumed from {self.latest_path} at epoch {state['epoch']} of {state['max_epochs']}")

    def _why_not_resume(self, state, max_epochs: int) -> str:
        """"" when ``state`` is an interrupted run of this length and data, else the reason to start anew."""
        if state is None:
            return "no checkpoint to resume"
        if state.get("max_epochs") != max_epochs:
            return f"the checkpoint's run had {state.get('max_epochs')} epochs, this one has {max_epochs}"
        if state.get("data_key") != self.data_key:
            return "the checkpoint's run trained on other data"
        if state["epoch"] >= max_epochs:
            return f"the checkpoint's run finished all {max_epochs} epochs"
        return ""

    def epoch_started(self, engine: Engine) -> None:
        self._epoch_lr = self.optimizer.param_groups[0]["lr"]  # the epoch's rate, before the scheduler steps
        self._losses = []
        self._epoch_start = time.monotonic()

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output["loss"] if isinstance(output, dict) else output[0]["loss"]
        self._losses.append(float(loss))

    def epoch_completed(self, engine: Engine) -> None:
        h = self.history
        if self.classification_metric is not None:
            self._classification_completed(engine)
        h["epoch"].append(engine.state.epoch)
        h["train_loss"].append(mean_over_ranks(self._losses))  # every rank takes part
        h["val_pseudo_dice"].append(self.metric.last_mean)
        h.setdefault("val_pseudo_dice_per_class", []).append(list(self.metric.last_per_class))  # label or region
        h["val_ema"].append(self.metric.ema)
        h["lr"].append(self._epoch_lr)
        h["epoch_seconds"].append(time.monotonic() - self._epoch_start)
        logger.info(f"epoch {engine.state.epoch}: train loss {h['train_loss'][-1]:.4f}, pseudo-Dice "
                    f"{self.metric.last_per_class}, EMA {self.metric.ema}")
        if not self.enabled:
            return
        weights = _unwrap(self.network).state_dict()
        if self.metric.ema is not None and (self.best_ema is None or self.metric.ema > self.best_ema):
            self.best_ema = self.metric.ema
            save_atomic(weights, self.ckpt_dir / "model_best.pt")
        scaler = getattr(engine, "scaler", None)
        save_atomic({"network": weights, "optimizer": self.optimizer.state_dict(),
                     "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "epoch": engine.state.epoch, "max_epochs": engine.state.max_epochs,
                     "data_key": self.data_key, "ema": self.metric.ema, "best_ema": self.best_ema,
                     "history": self.history}, self.latest_path)
        self.plot()

    def completed(self, engine: Engine) -> None:
        if self.enabled:
            save_atomic(_unwrap(self.network).state_dict(), self.ckpt_dir / "model.pt")

    def _classification_completed(self, engine: Engine) -> None:
        h, metric = self.history, self.classification_metric
        for key in ("val_class_accuracy", "val_class_macro_f1"):  # a resumed history may predate them
            h.setdefault(key, [float("nan")] * len(h["epoch"]))
        h["val_class_accuracy"].append(metric.last_accuracy)
        h["val_class_macro_f1"].append(metric.last_f1)
        logger.info(f"epoch {engine.state.epoch}: classification accuracy {metric.last_accuracy:.4f}, "
                    f"macro-F1 {metric.last_f1:.4f}")

    def extra_panels(self) -> list:
        """Functions ``(axis, history)`` drawing panels between the loss and the epoch-time panels: the validation
        classification accuracy and macro-F1 of a multi-task bundle."""
        if self.classification_metric is None:
            return []

        def classification(axis, h):
            axis.plot(h["epoch"], h.get("val_class_accuracy", []), "b-", label="classification accuracy")
            axis.plot(h["epoch"], h.get("val_class_macro_f1", []), "r-", label="classification macro-F1")
            axis.set_ylim(-0.02, 1.02)
            axis.set_ylabel("validation (lesion patches)")
            axis.legend(loc="upper left")

        return [classification]

    def plot(self) -> None:
        """progress.png like nnU-Net's: losses and pseudo-Dice, any ``extra_panels``, epoch duration, learning rate;
        and progress.json with the history."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        extra = self.extra_panels()
        fig, axes = plt.subplots(3 + len(extra), 1, figsize=(10, 12 + 3 * len(extra)))
        for draw, axis in zip(extra, axes[1:]):
            draw(axis, h)
        axes = [axes[0], *axes[1 + len(extra):]]
        axes[0].plot(h["epoch"], h["train_loss"], label="train loss")
        axes[0].set_ylabel("loss")
        dice_axis = axes[0].twinx()
        dice_axis.plot(h["epoch"], h["val_pseudo_dice"], "g:", label="pseudo Dice")
        dice_axis.plot(h["epoch"], [v if v is not None else float("nan") for v in h["val_ema"]], "g-",
                       label="pseudo Dice (EMA)")
        dice_axis.set_ylabel("pseudo Dice")
        axes[0].legend(loc="upper left")
        dice_axis.legend(loc="upper right")
        axes[1].plot(h["epoch"], h["epoch_seconds"])
        axes[1].set_ylabel("epoch time (s)")
        axes[2].plot(h["epoch"], h["lr"])
        axes[2].set_ylabel("learning rate")
        axes[2].set_xlabel("epoch")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / f".progress.{os.getpid()}.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.output_dir / "progress.png")
        tmp = self.output_dir / f".progress.{os.getpid()}.json"
        tmp.write_text(json.dumps(h, indent=1))
        os.replace(tmp, self.output_dir / "progress.json")


class ResumeSampling:
    """Attach after ``TrainingProgress``: a resumed run draws the samples (patches and augmentations) that the
    interrupted run would have drawn next, not its first epochs' again.

    ``PatchDataset`` keys every sample's randomness by its number, counted from its ``offset``. At the start of a
    run resumed after epoch ``e`` (``TrainingProgress`` has set the engine's epoch and iteration by then, and no
    loader has started its workers yet) the training dataset skips the ``iteration x batch size`` samples already
    trained on, and the validation dataset the ``e // val_interval`` passes of ``validation`` (``RollingBatches``)
    already run. A new run starts at 0.
    """

    def __init__(self, train_loader, validation=None, val_interval: int = 1):
        self.train_loader, self.validation, self.val_interval = train_loader, validation, int(val_interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)

    def started(self, engine: Engine) -> None:
        _skip(self.train_loader, engine.state.iteration * self.train_loader.batch_size)
        if self.validation is not None:
            loader = self.validation.loader
            passes = engine.state.epoch // self.val_interval
            _skip(loader, passes * self.validation.epoch_length * loader.batch_size)


def _skip(loader, samples: int) -> None:
    if hasattr(loader.dataset, "offset"):
        loader.dataset.offset = int(samples)


class DataWorkers:
    """Starts the validation loader's workers with training and ends every loader's workers when training completes,
    as nnU-Net starts both augmenters before the first epoch and ends them in ``on_train_end``.

    Workers are forked processes. One forked at the first validation would inherit the memory that training has
    allocated by then, copy-on-write, and keep it as its own while training rewrites it (about 700 MB more on
    Hippocampus on a CPU); forked at the start, it shares only the set-up. Ended with training, no idle workers
    hold memory during the final validation, and the process does not leave them to interpreter shutdown.
    """

    def __init__(self, loaders):
        self.loaders = loaders

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.COMPLETED, self.release)

    def start(self, engine: Engine) -> None:
        for loader in self.loaders:
            if isinstance(loader, RollingBatches):
                loader.start()  # the trainer starts its own loader right after this event

    def release(self, engine: Engine) -> None:
        for loader in self.loaders:
            if isinstance(loader, RollingBatches):
                loader.release()
            else:
                shutdown_workers(loader)


def clip_gradients_hook(network: torch.nn.Module, max_norm: float = 12.0):
    """An optimizer step pre-hook clipping the global gradient norm (nnU-Net: 12). With AMP, GradScaler unscales the
    gradients before calling ``optimizer.step``, so the hook sees true gradients."""
    parameters = [p for p in network.parameters() if p.requires_grad]

    def hook(optimizer, args, kwargs):
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    return hook
