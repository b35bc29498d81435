"""Cross/deep concurrency of a parallel tower on CUDA, and the GPU's MatMul peaks for context (issue 8).

The cross network and the MLP of each tower of a dcnc checkpoint are timed alone and together on one x0, in
torch on CUDA with events: t_parallel runs them on two streams, so ratio = t_parallel / max(t_cross, t_deep) is
1.0 when the GPU overlaps them fully and (t_cross + t_deep) / max when it serialises them. The FP16 and BF16
peaks of one large MatMul (toolkit.commands.bench.peak) say how far the tower is from the GPU's roof.

    python3 scripts/gpu/branches.py CHECKPOINT.pt [--batch 4096] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch


def time_ms(call, repeats: int = 200, warmup: int = 20) -> float:
    """Median of `repeats` event-timed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tower_branches(tower, batch: int) -> dict:
    from toolkit.core.signature import random_inputs

    interaction = tower.interaction
    if interaction.structure != "parallel":
        return {"skipped": f"structure {interaction.structure!r} has no parallel branches"}
    inputs = [torch.from_numpy(v).cuda() for v in random_inputs(tower.input_specs, batch, seed=0).values()]
    with torch.inference_mode():
        x0 = torch.cat(tower.features(inputs), dim=-1)
        side = torch.cuda.Stream()

        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                interaction.deep(x0)
            interaction.cross(x0)
            torch.cuda.current_stream().wait_stream(side)

        t = {"cross": time_ms(lambda: interaction.cross(x0)), "deep": time_ms(lambda: interaction.deep(x0)),
             "parallel": time_ms(both)}
    return {"batch": batch, "t_cross_ms": t["cross"], "t_deep_ms": t["deep"], "t_parallel_ms": t["parallel"],
            "ratio": t["parallel"] / max(t["cross"], t["deep"]),
            "serial_ratio": t["parallel"] / (t["cross"] + t["deep"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from toolkit.commands.bench.peak import torch_matmul_peak
    from toolkit.model.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(args.checkpoint)
    model = model.cuda().eval()
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "towers": {name: tower_branches(tower, args.batch) for name, tower in model.towers().items()},
        "peaks": {p: torch_matmul_peak(p, "cuda", n=8192).to_dict() for p in ("fp32", "fp16", "bf16")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
