"""The shape of the code base: one way dependencies, no native code of ours, and a README for users."""
from __future__ import annotations

import ast
import glob
import os
import re

from tests.conftest import ROOT

PACKAGES = ("lima_jax", "data_pipeline")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every Python file in our packages."""
    out = {}
    for package in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path: str, modules: dict) -> set[str]:
    """Our modules that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "lima_jax.checkpoint" in graph and "lima_jax.train" in graph  # the parse sees our modules
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_only_the_command_line_imports_the_training_loop():
    importers = sorted(m for m, deps in import_graph().items() if "lima_jax.train" in deps)
    assert importers == ["lima_jax.cli.train"], importers
    for path in glob.glob(os.path.join(ROOT, "tools", "*.py")):
        assert "lima_jax.train" not in _imports(path, _modules()), path


NATIVE_SUFFIXES = (".c", ".h", ".cc", ".cpp", ".so", ".pyx")


def test_no_native_code_of_ours():
    native = [p for p in glob.glob(os.path.join(ROOT, "lima_jax", "**", "*"), recursive=True)
              if p.endswith(NATIVE_SUFFIXES)]
    assert not native, native
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert "ext_modules" not in setup and "Extension" not in setup  # pip install -e . compiles nothing
    for name, path in _modules().items():
        text = open(path, encoding="utf-8").read()
        # Whole words: "tpu_custom_call", the op a Pallas TPU kernel of jax's becomes, is not a call of ours.
        for marker in ("ctypes", "ffi_call", "custom_call", "CDLL"):
            assert not re.search(rf"\b{marker}\b", text), f"{path} uses {marker}"


def test_no_blas_or_allocator_handling():
    pattern = re.compile(r"\b(mkl|openblas|mallopt|malloc)\b", re.IGNORECASE)
    files = [os.path.join(ROOT, f) for f in ("setup.py", "Makefile", "README.md")] + list(_modules().values()) \
        + glob.glob(os.path.join(ROOT, "tools", "*.py"))
    hits = [f"{path}:{n}: {line.strip()}" for path in files
            for n, line in enumerate(open(path, encoding="utf-8"), start=1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


# ---- the README ---------------------------------------------------------------------------------
def _readme() -> str:
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_readme_is_short_and_for_users():
    text = _readme()
    assert len(text) <= 14_000, len(text)
    assert "make demo" in text and "make test" in text
    for note in ("heap", "ynnpack", "reduce-window", "reduce_window", "custom call", "csrc", "cpu_gemm",
                 "cpu_tuning", "page fault"):
        assert note not in text.lower(), f"README mentions {note!r}: an implementation note, not for users"


def test_readme_install_lines_match_the_makefile_and_setup():
    """The install by hand is the Makefile's; any other install line (a GPU's extra) names extras that
    setup.py has."""
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    [spec] = re.findall(r"pip install .*?(-e '[^']+')", makefile)
    installs = re.findall(r"pip install[^`\n]*", _readme())
    assert installs, "README shows no install line"
    assert spec in installs[0], (spec, installs)
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    extras = set(re.findall(r'^ {8}"(\w+)": \[', setup, re.MULTILINE))
    assert {"test", "tpu", "cuda"} <= extras, extras
    for line in installs:
        [named] = re.findall(r"-e '\.\[([\w,]+)\]'", line)
        assert set(named.split(",")) <= extras, (line, extras)


# A path of ours: one of the repo's top-level folders, then more path; globs allowed.
_REPO_PATH = re.compile(r"(?<![\w./-])((?:lima_jax|data_pipeline|gin|tools|tests|docs)/[\w*./-]*[\w*])")


def _text_files() -> list[str]:
    files = [os.path.join(ROOT, f) for f in ("README.md", "setup.py", "Makefile")]
    for folder, suffixes in (("lima_jax", (".py", ".txt")), ("data_pipeline", (".py",)), ("tools", (".py",)),
                             ("tests", (".py", ".gin")), ("gin", (".gin",)), ("docs", (".md",))):
        files += [p for p in glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True) if p.endswith(suffixes)]
    return files


def missing_paths(text: str) -> list[str]:
    """The repo paths named in `text` that match no file or folder of the repo."""
    return [p for p in _REPO_PATH.findall(text) if not glob.glob(os.path.join(ROOT, p.rstrip(".")))]


def test_path_finder_flags_a_file_that_is_not_here():
    assert missing_paths("see lima_jax/csrc/pool.c and lima_jax/model.py") == ["lima_jax/csrc/pool.c"]
    assert missing_paths("(gin/models/*.gin, `docs/PERFORMANCE.md`)") == []


def test_files_named_in_docs_and_comments_exist():
    bad = []
    for path in _text_files():
        if path == os.path.abspath(__file__):
            continue  # this file names missing paths on purpose
        for n, line in enumerate(open(path, encoding="utf-8"), start=1):
            bad += [f"{os.path.relpath(path, ROOT)}:{n}: {p}" for p in missing_paths(line)]
    assert not bad, "\n".join(bad)
