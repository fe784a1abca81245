"""The package layout stays a layering: no two product modules import each other in a circle
(directly or through others), counting imports inside functions too, since a lazy import
that dodges a circle still ties the two modules together."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("cluster", "prefill_worker", "decode_worker", "dllm")


def product_modules() -> dict[str, Path]:
    out = {}
    for root in PRODUCT:
        for path in (REPO / root).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imported(path: Path, module: str, modules: dict) -> set[str]:
    """The product modules `module` imports anywhere in its file (a name imported from a
    package counts as its submodule when it is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def known(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps.update(known(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                deps.add(known(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else known(base))
    return deps - {None, module}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_two_product_modules_import_each_other_in_a_circle():
    modules = product_modules()
    graph = {m: imported(p, m, modules) for m, p in modules.items()}
    assert len(graph) > 100 and "cluster.wire.protocol" in graph["cluster.wire.transport"]
    assert circles(graph) == []


def test_a_circle_is_found_however_long():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


MAX_PRODUCT_LINES = 320   # "about 300": small files, one concept each; a little slack so a
                          # one-line fix never forces a split


def test_no_product_file_is_much_over_300_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in product_modules().values()}
    too_long = {path: n for path, n in sizes.items() if n > MAX_PRODUCT_LINES}
    assert not too_long, f"split these by concept: {too_long}"


def test_the_router_and_the_launcher_never_import_torch():
    # torch costs a routing process ~1 s of CPU and ~180 MB at every start; they never build a tensor
    # (a long prompt leaves the router as a numpy array; only workers decode it into a tensor)
    probe = ("import sys, cluster.router.__main__, cluster.router.frontend, cluster.launch.cli, cluster.launch.launcher;"
             "from cluster.engine.model_files import load_tokenizer, model_config;"
             "from cluster.wire.protocol import encode; from cluster.wire.messages import Generate;"
             "from cluster.sampling_params import SamplingParams;"
             "encode(Generate(rid='r', input_ids=list(range(300)), sampling=SamplingParams()));"
             "load_tokenizer(); model_config(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
