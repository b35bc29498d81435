"""Benchmark (not a test) of `dcnc embed` at corpus scale, for docs/scale.md.

On a corpus of --items items synthesised from the example's item feature distributions (the 1000 real items of
the synthetic dataset keep their ids 0..999; the rest draw item_id uniformly, item_genre from its empirical
shares and item_profile from a Gaussian with the real profiles' mean and covariance):

- items/s and peak memory of `dcnc embed` with the example item tower: the local engine (ORT fp32 and int8
  bundles) and the Ray engine (int8, a local Ray cluster on this machine's cores), against torch eager running the
  same checkpoint through the same streamed Parquet reader and writer. Every run is its own process, the modes
  interleaved round by round. Peak memory is the largest proportional set size (PSS, so pages shared between
  processes count once) of the whole process tree (Ray's GCS, raylet and workers included), sampled every 0.2 s.
- recall@100 / @1000 parity of the example two-tower's INT8 bundle against PyTorch over the whole corpus
  (`dcnc verify --corpus`), the example's held-out queries and relevance.

    .venv/bin/python scripts/bench_embed.py [--items 1000000] [--rounds 2] [--out runs/scale]

The example checkpoint comes from runs/example (trained by `dcnc train` when missing); bundles, corpus and
outputs go to --out. Prints a Markdown table and writes --out/bench_embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DCNC = [sys.executable, "-m", "cli"]


def dcnc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*DCNC, *map(str, args)], cwd=ROOT, check=check, text=True, capture_output=True)


def prepare(out: Path, example: Path) -> dict[str, Path]:
    """The example checkpoint, its ONNX towers and ORT fp32 / int8 bundles (batch up to 4096), built once."""
    checkpoint = example / "two_tower.pt"
    if not checkpoint.exists():
        dcnc("train", "--family", "retrieval", "--out", example, "--quiet")
    if not (out / "onnx").exists():
        dcnc("export", checkpoint, "-o", out / "onnx")
    bundles = {}
    for precision in ("fp32", "int8"):
        bundles[precision] = out / f"ort-{precision}"
        if not bundles[precision].exists():
            calib = ["--calib", example] if precision == "int8" else []
            dcnc("build", out / "onnx", "-o", bundles[precision], "--precision", precision, "--batch", "1:4096:4096", *calib)
    return {"checkpoint": checkpoint, **bundles}


def synthesise_corpus(out: Path, example: Path, items: int, seed: int = 0) -> tuple[Path, Path]:
    """A Parquet folder of `items` items and an eval .npz (the example's queries, relevance by item id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toolkit.commands.embed.items import to_arrow
    from toolkit.example.data.synthetic import GENRES, generate

    folder, evaluation = out / f"items-{items}", out / f"eval-{items}.npz"
    if folder.exists() and evaluation.exists():
        return folder, evaluation
    real = generate(seed=0).item_features  # the data the example was trained on (dcnc train's default seed)
    rng = np.random.default_rng(seed)
    extra = items - len(real["item_id"])
    profile = real["item_profile"].astype(np.float64)
    shares = np.bincount(real["item_genre"], minlength=GENRES) / len(real["item_genre"])
    features = {
        "item_id": np.concatenate([real["item_id"], rng.integers(0, len(real["item_id"]), extra)]),
        "item_genre": np.concatenate([real["item_genre"], rng.choice(GENRES, extra, p=shares)]),
        "item_profile": np.concatenate([
            real["item_profile"],
            rng.multivariate_normal(profile.mean(0), np.cov(profile, rowvar=False), extra).astype(np.float32),
        ]),
    }  # fmt: skip
    table = pa.table({"id": pa.array(np.arange(items, dtype=np.int64)), **{k: to_arrow(v) for k, v in features.items()}})
    staging = out / f".items-{items}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    step = -(-items // 4)
    for n, start in enumerate(range(0, items, step)):
        pq.write_table(table.slice(start, step), staging / f"items-{n}.parquet", row_group_size=65536)
    staging.rename(folder)
    arrays = dict(np.load(example / "two_tower_eval.npz"))
    assert (arrays["item/item_id"] == np.arange(len(arrays["item/item_id"]))).all()  # item row == item id
    np.savez(evaluation, relevance=arrays["relevance"], **{k: v for k, v in arrays.items() if k.startswith("query/")})
    return folder, evaluation


def tree_pss_kib(root: int) -> int:
    """Summed PSS (KiB) of `root` and every process descended from it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def measured(command: list[str]) -> dict:
    """Run `command`; its wall seconds, peak process-tree PSS (MiB) and output."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_pss_kib(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_pss_mib": peak[0] / 1024, "load_1min": load, "stdout": stdout}


class ZeroTower:
    """A runner that answers zeros of the tower's output shape at once: what is left is embed's own reading,
    checking, converting and writing (the CPU work a GPU actor still does per item)."""

    def __init__(self, dim: int):
        self.dim = dim

    def __enter__(self) -> ZeroTower:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def infer(self, feeds: dict) -> dict:
        return {"embedding": np.zeros((len(next(iter(feeds.values()))), self.dim), np.float32)}


def worker(kind: str, checkpoint: str, items: str, out: str, batch: int) -> None:
    """torch: the torch eager baseline, the checkpoint's item tower through embed's own streamed reader and
    writer. io: the same with ZeroTower, embed's per-item cost outside the tower."""
    from toolkit.backends.torch_runner import TorchRunner
    from toolkit.commands.embed.items import open_items
    from toolkit.commands.embed.local import embed_local
    from toolkit.model.checkpoint import load_checkpoint

    model, spec, _ = load_checkpoint(checkpoint)
    source = open_items(items, model.item.input_specs, "id")
    Path(out).mkdir(parents=True)
    start = time.perf_counter()
    with TorchRunner(model.item) if kind == "torch" else ZeroTower(spec.towers["item"].out_dim) as runner:
        rows = embed_local(source, runner, batch, Path(out), 1_000_000, progress=False)
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))


def run_mode(mode: str, made: dict, items: Path, out: Path, batch: int) -> dict:
    target = out / "emb" / mode
    shutil.rmtree(target, ignore_errors=True)
    if mode in ("torch-eager", "io-only"):
        kind = "torch" if mode == "torch-eager" else "io"
        result = measured([sys.executable, __file__, "--worker", kind, str(made["checkpoint"]), str(items), str(target), str(batch)])
        engine = json.loads(result["stdout"].strip().splitlines()[-1])
        seconds, rows = engine["seconds"], engine["rows"]
    else:
        engine_name, precision = mode.split("-")
        result = measured([*DCNC, "embed", str(made[precision]), "--data", str(items), "--out", str(target),
                           "--engine", engine_name, "--batch-size", str(batch), "--quiet"])  # fmt: skip
        manifest = json.loads((target / "manifest.json").read_text())
        seconds, rows = manifest["seconds"], manifest["rows"]
    shutil.rmtree(target, ignore_errors=True)
    return {"mode": mode, "rows": rows, "engine_s": seconds, "items_per_s": rows / seconds,
            "process_items_per_s": rows / result["wall_s"],
            **{k: v for k, v in result.items() if k != "stdout"}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--example", type=Path, default=ROOT / "runs" / "example")
    parser.add_argument("--modes", default="local-fp32,local-int8,ray-int8,torch-eager,io-only")
    parser.add_argument("--no-verify", action="store_true", help="Skip the INT8 recall parity run.")
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "CHECKPOINT", "ITEMS", "OUT", "BATCH"))
    args = parser.parse_args()
    if args.worker:
        kind, checkpoint, items, out, batch = args.worker
        worker(kind, checkpoint, items, out, int(batch))
        return
    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    made = prepare(args.out, args.example)
    items, evaluation = synthesise_corpus(args.out, args.example, args.items)
    runs = []
    modes = args.modes.split(",")
    for round_ in range(args.rounds):
        for mode in modes[round_ % len(modes):] + modes[: round_ % len(modes)]:  # the order rotates each round
            runs.append({"round": round_, **run_mode(mode, made, items, args.out, args.batch)})
            print(json.dumps(runs[-1]), flush=True)
    result = {"machine": {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0))}, "items": args.items,
              "batch": args.batch, "runs": runs}  # fmt: skip
    if not args.no_verify:
        result["verify_int8"] = verify_int8(made, items, evaluation, args.out, args.items)
    (args.out / "bench_embed.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(result)


def verify_int8(made: dict, items: Path, evaluation: Path, out: Path, count: int) -> dict:
    """`dcnc verify --corpus` of the INT8 bundle against PyTorch over the corpus: recall, agreement, gates."""
    report = out / f"verify-int8-{count}.json"
    verified = dcnc("verify", made["checkpoint"], made["int8"], "--data", evaluation, "--corpus", items, "--k", "10,100,1000",
                    "--no-latency", "--no-branches", "--quiet", "--report", report, check=False)  # fmt: skip
    recall = json.loads(report.read_text()) if verified.returncode in (0, 1) else {"error": verified.stderr}
    return {"exit_code": verified.returncode, "seconds": recall.get("seconds"), "retrieval": recall.get("retrieval"),
            "gates": recall.get("gates"), "parity_item": (recall.get("parity") or {}).get("item/embedding")}  # fmt: skip


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def print_table(result: dict) -> None:
    print(f"\n{result['items']:,} items, batch {result['batch']}, {result['machine']['cores']} cores ({result['machine']['cpu']})")
    print("| mode | round | items/s (engine) | items/s (whole process) | wall s | peak PSS MiB | load |")
    print("|---|---|---|---|---|---|---|")
    for run in result["runs"]:
        print(f"| {run['mode']} | {run['round']} | {run['items_per_s']:,.0f} | {run['process_items_per_s']:,.0f} |"
              f" {run['wall_s']:.1f} | {run['peak_pss_mib']:,.0f} | {run['load_1min']:.2f} |")
    verify = result.get("verify_int8") or {}
    if verify.get("retrieval"):
        recall = verify["retrieval"]["recall"]
        print(f"\nINT8 over {verify['retrieval']['items']:,} items (verify exit {verify['exit_code']}):")
        for k in ("10", "100", "1000"):
            print(f"  recall@{k}: torch {recall['reference'][k]:.4f}, int8 {recall['candidate'][k]:.4f},"
                  f" ratio {verify['retrieval']['recall_ratio'][k]:.4f}, agreement {verify['retrieval']['agreement'][k]:.4f}")
        failed = [g["name"] for g in verify["gates"] if not g["passed"]]
        print(f"  gates failed: {failed or 'none'}")


if __name__ == "__main__":
    main()
