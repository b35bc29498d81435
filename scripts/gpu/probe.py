"""The GPU check's first look (scripts/gpu/check.sh, step "probe"): does onnxruntime really run on the GPU, and
what does TF32 do to an FP32 tower?

torch is imported before onnxruntime, so the CUDA runtime, cuBLAS and cuDNN of torch's nvidia wheels are
loaded when the CUDA provider needs them. A real session is then opened on a tower graph through dcnc's session
factory, which keeps it only if its first provider is the CUDA provider (get_available_providers() lists what
was compiled in, not what works). The same rows run with TF32 off (dcnc's default) and on, each compared with
the torch reference in full FP32.

    python3 scripts/gpu/probe.py CHECKPOINT.pt TOWER.onnx [--tower query] [--batch 4096] [--json OUT.json]
    python3 scripts/gpu/probe.py ... --dry-run      # ONNX Runtime's CPU provider, torch on CPU

dcnc's packages must be importable (pip install -e ., or PYTHONPATH=. as check.sh sets it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch  # first: see above

# isort: split
import onnxruntime

from toolkit.backends.ort.loader import OrtOptions, ort_session
from toolkit.backends.ort.runner import OrtRunner
from toolkit.backends.torch_runner import TorchRunner
from toolkit.core.errors import DcncError
from toolkit.core.signature import random_inputs
from toolkit.evaluate.parity import ParityAccumulator
from toolkit.model.checkpoint import load_checkpoint

FP32_REL_L2_GATE = 1e-4  # toolkit.evaluate.gates' fp32 default


def tf32_parity(checkpoint: Path, onnx_path: Path, tower: str, batch: int, backend: str) -> dict:
    """The session's providers and, for TF32 off and on, rel L2 and worst cosine of every output against torch."""
    # first the question the check exists for: the session refuses to fall back to the CPU provider
    sessions = {allow: ort_session(onnx_path, backend, OrtOptions(allow_tf32=allow)) for allow in (False, True)}
    model, _, _ = load_checkpoint(checkpoint)
    module = model.towers()[tower]
    feed = random_inputs(module.input_specs, batch, seed=0)
    with TorchRunner(module, "cpu" if backend == "ort" else "cuda") as reference:
        want = reference.infer(feed)
    result = {"backend": backend, "tower": tower, "batch": batch, "rel_l2_gate": FP32_REL_L2_GATE,
              "session_providers": sessions[False].get_providers(), "tf32": {}}  # fmt: skip
    for allow, session in sessions.items():
        with OrtRunner(session) as runner:
            got = runner.infer(feed)
        outputs = {}
        for name, expected in want.items():
            stats = ParityAccumulator.of(expected, got[name])
            outputs[name] = {"rel_l2": stats["rel_l2"], "cosine_min": stats["cosine_min"], "max_abs": stats["max_abs"]}
        result["tf32"]["on" if allow else "off"] = outputs
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("onnx", type=Path, help="the tower's exported graph")
    parser.add_argument("--tower", default="query")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dry-run", action="store_true", help="ONNX Runtime's CPU provider and torch on CPU")
    parser.add_argument("--json", dest="json_path", type=Path)
    args = parser.parse_args(argv)

    try:
        parity = tf32_parity(args.checkpoint, args.onnx, args.tower, args.batch, "ort" if args.dry_run else "ort-cuda")
    except DcncError as err:  # e.g. no CUDA provider, or a session that fell back to the CPU: one line
        sys.exit(f"probe: {err}")
    probe = {
        "onnxruntime": {  # the module that runs: onnxruntime-gpu beside a CPU onnxruntime has one metadata name
            "version": onnxruntime.__version__,
            "file": onnxruntime.__file__,
            "device": onnxruntime.get_device(),
            "available_providers": onnxruntime.get_available_providers(),
        },
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **parity,
    }
    text = json.dumps(probe, indent=2)
    print(text)
    if args.json_path:
        args.json_path.write_text(text + "\n")
    return probe


if __name__ == "__main__":
    main()
