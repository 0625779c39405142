"""ONNX image classifiers as trainable PyTorch modules.

BaDExpert finetunes copies of the model, so an ONNX graph is turned into an ``nn.Module`` whose
weights (convolution kernels, dense layers, normalisation scales, constant addends) are
``nn.Parameter`` s and whose statistics and shape constants are buffers. The converter covers the
operators image classifiers use (convolutions, pooling, dense layers, normalisations,
activations, the shape arithmetic of dynamic-batch exports and the attention blocks of vision
transformers); constants may be initializers or ``Constant`` nodes (constant-folded graphs), and
attributes that moved to inputs across opsets (``Clip``, ``Squeeze``, ``ReduceMean``, ``Split``,
``Pad``...) are read either way.

:func:`onnx_to_torch` checks the graph (one image input ``[N, C, H, W]``, one output, only
known operators) and :func:`verify_conversion` compares the result with onnxruntime on seeded
inputs; every refusal is one line naming what is wrong.

Two things make a converted copy finetune as the original network would:

- a graph that ends in ``Softmax`` or ``LogSoftmax`` over the classes outputs probabilities;
  finetuning and the detectors need logits, so :func:`strip_final_activation` cuts the graph at
  that node's input (the softmax of the logits is the file's output, so labels and confidences are
  unchanged) and the conversion is checked against onnxruntime running the same cut graph;
- ``BatchNormalization`` (in exports made without constant folding, where it is not fused into the
  convolution) and ``Dropout`` follow the module's mode (:data:`MODE_OPS`): in training mode batch
  statistics, with the stored running statistics updated as torch's ``BatchNorm`` updates them
  (ONNX ``momentum`` m is torch's ``1 - m``), and dropping; in eval mode the stored statistics and
  the identity, as onnxruntime runs the graph.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadExpertError

#: Largest difference allowed between the converted module and onnxruntime, relative to the
#: largest logit magnitude (at least 1): ``max|torch - ort| <= ATOL * max(1, max|ort|)``.
ATOL = 1e-4

# ONNX TensorProto data types -> torch dtypes
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


# --- operators ---------------------------------------------------------------------------------
# Each operator is ``fn(attrs, opset) -> callable(*inputs) -> output or tuple of outputs``; missing
# optional inputs arrive as ``None``.


def _same_pads(size: list[int], kernel: list[int], strides: list[int], dilations: list[int], upper: bool) -> list[int]:
    begins, ends = [], []
    for s, k, st, d in zip(size, kernel, strides, dilations):
        out = -(-s // st)
        total = max(0, (out - 1) * st + (k - 1) * d + 1 - s)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def _pads_for(a: dict, x: torch.Tensor, kernel: list[int], strides, dilations, op: str) -> list[int]:
    n = len(kernel)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(list(x.shape[2:]), kernel, strides, dilations, auto == "SAME_UPPER")
    if auto == "VALID":
        return [0] * (2 * n)
    if auto != "NOTSET":
        raise BadExpertError(f"ONNX operator {op} has unsupported auto_pad {auto!r}")
    return list(a.get("pads", [0] * (2 * n)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX ``[b1, b2, ..., e1, e2, ...]`` -> F.pad's ``[b_last, e_last, ..., b1, e1]``."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _conv(a, opset):
    def run(x, w, b=None):
        if x.dim() not in (3, 4):
            raise BadExpertError(f"ONNX operator Conv on a {x.dim()}-D input is not supported")
        kernel = list(a.get("kernel_shape", w.shape[2:]))
        nd = len(kernel)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        pads = _pads_for(a, x, kernel, strides, dil, "Conv")
        conv = F.conv2d if nd == 2 else F.conv1d
        if pads[:nd] == pads[nd:]:
            return conv(x, w, b, strides, pads[:nd], dil, a.get("group", 1))
        return conv(F.pad(x, _torch_pad(pads)), w, b, strides, 0, dil, a.get("group", 1))
    return run


def _pool(kind: str):
    def make(a, opset):
        def run(x):
            kernel = list(a["kernel_shape"])
            nd = len(kernel)
            strides = list(a.get("strides", [1] * nd))
            dil = list(a.get("dilations", [1] * nd))
            pads = _pads_for(a, x, kernel, strides, dil, kind)
            ceil = bool(a.get("ceil_mode", 0))
            if kind == "MaxPool":
                if a.get("storage_order", 0):
                    raise BadExpertError("ONNX operator MaxPool with storage_order=1 is not supported")
                fn = F.max_pool2d if nd == 2 else F.max_pool1d
                if pads[:nd] == pads[nd:] and all(p <= k // 2 for p, k in zip(pads, kernel)):
                    return fn(x, kernel, strides, pads[:nd], dil, ceil_mode=ceil)
                return fn(F.pad(x, _torch_pad(pads), value=-math.inf), kernel, strides, 0, dil, ceil_mode=ceil)
            if any(d != 1 for d in dil):
                raise BadExpertError("ONNX operator AveragePool with dilations is not supported")
            fn = F.avg_pool2d if nd == 2 else F.avg_pool1d
            include = bool(a.get("count_include_pad", 0))
            if pads[:nd] == pads[nd:] and all(p <= k // 2 for p, k in zip(pads, kernel)):
                return fn(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)
            if not include and any(pads):
                raise BadExpertError("ONNX operator AveragePool with asymmetric padding excluded from the count "
                                     "is not supported")
            return fn(F.pad(x, _torch_pad(pads)), kernel, strides, 0, ceil_mode=ceil)
        return run
    return make


def _gemm(a, opset):
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)

    def run(x, w, c=None):
        y = (x.t() if ta else x) @ (w.t() if tb else w)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y
    return run


def _batchnorm(a, opset):
    eps, momentum = a.get("epsilon", 1e-5), a.get("momentum", 0.9)

    def run(x, scale, bias, mean, var, *, training=False):
        # training (a finetuned copy): batch statistics, and the stored ones updated in place as
        # torch's BatchNorm does (ONNX momentum m keeps m of the old value: torch's is 1 - m)
        return F.batch_norm(x, mean, var, scale, bias, training=training, momentum=1 - momentum, eps=eps)
    return run


def _dropout(a, opset):
    def run(x, ratio=None, training_mode=None, *, training=False):
        p = a.get("ratio", 0.5) if opset < 12 else (float(ratio) if ratio is not None else 0.5)
        return F.dropout(x, p, training=True) if training and p > 0 else x
    return run


def _layernorm(a, opset):
    axis, eps = a.get("axis", -1), a.get("epsilon", 1e-5)

    def run(x, scale, bias=None):
        ax = axis % x.dim()
        return F.layer_norm(x, x.shape[ax:], scale, bias, eps)
    return run


def _clip(a, opset):
    def run(x, lo=None, hi=None):
        if opset < 11:
            lo, hi = a.get("min"), a.get("max")
        lo = float(lo) if lo is not None else None
        hi = float(hi) if hi is not None else None
        return torch.clamp(x, lo, hi)
    return run


def _softmax(fn):
    def make(a, opset):
        axis = a.get("axis", -1 if opset >= 13 else 1)

        def run(x):
            if opset >= 13:
                return fn(x, axis)
            ax = axis % x.dim()  # before opset 13: over the flattened trailing axes
            return fn(x.flatten(ax), -1).reshape(x.shape)
        return run
    return make


def _axes_arg(a, opset, since, axes):
    if opset < since:
        return a.get("axes")
    return _ints(axes) if axes is not None else None


def _squeeze(a, opset):
    def run(x, axes=None):
        axes = _axes_arg(a, opset, 13, axes)
        if axes is None:
            return x.squeeze()
        for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
            x = x.squeeze(ax)
        return x
    return run


def _unsqueeze(a, opset):
    def run(x, axes=None):
        axes = _axes_arg(a, opset, 13, axes)
        rank = x.dim() + len(axes)
        for ax in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(ax)
        return x
    return run


def _reduce(fn_name: str, since: int):
    def make(a, opset):
        keep = bool(a.get("keepdims", 1))

        def run(x, axes=None):
            axes = _axes_arg(a, opset, since, axes)
            if not axes:
                if a.get("noop_with_empty_axes", 0):
                    return x
                axes = list(range(x.dim()))
            if fn_name == "max":
                out = x
                for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
                    out = out.amax(ax, keepdim=keep)
                return out
            return getattr(torch, fn_name)(x, dim=tuple(axes), keepdim=keep)
        return run
    return make


def _reshape(a, opset):
    allowzero = a.get("allowzero", 0)

    def run(x, shape):
        shape = _ints(shape)
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    return run


def _flatten(a, opset):
    axis = a.get("axis", 1)

    def run(x):
        ax = axis % x.dim() if x.dim() else 0
        if ax == 0 or ax >= x.dim():  # [1, all] or [all, 1]
            return x.reshape(1, -1) if ax == 0 else x.reshape(-1, 1)
        # torch's own flatten keeps the leading (batch) size symbolic when the module is traced
        return x.flatten(ax).flatten(0, ax - 1)
    return run


def _slice(a, opset):
    def run(x, starts=None, ends=None, axes=None, steps=None):
        if opset < 10:
            starts, ends, axes = a["starts"], a["ends"], a.get("axes")
        starts, ends = _ints(starts), _ints(ends)
        axes = _ints(axes) if axes is not None else list(range(len(starts)))
        steps = _ints(steps) if steps is not None else [1] * len(starts)
        idx = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if st <= 0:
                if st < 0:
                    x = x.flip(ax % x.dim())
                    n = x.shape[ax % x.dim()]
                    s, e, st = n - 1 - max(min(s, n - 1), -1), n - 1 - max(min(e, n), -1), -st
                else:
                    raise BadExpertError("ONNX operator Slice with step 0")
            idx[ax % x.dim()] = slice(s, e, st)
        return x[tuple(idx)]
    return run


def _split(a, opset):
    axis = a.get("axis", 0)

    def run(x, split=None):
        sizes = a.get("split") if opset < 13 else (_ints(split) if split is not None else None)
        n = a["__outputs__"]
        if sizes is None:
            sizes = [-(-x.shape[axis] // n)] * n
            sizes[-1] = x.shape[axis] - sum(sizes[:-1])
        return tuple(torch.split(x, list(sizes), dim=axis))
    return run


def _gather(a, opset):
    axis = a.get("axis", 0)

    def run(x, idx):
        idx = idx.long()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        if idx.dim() == 0:
            return x.select(axis, int(idx))
        return x.index_select(axis, idx.flatten()).reshape(*x.shape[:axis % x.dim()], *idx.shape,
                                                           *x.shape[axis % x.dim() + 1:])
    return run


def _shape(a, opset):
    def run(x):
        dims = list(x.shape)[a.get("start", 0):a.get("end", None)]
        return torch.tensor(dims, dtype=torch.int64)
    return run


def _constant_of_shape(a, opset):
    value = a.get("value")

    def run(shape):
        v = torch.from_numpy(np.array(_np_tensor(value))) if value is not None else torch.zeros(1)
        return v.reshape(()).expand(_ints(shape)).clone()
    return run


def _cast(a, opset):
    to = _DTYPES.get(a["to"])
    if to is None:
        raise BadExpertError(f"ONNX operator Cast to data type {a['to']} is not supported")
    return lambda x: x.to(to)


def _pad(a, opset):
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode

    def run(x, pads=None, value=None, axes=None):
        if opset < 11:
            pads, value = a["pads"], a.get("value", 0.0)
        pads = _ints(pads)
        if axes is not None:
            full = [0] * (2 * x.dim())
            ax = [v % x.dim() for v in _ints(axes)]
            for i, d in enumerate(ax):
                full[d], full[d + x.dim()] = pads[i], pads[i + len(ax)]
            pads = full
        v = float(value) if value is not None else 0.0
        torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
        if torch_mode is None:
            raise BadExpertError(f"ONNX operator Pad with mode {mode!r} is not supported")
        p = _torch_pad(pads)
        while len(p) >= 2 and p[-2:] == [0, 0]:
            p = p[:-2]
        return F.pad(x, p, mode=torch_mode, value=v) if torch_mode == "constant" else F.pad(x, p, mode=torch_mode)
    return run


def _simple(fn: Callable) -> Callable:
    return lambda a, opset: fn


def _with(fn: Callable) -> Callable:
    return lambda a, opset: (lambda *xs: fn(a, *xs))


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "Gemm": _gemm,
    "MatMul": _simple(torch.matmul),
    "Add": _simple(torch.add), "Sub": _simple(torch.sub), "Mul": _simple(torch.mul),
    "Div": _simple(lambda x, y: torch.div(x, y, rounding_mode="trunc")
                   if not x.is_floating_point() and not y.is_floating_point() else x / y),
    "Pow": _simple(torch.pow), "Sqrt": _simple(torch.sqrt), "Exp": _simple(torch.exp), "Log": _simple(torch.log),
    "Neg": _simple(torch.neg), "Abs": _simple(torch.abs), "Reciprocal": _simple(torch.reciprocal),
    "Erf": _simple(torch.erf), "Tanh": _simple(torch.tanh), "Sigmoid": _simple(torch.sigmoid),
    "Relu": _simple(F.relu), "Softplus": _simple(F.softplus),
    "LeakyRelu": _with(lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01))),
    "Elu": _with(lambda a, x: F.elu(x, a.get("alpha", 1.0))),
    "Selu": _with(lambda a, x: a.get("gamma", 1.0507009873554805) * torch.where(
        x > 0, x, a.get("alpha", 1.6732632423543772) * (torch.exp(x) - 1))),
    "HardSigmoid": _with(lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)),
    "HardSwish": _simple(F.hardswish),
    "Gelu": _with(lambda a, x: F.gelu(x, approximate=(a.get("approximate", b"none").decode()
                                                       if isinstance(a.get("approximate", b"none"), bytes)
                                                       else a.get("approximate", "none")))),
    "PRelu": _simple(lambda x, s: torch.where(x >= 0, x, x * s)),
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "MaxPool": _pool("MaxPool"), "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": _simple(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _simple(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "Flatten": _flatten, "Reshape": _reshape,
    "Transpose": _with(lambda a, x: x.permute(*(a.get("perm") or range(x.dim() - 1, -1, -1)))),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": _with(lambda a, *xs: torch.cat(xs, dim=a["axis"])),
    "Split": _split, "Slice": _slice, "Gather": _gather,
    "Shape": _shape, "ConstantOfShape": _constant_of_shape, "Cast": _cast,
    "Expand": _simple(lambda x, shape: x * torch.ones(_ints(shape), dtype=x.dtype, device=x.device)),
    "Where": _simple(torch.where), "Equal": _simple(torch.eq), "Less": _simple(torch.lt),
    "Greater": _simple(torch.gt), "Not": _simple(torch.logical_not),
    "Range": _simple(lambda s, e, d: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype)),
    "Identity": _simple(lambda x: x), "Dropout": _dropout,
    "ReduceMean": _reduce("mean", 18), "ReduceSum": _reduce("sum", 13), "ReduceMax": _reduce("max", 18),
    "Pad": _pad,
    "Min": _simple(lambda *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0)),
    "Max": _simple(lambda *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0)),
    "Sum": _simple(lambda *xs: sum(xs[1:], xs[0])),
}

#: Input positions whose float constants are trained when the module is finetuned (weights,
#: biases, normalisation scales, constant addends and factors); other constants are buffers.
TRAINABLE_SLOTS = {"Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2),
                   "LayerNormalization": (1, 2), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "PRelu": (1,)}
#: Operators that behave as their torch layers do while the module trains (a finetuned copy):
#: BatchNormalization normalises by the batch's statistics and updates the stored ones, Dropout
#: drops; in eval mode they use the stored statistics and pass inputs through, as onnxruntime does.
MODE_OPS = frozenset({"BatchNormalization", "Dropout"})
#: Final activations that turn logits into (log-)probabilities: a graph ending in one is converted
#: up to its input, the logits (:func:`strip_final_activation`).
FINAL_ACTIVATIONS = ("Softmax", "LogSoftmax")
#: Operators whose output is a constant when all their inputs are (folded at conversion).
_FOLDABLE = {"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Gather", "Transpose",
             "ConstantOfShape", "Slice", "Shape"}


def _np_tensor(t) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _constant_value(node) -> torch.Tensor:
    a = _attrs(node)
    if "value" in a:
        return torch.from_numpy(np.array(_np_tensor(a["value"])))
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    raise BadExpertError(f"ONNX Constant node '{node.name}' has an unsupported value ({', '.join(a)})")


class OnnxModule(nn.Module):
    """An ONNX graph run node by node with PyTorch operators; its float weights are parameters."""

    def __init__(self, steps: list[tuple[str, dict, list[str], list[str]]], consts: dict[str, torch.Tensor],
                 trainable: set[str], input_name: str, output_name: str, opset: int) -> None:
        super().__init__()
        self.input_name, self.output_name, self.opset = input_name, output_name, opset
        self._slot: dict[str, str] = {}  # ONNX value name -> attribute name holding the constant
        self.weights = nn.ParameterDict()
        for i, (name, value) in enumerate(consts.items()):
            key = f"c{i}"
            if name in trainable and value.is_floating_point():
                self.weights[key] = nn.Parameter(value.clone().float() if value.dtype == torch.float64 else value.clone())
            else:
                self.register_buffer(key, value.clone())
            self._slot[name] = key
        self._steps = [(op, attrs, ins, outs) for op, attrs, ins, outs in steps]
        self._fns = [OPS[op](attrs, opset) for op, attrs, ins, outs in steps]
        self._types = [op for op, *_ in steps]

    def _const(self, name: str) -> torch.Tensor:
        key = self._slot[name]
        return self.weights[key] if key in self.weights else getattr(self, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for (op, _, ins, outs), fn in zip(self._steps, self._fns):
            args = [None if not n else env[n] if n in env else self._const(n) for n in ins]
            args = [a.to(x.device) if isinstance(a, torch.Tensor) and a.device != x.device else a for a in args]
            while args and args[-1] is None:
                args.pop()
            try:
                out = fn(*args, training=self.training) if op in MODE_OPS else fn(*args)
            except BadExpertError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure inside a converted operator is reported the same
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise BadExpertError(f"the converted ONNX operator {op} failed ({first}); the graph is not "
                                     "supported") from exc
            for n, v in zip(outs, out if isinstance(out, tuple) else (out,)):
                if n:
                    env[n] = v
        return env[self.output_name] if self.output_name in env else self._const(self.output_name)


def graph_io(model) -> tuple[list, list]:
    """The graph's real inputs (initializers listed as inputs excluded) and its outputs."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits], list(model.graph.output)


def strip_final_activation(model) -> tuple[Any, str | None]:
    """``(model, None)``, or for a graph whose output is made by a final Softmax or LogSoftmax over
    the class axis (probabilities, which finetuning and the detectors cannot use), a copy of the
    graph that ends at that node's input, the logits, and the activation's name. Softmax of the
    logits gives back the file's probabilities (LogSoftmax: their logarithm), so the labels, and the
    confidences the guard reports, are the file's."""
    import copy

    from onnx import helper

    graph = model.graph
    _, outputs = graph_io(model)
    if len(outputs) != 1 or not graph.node:
        return model, None
    last = graph.node[len(graph.node) - 1]
    producers = [n for n in graph.node if outputs[0].name in n.output]
    if len(producers) != 1 or producers[0] is not last or last.op_type not in FINAL_ACTIVATIONS \
            or last.domain not in ("", "ai.onnx") or len(last.input) != 1:
        return model, None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = _attrs(last).get("axis", -1 if opset >= 13 else 1)
    if axis not in (1, -1):  # not the class axis of [N, C] logits
        return model, None
    out = copy.deepcopy(model)
    g = out.graph
    del g.node[len(g.node) - 1]
    elem = outputs[0].type.tensor_type.elem_type or 1
    g.output.pop()
    g.output.append(helper.make_tensor_value_info(last.input[0], elem, None))
    return out, last.op_type


def input_dims(value_info) -> list[int | str | None]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def onnx_to_torch(model, source: str) -> OnnxModule:
    """Convert a loaded ``onnx.ModelProto`` (one input, one output) to :class:`OnnxModule`; an
    operator outside :data:`OPS`, a sub-graph or a non-default domain is a one-line refusal."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise BadExpertError(f"{source} declares no default-domain opset; it is not a standard ONNX model")
    unknown = sorted({f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}" for n in graph.node
                      if n.domain not in ("", "ai.onnx") or (n.op_type not in OPS and n.op_type != "Constant")})
    if unknown:
        raise BadExpertError(f"{source} uses ONNX operator{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:6])} "
                             "that badexpert cannot convert to PyTorch; export the model without "
                             f"{'them' if len(unknown) > 1 else 'it'} or guard it from PyTorch")
    (inp,), (out,) = graph_io(model)
    consts: dict[str, torch.Tensor] = {t.name: torch.from_numpy(np.array(_np_tensor(t))) for t in graph.initializer}
    steps = []
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = _constant_value(node)
            continue
        a = _attrs(node)
        if any(isinstance(v, type(graph)) for v in a.values()):
            raise BadExpertError(f"{source}: ONNX operator {node.op_type} with a sub-graph is not supported")
        a["__outputs__"] = len(node.output)
        ins, outs = list(node.input), list(node.output)
        if node.op_type in _FOLDABLE and ins and all(not n or n in consts for n in ins[:1]) and \
                all(not n or n in consts for n in ins):
            # shape arithmetic on constants: fold it now, so parameters stay parameters
            args = [consts[n] if n else None for n in ins]
            while args and args[-1] is None:
                args.pop()
            try:
                folded = OPS[node.op_type](a, opset)(*args)
            except Exception:  # noqa: BLE001 - leave it to run time (and its error) if folding fails
                folded = None
            if folded is not None:
                for n, v in zip(outs, folded if isinstance(folded, tuple) else (folded,)):
                    consts[n] = v
                continue
        steps.append((node.op_type, a, ins, outs))
    used = {n for _, _, ins, _ in steps for n in ins} | {out.name}
    consts = {k: v for k, v in consts.items() if k in used}
    trainable = set()
    for op, _, ins, _ in steps:
        for i in TRAINABLE_SLOTS.get(op, ()):
            if i < len(ins) and ins[i] in consts and consts[ins[i]].numel() > 1:
                trainable.add(ins[i])
    return OnnxModule(steps, consts, trainable, inp.name, out.name, opset)


def verify_conversion(data: bytes, module: nn.Module, inputs: torch.Tensor, source: str, *,
                      atol: float = ATOL, batch: int | None = None) -> float:
    """Run ``inputs`` (already preprocessed for the graph) through onnxruntime and ``module``;
    refuse (one line) when a label differs or a logit differs by more than ``atol`` (relative to
    the largest logit magnitude, at least 1). Returns the largest difference."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadExpertError(f"onnxruntime cannot run {source} ({first})") from exc
    name = sess.get_inputs()[0].name
    step = batch or len(inputs)
    ref = []
    try:
        for i in range(0, len(inputs), step):
            ref.append(sess.run(None, {name: inputs[i:i + step].numpy()})[0])
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadExpertError(f"onnxruntime cannot run {source} on {list(inputs.shape[1:])} inputs ({first})") from exc
    expected = torch.from_numpy(np.concatenate(ref)).float()
    with torch.no_grad():
        got = torch.cat([module(inputs[i:i + step]) for i in range(0, len(inputs), step)]).float()
    if got.shape != expected.shape:
        raise BadExpertError(f"the PyTorch conversion of {source} returns shape {list(got.shape)} where onnxruntime "
                             f"returns {list(expected.shape)}; the graph is not supported")
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
    if not math.isfinite(diff) or diff > atol * scale:
        raise BadExpertError(f"the PyTorch conversion of {source} disagrees with onnxruntime (largest logit "
                             f"difference {diff:.3g}, tolerance {atol * scale:.3g}); the graph is not supported")
    if expected.dim() == 2 and expected.shape[1] > 1:
        top2 = expected.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * atol * scale  # near-ties may flip within the tolerance
        if bool((got.argmax(1) != expected.argmax(1))[clear].any()):
            raise BadExpertError(f"the PyTorch conversion of {source} predicts other labels than onnxruntime; the "
                                 "graph is not supported")
    return diff


__all__ = ["ATOL", "FINAL_ACTIVATIONS", "MODE_OPS", "OPS", "OnnxModule", "graph_io", "input_dims", "onnx_to_torch",
           "strip_final_activation", "verify_conversion"]
