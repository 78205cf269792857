"""The project's size as a reader meets it, before and after a restructuring:

    python tests/size.py            # a table per file, then one summary line

* code lines per .py file outside tests/ and config/: lines that are not blank, not a comment and
  not inside a docstring (comments stay as rich as a learner needs; only code is counted), and the
  code lines longer than 100 characters;
* configuration keys: ModelConfig's fields, and each configurator script's own keys (the names
  assigned at the top level before the line that execs configurator.py: train.py, eval.py,
  predict.py, bench.py);
* circles among the imports of the top-level modules (a module importing one that imports it,
  directly or through others, at the top or inside a function);
* lines of README.md, RESULTS.md and METHODS.md.

Not a test: it measures, it asserts nothing (tests/test_safeguards.py runs it so it cannot rot).
"""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"(^|/)(tests|config|out|data|\.git)/")
CONFIGURATOR_LINE = '"configurator.py")).read())'


def python_files(root=ROOT):
    """Every .py file outside tests/, config/ and the run folders, relative to root, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if name.endswith(".py") and not SKIP.search(rel):
                found.append(rel)
    return sorted(found)


def docstring_lines(tree):
    """Line numbers (1-based) inside the docstrings of the module, its classes and functions."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source):
    """The code lines of a file's source (not blank, not comment, not docstring)."""
    doc = docstring_lines(ast.parse(source))
    return [line for i, line in enumerate(source.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and i not in doc]


def script_keys(source):
    """A configurator script's keys: top-level names assigned before it execs configurator.py."""
    cut = source.find(CONFIGURATOR_LINE)
    if cut < 0:
        return []
    cut_line = source[:cut].count("\n") + 1
    keys = []

    def scan(body):  # the statements before the exec line, into the block that holds it (eval.py's main)
        for node in body:
            if node.lineno >= cut_line:
                return
            if isinstance(node, ast.If) and node.end_lineno >= cut_line:
                return scan(node.body)
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                for name in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", [])):
                    if isinstance(name, ast.Name) and not name.id.startswith("_") and name.id not in keys:
                        keys.append(name.id)

    scan(ast.parse(source).body)
    return keys


def model_config_fields(source):
    """The annotated fields of model.py's ModelConfig dataclass."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "ModelConfig":
            return [n.target.id for n in node.body if isinstance(n, ast.AnnAssign)]
    return []


def imports(source, modules):
    """The top-level modules of this project that a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules


def circles(graph):
    """Each import circle once, as a sorted list of module names (strongly connected components of
    more than one module, or a module importing itself)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def measure(root=ROOT):
    """{"files": [(path, lines, code, long)], "keys": {name: [keys]}, "circles": [...], "docs": {...}}."""
    files, keys, graph = [], {}, {}
    paths = python_files(root)
    modules = {os.path.splitext(p)[0] for p in paths if "/" not in p}
    for path in paths:
        source = open(os.path.join(root, path)).read()
        code = code_lines(source)
        files.append((path, len(source.splitlines()), len(code), sum(len(line) > 100 for line in code)))
        if path == "model.py":
            keys["ModelConfig"] = model_config_fields(source)
        if script_keys(source):
            keys[path] = script_keys(source)
        if "/" not in path:
            graph[os.path.splitext(path)[0]] = imports(source, modules)
    docs = {}
    for name in ("README.md", "RESULTS.md", "METHODS.md"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            docs[name] = len(open(p).read().splitlines())
    return {"files": files, "keys": keys, "circles": circles(graph), "docs": docs}


def main(root=ROOT):
    m = measure(root)
    print(f"{'file':<24}{'lines':>7}{'code':>7}{'code > 100 ch':>15}")
    for path, lines, code, long in m["files"]:
        print(f"{path:<24}{lines:>7}{code:>7}{long:>15}")
    code = sum(f[2] for f in m["files"])
    long = sum(f[3] for f in m["files"])
    print(f"{'all':<24}{sum(f[1] for f in m['files']):>7}{code:>7}{long:>15}")
    print("keys: " + ", ".join(f"{name} {len(k)}" for name, k in m["keys"].items()))
    print("import circles: " + (", ".join(" <-> ".join(c) for c in m["circles"]) or "none"))
    print("documents: " + ", ".join(f"{name} {n} lines" for name, n in m["docs"].items()))
    model = next((f[2] for f in m["files"] if f[0] == "model.py"), 0)
    print(f"summary: code {code} (model.py {model}), code lines > 100 ch {long}, "
          f"ModelConfig {len(m['keys'].get('ModelConfig', []))} keys, "
          f"train.py {len(m['keys'].get('train.py', []))} keys, circles {len(m['circles'])}")
    return m


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ROOT)
