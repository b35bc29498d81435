"""The example trainer: fit the example specs to a dataset, train them on CPU, and write each checkpoint with its
held-out eval file and calibration samples.

- retrieval (`two_tower.toml`): in-batch softmax over L2-normalised embeddings with a temperature, optionally
  with logQ correction (subtract log of each in-batch item's training frequency, so popular items are not
  over-penalised as negatives); duplicates of the positive item in a batch are masked out.
- ranking (`ranker.toml`): binary cross-entropy, rating >= 4 positive.

Output folder (default runs/example): two_tower.pt, two_tower_eval.npz, query_calib.npz, item_calib.npz,
ranker.pt, ranker_eval.npz, ranker_calib.npz (formats in toolkit.example.data.evalsplit). Each checkpoint's `extra`
holds dataset, eval_data and calib_data (file names relative to its folder), the held-out metrics measured in
torch, and `key`: a hash of spec, data, seed and training settings that ensure_examples compares.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.core.errors import DcncError
from toolkit.core.paths import FOLDER, check_outputs, output
from toolkit.core.progress import StepBar
from toolkit.evaluate.metrics import auc, logloss, recall_at_k
from toolkit.example.data import load_dataset
from toolkit.example.data.evalsplit import (
    Split,
    calibration_sample,
    event_inputs,
    labels,
    ranking_eval,
    retrieval_eval,
    save_npz,
    split_interactions,
)
from toolkit.example.data.interactions import Interactions
from toolkit.model.checkpoint import read_checkpoint, save_checkpoint
from toolkit.model.spec import ModelSpec
from toolkit.model.zoo.families import TwoTower, build_model

FAMILIES = ("retrieval", "ranking")
EXAMPLES = {"retrieval": "two_tower", "ranking": "ranker"}  # family -> example spec and checkpoint name
EVAL_FRACTION = 0.2
CALIBRATION_ROWS = 2048
KEY_VERSION = 1  # bump when training changes in a way that makes old checkpoints stale


@dataclass
class TrainConfig:
    """Optimisation settings. temperature and logq apply to retrieval only."""

    epochs: int
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    temperature: float = 0.05
    logq: bool = False


DEFAULT_CONFIGS = {
    "retrieval": TrainConfig(epochs=4, batch_size=512, lr=3e-3, temperature=0.05, logq=True),
    "ranking": TrainConfig(epochs=4, batch_size=512, lr=2e-3, weight_decay=1e-5),
}


def example_spec(name: str) -> ModelSpec:
    """One of the example specs shipped in toolkit/example (two_tower, ranker, engagement)."""
    source = resources.files("toolkit.example") / f"{name}.toml"
    if not source.is_file():
        raise DcncError(f"no example spec {name!r} in toolkit/example")
    with resources.as_file(source) as path:
        return ModelSpec.load(path)


def fit_spec_to_data(spec: ModelSpec, data: Interactions) -> ModelSpec:
    """A copy of `spec` with every sparse feature's cardinality and every dense feature's dim taken from `data`.

    A retrieval query tower may read only user features and the item tower only item features; a ranking or
    projection tower reads both. A projection sequence of item history gets cardinality num_items + 1 (0 pads).
    """
    fitted = copy.deepcopy(spec)
    both = data.user_features | data.item_features
    sides = {"query": data.user_features, "item": data.item_features} if spec.family == "retrieval" else {}
    for tower_name, tower in fitted.towers.items():
        table = sides.get(tower_name, both)
        side = {"query": "user", "item": "item"}.get(tower_name, "user or item")
        for feature in tower.sparse + tower.dense:
            if feature.name not in table:
                raise DcncError(
                    f"spec {spec.name or spec.family}: towers.{tower_name} reads {feature.name!r}, which is not a"
                    f" {side} feature of dataset {data.name} ({sorted(table)})"
                )
        for feature in tower.sparse:
            if table[feature.name].dtype != np.int64:
                raise DcncError(f"towers.{tower_name}: {feature.name!r} is a dense feature in {data.name}, not sparse")
            feature.cardinality = data.cardinalities[feature.name]
        for feature in tower.dense:
            if table[feature.name].ndim != 2:
                raise DcncError(f"towers.{tower_name}: {feature.name!r} is a sparse feature in {data.name}, not dense")
            feature.dim = int(table[feature.name].shape[1])
    if fitted.sequence is not None:
        fitted.sequence.cardinality = data.num_items + 1
    fitted.validate(f"spec {spec.name or spec.family} fitted to {data.name}")
    return fitted


def run_key(spec: ModelSpec, data: Interactions, seed: int, config: TrainConfig) -> str:
    """What a checkpoint was made from: spec, data, seed, training settings and split; a changed key means retrain."""
    made_from = {
        "version": KEY_VERSION,
        "spec": spec.to_dict(),
        "dataset": data.name,
        "data": data.fingerprint(),
        "seed": seed,
        "config": dataclasses.asdict(config),
        "eval_fraction": EVAL_FRACTION,
        "calibration_rows": CALIBRATION_ROWS,
    }
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]


def _start(family: str, data: Interactions, spec: ModelSpec | None, config: TrainConfig | None, seed: int):
    """What both recipes start from: the spec fitted to the data, the config, the seeded split and model."""
    spec = fit_spec_to_data(spec or example_spec(EXAMPLES[family]), data)
    split = split_interactions(data, EVAL_FRACTION, seed)
    torch.manual_seed(seed)
    return spec, config or DEFAULT_CONFIGS[family], split, build_model(spec)


def train_two_tower(
    data: Interactions,
    out_dir: str | Path,
    *,
    spec: ModelSpec | None = None,
    config: TrainConfig | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Train the retrieval example (or `spec`) on `data`; write two_tower.pt, its eval and calibration files.
    Returns paths, held-out recall@10 / recall@100 and the training time."""
    spec, config, split, model = _start("retrieval", data, spec, config, seed)
    query_names = [s.name for s in model.query.input_specs]
    item_names = [s.name for s in model.item.input_specs]
    users = _tensors(data.user_features, query_names)
    items = _tensors(data.item_features, item_names)
    train_users = torch.from_numpy(data.user[split.train])
    train_items = torch.from_numpy(data.item[split.train])
    frequency = np.bincount(data.item[split.train], minlength=data.num_items) / len(split.train)
    log_q = torch.from_numpy(np.log(np.maximum(frequency, 1e-9))).float()

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        user, item = train_users[batch], train_items[batch]
        query = model.query(*[users[n][user] for n in query_names])
        candidate = model.item(*[items[n][item] for n in item_names])
        logits = query @ candidate.T / config.temperature
        if config.logq:
            logits = logits - log_q[item][None, :]
        duplicate = (item[:, None] == item[None, :]) & ~torch.eye(len(item), dtype=torch.bool)
        return F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), torch.arange(len(item)))

    seconds = _fit(model, loss_fn, len(split.train), config, seed, "two_tower", quiet)

    evaluation = retrieval_eval(data, split.held_out, query_names, item_names)
    metrics = _retrieval_metrics(model, evaluation, query_names, item_names)
    calibration = {
        "query": calibration_sample(data, split.train, query_names, CALIBRATION_ROWS, seed),
        "item": calibration_sample(data, split.train, item_names, CALIBRATION_ROWS, seed + 1),
    }
    return _write_outputs(out_dir, "two_tower", model, spec, data, split, config, seed, evaluation, calibration,
                          metrics, seconds)  # fmt: skip


def train_ranker(
    data: Interactions,
    out_dir: str | Path,
    *,
    spec: ModelSpec | None = None,
    config: TrainConfig | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Train the ranking example (or `spec`) on `data` with BCE (rating >= 4 positive); write ranker.pt, its eval
    and calibration files. Returns paths, held-out AUC and log loss, and the training time."""
    spec, config, split, model = _start("ranking", data, spec, config, seed)
    names = [s.name for s in model.input_specs]
    train = {n: torch.from_numpy(a) for n, a in event_inputs(data, split.train, names).items()}
    target = torch.from_numpy(labels(data, split.train))

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        logit, _ = model(*[train[n][batch] for n in names])
        return F.binary_cross_entropy_with_logits(logit, target[batch])

    seconds = _fit(model, loss_fn, len(split.train), config, seed, "ranker", quiet)

    evaluation = ranking_eval(data, split.held_out, names)
    with torch.no_grad():
        logit, _ = model.eval()(*[torch.from_numpy(evaluation[n]) for n in names])
    metrics = {"auc": auc(evaluation["label"], logit.numpy()), "logloss": logloss(evaluation["label"], logit.numpy())}
    calibration = {"ranker": calibration_sample(data, split.train, names, CALIBRATION_ROWS, seed)}
    return _write_outputs(out_dir, "ranker", model, spec, data, split, config, seed, evaluation, calibration,
                          metrics, seconds)  # fmt: skip


TRAINERS: dict[str, Callable[..., dict]] = {"retrieval": train_two_tower, "ranking": train_ranker}


def train_examples(
    out_dir: str | Path = "runs/example",
    dataset: str = "synthetic",
    data_dir: str | Path | None = None,
    families: Iterable[str] = FAMILIES,
    epochs: int | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Train the example models of `families` on `dataset` and write them to `out_dir`.

    epochs: overrides every family's default (retrieval 4, ranking 4). seed: drives data generation (synthetic),
    the split, initialisation and shuffling. Returns {"out_dir", "dataset", family: result of its trainer}.
    """
    return _examples(out_dir, dataset, data_dir, families, epochs, seed, quiet, only_if_stale=False)


def ensure_examples(
    out_dir: str | Path = "runs/example",
    dataset: str = "synthetic",
    data_dir: str | Path | None = None,
    families: Iterable[str] = FAMILIES,
    epochs: int | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Like train_examples, but train a family only when its checkpoint or files are missing or its stored key
    (spec, dataset, seed, settings) differs from the one these arguments give. result[family]["trained"] says."""
    return _examples(out_dir, dataset, data_dir, families, epochs, seed, quiet, only_if_stale=True)


def _examples(out_dir, dataset, data_dir, families, epochs, seed, quiet, only_if_stale: bool) -> dict:
    families = list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise DcncError(f"family must be one of {list(FAMILIES)}, got {unknown or families}")
    if epochs is not None and epochs < 1:
        raise DcncError(f"epochs must be >= 1, got {epochs}")
    out_dir = Path(out_dir)
    check_outputs([output(out_dir, "--out", FOLDER)], [data_dir])
    data = load_dataset(dataset, data_dir, seed)
    result: dict = {"out_dir": str(out_dir), "dataset": data.name}
    for family in families:
        config = DEFAULT_CONFIGS[family]
        if epochs is not None:
            config = dataclasses.replace(config, epochs=epochs)
        spec = fit_spec_to_data(example_spec(EXAMPLES[family]), data)
        current = _current(out_dir / f"{EXAMPLES[family]}.pt", run_key(spec, data, seed, config))
        if only_if_stale and current is not None:
            result[family] = current | {"trained": False}
            continue
        trained = TRAINERS[family](data, out_dir, spec=spec, config=config, seed=seed, quiet=quiet)
        result[family] = trained | {"trained": True}
    return result


def _current(checkpoint: Path, key: str) -> dict | None:
    """The stored result of a checkpoint made with `key` whose eval and calibration files all exist, else None."""
    if not checkpoint.is_file():
        return None
    try:
        extra = read_checkpoint(checkpoint).get("extra", {})
    except DcncError:
        return None  # unreadable: retrain over it
    folder = checkpoint.parent
    files = [extra.get("eval_data", "")] + list(extra.get("calib_data", {}).values())
    if extra.get("key") != key or not all(name and (folder / name).is_file() for name in files):
        return None
    return _result(checkpoint, extra)


def _result(checkpoint: Path, extra: dict) -> dict:
    folder = checkpoint.parent
    return {
        "checkpoint": str(checkpoint),
        "eval_data": str(folder / extra["eval_data"]),
        "calib_data": {tower: str(folder / name) for tower, name in extra["calib_data"].items()},
        "metrics": extra["metrics"],
        "seconds": extra["train_seconds"],
    }


def _tensors(table: dict[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(table[n]) for n in names}


def _fit(model, loss_fn, rows: int, config: TrainConfig, seed: int, label: str, quiet: bool) -> float:
    """Adam over shuffled mini-batches of `rows` training interactions, with a progress bar unless quiet; the
    seconds it took."""
    started = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-rows // config.batch_size)
    model.train()
    loss_field = {"loss": "loss {task.fields[loss]:.4f}"}
    with StepBar(config.epochs * steps, enabled=not quiet, fields=loss_field) as bar:
        for epoch in range(config.epochs):
            bar.describe(f"{label} epoch {epoch + 1}/{config.epochs}")
            for batch in torch.randperm(rows, generator=generator).split(config.batch_size):
                loss = loss_fn(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.done(loss=loss.item())
    model.eval()
    return time.perf_counter() - started


@torch.no_grad()
def _retrieval_metrics(model: TwoTower, evaluation: dict, query_names: list[str], item_names: list[str]) -> dict:
    """recall@10 and recall@100 of exact top-K by dot product, computed from the eval arrays as saved."""
    query = model.query(*[torch.from_numpy(evaluation[f"query/{n}"]) for n in query_names])
    corpus = model.item(*[torch.from_numpy(evaluation[f"item/{n}"]) for n in item_names])
    k = min(100, corpus.shape[0])
    ranked = torch.topk(TwoTower.score(query, corpus), k, dim=1).indices.numpy()
    recall = recall_at_k(ranked, evaluation["relevance"], [top for top in (10, 100) if top <= k])
    return {f"recall@{top}": value for top, value in recall.items()}


def _write_outputs(out_dir, name, model, spec, data, split: Split, config, seed, evaluation, calibration,
                   metrics, seconds) -> dict:  # fmt: skip
    """Eval and calibration files first, the checkpoint last: a checkpoint on disk implies its files are there."""
    out_dir = Path(out_dir)
    eval_name = f"{name}_eval.npz"
    save_npz(out_dir / eval_name, evaluation)
    calib_names = {tower: f"{tower}_calib.npz" for tower in calibration}
    for tower, arrays in calibration.items():
        save_npz(out_dir / calib_names[tower], arrays)
    extra = {
        "dataset": data.name,
        "eval_data": eval_name,
        "calib_data": calib_names,
        "metrics": metrics,
        "key": run_key(spec, data, seed, config),
        "seed": seed,
        "train_config": dataclasses.asdict(config),
        "train_seconds": round(seconds, 3),
        "num_train": int(len(split.train)),
        "num_eval": int(len(split.held_out)),
    }
    checkpoint = out_dir / f"{name}.pt"
    save_checkpoint(model, spec, checkpoint, extra=extra)
    return _result(checkpoint, extra)
