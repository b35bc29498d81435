"""Cross/deep concurrency of a parallel tower on CUDA, and the GPU's MatMul peaks for context (scripts/gpu/check.sh).

The cross network and the MLP of each tower of a dcnc checkpoint are timed alone and together on one x0, in
torch, interleaved (toolkit.backends.timing) with CUDA events: t_parallel runs them on two CUDA streams, so
ratio = t_parallel / max(t_cross, t_deep) is 1.0 when the GPU overlaps them fully and (t_cross + t_deep) / max
when it serialises them. The FP32 / FP16 / BF16 peaks of one large MatMul (toolkit.commands.bench.peak) say how
far the tower is from the GPU's roof; a peak the device cannot measure says why.

    python3 scripts/gpu/branches.py CHECKPOINT.pt [--batch 4096] [--device cuda] [--json OUT.json]

--device cpu (the check's dry run) times the same calls on the host clock; there t_parallel is the two
branches one after the other, as one CPU thread runs them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from toolkit.backends.timing import time_interleaved, timer_for
from toolkit.commands.bench.peak import torch_matmul_peak
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs
from toolkit.model.checkpoint import load_checkpoint


def tower_branches(tower, batch: int, device: str, repeats: int = 200, warmup: int = 20) -> dict:
    interaction = tower.interaction
    if interaction.structure != "parallel":
        return {"skipped": f"structure {interaction.structure!r} has no parallel branches"}
    inputs = [torch.from_numpy(v).to(device) for v in random_inputs(tower.input_specs, batch, seed=0).values()]
    with torch.inference_mode():
        x0 = torch.cat(tower.features(inputs), dim=-1)
        if device == "cuda":
            side = torch.cuda.Stream()

            def both():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    interaction.deep(x0)
                interaction.cross(x0)
                torch.cuda.current_stream().wait_stream(side)
        else:

            def both():
                interaction.deep(x0)
                interaction.cross(x0)

        calls = {"cross": lambda: interaction.cross(x0), "deep": lambda: interaction.deep(x0), "parallel": both}
        samples = time_interleaved(calls, warmup, repeats, timer_for(device))
    t = {name: float(np.median(s)) for name, s in samples.items()}
    return {"batch": batch, "t_cross_ms": t["cross"], "t_deep_ms": t["deep"], "t_parallel_ms": t["parallel"],
            "ratio": t["parallel"] / max(t["cross"], t["deep"]),
            "serial_ratio": t["parallel"] / (t["cross"] + t["deep"])}  # fmt: skip


def peaks(device: str, n: int) -> dict:
    result = {}
    for precision in ("fp32", "fp16", "bf16"):
        try:
            result[precision] = torch_matmul_peak(precision, device, n=n).to_dict()
        except DcncError as err:
            result[precision] = {"skipped": str(err)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--peak-n", type=int, default=None, help="MatMul side (default 8192 on cuda, 1024 on cpu)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    model, _, _ = load_checkpoint(args.checkpoint)
    model = model.to(args.device).eval()
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__,
        "towers": {n: tower_branches(t, args.batch, args.device, args.repeats) for n, t in model.towers().items()},
        "peaks": peaks(args.device, args.peak_n or (8192 if args.device == "cuda" else 1024)),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
