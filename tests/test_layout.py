"""The shape of the source tree: modules under src/wanpipe import each other without loops."""

from __future__ import annotations

import ast
from pathlib import Path

import wanpipe

SRC = Path(wanpipe.__file__).resolve().parent.parent  # the folder that holds the wanpipe package


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "wanpipe").rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The wanpipe modules that ``name`` imports anywhere in its file: at the top, inside functions,
    under ``TYPE_CHECKING``. ``from pkg import x`` counts as ``pkg.x`` when that is a module, else
    ``pkg``; the parent packages a dotted import also runs are not counted (that is no loop)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_import_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "wanpipe.serving.app" in graph["wanpipe.serving.cli"]  # imported inside _serve
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


MAX_LINES = 600


def test_no_source_file_over_600_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, "split these: " + str(
        sorted(((k, n) for n, k in long.items() if k > MAX_LINES), reverse=True)
    )


# What each floor may import from wanpipe: the models are pure modules, the typed messages and
# configs sit below the engine, the engine below the front doors.
FLOORS: dict[str, tuple[str, ...]] = {
    "wanpipe.arguments": (),
    "wanpipe.video_writer": (),
    "wanpipe.models": ("wanpipe.models",),
    "wanpipe.schedulers": ("wanpipe.schedulers",),
    "wanpipe.config": ("wanpipe.models", "wanpipe.schedulers"),
    "wanpipe.context": ("wanpipe.schedulers",),
    "wanpipe.presets": ("wanpipe.config", "wanpipe.context", "wanpipe.schedulers"),
    "wanpipe.stages": (
        "wanpipe.models",
        "wanpipe.runtime",
        "wanpipe.schedulers",
        "wanpipe.batch",
        "wanpipe.context",
        "wanpipe.parallel",
        "wanpipe.video_writer",
    ),
    "wanpipe.weights": ("wanpipe.weights", "wanpipe.models", "wanpipe.config", "wanpipe.schedulers"),
    # extension drives a pipeline it is handed (WanPipeline.extend), it imports none of the engine
    "wanpipe.extend": ("wanpipe.config", "wanpipe.context", "wanpipe.media", "wanpipe.schedulers"),
}


def test_floors_import_only_what_is_below_them() -> None:
    graph = import_graph()
    wrong = []
    for name, imported in graph.items():
        for floor, allowed in FLOORS.items():
            if name == floor or name.startswith(floor + "."):
                wrong += [
                    (name, m)
                    for m in imported
                    if not any(m == a or m.startswith(a + ".") for a in (floor, *allowed))
                ]
    assert not wrong, f"imports across floors: {sorted(wrong)}"


def test_dit_blocks_are_called_in_one_place() -> None:
    """Statically: the only call of a block is in ``call_block``, and the only loop over blocks that
    calls them is ``run_blocks`` (the streamer's generator yields, it does not call)."""
    calls = []
    other_models = (
        "wanpipe.models.umt5",
        "wanpipe.models.vae",
        "wanpipe.models.vae_layers",
    )  # their own blocks
    for name, path in _modules().items():
        if name in other_models:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("block", "buffer")
                ):
                    calls.append((name, fn.name))
    assert calls == [("wanpipe.models.transformer", "call_block")], calls


def test_every_dit_path_runs_the_blocks_through_run_blocks(wan_pipe, monkeypatch) -> None:
    """At run time, on the plain, block-offloaded and (one-rank) parallel paths, every block forward is
    called from call_block inside run_blocks."""
    import sys

    from wanpipe import WanRequest
    from wanpipe.models.transformer_layers import WanBlock
    from wanpipe.parallel import ParallelConfig
    from wanpipe.runtime import RuntimeOptions

    stacks: list[set[str]] = []
    forward = WanBlock.forward

    def spy(self, *args, **kwargs):
        frame, names = sys._getframe(1), set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        stacks.append(names)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(WanBlock, "forward", spy)
    request = WanRequest(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=2, seed=1)
    runtime = wan_pipe.executor.runtime
    try:
        for setup in ("plain", "block offload", "parallel"):
            if setup == "block offload":
                wan_pipe.set_runtime(RuntimeOptions(offload="block"))
            if setup == "parallel":
                wan_pipe.set_runtime(runtime)
                wan_pipe.enable_parallel(ParallelConfig())
            stacks.clear()
            wan_pipe.generate_batch([request], progress=False)
            blocks = len(wan_pipe.executor.transformer.blocks)
            assert len(stacks) == 2 * blocks, setup
            assert all({"call_block", "run_blocks"} <= names for names in stacks), setup
    finally:
        wan_pipe.enable_parallel(None)
        wan_pipe.set_runtime(runtime)
