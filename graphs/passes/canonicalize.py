"""Canonicalisation pass: rewrite library layouts of a dense layer into Gemm, then name every node of the tower
by its role, `cross/<layer>/<op>`, `deep/<layer>/<op>`, `head/<layer>/<op>` (`entry/<op>` for a fused entry).

Roles come from branch analysis (structure only), so Keras-style MatMul + Add kernels, TorchRec's kernels and
the dynamo exporter's graphs get the same names. In a serial tower nothing but the cross network consumes x0;
there the exporter's module scopes (`pkg.torch.onnx.name_scopes`), when present, tell the MLP from the head.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    matmul_add_to_gemm_rule,
    transpose_b_matmul_add_to_gemm_rule,
)

from graphs.branches import BranchReport, analyze

DENSE_LAYOUT_RULES = RewriteRuleSet(
    [*transpose_b_matmul_add_to_gemm_rule.commute(), *matmul_add_to_gemm_rule.commute()]
)
MATMUL_OPS = {"Gemm", "MatMul"}
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _layer_numbers(nodes: list[onnx.NodeProto], members: set[int]) -> dict[int, int]:
    """Within one branch, a node's layer is the number of Gemm/MatMul before it on its longest path, so a Relu
    belongs to the Gemm that feeds it."""
    producer = {t: i for i in members for t in nodes[i].output if t}
    seen: dict[int, int] = {}
    for i in sorted(members):
        before = max((seen[producer[t]] for t in nodes[i].input if t in producer), default=0)
        seen[i] = before + (nodes[i].op_type in MATMUL_OPS)
    return {i: max(count - 1, 0) for i, count in seen.items()}


def _is_deep_scope(node: onnx.NodeProto) -> bool:
    scopes = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), "")
    return any(part.strip(" '\"").split(".")[-1] == "deep" for part in scopes.strip("[]").split(","))


def role_names(model: onnx.ModelProto, report: BranchReport) -> dict[int, str]:
    """Node index -> canonical name, for every node of the cross branch, the deep branch and the head."""
    nodes = list(model.graph.node)
    index = {n.name or f"{n.op_type}#{i}": i for i, n in enumerate(nodes)}
    prefix: dict[int, str] = {}
    in_layers: set[int] = set()
    for layer in report.cross_layers:
        for name in layer.nodes:
            if name in index and name not in report.entry_nodes:
                prefix[index[name]] = f"cross/{layer.index}"
                in_layers.add(index[name])
    for name in report.entry_nodes:
        prefix[index[name]] = "entry"
    groups = {"cross/mlp": {index[n] for n in report.cross_nodes} - in_layers, "head": {index[n] for n in report.head_nodes}}
    groups["deep"] = {index[n] for n in report.deep_nodes}
    if not report.parallel:  # serial: the exporter's scopes, where present, tell the MLP after the cross from the head
        after = groups["head"]
        groups["deep"] = {i for i in after if _is_deep_scope(nodes[i])}
        groups["head"] = after - groups["deep"]
    for group, members in groups.items():
        for i, layer in _layer_numbers(nodes, members).items():
            prefix[i] = f"{group}/{layer}"
    names, used = {}, Counter()
    for i in sorted(prefix):
        base = f"{prefix[i]}/{nodes[i].op_type}"
        used[base] += 1
        names[i] = base if used[base] == 1 else f"{base}_{used[base] - 1}"
    return names


def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The canonical model and what changed."""
    graph = ir.serde.deserialize_model(model)
    rewritten = DENSE_LAYOUT_RULES.apply_to_model(graph)
    model = ir.serde.serialize_model(graph)
    changes = [f"rewrote {rewritten} MatMul + Add dense layer(s) as Gemm"] if rewritten else []
    report = analyze(model)
    if report.structure == "none":
        return model, changes + ["no cross layer found: nodes keep their names"]
    names = role_names(model, report)
    renamed = 0
    for i, name in names.items():
        if model.graph.node[i].name != name:
            model.graph.node[i].name = name
            renamed += 1
    roles = Counter(name.split("/")[0] for name in names.values())
    changes.append(
        f"named {len(report.cross_layers)} cross layer(s) on x0 {report.x0!r} ({report.structure}); "
        + ", ".join(f"{role}: {count} node(s)" for role, count in sorted(roles.items()))
        + f"; {renamed} renamed"
    )
    return model, changes
