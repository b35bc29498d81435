"""Cleanup pass: drop Identity, inference Dropout, no-op Cast, dead nodes and duplicate initializers."""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase
from onnxscript.rewriter.rules.common import no_op_cast_rule


class InferenceDropout(RewriteRuleClassBase):
    """Dropout(x[, ratio[, training_mode]]) -> Identity(x) when training_mode is absent or a constant false:
    at inference Dropout passes x through, and its mask output must be unused."""

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_) -> MatchResult:
        result = MatchResult()
        node = out.producer()
        if len(node.outputs) > 1 and node.outputs[1].uses():
            return result.fail("the dropout mask is used")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            training = node.inputs[2].const_value
            if training is None or bool(training.numpy().item()):
                return result.fail("training_mode is not a constant false")
        return result

    def rewrite(self, op, x, out, **_):
        return op.Identity(x)


CLEANUP_RULES = RewriteRuleSet([InferenceDropout().rule(), no_op_cast_rule])


def op_counts(model: onnx.ModelProto | ir.Model) -> Counter:
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    return Counter(node.op_type for node in nodes)


def removed(before: Counter, after: Counter, op: str, what: str) -> list[str]:
    gone = before[op] - after[op]
    return [f"removed {gone} {what}"] if gone > 0 else []


def with_nodes(model: onnx.ModelProto, nodes: list, new_initializers: list) -> onnx.ModelProto:
    """A copy of `model` whose graph runs `nodes`, with `new_initializers` added and the initializers nothing reads
    any more dropped (a rewrite that replaced a node leaves its old weights behind)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_initializers)
    used = {t for node in out.graph.node for t in node.input}
    kept = [init for init in out.graph.initializer if init.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def cleanup(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The cleaned model and what changed, one line per kind of change."""
    graph = ir.serde.deserialize_model(model)
    start = op_counts(graph)
    CLEANUP_RULES.apply_to_model(graph)  # Dropout / no-op Cast -> Identity
    ir_passes.IdentityEliminationPass()(graph)
    after_rules = op_counts(graph)
    nodes_before_dce = len(graph.graph)
    ir_passes.RemoveUnusedNodesPass()(graph)
    dead = nodes_before_dce - len(graph.graph)
    initializers = len(graph.graph.initializers)
    ir_passes.DeduplicateInitializersPass()(graph)
    ir_passes.RemoveUnusedNodesPass()(graph)  # also drops initializers nothing reads any more
    duplicates = initializers - len(graph.graph.initializers)
    changes = (
        removed(start, after_rules, "Dropout", "inference Dropout")
        + removed(start, after_rules, "Cast", "no-op Cast")
        + removed(start, after_rules, "Identity", "Identity")
        + ([f"removed {dead} dead node(s)"] if dead else [])
        + ([f"dropped {duplicates} duplicate or unused initializer(s)"] if duplicates > 0 else [])
    )
    return ir.serde.serialize_model(graph), changes
