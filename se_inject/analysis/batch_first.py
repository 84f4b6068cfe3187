"""Batch axes proven without a second shape pass: a node whose value keeps the samples of a
batch-first input on dim 0 through ops that map sample ``i`` to index ``i`` of dim 0.

``analysis.batch`` finds batch axes by running the graph's shapes again on one sample more; that
follows any op, but costs a whole shape propagation (about a sixth of a ResNet's analysis). Most
graphs are convolutions, norms, activations, sums and layout ops that never touch dim 0, and for
those the answer is known from the graph: this module proves it, op by op, from a small list of
ops whose semantics keep dim 0 (torch's own layers, exact classes only: a subclass may do
anything), plus the layers the shape passes themselves take to return their input's shape
(``ops.keeps_shape``: norms, activations, dropouts, timm's norm-act layers), so a proof never
claims more than the second pass would find. Anything else (a transpose of dim 0, attention, an opaque module, a library layer)
proves nothing, and the caller falls back to the second shape pass. A proof is never a guess:
each rule holds for every input, whatever the sizes (``T == B`` included).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .ops import SHAPE_KEEPING_FUNCTIONS, keeps_shape, module_of

__all__ = ["BatchFirst"]

#: Element-wise functions and methods: the output has the broadcast shape of the operands (the
#: unary ones in ``ops.SHAPE_KEEPING_FUNCTIONS`` are proven by that rule first).
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs,
    torch.exp, torch.sqrt, torch.rsqrt, torch.clamp, torch.where, F.sigmoid, F.tanh, F.selu, F.celu, F.softplus,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "neg", "abs", "exp", "sqrt", "rsqrt", "clamp", "clamp_", "clone", "contiguous",
    "float", "half", "bfloat16", "to", "type", "type_as", "__add__", "__radd__", "__iadd__", "__mul__",
    "__rmul__", "__imul__", "__sub__", "__rsub__", "__truediv__", "__neg__",
}
#: Reshapes (row-major): an output whose dim 0 is the input's holds input[i] at [i]; proven
#: only where the code keeps dim 0 (``flatten(1)``, ``view(x.size(0), ...)``, ``view(-1, C)``),
#: never from sizes that happen to agree (``view(T, B, D)`` of ``[B, T, D]`` when ``T == B``).
_RESHAPE_METHODS = {"reshape", "view"}
_FLATTEN = {torch.flatten, "flatten"}
_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.floordiv}
#: Reductions over the dims they are given (``keepdim`` or not): dim 0 stays if not given.
_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "std", "var"}

#: torch layers acting on each sample alone, with the number of dims of a batched input
#: (None: any number from 2; an unbatched call, Conv2d on [C, H, W], is not a batch-first one).
#: Norms, activations, dropouts and identities are ``ops.keeps_shape``, proven by that rule.
_MODULE_DIMS: dict[type[nn.Module], int | None] = {
    nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5, nn.ConvTranspose1d: 3, nn.ConvTranspose2d: 4, nn.ConvTranspose3d: 5,
    nn.MaxPool1d: 3, nn.MaxPool2d: 4, nn.MaxPool3d: 5, nn.AvgPool1d: 3, nn.AvgPool2d: 4, nn.AvgPool3d: 5,
    nn.AdaptiveAvgPool1d: 3, nn.AdaptiveAvgPool2d: 4, nn.AdaptiveAvgPool3d: 5, nn.AdaptiveMaxPool2d: 4,
    nn.Upsample: None, nn.Linear: None,
}
#: Functional layers, with the number of dims of a batched input (norms: shape-keeping).
_PER_SAMPLE_FUNCTIONS: dict[Any, int | None] = {
    F.conv1d: 3, F.conv2d: 4, F.conv3d: 5, F.max_pool2d: 4, F.avg_pool2d: 4, F.adaptive_avg_pool2d: 4,
    F.adaptive_max_pool2d: 4, F.interpolate: None, F.linear: None,
}


def _value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


class BatchFirst:
    """Which nodes of one graph provably hold a batch-first input's samples on dim 0.

    ``inputs`` is how many leading placeholders of ``graph`` are batch-first (the model's example
    arguments: their dim 0 is the batch by definition); ``root`` resolves ``call_module`` targets.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, inputs: int) -> None:
        self.root = root
        self._index = {n: i for i, n in enumerate(graph.nodes)}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._inputs = set(placeholders[:inputs])
        self._proven: dict[fx.Node, bool] = {}
        self._constant: dict[fx.Node, bool] = {}

    def proven(self, node: fx.Node) -> bool:
        """Whether ``node``'s value provably has the batch on dim 0 (False: not proven)."""
        if node not in self._proven:
            # Its unproven ancestors in graph order (inputs before users), iteratively: a deep
            # graph must not exhaust Python's stack.
            stack, ancestors = [node], {node}
            while stack:
                for a in stack.pop().all_input_nodes:
                    if a not in self._proven and a not in ancestors:
                        ancestors.add(a)
                        stack.append(a)
            for n in sorted(ancestors, key=self._index.__getitem__):
                self._proven[n] = self._rule(n)
        return self._proven[node]

    def _constant_value(self, node: fx.Node) -> bool:
        """Computed from parameters and constants only: it holds no sample of any batch."""
        if node not in self._constant:
            if node.op == "get_attr":
                self._constant[node] = True
            elif node.op in ("placeholder", "output", "call_module"):
                self._constant[node] = False
            else:  # sizes read off a batch (``x.shape[0]``) carry none of its values
                self._constant[node] = all(
                    self._constant_value(a) for a in node.all_input_nodes if isinstance(_value(a), torch.Tensor)
                )
        return self._constant[node]

    def _rule(self, node: fx.Node) -> bool:
        out = _value(node)
        if not isinstance(out, torch.Tensor) or out.dim() < 1:
            return False
        if node.op == "placeholder":
            return node in self._inputs
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            module = module_of(self.root, node)
            if module is None or len(node.args) != 1 or node.kwargs:
                return False
            if type(module) is nn.Flatten:
                return self._off_batch(first, (module.start_dim,), out)
            if keeps_shape(module):  # the shape passes give such a layer its input's shape
                return self._keeps(first, out, None) and out.shape == _value(first).shape
            return type(module) in _MODULE_DIMS and self._keeps(first, out, _MODULE_DIMS[type(module)])
        target = node.target
        if node.op == "call_function" and target in SHAPE_KEEPING_FUNCTIONS:
            return self._keeps(first, out, None) and out.shape == _value(first).shape
        if node.op == "call_function" and target in _PER_SAMPLE_FUNCTIONS:
            return self._keeps(first, out, _PER_SAMPLE_FUNCTIONS[target])
        if node.op in ("call_function", "call_method") and target in _FLATTEN:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self._off_batch(first, (start,), out)
        if (node.op == "call_function" and target is torch.reshape) or (
                node.op == "call_method" and target in _RESHAPE_METHODS):
            sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return self._keeps_batch_size(first, tuple(sizes)) and self._keeps(first, out, None)
        if node.op == "call_method" and target in ("view_as", "reshape_as"):
            return self._keeps(first, out, None) and isinstance(node.args[1], fx.Node) and self.proven(node.args[1])
        if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or (
                node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            return self._elementwise(node, out)
        if node.op == "call_method" and target == "permute" and len(node.args) > 1 and not node.kwargs:
            dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return isinstance(dims[0], int) and dims[0] % out.dim() == 0 and self._keeps(first, out, None)
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            return self._concatenation(node, out)
        if (node.op == "call_function" and target in _REDUCTION_FUNCTIONS) or (
                node.op == "call_method" and target in _REDUCTION_METHODS):
            return self._off_batch(first, _dims(node, 1), out)
        if (node.op == "call_function" and target is torch.transpose) or (
                node.op == "call_method" and target in ("transpose", "swapaxes")):
            return self._off_batch(first, tuple(node.args[1:3]), out)
        if node.op == "call_function" and target is operator.getitem:
            return self._item(node, out)
        return False

    def _keeps_batch_size(self, arg: Any, sizes: tuple[Any, ...]) -> bool:
        """The target sizes of a reshape of ``arg`` keep its dim 0: the first is read off dim 0
        of a batch-first tensor, or is -1 with every other size free of the batch."""
        if not sizes or not isinstance(arg, fx.Node):
            return False
        first, rest = sizes[0], sizes[1:]
        if first == -1 and not isinstance(first, fx.Node):
            return all(self._batch_free(s) for s in rest)
        read = _size_read(first)
        return read is not None and read[1] == 0 and self.proven(read[0]) and all(self._batch_free(s) for s in rest)

    def _batch_free(self, size: Any) -> bool:
        """A size that does not grow with the batch: a literal, a non-batch dim of a batch-first
        tensor, or arithmetic on those."""
        if isinstance(size, int) and not isinstance(size, bool):
            return True
        if not isinstance(size, fx.Node):
            return False
        read = _size_read(size)
        if read is not None:
            return read[1] != 0 and self.proven(read[0])
        return size.op == "call_function" and size.target in _ARITHMETIC and all(
            self._batch_free(a) for a in size.args)

    def _off_batch(self, arg: Any, dims: Any, out: torch.Tensor) -> bool:
        """An op over ``dims`` (a reduction, a transpose) none of which is dim 0."""
        value = _value(arg)
        if not isinstance(value, torch.Tensor) or not isinstance(dims, tuple) or not dims:
            return False
        if not all(isinstance(d, int) and d % value.dim() != 0 for d in dims):
            return False
        return self._keeps(arg, out, None)

    def _item(self, node: fx.Node, out: torch.Tensor) -> bool:
        """A piece of a split along another dim than 0, or ``x[:, ...]`` (dim 0 taken whole)."""
        source, index = node.args[0], node.args[1]
        if not isinstance(source, fx.Node):
            return False
        if isinstance(_value(source), torch.Tensor):
            whole = isinstance(index, tuple) and index and index[0] == slice(None)
            plain = all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index) if whole else False
            return plain and self._keeps(source, out, None)
        splits = source.op in ("call_method", "call_function") and getattr(
            source.target, "__name__", source.target) in ("split", "chunk", "tensor_split", "unbind")
        if not splits or not isinstance(index, int) or not source.args:
            return False
        dim = source.kwargs.get("dim", source.args[2] if len(source.args) > 2 else 0)
        return self._off_batch(source.args[0], (dim,), out) if source.target != "unbind" else False

    def _keeps(self, arg: Any, out: torch.Tensor, ndim: int | None) -> bool:
        """``out`` comes from the batch-first ``arg`` by an op that keeps dim 0 when the input is
        batched (``ndim`` dims, or at least two) and dim 0 keeps its size."""
        value = _value(arg)
        if not isinstance(arg, fx.Node) or not isinstance(value, torch.Tensor) or not self.proven(arg):
            return False
        batched = value.dim() == ndim if ndim is not None else value.dim() >= 2
        return batched and out.shape[0] == value.shape[0]

    def _elementwise(self, node: fx.Node, out: torch.Tensor) -> bool:
        """Every tensor operand is batch-first with the output's dims and dim 0, or constant;
        at least one is batch-first."""
        batch_first = 0
        for a in node.all_input_nodes:
            value = _value(a)
            if not isinstance(value, torch.Tensor):
                continue
            if self._constant_value(a):
                if value.dim() > out.dim():
                    return False
                continue
            if not self.proven(a) or value.dim() != out.dim() or value.shape[0] != out.shape[0]:
                return False
            batch_first += 1
        return batch_first > 0

    def _concatenation(self, node: fx.Node, out: torch.Tensor) -> bool:
        """Joined along another dim than 0: each operand batch-first (or constant, as a class token
        expanded to the batch) with the output's dims and dim 0; at least one batch-first."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or dim % out.dim() == 0:
            return False
        batch_first = 0
        for t in tensors:
            value = _value(t)
            if not isinstance(t, fx.Node) or not isinstance(value, torch.Tensor) or value.dim() != out.dim():
                return False
            if value.shape[0] != out.shape[0]:
                return False
            if self.proven(t):
                batch_first += 1
            elif not self._constant_value(t):
                return False
        return batch_first > 0


def _size_read(node: Any) -> tuple[fx.Node, int] | None:
    """``(t, d)`` when ``node`` is ``t.size(d)``, ``t.shape[d]`` or ``t.size()[d]`` (d made >= 0)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        tensor, dim = node.args
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        holder, dim = node.args
        shaped = holder.op == "call_function" and holder.target is getattr and holder.args[1:] == ("shape",)
        if not (shaped or (holder.op == "call_method" and holder.target == "size" and len(holder.args) == 1)):
            return None
        tensor = holder.args[0]
    else:
        return None
    value = _value(tensor) if isinstance(tensor, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(dim, int) or not value.dim():
        return None
    return tensor, dim % value.dim()


def _dims(node: fx.Node, position: int) -> Any:
    """The ``dim`` argument of a reduction, as a tuple (None: all dims, which proves nothing)."""
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim")
    if isinstance(dim, int):
        return (dim,)
    return tuple(dim) if isinstance(dim, (list, tuple)) else None

