"""The `dcnc` command line: thin Typer commands that parse options, call one library function and print."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from toolkit import __version__
from toolkit.core.errors import DcncError, GateFailed, first_line
from toolkit.core.logcapture import LogCapture
from toolkit.core.machine import quiet_openmp
from toolkit.report.terminal import labelled, literal_console

app = typer.Typer(
    name="dcnc",
    help="Deployment compiler for DCNv2 recommender towers: export, build, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = literal_console(stderr=True)
LOG_SETTINGS: dict[str, Any] = {"verbose": False, "log": None}  # set by the global --verbose / --log options
# filesystem states dcnc cannot change (full disk, read-only, permissions): bad environment, exit 2, not a bug
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                      errno.ENAMETOOLONG, errno.EFBIG, errno.EMFILE, errno.ENFILE}


def say(label: str, style: str, text: str) -> None:
    """The one way a message reaches stderr: dcnc's styled label, then `text` exactly as it is (never markup)."""
    console.print(labelled(label, style, text), soft_wrap=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's edge. DcncError -> one red line, exit 2; GateFailed -> its message, exit 1; an environment's
    filesystem error -> one line, exit 2; anything else -> one line naming the log file that holds the traceback,
    exit 3. Library logging is held off the terminal meanwhile (toolkit.core.logcapture)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with LogCapture(LOG_SETTINGS["verbose"]) as capture:
            failure: BaseException | None = None
            try:
                return command(*args, **kwargs)
            except DcncError as err:
                say("error:", "red", str(err))
                raise typer.Exit(err.exit_code) from None
            except GateFailed as err:
                say("FAILED:", "red", str(err))
                raise typer.Exit(err.exit_code) from None
            except KeyboardInterrupt:
                say("interrupted", "yellow", "")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort):
                raise
            except OSError as err:
                if err.errno not in ENVIRONMENT_ERRNOS:
                    failure = err
                    raise typer.Exit(3) from None
                say("error:", "red", f"{err.filename or 'a file'}: {err.strerror or err}")
                raise typer.Exit(2) from None
            except Exception as err:  # a bug in dcnc (or a library it calls): never a traceback on the terminal
                failure = err
                raise typer.Exit(3) from None
            finally:
                _keep_log(capture, failure)

    return wrapper


def _keep_log(capture: LogCapture, failure: BaseException | None) -> None:
    """Write the held log to --log, and on an internal error (to --log, else a new file) with its traceback."""
    path = LOG_SETTINGS["log"]
    if failure is None and path is None:
        return
    try:
        written = capture.write(path, failure)
    except OSError as err:
        written = f"nowhere: the log could not be written ({err.strerror})"
    if failure is not None:
        say("internal error:", "red", f"{type(failure).__name__}: {first_line(failure)[:300]} (traceback in"
            f" {written}); exit 3 means a bug in dcnc, please report it with that file")


def _version(value: bool) -> None:
    if value:
        print(f"dcnc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", help="Also show the libraries' logging and warnings (torch, onnx, onnxruntime) on stderr; without it they are held off the terminal, so a failure prints dcnc's one line."),
    log: str = typer.Option(None, "--log", help="Append the libraries' logging and warnings, and the traceback of an internal error, to this file. Default: an internal error (exit 3) writes a new file under the temp folder's dcnc-logs/ and names it."),
) -> None:
    """Deployment compiler for DCNv2 recommender towers: export, build, verify.

    Exit codes: 0 ok; 1 a gate failed; 2 bad usage or input (one line saying what and where); 3 an internal
    error (one line naming the log file with the traceback).
    """
    LOG_SETTINGS.update(verbose=verbose, log=log)


# --- dcnc export ----------------------------------------------------------------------------------------------
# The default passes for --help, spelled out so `dcnc --help` does not import onnx (tests pin them to the manager's).
EXPORT_DEFAULT_PASSES = ("cleanup", "fold", "canonicalize")
EXPORT_EPILOG = """MODEL forms, with examples:

A dcnc checkpoint (spec + weights; its towers and inputs come with it): `dcnc export runs/example/ranker.pt -o ranker.onnx`; a two-tower model writes a directory: `dcnc export runs/example/two_tower.pt -o towers/` (towers/query.onnx, towers/item.onnx).

A torch.export program saved with torch.export.save (its dynamic dimensions are kept): `dcnc export tower.pt2 -o tower.onnx`.

An import path package.module:factory, the factory returning an nn.Module; dcnc imports it and calls the factory, so this runs your code (run from the folder holding the package, which dcnc adds to the end of sys.path, or install it; PYTHONPATH=. puts the folder first; see SECURITY.md): `dcnc export mypkg.towers:make_ranker --weights ranker_state.pt --input user_id:int64:B:100000 --input dense:float32:B,32 -o ranker.onnx`.

Exit codes: 0 exported and validated; 1 validation failed (the files are kept for inspection); 2 bad input, or an export the exporter cannot do (nothing is written)."""


@app.command(epilog=EXPORT_EPILOG)
@user_errors
def export(
    model: str = typer.Argument(..., help="A dcnc checkpoint .pt, a torch.export program .pt2, or package.module:factory (see the examples below)."),
    out: str = typer.Option(..., "-o", "--out", help="One tower: the .onnx file to write. Several towers: a directory, one <tower>.onnx each."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset, 18 (the exporter's own) up to the newest its converter knows; others are refused."),
    inputs: list[str] = typer.Option(None, "--input", help="Factory models: one input NAME:DTYPE:SHAPE in forward order, B the batch, e.g. x:float32:B,512; integer ids may add :HIGH, e.g. ids:int64:B:1000 (ids below 1000). Repeat per input. Default: the module's input_specs."),
    weights: str = typer.Option(None, "--weights", help="Factory models: a state_dict file loaded strictly (torch.load weights_only=True)."),
    towers: list[str] = typer.Option(None, "--tower", help="Export only this tower (repeatable). Default: every tower."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Run each file in ONNX Runtime beside torch at batch 1 and --validate-batch, on random inputs and on the checkpoint's evaluation rows where it names some."),
    atol: float = typer.Option(None, "--atol", help="Absolute tolerance per element. Default: 1e-5 x the output's scale (its largest |torch value|)."),
    rtol: float = typer.Option(1e-5, "--rtol", help="Relative tolerance per element: pass when |onnx - torch| <= atol + rtol x |torch| (and cosine >= 0.99999 per output)."),
    validate_batch: int = typer.Option(4096, "--validate-batch", help="The large batch validated beside batch 1."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    passes: str = typer.Option("default", "--passes", help=f"Graph passes run on each tower before it is saved and validated: default = {', '.join(EXPORT_DEFAULT_PASSES)}; gpu = default + fuse_entry; none = the exporter's own graph; or pass names separated by commas, run in that order. What each pass did (node counts, changes) is kept in the file's metadata, dcnc.passes."),
) -> None:
    """Export a trained model's towers to ONNX (dynamic batch, deterministic, with dcnc metadata) and validate them against PyTorch."""
    from graphs.export import pass_pipeline
    from toolkit.commands.export import export_model
    from toolkit.evaluate.validate import ParityFailed
    from toolkit.model.loading import load_model
    from toolkit.report.export import export_table, pass_lines, worst_table

    pipeline = pass_pipeline(passes)  # an unknown pass is refused before the model loads
    loaded = load_model(model, inputs, weights)
    for note in loaded.notes:
        say("note:", "yellow", note)
    try:
        results = export_model(loaded, out, opset, validate, atol, rtol, towers, force, validate_batch, pipeline)
    except ParityFailed as failed:
        literal_console().print(worst_table(failed.checks))
        raise
    literal_console().print(export_table(results, f"exported {loaded.source} (opset {opset})"))
    for line in pass_lines(results):
        literal_console().print(line, highlight=False, soft_wrap=True)


# --- dcnc verify ----------------------------------------------------------------------------------------------
def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise DcncError(f"{option} {text!r}: expected positive integers separated by commas, e.g. 1,64,512")
    return values


@app.command()
@user_errors
def verify(
    reference: str = typer.Argument(..., help="The PyTorch original: a checkpoint .pt, a .pt2 program or package.module:factory."),
    bundle: str = typer.Argument(..., help="The bundle directory `dcnc build` wrote."),
    inputs: list[str] = typer.Option(None, "--input", help="Factory references: the inputs NAME:DTYPE:SHAPE[:HIGH] in forward order, as given to `dcnc export` (repeatable)."),
    weights: str = typer.Option(None, "--weights", help="Factory references: the state_dict file given to `dcnc export --weights`."),
    data: str = typer.Option(None, "--data", help="Evaluation .npz (retrieval: query/*, item/*, relevance; ranking: inputs, label). Default: the split the checkpoint names."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where both sides run and are timed."),
    report: str = typer.Option(None, "--report", help="Write the JSON report (schema dcnc.verify/1) here."),
    junit: str = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per gate) here."),
    markdown: str = typer.Option(None, "--markdown", help="Write a Markdown summary here."),
    html: str = typer.Option(None, "--html", help="Write a self-contained HTML report here (charts inline, opens offline)."),
    gates: str = typer.Option(None, "--gates", help="TOML gates file: precision and a [gates] table of thresholds."),
    baseline: str = typer.Option(None, "--baseline", help="An earlier JSON report: fail if a speedup dropped by more than the two runs' noise together (at most 25%)."),
    k: str = typer.Option("1,10,100", "--k", help="K values for recall@K and agreement@K."),
    batch_sizes: str = typer.Option("1,64,512", "--batch-sizes", help="Latency batch sizes (those outside the bundle's profile are skipped)."),
    iterations: int = typer.Option(50, "--iterations", help="Timed rounds per batch size (reference and candidate alternate call by call)."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed rounds per batch size first."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency."),
    latency_ci: float = typer.Option(0.10, "--latency-ci", help="Widest 95% interval of a speedup, relative to it, that is reported as a figure; wider is 'inconclusive' and fails latency gates."),
    latency_budget: float = typer.Option(3.0, "--latency-budget", help="Seconds of extra rounds per batch size allowed to narrow a wider interval (0: none)."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads of both sides while timing (default: the cores other work leaves free at the start)."),
    require_quality: bool = typer.Option(False, "--require-quality", help="Refuse data without relevance pairs or labels (exit 2) instead of verifying numeric parity and latency only."),
    branches: bool = typer.Option(True, "--branches/--no-branches", help="Also time the cross and deep branch subgraphs (CPU)."),
    cosine_min: float = typer.Option(None, "--cosine-min", help="Gate: lowest per-sample cosine, at least."),
    rel_l2: float = typer.Option(None, "--rel-l2", help="Gate: relative L2 error, at most."),
    max_abs: float = typer.Option(None, "--max-abs", help="Gate: largest absolute error, at most."),
    recall_ratio: float = typer.Option(None, "--recall-ratio", help="Gate: candidate / reference recall@K, at least (relaxed where the data cannot resolve it, never below the precision's floor)."),
    agreement: float = typer.Option(None, "--agreement", help="Gate: agreement@K of the two top-K lists, at least."),
    auc_diff: float = typer.Option(None, "--auc-diff", help="Gate: |AUC difference|, at most."),
    logloss_diff: float = typer.Option(None, "--logloss-diff", help="Gate: |log loss difference|, at most."),
    min_speedup: float = typer.Option(None, "--min-speedup", help="Gate: the paired median speedup over the reference, at least, judged only when conclusive (off by default)."),
    latency_tolerance: float = typer.Option(None, "--latency-tolerance", help="With --baseline: smallest regression flagged (default 0.02)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar (corpus embedding, latency sweep)."),
    corpus: str = typer.Option(None, "--corpus", help="Retrieval: take the items from this corpus (Parquet file or folder, or .npz, as `dcnc embed` reads) instead of --data's item/*; --data then holds query/* and relevance as (query row, corpus item id). Both sides embed every item; exact top-K is searched shard by shard and merged."),
    engine: str = typer.Option("local", "--engine", help="With --corpus: local (this process) or ray (Ray Data actors embed and search shares of the corpus; merged here)."),
    address: str = typer.Option(None, "--address", help="With --engine ray: the cluster to join. Default: a local Ray."),
    concurrency: int = typer.Option(None, "--concurrency", help="With --engine ray: the actors. Default as `dcnc embed`."),
    num_gpus: float = typer.Option(None, "--num-gpus", help="With --engine ray: GPUs per actor. Default as `dcnc embed`."),
    id_column: str = typer.Option("id", "--id-column", help="With --corpus: the corpus column holding item ids (integers)."),
) -> None:
    """Check a bundle against its PyTorch original: parity, recall@K or AUC, and latency; exit 1 if a gate fails."""
    quiet_openmp()  # before torch loads: OpenMP reads its wait policy once
    from toolkit.commands.embed.command import EngineOptions
    from toolkit.commands.verify import Corpus
    from toolkit.commands.verify import verify as run_verify
    from toolkit.evaluate.latency import LatencyPolicy
    from toolkit.evaluate.verify import VerifyOptions
    from toolkit.report import verify as reports

    options = VerifyOptions(ks=_ints(k, "--k"), batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                            iterations=iterations, warmup=warmup, latency=latency, progress=not quiet,
                            policy=LatencyPolicy(latency_ci, latency_budget), threads=threads)
    overrides = {"cosine_min": cosine_min, "rel_l2": rel_l2, "max_abs": max_abs, "recall_ratio": recall_ratio,
                 "agreement": agreement, "auc_diff": auc_diff, "logloss_diff": logloss_diff,
                 "min_speedup": min_speedup, "latency_tolerance": latency_tolerance}
    if not corpus and (engine != "local" or address or concurrency or num_gpus):
        raise DcncError("--engine, --address, --concurrency and --num-gpus choose where --corpus is embedded; pass --corpus")
    engine_options = EngineOptions(engine, address, None, concurrency, num_gpus, progress=not quiet)
    written = {"report": report, "junit": junit, "markdown": markdown, "html": html}
    result = run_verify(reference, bundle, data, device, options, gates, overrides, baseline, branches, inputs, weights,
                        require_quality, Corpus(corpus, engine_options, id_column) if corpus else None,
                        outputs=written)  # fmt: skip
    reports.print_summary(result, literal_console())
    if html:
        print(f"HTML report: {html}")
    if not result.passed:
        raise GateFailed(", ".join(g.name for g in result.failed_gates))


# --- dcnc embed ----------------------------------------------------------------------------------------------
EMBED_EPILOG = """ITEMS is a Parquet file or folder (every *.parquet under it; names starting with . or _ skipped) with one column per tower input, named as the input: a [B] input a plain column of its dtype (int64 ids), a [B, d] input a fixed-size list column of d values (pyarrow: pa.list_(pa.float32(), d)); and an id column (--id-column). Or an .npz keyed by input name (loaded whole; ids are row numbers unless it has the id array).

DIR gets shards/*.parquet (the id column, then each tower output as a fixed-size float32 list) and manifest.json (schema dcnc.embed/1: bundle hash, tower, rows, shards with hashes, engine, seconds, items/s). Read it back with pandas.read_parquet("DIR/shards") or ray.data.read_parquet("DIR/shards"). DIR appears whole or not at all: a run that fails or is killed leaves nothing, and the next run clears what a killed one staged. Running again with the same bundle, tower, items and batch size is a no-op.

Examples: `dcnc embed bundles/two_tower --data items/ --out emb/` (this machine, every core); `dcnc embed bundles/two_tower --data items/ --out emb/ --engine ray` (a local Ray cluster); `dcnc embed bundles/trt-fp16 --data /shared/items --out /shared/emb --engine ray --address auto --num-gpus 1 --batch-size 65536` (a GPU cluster: one actor per GPU; paths must be visible to every node). Both engines give identical embeddings. docs/scale.md: sizing a cluster, GPU batch sizes, 1B-item estimates.

Exit codes: 0 written (or already current); 2 bad input: a missing column or wrong type or width, nulls, NaN/Inf, an id outside its embedding table, an empty corpus, an unwritable DIR, a changed bundle, Ray not installed (nothing is written)."""


@app.command(epilog=EMBED_EPILOG)
@user_errors
def embed(
    bundle: str = typer.Argument(..., help="A bundle directory written by `dcnc build`."),
    data: str = typer.Option(..., "--data", help="ITEMS: a Parquet file or folder, or an .npz (see below)."),
    out: str = typer.Option(..., "--out", help="DIR: the output folder (Parquet shards and manifest.json)."),
    tower: str = typer.Option("item", "--tower", help="The bundle's tower to run."),
    engine: str = typer.Option("local", "--engine", help="local: this process, its ONNX Runtime session on every usable core. ray: Ray Data actors, one bundle runner each (pip install 'dcnc[ray]')."),
    address: str = typer.Option(None, "--address", help="ray: the cluster to join (auto, or ray://head:10001). Default: start a local Ray on this machine's cores."),
    batch_size: int = typer.Option(None, "--batch-size", help="Rows per inference call, inside the bundle's batch profile. Default: the profile's largest batch."),
    concurrency: int = typer.Option(None, "--concurrency", help="ray: the number of actors. Default: one per GPU for GPU bundles, else one per CPU but one (Ray Data's read and write tasks need it)."),
    num_gpus: float = typer.Option(None, "--num-gpus", help="ray: GPUs per actor (0.5 packs two actors on a GPU). Default: 1 for ort-cuda and tensorrt bundles, 0 for CPU bundles."),
    id_column: str = typer.Option("id", "--id-column", help="The column of ITEMS carried to the output as each row's id."),
    shard_rows: int = typer.Option(1_000_000, "--shard-rows", help="Rows per output Parquet file, at most."),
    force: bool = typer.Option(False, "--force", help="Replace DIR when it holds something else (an output made from other inputs)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Embed every item of a corpus with a bundle's tower: Parquet shards and a manifest, locally or on Ray."""
    from toolkit.commands.embed.command import EngineOptions
    from toolkit.commands.embed.command import embed as run_embed

    options = EngineOptions(engine, address, batch_size, concurrency, num_gpus, progress=not quiet)
    manifest, current = run_embed(bundle, data, out, tower, options, id_column, shard_rows, force)
    if current:
        print(f"{out}: current ({manifest['rows']:,} rows, made by the {manifest['engine']['name']} engine); nothing to do")
        return
    print(f"{out}: {manifest['rows']:,} rows in {len(manifest['shards'])} shards, {manifest['seconds']:.1f} s,"
          f" {manifest['items_per_s']:,.0f} items/s ({manifest['engine']['name']} engine, batch {manifest['engine']['batch_size']})")


# --- dcnc build -----------------------------------------------------------------------------------------------
BUILD_EPILOG = """int8 on CPU (--backend ort): the calibration rows are split in half; the tower is calibrated on one half (outlier smoothing folded into its weights, 8-bit weights on VNNI/AMX) and judged on the other by the FP32 vs INT8 agreement of what it exists for. The cross layers run on uint8 when that meets --min-agreement, else in float, then layers are kept FP32 (most sensitive first) until it is met; build prints every point tried with its measured speed, and manifest.json keeps them. Examples: `dcnc build runs/export -o runs/int8 --precision int8 --calib runs/example` (default target 0.99); `... --min-agreement 0` (plain INT8, fastest); `... --int8-isa avx2` (build on a VNNI machine for AVX2 servers)."""


@app.command(epilog=BUILD_EPILOG)
@user_errors
def build(
    model: str = typer.Argument(..., help="An exported tower .onnx, or a directory of <tower>.onnx (one bundle entry each)."),
    out: str = typer.Option(..., "-o", "--out", help="The bundle directory to write (refused if it exists, unless --force)."),
    backend: str = typer.Option("ort", "--backend", help="ort (ONNX Runtime, CPU), ort-cuda (needs onnxruntime-gpu) or tensorrt (needs tensorrt 10/11 and a GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16, bf16 or int8, decided in the ONNX by its lowering. fp16/bf16: half everywhere except the nodes whose activations on --calib data leave the type's safe range (max finite / 8), and the output tail; without --calib the conservative default keeps the whole cross branch and the head FP32. int8: Q/DQ from --calib ranges."),
    calib: str = typer.Option(None, "--calib", help="Calibration data: .npz keyed by input name, .npy (one input), a folder (per-tower <tower>_calib.npz, or .npz shards) or dataset:NAME. Required by int8; chooses fp16/bf16's FP32 nodes."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="int8 activation ranges: minmax, entropy (KL on 2048-bin histograms) or percentile (99.99)."),
    calib_samples: int = typer.Option(None, "--calib-samples", help="Draw this many calibration rows (seeded, deterministic); default all."),
    int8_target: str = typer.Option(None, "--int8-target", help="int8 number formats: cpu (uint8 activations, int8 weights: integer Gemm kernels) or tensorrt (symmetric int8, per-channel weights). Default: tensorrt for --backend tensorrt, else cpu; build a tensorrt-target graph with --backend ort to check on CPU what the GPU will run."),
    keep_fp32: list[str] = typer.Option(None, "--keep-fp32", help="int8: leave this node in float (repeatable), e.g. the keep_fp32 list of `dcnc calibrate --eval`'s sensitivity.json."),
    int8_isa: str = typer.Option(None, "--int8-isa", help="cpu int8: the CPU level to build for, avx2, avx512, avx-vnni, avx512-vnni or amx (default: this CPU's). VNNI and AMX keep 8-bit weights; below, 7 bits (their u8 x s8 kernel sums products in int16). Recorded in the manifest; verify warns on another CPU."),
    min_agreement: float = typer.Option(None, "--min-agreement", help="cpu int8 (default 0.99): held-out agreement to meet (agreement@100 of each held-out calibration row's nearest neighbours for an embedding tower, the share of score pairs in the same order for a scoring tower; a bundle's n embedding towers each get 1/n of 1 - this). Fewest layers kept FP32 to meet it; refused with the best point when it cannot be met. 0: plain INT8, nothing kept FP32."),
    batch: str = typer.Option(None, "--batch", help="Batch profile MIN:OPT:MAX (or one N); TensorRT builds for it, runners refuse batches outside it. Default: 1:256:4096, or the one batch a fixed-shape graph takes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output (rebuild it)."),
    threads: int = typer.Option(None, "--threads", help="ORT intra-op threads (default: the cores this process may use)."),
    ort_opt_level: str = typer.Option("all", "--ort-opt-level", help="ORT graph optimisation: disable, basic, extended or all."),
    save_optimized: bool = typer.Option(False, "--save-optimized", help="ORT: also save its optimised graph (loads faster; tied to this ORT version and CPU, marked non-portable)."),
    device_id: int = typer.Option(0, "--device-id", help="CUDA device for ort-cuda and tensorrt."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="ort-cuda / tensorrt: capture one CUDA graph per batch size and replay it. Where onnxruntime cannot capture a tower (a node off the CUDA provider), the bundle records it off, with ORT's reason."),
    allow_tf32: bool = typer.Option(False, "--allow-tf32", help="ort-cuda / tensorrt: let FP32 MatMul/Gemm compute in TF32 (inputs rounded to 10-bit mantissas; off by default, as the fp32 gates and the FP32 torch reference expect). Recorded in the manifest."),
    trt_opt_level: int = typer.Option(3, "--trt-opt-level", help="TensorRT builder optimisation level 0-5 (higher builds longer)."),
    max_aux_streams: int = typer.Option(2, "--max-aux-streams", help="TensorRT auxiliary streams, so the cross and deep branches run concurrently (-1: TensorRT decides)."),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="TensorRT: an engine later TensorRT versions of the same major can run."),
    hardware_compat: str = typer.Option("none", "--hardware-compat", help="TensorRT: none (this GPU's compute capability), ampere_plus or same_compute_capability."),
    workspace: int = typer.Option(None, "--workspace", help="TensorRT builder workspace limit in MiB (default: TensorRT's)."),
    timing_cache: str = typer.Option(None, "--timing-cache", help="TensorRT timing cache kept across builds (rebuilt when its TensorRT version or GPU differ)."),
) -> None:
    """Lower exported tower graphs to a precision and build them into one bundle (ONNX, engine, caches, manifest.json)."""
    from toolkit.backends.ort.loader import OrtOptions
    from toolkit.backends.tensorrt.config import TrtOptions
    from toolkit.commands.build import build_bundle, parse_batch

    manifest = build_bundle(
        model, out, backend=backend, precision=precision, calib=calib, batch=parse_batch(batch) if batch else None,
        force=force,
        ort_options=OrtOptions(threads=threads, opt_level=ort_opt_level, device_id=device_id, cuda_graph=cuda_graph,
                               allow_tf32=allow_tf32),
        trt_options=TrtOptions(
            opt_level=trt_opt_level, max_aux_streams=None if max_aux_streams < 0 else max_aux_streams,
            version_compatible=version_compatible, hardware_compat=hardware_compat, workspace_mib=workspace,
            device_id=device_id, cuda_graph=cuda_graph, allow_tf32=allow_tf32,
        ),
        save_optimized=save_optimized, timing_cache=timing_cache, int8_target=int8_target,
        calib_method=calib_method, calib_samples=calib_samples, keep_fp32=tuple(keep_fp32 or ()), int8_isa=int8_isa,
        min_agreement=min_agreement, progress=lambda line: console.print(f"  {line}", soft_wrap=True),
    )
    towers = ", ".join(manifest.towers)
    profile = ":".join(str(manifest.batch[k]) for k in ("min", "opt", "max"))
    print(f"{out}: {manifest.backend} {manifest.precision} bundle, towers {towers}, batch {profile}")
    if manifest.options.get("cuda_graph_refused"):
        print(f"  CUDA graphs off: {manifest.options['cuda_graph_refused']}")
    for tower, entry in manifest.towers.items():
        if entry.lowering:
            print(f"  {tower}: {entry.lowering.summary()}")
            for line in getattr(entry.lowering, "curve", lambda: [])():
                print(f"    {line}")


@app.command()
@user_errors
def calibrate(
    model: str = typer.Argument(..., help="The FP32 tower graph (.onnx) to calibrate."),
    calib: str = typer.Option(..., "--calib", help="Calibration data: .npz keyed by input name, .npy (one-input graphs), a folder of .npz shards, or dataset:NAME."),
    out: str = typer.Option(..., "--out", help="Folder for calibration.json (reused when graph, data and method match)."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax | entropy (KL, 2048-bin histograms) | percentile."),
    calib_samples: int = typer.Option(None, "--calib-samples", help="Use this many samples, drawn with --seed (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --calib-samples draw."),
    percentile: float = typer.Option(99.99, "--percentile", help="Percentile of |x| kept by --calib-method percentile."),
    trt_table: bool = typer.Option(False, "--trt-table", help="Also write calibration.trt.cache, TensorRT's calibration table (implicit INT8, TensorRT <= 10)."),
    trt_version: str = typer.Option(None, "--trt-version", help="TensorRT version the table is for (default: the installed tensorrt)."),
    eval_data: str = typer.Option(None, "--eval", help="Run sensitivity analysis on this .npz of tower inputs (+ optional 'label' for AUC); writes sensitivity.json."),
    target: str = typer.Option("cpu", "--target", help="INT8 target the sensitivity analysis quantizes for: cpu | tensorrt."),
    granularity: str = typer.Option("layer", "--granularity", help="Sensitivity units: node | layer | branch."),
    min_metric_ratio: float = typer.Option(0.999, "--min-metric-ratio", help="Keep the fewest units in FP32 so that INT8 metric / FP32 metric reaches this."),
) -> None:
    """Calibrate a tower graph for INT8: activation ranges into a keyed cache, optionally a TensorRT table and a sensitivity curve."""
    from toolkit.commands.calibrate import analyse_sensitivity
    from toolkit.commands.calibrate import calibrate as run_calibration

    summary = run_calibration(
        model, calib, out, calib_method, calib_samples, seed, percentile, trt_table, trt_version, progress=True,
        eval_data=eval_data,
    )
    state = "reused" if summary["reused"] else "written"
    print(f"{summary['cache']}: {state} ({summary['tensors']} tensors, {summary['samples']} samples, {calib_method})")
    if "tensorrt_table" in summary:
        print(f"{summary['tensorrt_table']}: TensorRT calibration table")
    if eval_data is not None:
        report = analyse_sensitivity(
            model, calib, eval_data, out, calib_method, target, granularity, min_metric_ratio,
            calib_samples, seed, percentile, progress=lambda line: console.print(line, soft_wrap=True),
        )  # fmt: skip
        print(f"{report.metric}: FP32 {report.fp32_metric:.4f}; FP32 units kept -> ratio, latency (FP32 {report.fp32_latency_ms:.2f} ms)")
        for point in report.curve:
            print(f"  {len(point.kept):3d}  {point.ratio:.4f}  {point.latency_ms:.2f} ms  {', '.join(point.kept[-1:])}")
        verdict = "met" if report.met else "NOT met"
        print(f"target {min_metric_ratio} {verdict}; keep in FP32: {report.keep_fp32 or 'nothing'}")


# --- dcnc train -----------------------------------------------------------------------------------------------
@app.command()
@user_errors
def train(
    dataset: str = typer.Option("synthetic", "--dataset", help="synthetic (generated from --seed: 2000 users, 1000 items, latent tastes) or movielens (MovieLens-100K)."),
    data_dir: str = typer.Option(None, "--data-dir", help="movielens only: folder with u.data, u.item, u.user (or RecBole's ml-100k.inter/.item/.user). Default: the copy inside `pip install --no-deps recbole==1.2.1`."),
    family: str = typer.Option("all", "--family", help="retrieval (two_tower.toml), ranking (ranker.toml) or all."),
    out: str = typer.Option("runs/example", "--out", help="Folder for <model>.pt, <model>_eval.npz and <tower>_calib.npz (each written atomically)."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs for every family (default: retrieval 4, ranking 4)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the synthetic data, the 80/20 split, initialisation and shuffling."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train the example models on CPU and save checkpoints with a held-out eval split and calibration samples.

    Cardinalities and dense widths of the example specs are set from the dataset. The checkpoints are what
    `dcnc export` / `build` / `verify` take; verify finds the eval split through the checkpoint.
    """
    from rich.table import Table

    from toolkit.example.train import FAMILIES, train_examples

    if family not in (*FAMILIES, "all"):
        raise DcncError(f"--family must be one of {[*FAMILIES, 'all']}, got {family!r}")
    result = train_examples(out, dataset, data_dir, FAMILIES if family == "all" else (family,), epochs, seed, quiet)
    table = Table(title=f"held-out metrics ({result['dataset']}, seed {seed})")
    for column in ("model", "checkpoint", "metric", "value", "train s"):
        table.add_column(column)
    for name in FAMILIES:
        if name in result:
            trained = result[name]
            for metric, value in trained["metrics"].items():
                table.add_row(name, trained["checkpoint"], metric, f"{value:.4f}", f"{trained['seconds']:.1f}")
    literal_console().print(table)


# --- dcnc run -------------------------------------------------------------------------------------------------
RUN_EPILOG = """Without PIPELINE.toml: the built-in example (toolkit/example/pipeline.toml): the example two-tower and ranker, trained on synthetic data into OUT/<model>/train/ when missing, each built for ONNX Runtime CPU in fp32, fp16 and int8 and verified. Copy that file to write your own (the keys are described in toolkit/commands/run/pipeline.py).

Stages whose inputs hash as before and whose outputs are intact are skipped ("current"): changing one target rebuilds only it, a changed checkpoint redoes everything after it; --force redoes all.

Writes OUT/<model>/<target>/{bundle/, report.json, report.md, junit.xml}, OUT/summary.json (schema dcnc.run/1) and OUT/report.html (every target on one page).

Exit codes: 0 every gate passed; 1 a gate failed (after every target ran); 2 bad pipeline file or input."""


@app.command(epilog=RUN_EPILOG)
@user_errors
def run(
    pipeline: str = typer.Argument(None, help="Pipeline TOML: the model, export options, targets and verify settings. Default: the built-in example."),
    out: str = typer.Option("runs/pipeline", "-o", "--out", help="Folder for every stage's output, stamps and summary.json."),
    force: bool = typer.Option(False, "--force", help="Redo every stage even when it is current."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the summary (no progress)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary JSON to stdout instead of the table."),
) -> None:
    """The whole job in one command: train-if-needed, export, build every target, verify each; one summary."""
    quiet_openmp()  # before torch loads: OpenMP reads its wait policy once
    import json

    from toolkit.commands.run.pipeline import load_pipeline
    from toolkit.commands.run.stages import run_pipeline
    from toolkit.report.runsummary import print_summary

    def progress(line: str) -> None:
        console.print(line, soft_wrap=True)

    summary = run_pipeline(load_pipeline(pipeline), out, force=force, quiet=quiet, say=None if quiet else progress)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, literal_console())  # LOG_WIDTH wide in CI logs: no wrapping
    failed = [f"{t['model']}/{t['target']}" for t in summary["targets"] if not t["passed"]]
    if failed:
        raise GateFailed(f"{len(failed)} of {len(summary['targets'])} target(s): {', '.join(failed)}")


@app.command()
@user_errors
def inspect(
    model: str = typer.Argument(..., help="Any ONNX file: dcnc's or another exporter's."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON (adds precision per node)."),
) -> None:
    """Opset, inputs/outputs, op counts, parameters and FLOPs per sample per branch, branch structure, precision, Q/DQ."""
    from graphs.inspect import format_inspection, inspect_model, inspection_json

    info = inspect_model(model)
    print(inspection_json(info) if as_json else format_inspection(info))


# --- dcnc package ---------------------------------------------------------------------------------------------
PACKAGE_EPILOG = """Writes REPO/<model>/config.pbtxt and REPO/<model>/1/model.onnx (platform onnxruntime_onnx, for ort and ort-cuda bundles) or 1/model.plan (tensorrt_plan), one model per tower, named <bundle name>_<tower>. The config carries max_batch_size (the profile's max), dynamic batching preferring its opt batch, instance groups (KIND_CPU for ort, KIND_GPU otherwise), and the settings the bundle was verified with (ORT graph optimisation level, sequential executor, threads; CUDA graphs for TensorRT). Other models in REPO are kept.

No ensemble: a retrieval bundle's query tower answers requests while its item tower embeds the corpus offline for the ANN index, so the two never run in one request; a ranking or projection tower is already one graph from features to its heads. Each tower is its own model.

Example: `dcnc build towers/ -o bundles/two_tower --batch 1:256:4096 && dcnc package bundles/two_tower --triton models/` then `tritonserver --model-repository models/`.

Exit codes: 0 written; 2 not a bundle or a changed one, a model that exists (without --force), an unwritable REPO, or a tower Triton cannot batch (nothing is written)."""


@app.command(epilog=PACKAGE_EPILOG)
@user_errors
def package(
    bundle: str = typer.Argument(..., help="A bundle directory written by `dcnc build`."),
    triton: str = typer.Option(..., "--triton", help="The Triton model repository to write the models into (created if missing)."),
    name_prefix: str = typer.Option(None, "--name-prefix", help="Model names are <prefix>_<tower> (default prefix: the bundle directory's name)."),
    instances: int = typer.Option(1, "--instances", help="Model instances (per GPU for GPU bundles)."),
    max_queue_delay_us: int = typer.Option(100, "--max-queue-delay-us", help="How long the dynamic batcher may hold a request to form a larger batch, in microseconds."),
    force: bool = typer.Option(False, "--force", help="Replace models of the same name already in the repository."),
) -> None:
    """Package a bundle for serving: a Triton Inference Server model repository, one model per tower."""
    from toolkit.commands.package import package_triton

    models = package_triton(bundle, triton, name_prefix, instances, max_queue_delay_us, force)
    for model in models:
        print(f"{triton}/{model.name}: {model.platform}, tower {model.tower}")


# --- dcnc bench -----------------------------------------------------------------------------------------------
@app.command()
@user_errors
def bench(
    model: str = typer.Argument(..., help="A dcnc checkpoint .pt, a torch.export program .pt2, or package.module:factory."),
    towers: list[str] = typer.Option(None, "--tower", help="Time only this tower (repeatable). Default: every tower."),
    runners: str = typer.Option(None, "--runners", help="Comma-separated runners: eager, compile, aot, ort-fp32, ort-fp16, ort-int8 (cpu); ort-cuda-fp32, ort-cuda-fp16, tensorrt-fp32, tensorrt-fp16, tensorrt-int8 (cuda). Default cpu: eager,compile,ort-fp32,ort-fp16,ort-int8; cuda: eager,compile and the ort-cuda and tensorrt ones."),
    aot: bool = typer.Option(False, "--aot", help="Also time AOTInductor (torch._inductor.aoti_compile_and_package; tens of seconds per tower on a small CPU, cached)."),
    bundles: list[str] = typer.Option(None, "--bundle", help="Also time this existing bundle (repeatable); refused unless check_bundle accepts it."),
    calib: str = typer.Option(None, "--calib", help="INT8 calibration data: a .npz, or a folder with <tower>_calib.npz. Default: the files the checkpoint names beside it."),
    batch_sizes: str = typer.Option("1,64,256,4096", "--batch-sizes", help="The batch sweep."),
    iterations: int = typer.Option(100, "--iterations", help="Timed interleaved rounds per batch size."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed rounds per batch size first."),
    threads: int = typer.Option(None, "--threads", help="torch and ORT intra-op threads (default: the cores this process may use)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (torch on CUDA, ORT CUDA and TensorRT bundles, timed with CUDA events)."),
    out: str = typer.Option("runs/bench", "--out", help="Cache folder for exported graphs, bundles built on the fly and AOT packages."),
    peak_n: int = typer.Option(None, "--peak-n", help="Side of the square MatMul whose measured peak results are read against (default 1024 on cpu, 8192 on cuda)."),
    json_path: str = typer.Option(None, "--json", help="Write the full report (schema dcnc.bench/1) here."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no table."),
) -> None:
    """Benchmark a model's towers across runtimes over a batch sweep, interleaved: p50/p90/p99, throughput, speedup over torch eager, % of the measured MatMul peak."""
    quiet_openmp()  # before torch loads: OpenMP reads its wait policy once
    from toolkit.commands.bench.benchmark import (
        BenchOptions,
        bench_tables,
        parse_runners,
        run_bench,
    )

    options = BenchOptions(
        batch_sizes=_ints(batch_sizes, "--batch-sizes"), iterations=iterations, warmup=warmup, threads=threads,
        device=device, runners=parse_runners(runners), aot=aot, towers=tuple(towers or ()), calib=calib,
        bundles=tuple(bundles or ()), out=out, peak_n=peak_n, json=json_path,
    )
    report = run_bench(model, options, progress=not quiet)
    if not quiet:
        for table in bench_tables(report):
            literal_console().print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
