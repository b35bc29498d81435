"""Branch analysis of a DCN tower graph: find x0, the cross and deep branches and the head, check that the two
branches stay concurrent, and cut each branch out as its own ONNX (toolkit.evaluate.branch_timing times them).

Everything is found from the ONNX alone, structurally, so graphs from any exporter work: a cross layer is an
`Add(P, x_l)` whose product P is (a Mul / ReduceSum chain over) `Mul(x0, q)` with q computed from x_l. The
shared input x0 is the tensor such layers multiply by; the deep branch is what else hangs off x0; the head is
where the two meet.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import onnx

from toolkit.core.errors import DcncError

# Ops a shared branch entry may consist of: a horizontally fused Gemm + Split that computes from x0 alone.
ENTRY_OPS = {"Gemm", "MatMul", "Add", "Split", "Slice", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
# Ops allowed between a cross layer's Mul(x0, q) and its residual Add (mixture gating, sum over experts, bias).
PRODUCT_OPS = {"Mul", "ReduceSum", "Add"}
# Ops that only reshape x0 before the cross layers multiply by it.
VIEW_OPS = {"Unsqueeze", "Reshape", "Flatten", "Identity"}


class ConcurrencyBroken(DcncError):
    """The cross and deep branches no longer both hang off x0 with no path between them."""


@dataclass
class CrossLayer:
    index: int
    input: str  # x_l
    output: str  # x_{l+1}
    nodes: list[str]


@dataclass
class BranchReport:
    """Where x0, the cross branch, the deep branch and the head are; node lists hold node names."""

    x0: str | None = None
    x0_width: int | None = None
    structure: str = "none"  # parallel (both branches on x0) | serial (nothing else on x0) | none (no cross layer)
    cross_layers: list[CrossLayer] = field(default_factory=list)
    entry_nodes: list[str] = field(default_factory=list)  # shared entry computed from x0 alone (fused GEMM)
    cross_nodes: list[str] = field(default_factory=list)
    deep_nodes: list[str] = field(default_factory=list)
    head_nodes: list[str] = field(default_factory=list)
    cross_outputs: list[str] = field(default_factory=list)  # tensors the rest of the graph reads from each branch
    deep_outputs: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def parallel(self) -> bool:
        return self.structure == "parallel"

    def to_dict(self) -> dict:
        return asdict(self)


class _Graph:
    """Producer / consumer maps and, per tensor, the bitmask of tensors it is computed from."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.tid: dict[str, int] = {}
        self.constant = {init.name for init in graph.initializer}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
            for name in node.output:
                if name:
                    self.producer[name] = i
            if all(t in self.constant for t in node.input if t):  # Constant nodes and what folds from them
                self.constant.update(o for o in node.output if o)
        self.ancestry: dict[str, int] = {}
        for node in self.nodes:
            bits = 0
            for t in node.input:
                if t:
                    bits |= self.ancestry.get(t, 0) | (1 << self._id(t))
            for t in node.output:
                if t:
                    self.ancestry[t] = bits

    def _id(self, tensor: str) -> int:
        return self.tid.setdefault(tensor, len(self.tid))

    def depends(self, tensor: str, on: str) -> bool:
        """True when `tensor` is computed from `on` (or is it)."""
        return tensor == on or bool(self.ancestry.get(tensor, 0) >> self._id(on) & 1)

    def node_depends(self, i: int, on: str) -> bool:
        return any(t and self.depends(t, on) for t in self.nodes[i].input)

    def live_inputs(self, i: int) -> list[str]:
        return [t for t in self.nodes[i].input if t and t not in self.constant]

    def product_muls(self, tensor: str, depth: int = 4) -> list[int]:
        """Mul nodes reached walking back from `tensor` through the ops of a cross layer's product."""
        i = self.producer.get(tensor)
        if i is None or depth == 0 or self.nodes[i].op_type not in PRODUCT_OPS:
            return []
        found = [i] if self.nodes[i].op_type == "Mul" else []
        for t in self.live_inputs(i):
            found += self.product_muls(t, depth - 1)
        return found


def _cross_layer_candidates(g: _Graph) -> dict[str, list[tuple[str, int, int]]]:
    """x0 -> [(x_l, residual Add index, Mul(x0, q) index)] for every Add that looks like a cross layer."""
    found: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for a, node in enumerate(g.nodes):
        if node.op_type != "Add":
            continue
        live = g.live_inputs(a)
        if len(live) != 2:
            continue
        for product, x in (live, live[::-1]):
            for m in g.product_muls(product):
                mul_in = g.live_inputs(m)
                if len(mul_in) != 2:
                    continue
                for x0, q in (mul_in, mul_in[::-1]):
                    if g.depends(x, x0) and q != x0 and g.depends(q, x) and (x == x0 or not g.depends(x0, x)):
                        found[x0].append((x, a, m))
    return found


def _layer_chain(g: _Graph, x0: str, candidates: list[tuple[str, int, int]]) -> list[CrossLayer]:
    """Follow x0 -> layer 0 -> layer 1 ..., hopping over a trailing bias Add (DCNv1 adds b after the residual)."""
    by_input: dict[str, tuple[int, int]] = {}
    for x, a, m in candidates:
        by_input.setdefault(x, (a, m))
    layers: list[CrossLayer] = []
    current = x0
    while current in by_input and len(layers) < 1000:
        a, _ = by_input[current]
        out, extra = g.nodes[a].output[0], []
        users = g.consumers.get(out, [])
        if len(users) == 1 and g.nodes[users[0]].op_type == "Add" and len(g.live_inputs(users[0])) == 1:
            extra, out = [users[0]], g.nodes[users[0]].output[0]
        members = [
            i
            for i in range(a + 1)
            if (g.node_depends(i, current) and g.depends(g.nodes[a].output[0], g.nodes[i].output[0]))
        ] + extra
        layers.append(CrossLayer(len(layers), current, out, [g.names[i] for i in members]))
        current = out
    return layers


def _classify(g: _Graph, x0: str, layers: list[CrossLayer], graph_outputs: set[str]) -> BranchReport:
    index = {name: i for i, name in enumerate(g.names)}
    core = {index[n] for layer in layers for n in layer.nodes}
    y_last = layers[-1].output
    on_x0 = [i for i in range(len(g.nodes)) if g.node_depends(i, x0)]
    after = {i for i in on_x0 if i not in core and g.node_depends(i, y_last)}

    from_x0_alone: set[int] = set()  # cross-core nodes computing from x0 and each other only (a fused GEMM)
    for i in sorted(core):
        if g.nodes[i].op_type in ENTRY_OPS and all(t == x0 or g.producer.get(t) in from_x0_alone for t in g.live_inputs(i)):
            from_x0_alone.add(i)
    deep = [i for i in on_x0 if i not in core and i not in after]
    deep_tensors = {t for i in deep for t in g.nodes[i].output if t}
    # the shared entry: those of them the deep branch also reads from
    entry = {e for e in from_x0_alone if any(g.node_depends(d, t) for d in deep for t in g.nodes[e].output if t)}
    # the head: what reads both branches; in a serial tower, everything after the cross network
    head = {i for i in after if any(g.depends(t, d) for t in g.nodes[i].input if t for d in deep_tensors)} if deep else after
    cross = (core - entry) | (after - head)

    violations = []
    for i in deep:
        for t in g.live_inputs(i):
            p = g.producer.get(t)
            if p in core and p not in entry:
                violations.append(f"deep node {g.names[i]} reads {t} from the cross branch")
    for i in sorted(core - entry):
        for t in g.live_inputs(i):
            if t != x0 and g.producer.get(t) not in core:
                violations.append(f"cross node {g.names[i]} reads {t}, which the cross branch does not compute from x0")

    def outputs_of(members: set[int]) -> list[str]:
        outs = []
        for i in sorted(members):
            for t in g.nodes[i].output:
                if t and (t in graph_outputs or any(c not in members for c in g.consumers.get(t, []))):
                    outs.append(t)
        return outs

    names = lambda members: [g.names[i] for i in sorted(members)]  # noqa: E731
    parallel = any(t == x0 or g.producer.get(t) in entry for i in deep for t in g.live_inputs(i))
    return BranchReport(
        x0=x0,
        structure="parallel" if parallel else "serial",
        cross_layers=layers,
        entry_nodes=names(entry),
        cross_nodes=names(cross),
        deep_nodes=names(set(deep)),
        head_nodes=names(head),
        cross_outputs=outputs_of(cross),
        deep_outputs=outputs_of(set(deep)),
        violations=violations,
    )


def analyze(model: onnx.ModelProto) -> BranchReport:
    """Find x0, the cross layers, the deep branch and the head of the tower in `model` (structure "none" when the
    graph has no cross layer). Where several cross networks exist (the projection family's DCNv2 projection), the
    tower's is the one with a parallel deep branch, then the longest, then the last."""
    g = _Graph(model.graph)
    outputs = {o.name for o in model.graph.output}
    best: tuple | None = None
    for x0, candidates in _cross_layer_candidates(g).items():
        layers = _layer_chain(g, x0, candidates)
        if not layers:
            continue
        reports = [_classify(g, x0, layers, outputs)]
        view = g.producer.get(x0)
        if view is not None and g.nodes[view].op_type in VIEW_OPS and len(g.live_inputs(view)) == 1:
            # TorchRec's CrossNet multiplies by x0.unsqueeze(2): the shared input is the tensor before the view
            first = CrossLayer(0, layers[0].input, layers[0].output, [g.names[view], *layers[0].nodes])
            reports.append(_classify(g, g.live_inputs(view)[0], [first, *layers[1:]], outputs))
        for report in reports:
            key = (report.parallel, len(layers), g.producer.get(report.x0, -1))
            if best is None or key > best[0]:
                best = (key, report)
    if best is None:
        return BranchReport()
    report = best[1]
    report.x0_width = _last_dim(model, report.x0)
    return report


def check_concurrency(model: onnx.ModelProto, where: str = "graph") -> BranchReport:
    """Raise ConcurrencyBroken unless both branches consume x0 and no path joins them before the head."""
    report = analyze(model)
    if report.structure == "none":
        raise ConcurrencyBroken(f"{where}: no cross layer found, so no cross branch on x0")
    if not report.parallel:
        raise ConcurrencyBroken(f"{where}: no deep branch consumes x0 {report.x0!r}; the branches are serial")
    if report.violations:
        raise ConcurrencyBroken(f"{where}: {report.violations[0]}")
    return report


def _last_dim(model: onnx.ModelProto, tensor: str | None) -> int | None:
    if tensor is None:
        return None
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.name == tensor and vi.type.tensor_type.shape.dim:
            last = vi.type.tensor_type.shape.dim[-1]
            return last.dim_value if last.HasField("dim_value") else None
    return None


def extract_branch(model: onnx.ModelProto, branch: str, report: BranchReport | None = None) -> onnx.ModelProto:
    """A runnable model from x0 to the outputs of `branch`: "cross", "deep", or "parallel" (both branches)."""
    report = report or analyze(model)
    if not report.parallel:
        raise DcncError(f"branch extraction needs a parallel tower; this graph's structure is {report.structure}")
    outputs = {
        "cross": report.cross_outputs,
        "deep": report.deep_outputs,
        "parallel": report.cross_outputs + report.deep_outputs,
    }.get(branch)
    if outputs is None:
        raise DcncError(f"branch must be cross, deep or parallel, got {branch!r}")
    inferred = onnx.shape_inference.infer_shapes(model)
    sub = onnx.utils.Extractor(inferred).extract_model([report.x0], outputs)
    sub.graph.name = f"{branch}_branch"
    return sub
