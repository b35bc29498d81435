"""The `dcnc` command line: thin Typer commands that parse options, call one library function and print."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from toolkit import __version__
from toolkit.errors import DcncError, GateFailed

app = typer.Typer(
    name="dcnc",
    help="Deployment compiler for DCNv2 recommender towers: export, build, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DcncError into one red line and exit 2, GateFailed into its message and exit 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DcncError as err:
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except GateFailed as err:
            console.print(f"[red]FAILED:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"dcnc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Deployment compiler for DCNv2 recommender towers: export, build, verify."""


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
    data: str = typer.Option(None, "--data", help="Evaluation .npz (retrieval: query/*, item/*, relevance; ranking: inputs, label). Default: the split the checkpoint names."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where both sides run and are timed."),
    report: str = typer.Option(None, "--report", help="Write the JSON report (schema dcnc.verify/1) here."),
    junit: str = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per gate) here."),
    markdown: str = typer.Option(None, "--markdown", help="Write a Markdown summary here."),
    gates: str = typer.Option(None, "--gates", help="TOML gates file: precision and a [gates] table of thresholds."),
    baseline: str = typer.Option(None, "--baseline", help="An earlier JSON report: fail if latency regressed beyond this run's noise."),
    k: str = typer.Option("1,10,100", "--k", help="K values for recall@K and agreement@K."),
    batch_sizes: str = typer.Option("1,64,512", "--batch-sizes", help="Latency batch sizes (those outside the bundle's profile are skipped)."),
    iterations: int = typer.Option(50, "--iterations", help="Timed rounds per batch size."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed rounds per batch size first."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency."),
    branches: bool = typer.Option(True, "--branches/--no-branches", help="Also time the cross and deep branch subgraphs (CPU)."),
    cosine_min: float = typer.Option(None, "--cosine-min", help="Gate: lowest per-sample cosine, at least."),
    rel_l2: float = typer.Option(None, "--rel-l2", help="Gate: relative L2 error, at most."),
    max_abs: float = typer.Option(None, "--max-abs", help="Gate: largest absolute error, at most."),
    recall_ratio: float = typer.Option(None, "--recall-ratio", help="Gate: candidate / reference recall@K, at least."),
    agreement: float = typer.Option(None, "--agreement", help="Gate: agreement@K of the two top-K lists, at least."),
    auc_diff: float = typer.Option(None, "--auc-diff", help="Gate: |AUC difference|, at most."),
    logloss_diff: float = typer.Option(None, "--logloss-diff", help="Gate: |log loss difference|, at most."),
    min_speedup: float = typer.Option(None, "--min-speedup", help="Gate: reference p50 / candidate p50, at least (off by default)."),
    latency_tolerance: float = typer.Option(None, "--latency-tolerance", help="With --baseline: smallest regression flagged (default 0.02)."),
) -> None:
    """Check a bundle against its PyTorch original: parity, recall@K or AUC, and latency; exit 1 if a gate fails."""
    from toolkit import report as reports
    from toolkit.verify import VerifyOptions
    from toolkit.verify import verify as run_verify

    options = VerifyOptions(ks=_ints(k, "--k"), batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                            iterations=iterations, warmup=warmup, latency=latency)
    overrides = {"cosine_min": cosine_min, "rel_l2": rel_l2, "max_abs": max_abs, "recall_ratio": recall_ratio,
                 "agreement": agreement, "auc_diff": auc_diff, "logloss_diff": logloss_diff,
                 "min_speedup": min_speedup, "latency_tolerance": latency_tolerance}
    result = run_verify(reference, bundle, data, device, options, gates, overrides, baseline, branches)
    for path, write in ((report, reports.write_json), (junit, reports.write_junit), (markdown, reports.write_markdown)):
        if path:
            write(result, path)
    reports.print_summary(result, Console())
    if not result.passed:
        raise GateFailed(", ".join(g.name for g in result.failed_gates))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
