"""Training data: the per-configuration preprocessing cache and nnU-Net's patch sampling (spec 4 and 5.3).

Preprocessing runs once per configuration: each case is written atomically to ``cache_dir`` (shared by all folds)
and skipped while its source files are unchanged (name, size, modification time), so an edited label is preprocessed
again. Patches are then cut from memory-mapped arrays, so an epoch costs no resampling.
MONAI's crop samplers cannot express nnU-Net's "the last third of every batch is forced onto foreground", so the
sampler below implements it; augmentation stays with MONAI transforms applied afterwards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage, MapTransform, Randomizable

from .preprocessing import (PlanSettings, one_hot, preprocess_case, preprocess_previous_stage, spacing_from_meta,
                            to_nnunet_order)

MAX_LOCATIONS = 10000
POOL_WORTH_SECONDS = 20.0  # estimated serial preprocessing time above which a worker pool is started
PROBE_SECONDS = 1.0  # cases are timed in-process (at least 3) for this long before the pool decision
LOCATION_SEED = 1234


def default_workers() -> int:
    """nnU-Net's number of data-augmentation workers: 12, capped at the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(12, cores)


# --- finding cases ---------------------------------------------------------------------------------------------
DATASET_RECORD = "dataset_dir.txt"


def find_dataset(bundle_root, dataset_name: str, subfolder: str = "") -> str:
    """The default ``dataset_dir``: bundles hold no path of the machine that made them, so the dataset is looked for
    where this machine says it is: the folder recorded by ``autoplan emit`` in ``dataset_dir.txt`` beside the bundle
    (not inside it), else ``$nnUNet_raw/<dataset_name>``. Returns "" when neither exists; ``list_cases`` then says
    how to point the bundle at its data."""
    record = Path(str(bundle_root)) / ".." / DATASET_RECORD
    candidates = [record.read_text().strip()] if record.is_file() else []
    if os.environ.get("nnUNet_raw") and dataset_name:
        candidates.append(os.path.join(os.environ["nnUNet_raw"], dataset_name))
    for folder in candidates:
        if folder and os.path.isdir(folder):
            return os.path.join(folder, subfolder) if subfolder else folder
    return ""


def list_cases(images_dir, file_ending: str, num_channels: int, labels_dir=None, cases=None) -> list[dict]:
    """``[{"case", "image": [channel files], "label"?}]`` for ``CASE_XXXX<ending>`` files, sorted by case.

    A single file that does not follow the channel naming (e.g. one image handed over by MONAI Label) is its own case.
    """
    if not os.path.isdir(str(images_dir)):
        raise FileNotFoundError(f"{images_dir or '(unset)'}: no such folder. Point the bundle at its data with "
                                "--dataset_dir /path/to/DatasetXXX_Name (the folder holding imagesTr and labelsTr; "
                                "for inference, a folder of images), or set nnUNet_raw")
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    found: dict[str, dict[int, str]] = {}
    for path in sorted(glob.glob(os.path.join(str(images_dir), f"*{file_ending}"))):
        name = os.path.basename(path)
        if name.startswith("."):
            continue
        match = pattern.match(name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = path
    items = []
    for case, channels in sorted(found.items()):
        if cases is not None and case not in cases:
            continue
        missing = [c for c in range(num_channels) if c not in channels]
        if missing:
            raise FileNotFoundError(f"{images_dir}: case '{case}' lacks channel file(s) {missing}")
        item = {"case": case, "image": [channels[c] for c in range(num_channels)]}
        if labels_dir is not None:
            item["label"] = os.path.join(str(labels_dir), case + file_ending)
        items.append(item)
    if cases is not None:
        absent = sorted(set(cases) - {i["case"] for i in items})
        if absent:
            raise FileNotFoundError(f"{images_dir}: no images for case(s) {absent[:10]}")
    return items


def with_previous_stage(datalist: list[dict], folders, file_ending: str) -> list[dict]:
    """Adds ``prev``: the previous stage's prediction of each case, found in any of ``folders`` (cascade); without
    ``folders`` (not a cascade) the datalist is returned as it is."""
    if folders is None:
        return datalist
    items = []
    for item in datalist:
        case = case_of(item)
        found = [os.path.join(str(f), case + file_ending) for f in folders
                 if os.path.isfile(os.path.join(str(f), case + file_ending))]
        if not found:
            raise FileNotFoundError(f"no previous-stage prediction {case}{file_ending} in {list(map(str, folders))}: "
                                    "train (or predict with) the 3d_lowres bundles first")
        items.append({**item, "prev": found[0]})
    return items


def channel_files(image) -> list[str]:
    """A case's image as a list of channel files: MONAI Label hands over one path, ``list_cases`` a list."""
    return [str(image)] if isinstance(image, (str, os.PathLike)) else [str(f) for f in image]


def case_of(item: dict) -> str:
    """The case identifier of a datalist item: ``case``, else the label's (or image's) file name without ending."""
    source = item.get("label") or channel_files(item["image"])[0]
    return item.get("case") or case_name({"filename_or_obj": source})["subject"]


def datalist_key(datalist: list[dict]) -> str:
    """Identifies the training data of a run (the cases and their files), so that a resumed run is the same run."""
    listing = sorted((case_of(item), channel_files(item["image"]), str(item.get("label"))) for item in datalist)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def source_stamp(item: dict) -> list:
    """Name, size and modification time of a case's source files: an edited image or label changes it."""
    files = channel_files(item["image"]) + [str(item[k]) for k in ("label", "prev") if item.get(k)]
    stats = [(os.path.basename(f), os.stat(f)) for f in files]
    return [[name, st.st_size, st.st_mtime_ns] for name, st in stats]


def case_name(metadict: dict, saver=None) -> dict:
    """``SaveImaged`` name formatter: ``CASE_0000.nii.gz`` (or ``CASE.nii.gz``) is saved as ``CASE.nii.gz``."""
    source = metadict.get("filename_or_obj", "case")
    source = source[0] if isinstance(source, (list, tuple)) else source
    name = os.path.basename(str(source))
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".bmp", ".gipl"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return {"subject": re.sub(r"_\d{4}$", "", name), "idx": None}


def load_case(image_files, label_file=None, ignore_label: int | None = None):
    """Read a case with MONAI's loader into nnU-Net order: (data (C,z,y,x), seg (1,z,y,x) or None, spacing).

    A label file may mark unannotated voxels with -1 (the DIAG fork's sparse labels, declared as ``"ignore": -1``);
    they become ``ignore_label`` (max label + 1), the value nnU-Net's ignore label has everywhere else.
    """
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    channels = [loader(f) for f in image_files]
    spacing_xyz = spacing_from_meta(channels[0])
    data, spacing = to_nnunet_order(np.concatenate([np.asarray(c) for c in channels]), spacing_xyz)
    seg = None
    if label_file is not None:
        seg, _ = to_nnunet_order(np.asarray(loader(label_file)), spacing_xyz)
        seg = np.rint(seg).astype(np.int16)
        unannotated = seg < 0
        if unannotated.any():
            if ignore_label is None:
                raise ValueError(f"{label_file}: label value -1 (unannotated voxels) but dataset.json declares no "
                                 "ignore label; add \"ignore\": -1 to its \"labels\"")
            seg[unannotated] = ignore_label
    return data.astype(np.float32), seg, spacing


# --- preprocessing cache ---------------------------------------------------------------------------------------
def cache_folder(cache_root, data_identifier: str, plan: PlanSettings) -> Path:
    """A cache per configuration; the name changes whenever a preprocessing setting changes."""
    digest = hashlib.sha256(json.dumps(asdict(plan), sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_root) / f"{data_identifier}_{digest}"


def foreground_locations(seg: np.ndarray, labels: list, rng: np.random.RandomState,
                         ignore_label: int | None = None) -> dict:
    """Up to 10,000 (at least 1 %) voxel coordinates per foreground label, for forced-foreground sampling.

    With an ignore label, the key ``annotated`` holds voxels that are not ignored (sparse annotation), as nnU-Net's
    extra class-location key does.
    """
    locations = {}
    keys = list(labels) + (["annotated"] if ignore_label is not None else [])
    for label in keys:
        mask = seg[0] != ignore_label if label == "annotated" else np.isin(seg[0], label)
        coords = np.argwhere(mask)
        if len(coords):
            n = max(min(MAX_LOCATIONS, len(coords)), int(np.ceil(0.01 * len(coords))))
            coords = coords[rng.choice(len(coords), n, replace=False)] if n < len(coords) else coords
        locations[str(label)] = coords.astype(np.int32)
    return locations


def _save_npy_atomic(path: Path, array: np.ndarray):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def preprocess_to_cache(datalist: list[dict], plans: dict, configuration: str, cache_root, foreground_labels: list,
                        ignore_label: int | None = None, num_workers: int = 0) -> Path:
    """Preprocess every listed case not yet in the cache. Returns the cache folder."""
    plan = PlanSettings.from_plans(plans, configuration)
    from .preprocessing import resolve_configuration

    identifier = resolve_configuration(plans, configuration)["data_identifier"]
    if any("prev" in item for item in datalist):
        identifier += "_with_previous_stage"
    folder = cache_folder(cache_root, identifier, plan)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [item for item in datalist if not _cached(folder / f"{item['case']}.json", item)]
    jobs = [(item, plan, foreground_labels, ignore_label, str(folder)) for item in todo]
    if not jobs:
        return folder
    # The first cases are timed in this process: a worker pool costs seconds of start-up (each spawned worker imports
    # torch and MONAI), which only pays off when the remaining cases are expensive. The first case also carries
    # one-off costs (imports, reader set-up), so the estimate is the median of the later ones.
    times: list[float] = []
    while len(times) < len(jobs) and (len(times) < 3 or sum(times) < PROBE_SECONDS):
        start = time.monotonic()
        _preprocess_job(jobs[len(times)])
        times.append(time.monotonic() - start)
    remaining = jobs[len(times):]
    per_case = float(np.median(times[1:])) if len(times) > 1 else times[0]
    if num_workers > 1 and len(remaining) > 1 and per_case * len(remaining) > POOL_WORTH_SECONDS:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(num_workers, len(remaining))) as pool:
            list(pool.imap_unordered(_preprocess_job, remaining))
    else:
        for job in remaining:
            _preprocess_job(job)
    return folder


def _cached(properties_file: Path, item: dict) -> bool:
    """A case is cached when its properties (written last) record the current source files' stamp."""
    if not properties_file.is_file():
        return False
    return json.loads(properties_file.read_text()).get("sources") == source_stamp(item)


def _preprocess_job(job):
    item, plan, foreground_labels, ignore_label, folder = job
    folder = Path(folder)
    sources = source_stamp(item)  # taken before reading, so that a file edited meanwhile is read again next time
    data, seg, spacing = load_case(channel_files(item["image"]), item.get("label"), ignore_label)
    if ignore_label is not None and seg is not None and not np.any(seg != ignore_label):
        raise ValueError(f"{item['label']}: case {item['case']} has no annotated voxel (all of it is the ignore "
                         "label); annotate part of it or leave it out of training")
    data, seg, props = preprocess_case(data, spacing, plan, seg)
    seg = seg.astype(np.int8 if seg.max() <= 127 else np.int16)
    if "prev" in item:
        previous = load_case([item["prev"]])[0]
        _save_npy_atomic(folder / f"{item['case']}_prev.npy",
                         preprocess_previous_stage(previous, props, plan).astype(np.int16))
    locations = foreground_locations(seg, foreground_labels, np.random.RandomState(LOCATION_SEED), ignore_label)
    _save_npy_atomic(folder / f"{item['case']}_data.npy", data)
    _save_npy_atomic(folder / f"{item['case']}_seg.npy", seg)
    tmp = folder / f".{item['case']}_locations.{os.getpid()}.npz"
    np.savez(tmp, **locations)
    os.replace(tmp, folder / f"{item['case']}_locations.npz")
    props["case"], props["sources"] = item["case"], sources
    text = json.dumps(props)
    tmp = folder / f".{item['case']}.{os.getpid()}.json"
    tmp.write_text(text)
    os.replace(tmp, folder / f"{item['case']}.json")  # written last: marks the case complete


def _preprocess_once(data, plans, configuration, cache_root, foreground_labels, ignore_label, num_workers) -> Path:
    """Under DDP only rank 0 preprocesses; the others wait for it, then find every case cached."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
    folder = preprocess_to_cache(data, plans, configuration, cache_root, foreground_labels, ignore_label, num_workers)
    if distributed and torch.distributed.get_rank() == 0:
        torch.distributed.barrier()
    return folder


# --- patch sampling --------------------------------------------------------------------------------------------
def initial_patch_size(patch_size, rotation_max: float, dummy_2d: bool = False) -> list[int]:
    """The enlarged patch cut before rotation/scaling so that the centre crop has no empty corners (spec 5.4).

    The patch's extent vector is rotated by the largest angle (capped at 90 degrees) about each axis in turn, as a row
    vector times the rotation matrix; the elementwise maximum of the absolute extents is divided by 0.85.
    """
    if dummy_2d:  # rotation happens in-plane only; the slice axis keeps its size
        return [int(patch_size[0])] + initial_patch_size(patch_size[1:], rotation_max)
    angle = min(abs(rotation_max), np.pi / 2)
    c, s = np.cos(angle), np.sin(angle)
    coords = np.array(patch_size, dtype=np.float64)
    if len(coords) == 3:
        rotations = [np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
                     np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])]
    else:
        rotations = [np.array([[c, -s], [s, c]])]
    shape = coords.copy()
    for rotation in rotations:
        shape = np.maximum(shape, np.abs(coords @ rotation))
    shape = (shape / 0.85).astype(int)
    return [int(v) for v in shape]


def rank_batch(global_batch_size: int, oversample_foreground: float, rank: int, world_size: int) -> tuple[int, float]:
    """(batch size, oversampling share) of one DDP rank, as nnU-Net splits the plan's batch over the ranks.

    The ranks' batches add up to the plan's: each gets ``global // world_size`` samples and the first
    ``global % world_size`` ranks one more (9 on 2 ranks: 5 + 4). Rank ``r`` holds consecutive samples of the
    global batch, and its share of forced-foreground samples is how many of those a single process would force
    (sample ``j`` iff ``j >= round(global * (1 - oversample))``), so the ranks together force exactly as many.
    """
    if not 0 <= rank < world_size or global_batch_size < world_size:
        raise ValueError(f"a batch of {global_batch_size} cannot be split over {world_size} ranks (rank {rank})")
    sizes = [global_batch_size // world_size + (r < global_batch_size % world_size) for r in range(world_size)]
    start = sum(sizes[:rank])
    first_forced = round(global_batch_size * (1 - oversample_foreground))
    forced = sum(j >= first_forced for j in range(start, start + sizes[rank]))
    return sizes[rank], forced / sizes[rank]


class PatchDataset(torch.utils.data.Dataset):
    """Random patches from the preprocessing cache, nnU-Net style: ``length`` samples in all.

    The bundles size it for the whole run (epochs x iterations x batch) and let the engine's ``epoch_length`` cut
    the epochs, so one loader iterator, and the prefetching of its workers, carries on across epoch boundaries.

    ``data`` is a datalist (``[{"image": [channel files], "label": file, "case"?: id}]``, the form MONAI Label passes
    as ``train#dataset#data``); missing cases are preprocessed into ``cache_root`` first (rank 0 only under DDP).
    Sample ``i`` is forced onto a random foreground class when ``i % batch_size >= round(batch_size * 0.67)``, so
    with ``shuffle=False`` exactly nnU-Net's share of every batch is foreground-centred. 2-D configurations cut a
    random slice (or the slice of the chosen foreground voxel) and drop the slice axis.

    With an ignore label (sparse annotation) the other samples are centred on a random annotated voxel, as nnU-Net
    and the DIAG fork's ``nnUNetTrainerV2Sparse`` do; ``sparse_sampling=False`` draws them anywhere instead (the
    fork's ``nnUNetTrainerV2SparseNormalSampling``). ``foreground_labels`` may hold regions (lists of labels): a
    forced sample then picks a region, as nnU-Net does for region-based training.

    Every random draw of sample ``i`` (case, patch position, and the augmentations of ``transform``, reseeded per
    sample) comes from a generator seeded with ``(seed, i + offset)``, so a sample is the same whichever worker makes
    it and whenever: a resumed run sets ``offset`` to the samples already trained on (``ResumeSampling``) and draws
    exactly what the interrupted run would have drawn next. ``seed`` defaults to torch's initial seed.
    """

    def __init__(self, data: list[dict], plans: dict, configuration: str, cache_root, foreground_labels: list,
                 patch_size, final_patch_size, batch_size: int, length: int, oversample_foreground: float = 0.33,
                 transform=None, two_d: bool = False, ignore_label: int | None = None, num_workers: int = 0,
                 sparse_sampling: bool = True, seed: int | None = None):
        data = [dict(item, case=case_of(item)) for item in data]
        self.cache_dir = _preprocess_once(data, plans, configuration, cache_root, foreground_labels, ignore_label,
                                          num_workers)
        self.cases = [item["case"] for item in data]
        self.patch_size = [int(p) for p in patch_size]
        self.final_patch_size = [int(p) for p in final_patch_size]
        self.batch_size = int(batch_size)
        self.length = int(length)
        self.first_forced = round(self.batch_size * (1 - oversample_foreground))
        self.transform = transform
        self.two_d = two_d
        self.ignore_label = ignore_label
        self.sparse_sampling = sparse_sampling
        self.seed = int(torch.initial_seed() if seed is None else seed) % 2**63
        self.offset = 0
        self.rng = np.random.default_rng(self.seed)

    def __len__(self):
        return self.length

    def _load(self, case: str):
        data = np.load(self.cache_dir / f"{case}_data.npy", mmap_mode="r")
        seg = np.load(self.cache_dir / f"{case}_seg.npy", mmap_mode="r")
        with np.load(self.cache_dir / f"{case}_locations.npz") as z:
            locations = {k: z[k] for k in z.files}
        previous = self.cache_dir / f"{case}_prev.npy"
        previous = np.load(previous, mmap_mode="r") if previous.is_file() else None
        return data, seg, previous, locations

    def _pick_voxel(self, locations: dict, key: str | None = None):
        """A stored voxel of ``key``, or of a random class (the ``annotated`` key only if no class has voxels)."""
        classes = [key] if key else [k for k, v in locations.items() if len(v) and k != "annotated"]
        if not classes and len(locations.get("annotated", ())):
            classes = ["annotated"]
        if not classes or not len(locations[classes[0]]):
            return None
        coords = locations[classes[self.rng.integers(len(classes))]]
        return coords[self.rng.integers(len(coords))]

    def _crop(self, data, seg, center, previous=None):
        shape = data.shape[1:]
        patch = self.patch_size
        need = [max(p - f, 0) for p, f in zip(patch, self.final_patch_size)]
        need = [max(n, p - s) for n, p, s in zip(need, patch, shape)]
        lower = [-n // 2 for n in need]
        upper = [s + n // 2 + n % 2 - p for s, n, p in zip(shape, need, patch)]
        if center is None:
            start = [int(self.rng.integers(lo, hi + 1)) for lo, hi in zip(lower, upper)]
        else:
            start = [max(lo, int(c) - p // 2) for lo, c, p in zip(lower, center, patch)]
        image = np.zeros((data.shape[0], *patch), np.float32)
        label = np.full((1, *patch), -1, np.int16)
        src = tuple(slice(max(b, 0), min(b + p, s)) for b, p, s in zip(start, patch, shape))
        dst = tuple(slice(max(b, 0) - b, min(b + p, s) - b) for b, p, s in zip(start, patch, shape))
        image[(slice(None),) + dst] = data[(slice(None),) + src]
        label[(slice(None),) + dst] = seg[(slice(None),) + src]
        if previous is None:
            return image, label, None
        prev = np.zeros((1, *patch), np.float32)
        prev[(slice(None),) + dst] = previous[(slice(None),) + src]
        return image, label, prev

    def __getitem__(self, index: int):
        index = int(index) + self.offset
        self.rng = np.random.default_rng([self.seed, index])
        case = self.cases[self.rng.integers(len(self.cases))]
        data, seg, previous, locations = self._load(case)
        forced = index % self.batch_size >= self.first_forced
        if forced:
            voxel = self._pick_voxel(locations)
        elif self.ignore_label is not None and self.sparse_sampling:  # centre ordinary samples on annotated voxels
            voxel = self._pick_voxel(locations, "annotated")
        else:
            voxel = None
        if self.two_d:
            z = int(voxel[0]) if voxel is not None else int(self.rng.integers(data.shape[1]))
            data, seg = data[:, z], seg[:, z]
            voxel = voxel[1:] if voxel is not None else None
        image, label, prev = self._crop(data, seg, voxel, previous)
        # labels travel as float32 so that interpolating and non-interpolating augmentations batch together
        item = {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.float32)), "case": case}
        if prev is not None:
            item["prev"] = torch.from_numpy(prev)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.rng.integers(2**32)))
        return self.transform(item) if self.transform is not None else item


def shutdown_workers(loader) -> None:
    """Ends the worker processes of a ``DataLoader``'s persistent iterator, which it keeps between passes."""
    batches = getattr(loader, "_iterator", None)
    if batches is not None and hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()
    loader._iterator = None


class RollingBatches:
    """``epoch_length`` batches per pass, drawn from one long-lived iterator over ``loader``.

    An engine run again every epoch (the validation) would restart its loader each time, and the workers would
    start on the next batches only then. Drawing from one iterator lets them fill their prefetch queue while
    training goes on, as nnU-Net's background validation augmenter does. ``loader`` should hold at least one
    pass per run (the bundles size the validation dataset for every epoch); when it runs out it is restarted.
    """

    def __init__(self, loader, epoch_length: int):
        self.loader = loader
        self.epoch_length = int(epoch_length)
        self._batches = None

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self):
        for _ in range(self.epoch_length):
            self.start()
            try:
                yield next(self._batches)
            except StopIteration:
                self._batches = iter(self.loader)
                yield next(self._batches)

    def start(self) -> None:
        """Starts the loader's workers now (the first pass would otherwise start them)."""
        if self._batches is None:
            self._batches = iter(self.loader)

    def release(self) -> None:
        """Ends the loader's workers; a later pass starts new ones."""
        self._batches = None
        shutdown_workers(self.loader)


class PreviousStageToChannelsd(MapTransform):
    """Cascade: the (augmented) previous-stage label map becomes one-hot channels appended to the image."""

    def __init__(self, keys, image_key: str = "image", labels=(), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.labels = list(labels)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            previous = torch.as_tensor(np.asarray(d.pop(key)))
            channels = torch.from_numpy(one_hot(np.rint(previous.numpy()), self.labels))
            d[self.image_key] = torch.cat([torch.as_tensor(d[self.image_key]), channels])
        return d
