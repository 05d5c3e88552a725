#!/usr/bin/env python3
"""Checks Shoal's layers (docs/architecture.md, "Crates and layers"):

1. The crate graph: each Shoal crate depends only on the Shoal crates it may
   (`ALLOWED` below), as `cargo metadata` reports its normal and build
   dependencies.
2. Inside each crate, the top-level modules form no import cycle. A module's
   imports are the `crate::<module>` paths anywhere in its file or its
   directory (so a top-level module names its siblings with `crate::`, never
   `super::`). Items defined in the crate root (lib.rs or main.rs) count as a
   module of their own, `<lib.rs>`; a `<module>::` path in the root's code is
   an import of that module.

Prints every violation and exits 1 if there is one. Run from anywhere in the
repository: `python3 scripts/check-layers.py`.
"""

import json
import os
import re
import subprocess
import sys

# Which Shoal crates each Shoal crate may depend on.
ALLOWED = {
    "shoal-shared": set(),
    "shoal-cluster": {"shoal-shared"},
    "shoal-shard-worker": {"shoal-shared"},
    "shoal-net-daemon": {"shoal-shared", "shoal-cluster"},
    "shoal": {"shoal-shared", "shoal-shard-worker", "shoal-net-daemon", "shoal-cluster"},
}

MODULE_DECL = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)
# `crate::name` and each head of `crate::{a, b::c}`.
CRATE_PATH = re.compile(r"\bcrate::([A-Za-z_][A-Za-z0-9_]*)")
CRATE_GROUP = re.compile(r"\bcrate::\{([^}]*)\}")
LINE_COMMENT = re.compile(r"//.*$", re.M)


def rust_files(path):
    if os.path.isfile(path):
        yield path
    elif os.path.isdir(path):
        for base, _, names in os.walk(path):
            for name in sorted(names):
                if name.endswith(".rs"):
                    yield os.path.join(base, name)


def crate_paths(text):
    """The first segment of every `crate::` path in the code (comments left out)."""
    text = LINE_COMMENT.sub("", text)
    heads = set(CRATE_PATH.findall(text))
    for group in CRATE_GROUP.findall(text):
        for part in group.split(","):
            head = part.strip().split("::")[0].strip()
            if head:
                heads.add(head)
    return heads


def module_graph(root_file):
    """The import edges among the top-level modules of the crate rooted at root_file.
    Items defined in the root itself are the node `<lib.rs>` (or `<main.rs>`)."""
    src = os.path.dirname(root_file)
    root = "<" + os.path.basename(root_file) + ">"
    root_text = open(root_file).read()
    modules = MODULE_DECL.findall(LINE_COMMENT.sub("", root_text))
    known = set(modules)
    edges = {name: set() for name in modules + [root]}
    for name in modules:
        paths = list(rust_files(os.path.join(src, name + ".rs")))
        paths += list(rust_files(os.path.join(src, name)))
        for path in paths:
            for head in crate_paths(open(path).read()):
                edges[name].add(head if head in known else root)
        edges[name].discard(name)
    # What the root's own items use; declaring a module is not a use.
    body = MODULE_DECL.sub("", LINE_COMMENT.sub("", root_text))
    edges[root] |= set(re.findall(r"\b([a-z_][a-z0-9_]*)::", body)) & known
    return edges


def cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def cycle_path(edges, component):
    """One concrete cycle through the component, for the message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    node = start
    while True:
        nexts = sorted(succ for succ in edges[node] if succ in members)
        if start in nexts and len(path) > 1:
            return path + [start]
        unvisited = [succ for succ in nexts if succ not in seen]
        if not unvisited:
            return path + [nexts[0]] if nexts else path
        node = unvisited[0]
        path.append(node)
        seen.add(node)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
            cwd=repo, check=True, capture_output=True, text=True,
        ).stdout
    )
    problems = []
    for package in metadata["packages"]:
        name = package["name"]
        if name not in ALLOWED:
            problems.append(f"crate {name}: not in the layer table of scripts/check-layers.py")
            continue
        for dependency in package["dependencies"]:
            dep = dependency["name"]
            if dependency.get("kind") == "dev":
                continue
            if dep.startswith("shoal") and dep not in ALLOWED[name]:
                problems.append(f"crate {name} depends on {dep}, which its layer may not use")
        for target in package["targets"]:
            if not set(target["kind"]) & {"lib", "bin"}:
                continue
            edges = module_graph(target["src_path"])
            for component in cycles(edges):
                path = " -> ".join(cycle_path(edges, component))
                problems.append(
                    f"crate {name} ({os.path.relpath(target['src_path'], repo)}): "
                    f"import cycle among top-level modules: {path} "
                    f"(all of {', '.join(component)} are in it)"
                )
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} layer violation(s); see docs/architecture.md, \"Crates and layers\"")
        return 1
    print("layers: crate graph and module imports are in order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
