"""The pass registry: passes say which modes they serve, what they must follow, and when they apply.

Two kinds of pass exist. A ``module`` pass rewrites the working copy of the model once (eval, folding,
layout, weight precision). A ``graph`` pass builds a callable for one input signature (Inductor, IPEX,
OpenVINO); graph passes are the candidates the runtime tries in order before falling back to eager.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import threading
from typing import Any, Callable, Iterable, Optional

import torch

from ..errors import PassRegistrationError
from ..machine.hardware import Hardware
from ..options import Options

PASS_MODES = ("infer", "train")
KINDS = ("module", "graph")

# why a pass does not apply here, or None when it does
Availability = Callable[["PlanContext"], Optional[str]]


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What a pass may look at when deciding whether it applies."""

    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    options: Options
    hardware: Hardware
    mode: str

    def has_module(self, *types: type) -> bool:
        return any(isinstance(m, types) for m in self.model.modules())


@dataclasses.dataclass
class PassContext:
    """What a running pass gets: the options, the hardware, and one real input to look at."""

    options: Options
    hardware: Hardware
    mode: str
    optimizer: Optional[torch.optim.Optimizer] = None
    example_args: tuple = ()
    example_kwargs: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    dynamic_dims: Optional[dict] = None  # graph passes: {input position or name: [dims]} to build dynamic in
    artifact_dir: Optional[Any] = None  # graph passes: a persistent folder for this signature's artifacts
    out_dtypes: Any = None  # graph passes: eager's output dtypes (``verify.dtype_template``), cast in the graph

    def note(self, text: str) -> None:
        """Add a detail to this pass's line in the report (what it changed, how many)."""
        self.notes.append(text)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[..., Any]
    kind: str
    modes: frozenset[str]
    after: tuple[str, ...]
    before: tuple[str, ...]
    available: Availability
    doc: str
    dtypes: frozenset = frozenset({torch.float32, torch.bfloat16, torch.float16})  # graph passes: built for
    # module passes: True when the pass may write into weight storage in place; such a plan gets a full
    # copy of the weights. Passes that only rebind (``.to()``, ``param.data = ...``, folding) declare False
    # and the working copy shares every weight they leave alone with the user's model.
    writes_weights: bool = True


@dataclasses.dataclass(frozen=True)
class Plan:
    """Passes chosen for one model, in order, plus a reason for each one left out."""

    mode: str
    module_passes: tuple[PassSpec, ...]
    graph_passes: tuple[PassSpec, ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.module_passes + self.graph_passes]


_lock = threading.Lock()
_passes: dict[str, PassSpec] = {}
_load_lock = threading.Lock()
_loaders: list[Callable[[], None]] = []
_builtins_loaded = False
ENTRY_POINT_GROUP = "cpuboost.passes"


def add_builtin_loader(loader: Callable[[], None]) -> None:
    """Called by ``cpuboost/__init__`` with the function that registers the built-in passes.

    The registry imports no pass: passes import the registry, and the package hands the registry its loader,
    so the import arrows point one way. Third-party passes come from the ``cpuboost.passes`` entry-point group.
    """
    with _load_lock:
        if loader not in _loaders:
            _loaders.append(loader)


def _always(_ctx: PlanContext) -> Optional[str]:
    return None


def _as_tuple(value: Iterable[str] | str) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def register_pass(
    fn: Callable | None = None,
    /,
    *,
    name: str | None = None,
    modes: Iterable[str] | str = ("infer",),
    kind: str = "module",
    after: Iterable[str] | str = (),
    before: Iterable[str] | str = (),
    available: Availability | None = None,
    replace: bool = False,
    dtypes: Iterable[torch.dtype] | None = None,
    writes_weights: bool = True,
):
    """Register a pass; usable bare (``@register_pass``) or with arguments.

    A module pass is ``fn(model, ctx) -> model`` and works on cpuboost's copy of the user's model.
    A graph pass is ``fn(model, example_args, example_kwargs, ctx) -> callable``.
    ``available(ctx)`` returns None when the pass applies, or the reason it does not. ``dtypes``: the dtypes
    a graph pass builds for (default bf16, fp16, fp32; the int8 pass builds for int8 only).
    ``writes_weights=False`` promises a module pass never writes into weight storage in place (it may rebind
    tensors): then cpuboost's working copy shares the weights it leaves alone instead of copying them all.
    """
    if fn is None:
        return lambda f: register_pass(
            f, name=name, modes=modes, kind=kind, after=after, before=before, available=available, replace=replace,
            dtypes=dtypes, writes_weights=writes_weights,
        )
    pass_name = name or fn.__name__
    mode_set = frozenset(_as_tuple(modes))
    if not mode_set or not mode_set <= set(PASS_MODES):
        msg = f"pass {pass_name!r}: modes={sorted(mode_set)!r} must be a non-empty subset of {PASS_MODES}"
        raise PassRegistrationError(msg)
    if kind not in KINDS:
        raise PassRegistrationError(f"pass {pass_name!r}: kind={kind!r} must be one of {KINDS}")
    spec = PassSpec(
        name=pass_name,
        fn=fn,
        kind=kind,
        modes=mode_set,
        after=_as_tuple(after),
        before=_as_tuple(before),
        available=available or _always,
        doc=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        writes_weights=writes_weights,
        **({"dtypes": frozenset(dtypes)} if dtypes is not None else {}),
    )
    if pass_name in spec.after + spec.before:
        raise PassRegistrationError(f"pass {pass_name!r} cannot be ordered relative to itself")
    with _lock:
        if pass_name in _passes and not replace:
            msg = f"a pass named {pass_name!r} is already registered; pick another name or pass replace=True"
            raise PassRegistrationError(msg)
        _passes[pass_name] = spec
    return fn


def unregister_pass(name: str) -> None:
    with _lock:
        if name not in _passes:
            raise PassRegistrationError(f"no pass named {name!r}; registered: {', '.join(_passes)}")
        del _passes[name]


def _load_builtins() -> None:
    """Run the loaders once; the flag is set only after they finished, so no caller sees a half-filled table."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _load_lock:
        if _builtins_loaded:
            return
        for loader in _loaders:
            loader()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry_point.load()()
        _builtins_loaded = True


def list_passes(mode: str | None = None) -> list[str]:
    """Names of registered passes (optionally only those serving ``mode``), in plan order."""
    _load_builtins()
    return [p.name for p in _ordered(list(_passes.values())) if mode is None or mode in p.modes]


def lookup(name: str) -> PassSpec:
    _load_builtins()
    try:
        return _passes[name]
    except KeyError:
        raise PassRegistrationError(f"no pass named {name!r}; registered: {', '.join(_passes)}") from None


def _ordered(specs: list[PassSpec]) -> list[PassSpec]:
    """Topological order by after/before; registration order breaks ties."""
    names = {s.name for s in specs}
    deps: dict[str, set[str]] = {s.name: {a for a in s.after if a in names} for s in specs}
    for s in specs:
        for b in s.before:
            if b in names:
                deps[b].add(s.name)
    order, done = [], set()
    pending = list(specs)
    while pending:
        for s in pending:
            if deps[s.name] <= done:
                order.append(s)
                done.add(s.name)
                pending.remove(s)
                break
        else:
            cycle = ", ".join(s.name for s in pending)
            raise PassRegistrationError(f"pass ordering has a cycle among: {cycle}; fix their after=/before=")
    return order


def plan(model: torch.nn.Module, optimizer, options: Options, hardware: Hardware, mode: str) -> Plan:
    """Pick and order the passes for one model; every pass left out gets a reason."""
    _load_builtins()
    ctx = PlanContext(model=model, optimizer=optimizer, options=options, hardware=hardware, mode=mode)
    with _lock:
        specs = list(_passes.values())
    chosen, skipped = [], []
    for spec in _ordered(specs):
        if mode not in spec.modes:
            continue
        reason = spec.available(ctx)
        if reason:
            skipped.append((spec.name, reason))
        else:
            chosen.append(spec)
    return Plan(
        mode=mode,
        module_passes=tuple(p for p in chosen if p.kind == "module"),
        graph_passes=tuple(p for p in chosen if p.kind == "graph"),
        skipped=tuple(skipped),
    )


def plan_here(model: torch.nn.Module, options: Options, mode: str = "infer") -> tuple[Plan, Hardware]:
    """The plan for ``model`` on this machine, without an optimizer (where an unpickled model lands)."""
    from ..machine.hardware import detect

    hw = detect()
    return plan(model, None, options, hw, mode), hw
