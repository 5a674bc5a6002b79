"""The graph of an adapter pack (:mod:`vision_peft.pack`): a run's model exported with every trainable tensor as a
named graph input.

:func:`scalars_to_buffers` turns the float attributes a run's config sets (``pack_scalars``: LoRA's and DoRA's
``scale``) into one-element buffers, :func:`adapter_tensors` lists what distinguishes one run inside a pack,
:class:`PackGraph` feeds those tensors to the module as inputs (``torch.func.functional_call``; by hand under the
TorchScript tracer), and :func:`_export_pack_graph` exports one graph with zero default initializers for them (a
head's class dimension is the symbolic ``classes``) and returns its manifest entry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vision_peft.bundle import dtype_name
from vision_peft.export import ExportError, ort_session

CLASSES = "classes"  # the symbolic class dimension of a head's tensors in a pack graph


def scalars_to_buffers(model: nn.Module) -> dict[str, float]:
    """Turns every ``pack_scalars`` float attribute of the model's layers into a one-element float32 buffer of the
    same name (so it can be a graph input; shape (1,), not 0-d, because onnxruntime's adapter files store a
    scalar as one element); returns state-dict name -> value."""
    out: dict[str, float] = {}
    for mod_name, mod in model.named_modules():
        for attr in getattr(type(mod), "pack_scalars", ()):
            value = getattr(mod, attr)
            if isinstance(value, torch.Tensor):
                value = float(value)
            else:
                delattr(mod, attr)
                ref = next(iter(mod.parameters()), None)
                mod.register_buffer(attr, torch.tensor([float(value)], device=ref.device if ref is not None else None))
            out[f"{mod_name}.{attr}" if mod_name else attr] = float(value)
    return out


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What distinguishes a run inside a pack: its saved adapter/head tensors plus its ``pack_scalars`` (call
    :func:`scalars_to_buffers` first), by state-dict name."""
    sd = model.state_dict(keep_vars=True)
    out = dict(model.adapter_state_dict())
    for mod_name, mod in model.named_modules():
        for attr in getattr(type(mod), "pack_scalars", ()):
            key = f"{mod_name}.{attr}" if mod_name else attr
            out[key] = sd[key].detach()
    return out


class PackGraph(nn.Module):
    """``forward(*data_inputs, *adapter_tensors)`` = ``module(*data_inputs)`` with the adapter tensors in place of
    the module's own (``torch.func.functional_call``), so an exporter turns them into graph inputs."""

    def __init__(self, module: nn.Module, n_data: int, slots: list[str], scalars: set[str] | None = None) -> None:
        super().__init__()
        self.inner = module
        self.n_data = n_data
        self.slots = slots  # the module's own parameter/buffer names, in input order
        self.scalars = set(scalars or ())  # 0-d slots: fed as one-element inputs (adapter files store them so)

    def forward(self, *args: torch.Tensor):
        data = args[: self.n_data]
        tensors = [t.reshape(()) if s in self.scalars else t for s, t in zip(self.slots, args[self.n_data :])]
        if not torch.jit.is_tracing():
            swap = dict(zip(self.slots, tensors, strict=True))
            return torch.func.functional_call(self.inner, swap, data, strict=False)
        # the TorchScript tracer refuses torch.func: put the inputs in the modules' slots by hand, then restore
        saved = []
        for slot, t in zip(self.slots, tensors, strict=True):
            owner, _, attr = slot.rpartition(".")
            mod = self.inner.get_submodule(owner) if owner else self.inner
            table = mod._parameters if attr in mod._parameters else mod._buffers
            saved.append((table, attr, table[attr]))
            table[attr] = t
        try:
            return self.inner(*data)
        finally:
            for table, attr, old in saved:
                table[attr] = old


def _slots(spec, model: nn.Module, names: list[str]) -> dict[str, str]:
    """Adapter input name -> the graph module's own name of that tensor: the model's adapter tensors the graph
    reads (matched by identity; the ones it does not read are left out), and the buffers the export wrapper holds
    itself (values derived from trained tensors at export time, e.g. PPT's prompt text features), named
    ``graph.<graph>.<buffer>``."""
    sd = model.state_dict(keep_vars=True)
    by_id = {id(sd[n]): n for n in names if n in sd}
    model_ids = {id(t) for t in sd.values()}
    module = spec.module
    found: dict[str, str] = {}
    for own, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) in by_id:
            found.setdefault(by_id[id(t)], own)
        elif id(t) not in model_ids and not isinstance(t, nn.Parameter):
            found.setdefault(f"graph.{spec.graph_name}.{own}", own)
    return found


def _wrapper_tensors(specs, model: nn.Module) -> dict[str, torch.Tensor]:
    """The export wrappers' own buffers of every graph (see :func:`_slots`), by adapter input name."""
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        own = dict(s.module.named_buffers(remove_duplicate=False))
        for key, name in _slots(s, model, []).items():
            out[key] = own[name]
    return out


def _export_pack_graph(
    spec,
    model: nn.Module,
    tensors: dict[str, np.ndarray],
    head_dims: dict[str, int | None],
    folder: Path,
    run_dir: Path,
    exporter: str,
) -> tuple[dict[str, Any], list[str]]:
    """Exports one graph with its adapter tensors as inputs (zero default initializers; ``tensors``: the first
    run's, by adapter input name, for the example call); returns (manifest graph entry with ``adapter_inputs``,
    the adapter input names)."""
    import onnx
    from onnx import numpy_helper

    slots = _slots(spec, model, list(tensors))
    names = list(slots)
    data = list(spec.example_inputs)
    clash = sorted(set(names) & set(data))
    if clash:
        raise ExportError(f"graph {spec.graph_name!r} has data inputs named like adapter tensors {clash}")
    own = {**dict(spec.module.named_parameters(remove_duplicate=False)),
           **dict(spec.module.named_buffers(remove_duplicate=False))}  # fmt: skip
    scalars = {slots[n] for n in names if own[slots[n]].ndim == 0}
    wrapper = PackGraph(spec.module, len(data), [slots[n] for n in names], scalars).eval()
    args = tuple(spec.example_inputs[n] for n in data) + tuple(torch.from_numpy(tensors[n]) for n in names)
    exporter = spec.exporter or exporter
    raw = folder / f".raw-{spec.graph_name}.onnx"
    t0 = time.perf_counter()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                classes = torch.export.Dim(CLASSES, min=1, max=1_000_000)
                dims = [{0: batch} if spec.dynamic_batch else None for _ in data]
                dims += [{head_dims[n]: classes} if head_dims.get(n) is not None else None for n in names]
                torch.onnx.export(
                    wrapper, args, str(raw), input_names=data + names, output_names=spec.output_names,
                    dynamic_shapes=(tuple(dims),), dynamo=True, external_data=True, verbose=False,
                )  # fmt: skip
            elif exporter == "torchscript":
                axes = {n: {0: "batch"} for n in data + spec.output_names} if spec.dynamic_batch else {}
                axes.update({n: {head_dims[n]: CLASSES} for n in names if head_dims.get(n) is not None})
                torch.onnx.export(
                    wrapper, args, str(raw), input_names=data + names, output_names=spec.output_names,
                    dynamic_axes=axes, dynamo=False, opset_version=17,
                )  # fmt: skip
            else:
                raise ValueError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    except Exception as e:
        raise ExportError(
            f"the {exporter} exporter failed on the pack graph {spec.graph_name!r} of {run_dir}: "
            f"{type(e).__name__}: {str(e)[:500]}"
        ) from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    m = onnx.load(str(raw))
    graph_inputs = {i.name for i in m.graph.input}
    used = [n for n in names if n in graph_inputs]  # an input the graph never reads is dropped by the exporter
    for n in used:
        value = tensors[n]
        shape = list(value.shape)
        if head_dims.get(n) is not None:
            shape[head_dims[n]] = 1  # the default of a symbolic dim: smallest valid size
        m.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, value.dtype), n))
    out = folder / f"{spec.graph_name}.onnx"
    onnx.save(m, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{out.name}.data")
    for p in folder.glob(f"{raw.name}*"):
        p.unlink()
    onnx.checker.check_model(str(out))
    sess = ort_session(out)
    entry = {
        "file": out.name,
        "inputs": {i.name: {"shape": [d if isinstance(d, int) else "batch" for d in i.shape],
                            "dtype": dtype_name(i.type)} for i in sess.get_inputs()},
        "outputs": {o.name: {"shape": [d if isinstance(d, int) else str(d) for d in o.shape],
                             "dtype": dtype_name(o.type), "meaning": (spec.outputs_meaning or {}).get(o.name, "")}
                    for o in sess.get_outputs()},
        "adapter_inputs": {i.name: {"shape": [d if isinstance(d, int) else str(d) for d in i.shape],
                                    "dtype": dtype_name(i.type)} for i in sess.get_overridable_initializers()},
        "export_seconds": time.perf_counter() - t0,
        "exporter": exporter,
    }  # fmt: skip
    return entry, used
