"""Planning TensorRT engine builds: pure functions of the manifest, no TensorRT needed (they test anywhere).

- the optimization profile of a graph: every input axis's min/opt/max from the manifest, maxima lowered by the
  user (`--max AXIS=N`), and the min/opt/max shape of every input;
- the network typing and builder flags of a precision (`runtime/bundle/precisions.py` says what each precision needs);
- the options that reproduce a build, recorded per engine and compared before an engine is called up to date;
- the engine record in manifest.json, rewritten atomically (runtime/files/atomic.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bundle.manifest import MANIFEST_FILE, AxisRange, GraphEntry, Manifest, check_file_name
from ..bundle.precisions import get_precision
from ..bundle.tensors import TensorInfo
from ..errors import BundleError, MirasolError
from ..files.atomic import write_file

ENGINE_SUFFIX = ".engine"
TYPINGS = ("auto", "strong", "weak")
DEFAULT_WORKSPACE_MB = 1024


def engine_file_name(graph: str, precision: str) -> str:
    """`<graph>.<precision>.engine`, a plain file name inside the bundle."""
    name = f"{graph}.{precision}{ENGINE_SUFFIX}"
    check_file_name(name, f"the engine of graph {graph!r}")
    return name


def build_args(precision: str, axis_max: Mapping[str, int] | None = None, *, typing: str = "auto",
               workspace_mb: int | None = None, int8_fp16: bool = True, tf32: bool = False,
               optimization_level: int | None = None) -> list[str]:
    """The command-line options that reproduce a build (recorded per engine as "build_args"; an engine built with
    other options is not up to date)."""
    args = ["--precision", precision]
    for axis, value in sorted((axis_max or {}).items()):
        args += ["--max", f"{axis}={int(value)}"]
    if typing != "auto":
        args += ["--typing", typing]
    if workspace_mb is not None and workspace_mb != DEFAULT_WORKSPACE_MB:
        args += ["--workspace-mb", str(int(workspace_mb))]
    if not int8_fp16:
        args.append("--int8-fp32")
    if tf32:
        args.append("--tf32")
    if optimization_level is not None:
        args += ["--opt-level", str(int(optimization_level))]
    return args


def profile_axes(entry: GraphEntry, axis_max: Mapping[str, int] | None = None) -> dict[str, AxisRange]:
    """The min/opt/max of every axis the graph's inputs use, after the user's maxima.

    `axis_max` maps an axis name to a smaller maximum (e.g. {"batch": 1}). It may only lower the manifest's
    maximum: the manifest's range is what the export validated and what the runtime bounds inputs by, so a larger
    profile would never be used. opt is clamped down to the new maximum.
    """
    result: dict[str, AxisRange] = {}
    for axis in _input_axes(entry):
        rng = entry.axes.get(axis)
        if rng is None:
            raise BundleError(f"graph {entry.name!r}: axis {axis!r} (used by its inputs) has no range in the manifest, "
                              f"so no optimization profile can bound it; re-export the bundle")
        if not (0 <= rng.min <= rng.opt <= rng.max):
            raise BundleError(f"graph {entry.name!r}: axis {axis!r} range min={rng.min} opt={rng.opt} max={rng.max} "
                              f"is not 0 <= min <= opt <= max")
        result[axis] = rng
    for axis, new_max in (axis_max or {}).items():
        if axis not in result:
            continue  # an override for an axis another graph uses
        rng = result[axis]
        new_max = int(new_max)
        if new_max > rng.max:
            raise BundleError(f"--max {axis}={new_max} is above the bundle's maximum {rng.max} for axis {axis!r} "
                              f"(graph {entry.name!r}); the runtime never feeds more, so only lower maxima are allowed")
        if new_max < rng.min:
            raise BundleError(f"--max {axis}={new_max} is below the axis minimum {rng.min} (graph {entry.name!r})")
        result[axis] = AxisRange(rng.min, min(rng.opt, new_max), new_max)
    return result


def check_axis_overrides(manifest: Manifest, axis_max: Mapping[str, int] | None,
                         graphs: Sequence[str] | None = None) -> None:
    """Every overridden axis must be an axis some selected graph's inputs use (catches typos)."""
    if not axis_max:
        return
    known: set[str] = set()
    for name in graphs or manifest.graphs:
        known.update(_input_axes(manifest.graphs[name]))
    unknown = sorted(set(axis_max) - known)
    if unknown:
        raise BundleError(f"unknown axis {', '.join(map(repr, unknown))} in --max; the graphs' inputs use the axes "
                          f"{', '.join(sorted(known)) or '(none)'}")
    for axis, value in axis_max.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BundleError(f"--max {axis}={value!r}: the maximum must be a non-negative integer")


def input_shapes(entry: GraphEntry, axes: Mapping[str, AxisRange]) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape of every input: each symbolic dimension replaced by its axis range."""
    shapes: dict[str, dict[str, list[int]]] = {}
    for tensor in entry.inputs:
        shapes[tensor.name] = {
            which: [_dim(tensor, d, axes, which, entry.name) for d in tensor.shape] for which in ("min", "opt", "max")}
    return shapes


def check_fixed_dims(entry: GraphEntry, input_name: str, network_shape: Sequence[int],
                     shape: Mapping[str, Sequence[int]]) -> None:
    """The parsed network's dimensions that are fixed (not -1) must be what the profile gives at min, opt and max.

    TensorRT can only vary dimensions the network leaves dynamic: a fixed ONNX dimension under a named axis whose
    range is not that one size is refused at build time (the readiness check reports it at export).
    """
    declared = next((t.shape for t in entry.inputs if t.name == input_name), ())
    if len(network_shape) != len(shape["min"]):
        raise BundleError(f"graph {entry.name!r}: input {input_name!r} has rank {len(network_shape)} in the ONNX "
                          f"graph and {len(shape['min'])} in the manifest")
    for i, fixed in enumerate(network_shape):
        sizes = {shape[which][i] for which in ("min", "opt", "max")}
        if fixed >= 0 and sizes != {fixed}:
            axis = declared[i] if i < len(declared) else i
            raise BundleError(f"graph {entry.name!r}: input {input_name!r} dimension {i} is fixed to {fixed} in the "
                              f"ONNX graph, but the profile of axis {axis!r} spans {min(sizes)}..{max(sizes)}; "
                              f"TensorRT cannot vary a fixed dimension: re-export the graph with that dimension "
                              f"dynamic, or give the axis the range {fixed}..{fixed}")


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """How one graph is built: network typing, the builder flags to set / clear, and which layers a weakly typed
    network pins to fp32 (`pinned`: names of layer groups, see build.py's `rotary_layers`)."""

    precision: str
    strongly_typed: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    pinned: tuple[str, ...] = ()


PINNED_GROUPS = ("rotary_angles",)  # measured (calibration/fp16.py) to need fp32: weak typing pins them


def plan_build(precision: str, bundle_precision: str, *, typing: str = "auto", has_precision_flags: bool = True,
               int8_fp16: bool = True, tf32: bool = False) -> BuildPlan:
    """Choose a strongly/weakly typed network and the builder flags for a precision (`bundle/precisions.py` says,
    per precision, which bundles it builds from and which flags weak typing needs).

    - Strongly typed (`auto`, `strong`): the network keeps the graph's types, so it needs a bundle of the engine's
      precision: an fp16 bundle's fp32-kept layers (the rotary angles, ...) stay fp32; an int8 bundle's Q/DQ decide
      int8 and its other layers keep their types. TensorRT 11 has no precision flags (`has_precision_flags=False`)
      and is always strongly typed. `auto` refuses what only weak typing can build, naming both ways out.
    - Weakly typed (`weak`, TensorRT 10 only, asked for by name): fp32 sets no flag; fp16 from an fp32 bundle sets
      FP16 (TensorRT chooses fp16 kernels); int8 (Q/DQ graphs, explicit quantization, no calibrator) sets INT8, plus
      FP16 for the unquantized layers when `int8_fp16`. Where a flag allows fp16, the layers measured to need fp32
      (PINNED_GROUPS) are pinned to fp32 with OBEY_PRECISION_CONSTRAINTS.
    - TF32 is cleared unless `tf32`, whatever the typing (TensorRT enables it by default; it rounds matmul inputs
      to 10-bit mantissas and would break the fp32 tolerance).
    """
    try:
        entry = get_precision(precision)
    except MirasolError as unknown:
        raise BundleError(str(unknown)) from None
    if typing not in TYPINGS:
        raise BundleError(f"typing {typing!r} is not one of {TYPINGS}")
    if bundle_precision not in entry.engine_sources:
        raise BundleError(f"cannot build {precision} engines from a {bundle_precision} bundle (allowed from: "
                          f"{', '.join(entry.engine_sources)}); export the bundle with --precision {precision}")
    if typing == "weak" and not has_precision_flags:
        raise BundleError("this TensorRT has no precision builder flags (TensorRT 11+ is always strongly typed); "
                          "use --typing strong or auto")
    clear = () if tf32 else ("TF32",)
    if typing == "weak":
        flags = entry.weak_flags + (("FP16",) if entry.weak_fp16_fallback and int8_fp16 else ())
        if "FP16" in flags:
            return BuildPlan(precision, False, flags + ("OBEY_PRECISION_CONSTRAINTS",), clear, PINNED_GROUPS)
        return BuildPlan(precision, False, flags, clear)
    if bundle_precision != precision:
        export = f"export an {precision} bundle (mirasol-export --precision {precision})"
        if not has_precision_flags:
            raise BundleError(f"a strongly typed network keeps the graph's types, and this bundle's graphs are "
                              f"{bundle_precision}: {export}; as this TensorRT types every network strongly, the "
                              f"graphs must be {precision} already (NVIDIA ModelOpt AutoCast also converts ONNX "
                              f"graphs)")
        raise BundleError(f"a strongly typed network (the default) keeps the graph's types, and this bundle's graphs "
                          f"are {bundle_precision}: {export}, whose layers measured to need fp32 stay fp32; or build "
                          f"weakly typed with --typing weak (TensorRT 10 only: TensorRT then chooses {precision} "
                          f"kernels layer by layer, with the rotary-angle layers pinned to fp32)")
    return BuildPlan(precision, True, (), clear)


def int8_problem(manifest: Manifest, bundle_dir: str | os.PathLike[str]) -> str | None:
    """Why TensorRT cannot build this int8 bundle, from what its manifest records (None when it can, or when the
    bundle is not int8): TensorRT takes symmetric signed int8 Q/DQ only (the `tensorrt` int8 target); the `cpu`
    targets quantize activations to uint8 with zero points, which its ONNX parser refuses."""
    if manifest.precision != "int8":
        return None
    recipe = manifest.quantization.get("recipe") or manifest.quantization.get("flavour") or {}
    options = recipe.get("extra_options") or {}
    fits = (recipe.get("format") == "QDQ" and recipe.get("activations") == "QInt8" == recipe.get("weights")
            and bool(options.get("ActivationSymmetric")) and bool(options.get("WeightSymmetric")))
    if fits:
        return None
    if recipe:
        what = (f"its int8 target is {recipe.get('name')!r} ({recipe.get('format')}, {recipe.get('activations')} "
                f"activations{'' if options.get('ActivationSymmetric') else ' with zero points'}), made for ONNX "
                f"Runtime on the CPU")
    else:
        what = "its manifest does not say which int8 target made it"
    data = (manifest.quantization.get("data") or {}).get("source") or "DIR"
    return (f"{bundle_dir} is an int8 bundle TensorRT cannot build: {what}; TensorRT takes only symmetric int8 "
            f"Q/DQ. Export one for TensorRT on the machine with PyTorch, from the --preset or --checkpoint this bundle "
            f"came from: mirasol-export --checkpoint DIR --precision int8 --int8-target tensorrt --calibration-data "
            f"{shlex.quote(str(data))} --out {shlex.quote(str(bundle_dir).rstrip('/') + '-tensorrt')}")


def record_engine(bundle_dir: str | os.PathLike[str], graph: str, record: Mapping[str, Any]) -> Manifest:
    """Set GraphEntry.engine of one graph (re-reading the manifest first) and rewrite the manifest atomically."""
    manifest = Manifest.read(bundle_dir)
    if graph not in manifest.graphs:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST_FILE}: no graph {graph!r}")
    manifest.graphs[graph] = dataclasses.replace(manifest.graphs[graph], engine=dict(record))
    write_file(Path(bundle_dir) / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2))  # a name of ours
    return manifest


def _input_axes(entry: GraphEntry) -> list[str]:
    axes: list[str] = []
    for tensor in entry.inputs:
        for d in tensor.shape:
            if isinstance(d, str) and d not in axes:
                axes.append(d)
    return axes


def _dim(tensor: TensorInfo, d: int | str, axes: Mapping[str, AxisRange], which: str, graph: str) -> int:
    if isinstance(d, bool):
        raise BundleError(f"graph {graph!r}: input {tensor.name!r} has a malformed dimension {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise BundleError(f"graph {graph!r}: input {tensor.name!r} has an unnamed dynamic dimension ({d}); "
                              f"every dynamic dimension needs an axis name with a range in the manifest")
        return d
    if d not in axes:
        raise BundleError(f"graph {graph!r}: input {tensor.name!r} uses axis {d!r}, which has no range")
    return int(getattr(axes[d], which))
