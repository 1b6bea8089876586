"""``torch.compile`` as a config switch (``MODEL.COMPILE``): the tensor-heavy submodules of the model
(by default the backbone and the transformer) are compiled in place, their graphs and graph breaks
are counted and logged, and a compilation that fails makes that submodule run eagerly instead of
ending the run.

* In place: :meth:`torch.nn.Module.compile` only sets the module's ``_compiled_call_impl``, so
  parameter names, ``state_dict`` keys, checkpoints, DDP wrapping, the optimizer's parameter groups
  and LoRA merging are the same as without compilation.
* Lazy errors: ``torch.compile`` compiles at the first call (and again on a new input shape or on
  ``train()`` / ``eval()``), so that is where a missing C++ compiler, a backend that does not import
  or a dynamo error shows up. Every compiled call therefore goes through :class:`_GuardedCall`: when
  the compiled call raises and the same call succeeds eagerly, the module is detached from its
  compiled callable for good and a warning says what failed. When the eager call fails too, the
  error is the model's own and is raised. In training the backward graph is compiled together with
  the forward graph, so that its errors are caught here as well (AOTAutograd otherwise compiles it
  at the first ``backward()``).
* Counting: dynamo's process-wide counters (``torch._dynamo.utils.counters``) are read before and
  after every compiled call; the graphs and graph breaks (with their reasons) a call added are
  attributed to its module, logged, and kept in the :class:`CompileReport` that
  :func:`compile_report` returns. :class:`CompileMetricsHook` puts the totals into the training
  metrics (``compile/graphs``, ``compile/graph_breaks``, ``compile/compilations``,
  ``compile/eager_fallbacks``).
"""
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from detectron2.engine.train_loop import HookBase

__all__ = ["CompileMetricsHook", "CompileReport", "ModuleCompileState", "check_compile_config",
           "compile_model", "compile_modes", "compile_report"]

logger = logging.getLogger(__name__)

# torch.compile's modes, used when torch._inductor cannot be imported to list them.
_KNOWN_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_REPORT_ATTR = "_dinodet2_compile_report"
_MAX_REASONS_LOGGED = 5


def compile_modes() -> Tuple[str, ...]:
    """The ``mode`` values ``torch.compile`` accepts (inductor's mode table)."""
    try:
        from torch._inductor import list_mode_options

        return tuple(list_mode_options())
    except Exception:  # inductor missing or broken: validate against the documented modes
        return _KNOWN_MODES


def _known_backends() -> Optional[Tuple[str, ...]]:
    """Registered dynamo backends (debug ones such as ``aot_eager`` included); None if unavailable."""
    try:
        return tuple(torch._dynamo.list_backends(exclude_tags=()))
    except Exception:
        return None


def check_compile_config(cfg) -> None:
    """Reject ``MODEL.COMPILE`` values that are mistakes rather than missing support."""
    c = cfg.MODEL.COMPILE
    modes = compile_modes()
    if c.MODE not in modes:
        raise ValueError(f"MODEL.COMPILE.MODE '{c.MODE}' is not a torch.compile mode; use one of {list(modes)}.")
    if c.MODE != "default" and c.BACKEND != "inductor":
        raise ValueError(f"MODEL.COMPILE.MODE '{c.MODE}' is an inductor mode; with MODEL.COMPILE.BACKEND "
                         f"'{c.BACKEND}' use MODE 'default'.")
    backends = _known_backends()
    if backends is not None and c.BACKEND not in backends:
        raise ValueError(f"MODEL.COMPILE.BACKEND '{c.BACKEND}' is not a registered torch.compile backend; "
                         f"registered: {list(backends)}.")
    if c.DYNAMIC not in (None, True, False):
        raise ValueError(f"MODEL.COMPILE.DYNAMIC must be None, True or False, got {c.DYNAMIC!r}.")
    names = list(c.MODULES)
    if not names:
        raise ValueError("MODEL.COMPILE.MODULES is empty; name the submodules to compile, e.g. "
                         "['backbone', 'transformer'], or set MODEL.COMPILE.ENABLED False.")
    nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
    if nested or len(set(names)) != len(names):
        raise ValueError(f"MODEL.COMPILE.MODULES {names} names a module twice or a module inside another "
                         f"one ({nested}); compile the outer one only.")


@dataclass
class ModuleCompileState:
    """What compiling one submodule produced so far."""

    name: str
    calls: int = 0
    compilations: int = 0  # calls that compiled new graphs (first call, new shapes, train / eval switch)
    graphs: int = 0
    graph_breaks: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_call_seconds: Optional[float] = None
    compile_call_seconds: float = 0.0  # wall time of the calls that compiled (compilation + the call itself)
    fallback: Optional[str] = None  # why it runs eagerly, if it does

    def as_dict(self) -> Dict:
        return {"calls": self.calls, "compilations": self.compilations, "graphs": self.graphs,
                "graph_breaks": self.graph_breaks, "graph_break_reasons": dict(self.reasons),
                "first_call_seconds": self.first_call_seconds, "compile_call_seconds": self.compile_call_seconds,
                "eager_fallback": self.fallback}


@dataclass
class CompileReport:
    """The compiled submodules of one model and how compiling them went."""

    backend: str
    mode: str
    dynamic: Optional[bool]
    modules: Dict[str, ModuleCompileState] = field(default_factory=dict)

    def totals(self) -> Dict[str, int]:
        states = self.modules.values()
        return {"graphs": sum(s.graphs for s in states), "graph_breaks": sum(s.graph_breaks for s in states),
                "compilations": sum(s.compilations for s in states),
                "eager_fallbacks": sum(s.fallback is not None for s in states)}

    def as_dict(self) -> Dict:
        return {"backend": self.backend, "mode": self.mode, "dynamic": self.dynamic, **self.totals(),
                "modules": {name: s.as_dict() for name, s in self.modules.items()}}


def compile_report(model: nn.Module) -> Optional[CompileReport]:
    """The :class:`CompileReport` of a model :func:`compile_model` compiled (DDP-wrapped or not), else None."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, _REPORT_ATTR, None)


def _dynamo_counts() -> Tuple[int, Counter]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], Counter(counters["graph_break"])


def _short_reason(reason: str) -> str:
    """First line of a dynamo graph-break reason, plus its debug context (e.g. the operator)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    context = next((line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("Developer debug context:")), "")
    text = lines[0] + (f" ({context})" if context else "")
    return text if len(text) <= 240 else text[:237] + "..."


def _compile_backward_with_forward():
    """AOTAutograd compiles the backward graph at the first ``backward()`` unless told otherwise;
    compile it with the forward graph so that its errors reach :class:`_GuardedCall` (training only)."""
    config = getattr(torch._functorch, "config", None)
    if torch.is_grad_enabled() and hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of an error, and of the error it wraps (dynamo's ``BackendCompilerFailed``
    says only which backend raised; what it raised is its ``inner_exception`` / ``__cause__``)."""
    def line(e):
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"

    inner = getattr(error, "inner_exception", None) or error.__cause__
    text = line(error) + (f" <- {line(inner)}" if inner is not None and inner is not error else "")
    return text if len(text) <= 400 else text[:397] + "..."


class _GuardedCall:
    """The compiled ``_call_impl`` of one module, counting what each call compiled and falling back
    to the eager ``_call_impl`` for good when a compiled call fails and the eager one does not.

    Dynamo's caches are process-wide and shared by every compiled module (they are keyed by the
    code of ``nn.Module._call_impl``), so a failed module is only detached from its compiled
    callable; ``torch._dynamo.reset()`` would throw away the other modules' graphs as well.
    """

    def __init__(self, module: nn.Module, compiled: Callable, state: ModuleCompileState, settings: str):
        self.module = module
        self.compiled = compiled
        self.state = state
        self.settings = settings

    def __call__(self, *args, **kwargs):
        graphs_before, breaks_before = _dynamo_counts()
        start = time.perf_counter()
        try:
            with _compile_backward_with_forward():
                output = self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- anything compilation raises; eager decides below
            return self._run_eagerly(error, args, kwargs)
        seconds = time.perf_counter() - start
        graphs_after, breaks_after = _dynamo_counts()
        self._record(graphs_after - graphs_before, breaks_after - breaks_before, seconds)
        return output

    def _record(self, new_graphs: int, new_breaks: Counter, seconds: float) -> None:
        s = self.state
        s.calls += 1
        if s.first_call_seconds is None:
            s.first_call_seconds = seconds
        if not new_graphs and not new_breaks:
            return
        s.compilations += 1
        s.graphs += new_graphs
        s.graph_breaks += sum(new_breaks.values())
        s.compile_call_seconds += seconds
        reasons = Counter()
        for reason, count in new_breaks.items():
            reasons[_short_reason(reason)] += count
        s.reasons.update(reasons)
        phase = "training" if self.module.training else "inference"
        lines = [f"torch.compile of `{s.name}` ({self.settings}), {phase} call {s.calls}: compiled "
                 f"{new_graphs} graph(s) with {sum(new_breaks.values())} graph break(s) in {seconds:.1f} s "
                 f"(so far: {s.graphs} graphs, {s.graph_breaks} graph breaks, {s.compilations} compilations)."]
        if reasons:
            lines.append("  graph-break reasons (count: reason; where: rerun with TORCH_LOGS=graph_breaks):")
            lines += [f"    {count}: {reason}" for reason, count in reasons.most_common(_MAX_REASONS_LOGGED)]
        if s.compilations > 1:
            lines.append("  (a new compilation: new input shapes or train()/eval(); see TORCH_LOGS=recompiles)")
        logger.info("\n".join(lines))

    def _run_eagerly(self, error: Exception, args, kwargs):
        output = self.module._call_impl(*args, **kwargs)  # raises if the error is the model's own
        s = self.state
        s.fallback = _first_line(error)
        s.calls += 1
        self.module._compiled_call_impl = None  # eager from now on
        logger.warning(
            "torch.compile of `%s` (%s) failed at %s: %s. `%s` runs eagerly from now on (same results, "
            "without compilation's speed-up). Set MODEL.COMPILE.ENABLED False to skip compiling; "
            "TORCHDYNAMO_VERBOSE=1 prints dynamo's full traceback.",
            s.name, self.settings, "its first call" if s.calls == 1 else f"call {s.calls}", s.fallback, s.name)
        logger.debug("torch.compile failure of `%s`", s.name, exc_info=error)
        return output


def compile_model(cfg, model: nn.Module) -> nn.Module:
    """Compile ``cfg.MODEL.COMPILE.MODULES`` of ``model`` in place when ``MODEL.COMPILE.ENABLED``
    (see the module docstring); return ``model``. Where ``torch.compile`` itself fails (e.g. dynamo
    does not support this Python), the module stays eager and a warning says why."""
    c = cfg.MODEL.COMPILE
    if not c.ENABLED:
        return model
    check_compile_config(cfg)
    report = CompileReport(backend=c.BACKEND, mode=c.MODE, dynamic=c.DYNAMIC)
    settings = f"backend={c.BACKEND}, mode={c.MODE}, dynamic={c.DYNAMIC}"
    modules: List[Tuple[str, nn.Module]] = []
    for name in c.MODULES:
        try:
            modules.append((name, model.get_submodule(name)))
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(f"MODEL.COMPILE.MODULES names '{name}', which {type(model).__name__} does not have "
                             f"(its submodules: {children}).") from None
    for name, module in modules:
        state = report.modules[name] = ModuleCompileState(name)
        try:
            module.compile(backend=c.BACKEND, mode=None if c.MODE == "default" else c.MODE, dynamic=c.DYNAMIC)
        except Exception as error:  # noqa: BLE001 -- e.g. dynamo unsupported here, the backend does not import
            module._compiled_call_impl = None
            state.fallback = _first_line(error)
            logger.warning("torch.compile of `%s` (%s) is unavailable: %s. `%s` runs eagerly.",
                           name, settings, state.fallback, name)
            continue
        module._compiled_call_impl = _GuardedCall(module, module._compiled_call_impl, state, settings)
    setattr(model, _REPORT_ATTR, report)
    logger.info("torch.compile (%s) on %s; compiled at the first call of each (graphs and graph breaks are "
                "logged then).", settings, ", ".join(f"`{n}`" for n, _ in modules))
    return model


class CompileMetricsHook(HookBase):
    """Puts the model's compile totals (:meth:`CompileReport.totals`) into the event storage after
    every step: ``compile/graphs``, ``compile/graph_breaks``, ``compile/compilations``,
    ``compile/eager_fallbacks``."""

    def __init__(self, model: nn.Module):
        self._model = model

    def after_step(self):
        report = compile_report(self._model)
        if report is not None:
            self.trainer.storage.put_scalars(
                **{f"compile/{k}": v for k, v in report.totals().items()}, smoothing_hint=False)
