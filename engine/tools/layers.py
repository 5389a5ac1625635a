#!/usr/bin/env python3
"""Import graph between the top-level modules of engine/src, and a cycle check.

A top-level module is a file `engine/src/X.rs` or a folder `engine/src/X/`.
An edge A -> B is any `crate::B` path (in a `use`, or inline) in A's files,
or a `crate::Name` that lib.rs re-exports from B (`pub use B::...Name`);
tests inside the files count too, comments and doc links do not. Edges
inside one folder are not shown. Exit status 1 if the graph has a cycle or
an edge goes up the layer order below (or sideways, within one layer).

    python3 engine/tools/layers.py [--dot]
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
IGNORE = {"lib", "error"}  # the crate root, and Error, which every layer uses

# The layers, lowest first; a module may import only modules of lower layers.
LAYERS = [
    ["dev", "util"],
    ["format"],
    ["alloc", "journal", "unflushed", "lease"],
    ["map"],
    ["load"],
    ["pool"],
    ["admin"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def modules():
    mods = {}
    for name in sorted(os.listdir(SRC)):
        path = os.path.join(SRC, name)
        if name.endswith(".rs"):
            mods[name[:-3]] = [path]
        elif os.path.isdir(path):
            files = []
            for root, _, fs in os.walk(path):
                files += [os.path.join(root, f) for f in fs if f.endswith(".rs")]
            mods[name] = sorted(files)
    return mods


def root_names():
    """Names lib.rs re-exports, with the top-level module each comes from."""
    with open(os.path.join(SRC, "lib.rs")) as fh:
        text = re.sub(r"//[^\n]*", "", fh.read())
    names = {}
    for m in re.finditer(r"\bpub use ([a-z_][a-z0-9_]*)((?:::[a-z_][a-z0-9_]*)*)::(\{[^;]*\}|\w+);", text):
        for name in re.findall(r"\w+", m.group(3)):
            names[name] = m.group(1)
    return names


ROOT = root_names()


def use_targets(text):
    """Top-level modules named by `crate::X` paths, including `use crate::{X, Y::..}`."""
    text = re.sub(r"//[^\n]*", "", text)  # comments and doc comments
    found = set(re.findall(r"\bcrate::([A-Za-z_][A-Za-z0-9_]*)", text))
    for group in re.findall(r"\bcrate::\{([^;]*?)\};", text, re.S):
        depth, cur, parts = 0, "", []
        for ch in group:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        for p in parts:
            m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", p)
            if m:
                found.add(m.group(1))
    return {ROOT.get(t, t) for t in found}


def graph():
    mods = modules()
    edges = {m: set() for m in mods if m not in IGNORE}
    for m in edges:
        for f in mods[m]:
            with open(f) as fh:
                for t in use_targets(fh.read()):
                    if t in mods and t != m and t not in IGNORE:
                        edges[m].add(t)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layers(edges):
    """Each module's depth: 0 for one that imports nothing, else 1 + its deepest import."""
    depth = {}

    def d(v, seen=()):
        if v in depth:
            return depth[v]
        if v in seen:
            return 0
        depth[v] = 1 + max((d(w, seen + (v,)) for w in edges[v]), default=-1)
        return depth[v]

    for v in edges:
        d(v)
    return depth


def main():
    edges = graph()
    if "--dot" in sys.argv:
        print("digraph engine {")
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f"  {a} -> {b};")
        print("}")
    else:
        depth = layers(edges)
        for a in sorted(edges, key=lambda v: (depth[v], v)):
            deps = ", ".join(sorted(edges[a])) or "-"
            print(f"{depth[a]:2}  {a:12} -> {deps}")
    cyc = cycles(edges)
    for c in cyc:
        print("cycle:", " <-> ".join(c))
    if not cyc:
        print("no cycles")
    bad = [
        (a, b)
        for a in sorted(edges)
        for b in sorted(edges[a])
        if a not in RANK or b not in RANK or RANK[b] >= RANK[a]
    ]
    for a, b in bad:
        print(f"against the layer order: {a} -> {b}")
    if not bad:
        print("every edge goes down the layer order")
    return 1 if cyc or bad else 0


if __name__ == "__main__":
    sys.exit(main())
