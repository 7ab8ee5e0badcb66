"""The stage DAG, read from ``dvc.yaml`` through DVC's own index (never a hard-coded list).

Stages come out in a topological order that keeps ``dvc.yaml``'s order among stages
that could run in either order, so the flow's task order is stable and readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SelectionError(ValueError):
    """A stage selection that names no stage of ``dvc.yaml``, phrased for the user."""


@dataclass(frozen=True)
class Output:
    """One entry of a stage's ``outs``/``metrics``/``plots`` in ``dvc.yaml``."""

    path: str  # as written in dvc.yaml (relative to the workspace)
    kind: str  # "out", "metric" or "plot"
    cache: bool
    persist: bool
    plot: dict[str, Any] = field(default_factory=dict)  # x/y etc. of a plot


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: tuple[str, ...]  # direct and indirect upstream stages, in pipeline order
    params: dict[str, tuple[str, ...]]  # params file -> tracked keys (empty: whole file)
    outputs: tuple[Output, ...]

    def files(self, kind: str) -> list[str]:
        return [o.path for o in self.outputs if o.kind == kind]


@dataclass(frozen=True)
class Pipeline:
    workspace: Path
    stages: tuple[StageSpec, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def __getitem__(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise SelectionError(f"no stage '{name}' in dvc.yaml (stages: {', '.join(self.names)})")

    def downstream(self, name: str) -> list[str]:
        """Stages that (directly or not) use ``name``'s outputs, in pipeline order."""
        self[name]
        return [s.name for s in self.stages if name in s.upstream]

    def select(self, only: list[str] | None = None, from_stage: str | None = None) -> list[str]:
        """All stages; ``only`` these; or ``from_stage`` and everything downstream of it."""
        if only and from_stage:
            raise SelectionError("choose either 'only' or 'from_stage', not both")
        if only:
            for name in only:
                self[name]
            return [name for name in self.names if name in only]
        if from_stage:
            return [from_stage, *self.downstream(from_stage)]
        return self.names


def _output(out: Any) -> Output:
    kind = "metric" if out.metric else "plot" if out.plot else "out"
    plot = out.plot if isinstance(out.plot, dict) else {}
    return Output(str(out.def_path), kind, bool(out.use_cache), bool(out.persist), plot)


def _params(stage: Any) -> dict[str, tuple[str, ...]]:
    from dvc.dependency.param import ParamsDependency

    return {str(dep.def_path): tuple(dep.params) for dep in stage.deps
            if isinstance(dep, ParamsDependency)}


def topological(order: list[str], upstream_of: dict[str, set[str]]) -> list[str]:
    """Kahn's algorithm; among ready stages, the one listed first in ``order`` goes first."""
    done: list[str] = []
    waiting = list(order)
    while waiting:
        ready = next((n for n in waiting if upstream_of[n] <= set(done)), None)
        if ready is None:
            raise SelectionError(f"dvc.yaml has a cycle among {', '.join(waiting)}")
        done.append(ready)
        waiting.remove(ready)
    return done


def load_pipeline(workspace: Path) -> Pipeline:
    """The stages of ``<workspace>/dvc.yaml`` with their DAG, params and outputs."""
    import networkx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    dvc_yaml = (workspace / "dvc.yaml").resolve()
    with Repo(str(workspace)) as repo:
        index = repo.index
        graph = index.graph  # edges point from a stage to the stages it depends on
        ours = [s for s in index.stages
                if isinstance(s, PipelineStage) and Path(s.dvcfile.path).resolve() == dvc_yaml]
        names = [s.name for s in ours]
        upstream = {s.name: {getattr(u, "name", None) for u in networkx.descendants(graph, s)}
                    & set(names) for s in ours}
        order = topological(names, upstream)
        by_name = {s.name: s for s in ours}
        specs = tuple(
            StageSpec(name, tuple(n for n in order if n in upstream[name]),
                      _params(by_name[name]), tuple(_output(o) for o in by_name[name].outs))
            for name in order)
    return Pipeline(workspace.resolve(), specs)
