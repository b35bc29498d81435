"""The Ray engine: Ray Data reads the items, batches them to actors that each open the bundle's runner once, and
writes the shards (DESIGN.md decision 10: past one machine dcnc runs on Ray Data, not on a scheduler of its own).

Every path (BUNDLE, ITEMS, DIR) must be visible to every node under the same name: a shared file system. Ray is
imported only here and only when `--engine ray` is asked for; without it the one line says how to install it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.commands.embed.items import ItemSource, batch_feeds, outputs_table
from toolkit.commands.embed.local import fixed_batches
from toolkit.commands.embed.output import PARQUET_WRITE
from toolkit.core.errors import DcncError, first_line

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'dcnc[ray]' (or pip install 'ray[data]')"
RAY_LOGS = "Ray's logs: /tmp/ray/session_latest/logs on each node"


def require_ray() -> Any:
    """The ray module with Ray Data, or DcncError with the install hint."""
    try:
        import ray
        import ray.data  # noqa: F401  (the engine needs Data, which `pip install ray` alone lacks)
    except ImportError:
        raise DcncError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None, progress: bool) -> Iterator[Any]:
    """Ray connected: the session this process already has, the cluster at `address`, or a local one started on
    this machine's usable cores (and shut down again at the end)."""
    from toolkit.core.machine import usable_cores

    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        settings = {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address:
                ray.init(address=address, **settings)
            else:
                ray.init(num_cpus=usable_cores(), include_dashboard=False, **settings)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise DcncError(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: {first_line(err)}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress and sys.stderr.isatty()  # off a terminal Ray logs progress line by line
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and the CPUs and GPUs each one holds."""

    concurrency: int
    cpus: int
    gpus: float


def actor_plan(ray: Any, concurrency: int | None, num_gpus: float | None, gpu_bundle: bool) -> ActorPlan:
    """Actors of one CPU (its ORT session gets one thread) and `num_gpus` GPUs; by default one per GPU the
    cluster has for GPU bundles, else one per CPU but one, which Ray Data's read and write tasks need."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    num_gpus = (1.0 if gpu_bundle else 0.0) if num_gpus is None else num_gpus
    if gpu_bundle and num_gpus == 0:
        raise DcncError("the bundle runs on a GPU: give each actor one with --num-gpus (e.g. 1, or 0.5 for two per GPU)")
    if num_gpus and gpus < num_gpus:
        raise DcncError(f"--num-gpus {num_gpus:g} per actor, but the Ray cluster has {gpus:g} GPUs")
    if concurrency is None:
        concurrency = int(gpus // num_gpus) if num_gpus else cpus - 1
    if concurrency < 1 or concurrency > cpus - 1:
        raise DcncError(
            f"the Ray cluster has {cpus} CPUs: actors of one CPU each must leave one for reading and writing,"
            f" so --concurrency must be 1..{cpus - 1}" if cpus > 1 else "the Ray cluster needs at least 2 CPUs"
        )
    return ActorPlan(concurrency, 1, num_gpus)


class FirstError:
    """A Ray actor that keeps the first DcncError an embedding actor met, so the driver can say it in one line
    (Ray Data hands the driver its own wrapper exception with the cause only as traceback text)."""

    def __init__(self) -> None:
        self.message: str | None = None

    def record(self, message: str) -> None:
        self.message = self.message or message

    def first(self) -> str | None:
        return self.message


@contextlib.contextmanager
def reported_to(errors: Any) -> Iterator[None]:
    """Inside an actor: a DcncError raised in the block is recorded with `errors` before it propagates."""
    import ray

    try:
        yield
    except DcncError as err:
        ray.get(errors.record.remote(str(err)))
        raise


@contextlib.contextmanager
def one_line_failures(ray: Any, errors: Any, what: str) -> Iterator[None]:
    """On the driver: any failure of a Ray execution as one DcncError line, the actors' own message where there
    is one (an actor method's DcncError arrives as the `cause` of Ray's RayTaskError; one raised inside Ray Data
    was recorded with `errors`)."""
    try:
        yield
    except Exception as err:  # Ray wraps whatever happened remotely in its own exception types
        cause = getattr(err, "cause", err)  # a RayTaskError's `cause` is the exception the actor raised
        message = str(cause) if isinstance(cause, DcncError) else None
        if message is None and errors is not None:
            message = ray.get(errors.first.remote())
        raise DcncError(message or f"{what} failed on Ray: {first_line(err)} ({RAY_LOGS})") from None


class TowerEmbedder:
    """Ray Data's callable class: each actor opens the bundle's tower runner once and embeds the batches given to
    it, every call at exactly `batch` rows (see local.fixed_batches)."""

    def __init__(self, bundle: str, tower: str, source: dict[str, Any], batch: int, threads: int, errors: Any):
        from toolkit.backends.bundle import check_bundle, tower_runner

        self.source, self.batch, self.errors = source, batch, errors
        with reported_to(errors):
            self.runner = tower_runner(bundle, check_bundle(bundle), tower, threads)
            self.runner.activate()

    def __call__(self, table: Any) -> Any:
        with reported_to(self.errors):
            ids, feeds = batch_feeds(table, self.source["specs"], self.source["id_column"], self.source["where"])
            return outputs_table(self.source["id_column"], ids, fixed_batches(self.runner, feeds, self.batch))


def item_dataset(ray: Any, source: ItemSource) -> Any:
    """The items as a Ray Dataset: Parquet read by Ray Data (ITEMS as one path: a file, or the folder it lists
    itself), an .npz from the table already in memory."""
    if source.table is not None:
        return ray.data.from_arrow(source.table)
    return ray.data.read_parquet(str(source.path.resolve()), columns=source.columns)


def embed_on_ray(
    source: ItemSource, bundle: Path, tower: str, gpu_bundle: bool, batch: int, folder: Path, shard_rows: int,
    address: str | None, concurrency: int | None, num_gpus: float | None, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """read_parquet -> map_batches(TowerEmbedder) -> write_parquet into `folder`; the engine settings used."""
    with ray_cluster(address, progress) as ray:
        plan = actor_plan(ray, concurrency, num_gpus, gpu_bundle)
        errors = ray.remote(num_cpus=0)(FirstError).remote()
        described = {"specs": source.specs, "id_column": source.id_column, "where": str(source.path)}
        dataset = item_dataset(ray, source).map_batches(
            TowerEmbedder,
            fn_constructor_kwargs={"bundle": str(bundle.resolve()), "tower": tower, "source": described,
                                   "batch": batch, "threads": plan.cpus, "errors": errors},
            compute=ray.data.ActorPoolStrategy(size=plan.concurrency),
            batch_size=batch, batch_format="pyarrow", num_cpus=plan.cpus, num_gpus=plan.gpus or None,
        )  # fmt: skip
        with one_line_failures(ray, errors, "embedding"):
            dataset.write_parquet(str(folder.resolve()), max_rows_per_file=shard_rows, **PARQUET_WRITE)
        return {"address": address or "local", "concurrency": plan.concurrency, "cpus_per_actor": plan.cpus,
                "gpus_per_actor": plan.gpus, "cluster": {k: v for k, v in ray.cluster_resources().items()
                                                         if k in ("CPU", "GPU", "memory", "object_store_memory")}}  # fmt: skip
