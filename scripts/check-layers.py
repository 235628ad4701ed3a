#!/usr/bin/env python3
"""Checks that a Rust crate's modules form layers, not circles.

Every file of the crate's `src` is a module: `src/x.rs` and `src/x/mod.rs`
are `x`, `src/x/y.rs` is `x::y`; the crate root (`lib.rs` or `main.rs`) is
the node `<root>`. An edge `a -> b` is any reference from the file of `a`
to `b`: a `crate::…`, `super::…` or `self::…` path (groups included), a
bare path into one of `a`'s own child modules, or `crate::Item` where the
root re-exports `Item` (`pub use b::Item;`); a path names the longest
module it starts with. A folder's `mod.rs` declaring and re-exporting its
children is not an edge (it is how a folder is made). Comments, string
literals, `#[cfg(test)]` items and modules declared `#[cfg(test)] mod x;`
are ignored (tests may use the whole crate; pass --include-tests to count
them).

Checks, per crate:

- no cycle among the modules (exit 1, printing the cycle with the
  `file:line` of each edge);
- with a layers file, every reference goes to a module of the same or a
  lower layer (exit 1, printing each upward reference's `file:line`).

A layers file lists layers bottom-up, one per line:

    # comment
    values: error, services, format
    engine: watch
    api: client, store/, transport/layers/

A member names a module and everything under it; a trailing `/` says it
is a folder (and is checked). A module belongs to the layer of the
longest member that covers it; every module must be covered. The root
sits above every layer.

Usage:

    scripts/check-layers.py --crate client-sdk --crate cli
    scripts/check-layers.py --crate server --layers server/layers.txt

`--layers` applies to the `--crate` given just before it; one given before
any `--crate` applies to every crate without its own. `--graph` also
prints each module's imports.

Python 3, standard library only.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = "<root>"
# `--graph`: print every module's imports too.
PRINT_GRAPH = False


@dataclass
class Ref:
    """One reference from a file to a module."""

    target: str
    file: Path
    line: int


@dataclass
class Crate:
    """A crate's modules and the references between them."""

    src: Path
    root_file: Path
    # module path (`a::b`) -> its file
    modules: dict[str, Path] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)
    # (from, to) -> first reference
    edges: dict[tuple[str, str], Ref] = field(default_factory=dict)
    # every reference, for the layer check
    refs: list[tuple[str, Ref]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Lexing: blank out comments and literals, keeping line numbers.


def strip_code(text: str) -> str:
    """Replaces comments, string and char literals with spaces (newlines
    kept), so what remains is code with its original line numbers."""
    out: list[str] = []
    i, n = 0, len(text)

    def blank(s: str) -> str:
        return "".join("\n" if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and (
            i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(text[i:j]))
            i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i)):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(blank(text[i:j]))
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{..}'), else a lifetime.
            m = re.compile(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'").match(text, i)
            if m:
                out.append(blank(m.group(0)))
                i = m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_cfg_test(code: str) -> str:
    """Blanks every item annotated `#[cfg(test)]` (a block or up to `;`)."""
    chars = list(code)
    for m in re.finditer(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]", code):
        j, depth = m.end(), 0
        while j < len(code):
            ch = code[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            elif ch == ";" and depth == 0:
                j += 1
                break
            j += 1
        for k in range(m.start(), min(j, len(code))):
            if chars[k] != "\n":
                chars[k] = " "
    return "".join(chars)


def line_of(code: str, pos: int) -> int:
    return code.count("\n", 0, pos) + 1


# ---------------------------------------------------------------------------
# The crate's modules and the root's re-exports.

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def load_crate(directory: Path, include_tests: bool = False) -> Crate:
    src = directory / "src" if (directory / "src").is_dir() else directory
    root = next((src / f for f in ("lib.rs", "main.rs") if (src / f).is_file()), None)
    if root is None:
        raise SystemExit(f"check-layers: {src}: neither lib.rs nor main.rs")
    crate = Crate(src=src, root_file=root)
    for file in sorted(src.rglob("*.rs")):
        if file == root:
            continue
        path = module_path(crate, file)
        crate.modules["::".join(path)] = file
        for depth in range(1, len(path) if file.stem != "mod" else len(path) + 1):
            crate.folders.add("::".join(path[:depth]))
    if not include_tests:
        # A module declared `#[cfg(test)] mod x;` (a test file) is test code.
        for file in [root, *crate.modules.values()]:
            code = strip_code(file.read_text(encoding="utf-8"))
            for m in re.finditer(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]\s*mod\s+(" + IDENT + r")\s*;", code):
                test_module = "::".join(module_path(crate, file) + [m.group(1)])
                for name in list(crate.modules):
                    if name == test_module or name.startswith(test_module + "::"):
                        del crate.modules[name]
    return crate


def group_items(code: str, start: int) -> list[tuple[str, str]]:
    """The top-level entries of a `{…}` use group opening at `start`, as
    (first path segment, name it binds) pairs."""
    depth, j = 0, start
    while j < len(code):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                break
        j += 1
    inner = code[start + 1 : j]
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch in "{" :
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in items:
        item = " ".join(item.split())
        if not item:
            continue
        first = re.match(IDENT, item)
        if not first:
            continue
        alias = re.search(r"\bas\s+(" + IDENT + r")\s*$", item)
        last = re.findall(IDENT, item.split("{")[0])
        bound = alias.group(1) if alias else (last[-1] if last else first.group(0))
        out.append((first.group(0), bound))
    return out


def root_exports(crate: Crate, code: str) -> tuple[dict[str, str | None], set[str]]:
    """What the root re-exports (`name -> module`, None for another crate's
    item) and the names it defines itself."""
    exports: dict[str, str | None] = {}
    for m in re.finditer(r"\buse\s+(?:crate::|self::)?(" + IDENT + r")\s*::\s*", code):
        head = m.group(1)
        module = head if head in crate.modules else None
        rest = code[m.end() :]
        if rest.startswith("{"):
            for _, bound in group_items(code, m.end()):
                exports[bound] = module
        else:
            tail = re.match(r"[A-Za-z0-9_:\s]*?(" + IDENT + r")\s*(?:as\s+(" + IDENT + r"))?\s*;", rest)
            if tail:
                exports[tail.group(2) or tail.group(1)] = module
    defined = set(
        re.findall(
            r"\b(?:fn|struct|enum|trait|type|const|static|union|macro_rules!)\s+(" + IDENT + ")",
            code,
        )
    )
    return exports, defined


def paths_at(code: str, pos: int) -> list[list[str]]:
    """The paths starting at `pos` (after `crate::`, `super::`…): `a::b::C`
    gives one, `a::{b, c::{d, e}}` one per leaf; `self` in a group is its
    prefix."""
    out: list[list[str]] = []
    prefix: list[str] = []
    j = pos
    while True:
        m = re.compile(r"\s*(" + IDENT + r"|\*)").match(code, j)
        if not m:
            break
        prefix.append(m.group(1))
        j = m.end()
        sep = re.compile(r"\s*::\s*").match(code, j)
        if not sep:
            out.append(prefix)
            return out
        j = sep.end()
        if code.startswith("{", j):
            depth, k, start, items = 0, j, j + 1, []
            while k < len(code):
                if code[k] == "{":
                    depth += 1
                elif code[k] == "}":
                    depth -= 1
                    if depth == 0:
                        items.append((start, k))
                        break
                elif code[k] == "," and depth == 1:
                    items.append((start, k))
                    start = k + 1
                k += 1
            for begin, _ in items:
                for sub in paths_at(code, begin):
                    out.append(prefix + [p for p in sub if p != "self"])
            return out
    if prefix:
        out.append(prefix)
    return out


# ---------------------------------------------------------------------------
# References.


def module_path(crate: Crate, file: Path) -> list[str]:
    """The module path of a file: `src/x.rs` -> [x], `src/x/mod.rs` -> [x],
    `src/x/y.rs` -> [x, y]."""
    if file == crate.root_file:
        return []
    parts = list(file.relative_to(crate.src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return parts


def scan(crate: Crate, include_tests: bool) -> None:
    root_code = strip_code(crate.root_file.read_text(encoding="utf-8"))
    if not include_tests:
        root_code = strip_cfg_test(root_code)
    exports, defined = root_exports(crate, root_code)

    def resolve(path: list[str]) -> str | None:
        """The longest module `path` starts with."""
        for end in range(len(path), 0, -1):
            name = "::".join(path[:end])
            if name in crate.modules:
                return name
        if not path:
            return ROOT
        if path[0] in exports:
            return exports[path[0]]
        if path[0] in defined:
            return ROOT
        return None  # a macro or something not ours to place

    files = [(ROOT, crate.root_file)] + [(mod, f) for mod, f in crate.modules.items()]
    for owner, file in files:
        code = strip_code(file.read_text(encoding="utf-8"))
        if not include_tests:
            code = strip_cfg_test(code)
        here = module_path(crate, file)
        found: list[tuple[list[str], int]] = []
        for m in re.finditer(r"(?<![A-Za-z0-9_:])crate\s*::\s*", code):
            found += [(p, m.start()) for p in paths_at(code, m.end())]
        for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:super\s*::\s*)+)", code):
            ups = m.group(1).count("super")
            base = here[: len(here) - ups] if ups <= len(here) else []
            found += [(base + p, m.start()) for p in paths_at(code, m.end())]
        for m in re.finditer(r"(?<![A-Za-z0-9_:])self\s*::\s*", code):
            found += [(here + p, m.start()) for p in paths_at(code, m.end())]
        # Bare paths into a child module (`use child::Item;`, `child::f()`).
        for m in re.finditer(r"(?<![A-Za-z0-9_:])(" + IDENT + r")\s*::", code):
            if "::".join(here + [m.group(1)]) in crate.modules:
                found += [(here + p, m.start()) for p in paths_at(code, m.start())]
        for path, pos in found:
            target = resolve(path)
            if target is None or target == owner:
                continue
            # A folder declaring and re-exporting its own children.
            if owner != ROOT and target.startswith(owner + "::"):
                continue
            ref = Ref(target=target, file=file, line=line_of(code, pos))
            crate.refs.append((owner, ref))
            crate.edges.setdefault((owner, target), ref)


# ---------------------------------------------------------------------------
# Checks.


def find_cycle(crate: Crate) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for a, b in crate.edges:
        graph.setdefault(a, []).append(b)
    for targets in graph.values():
        targets.sort()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_layers(crate: Crate, layers_file: Path) -> list[str]:
    """Problems with `crate` against the layers in `layers_file`."""
    problems: list[str] = []
    member_level: dict[str, int] = {}
    names: list[str] = []
    for number, raw in enumerate(layers_file.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" not in line or "::" in line.split(":", 1)[0]:
            problems.append(f"{rel(layers_file)}:{number}: expected `layer: module, …`")
            continue
        name, members = line.split(":", 1)
        names.append(name.strip())
        for member in filter(None, (m.strip() for m in members.split(","))):
            module = member.rstrip("/").replace("/", "::")
            if module not in crate.modules and module not in crate.folders:
                problems.append(
                    f"{rel(layers_file)}:{number}: {member}: no such module in {rel(crate.src)}"
                )
            elif member.endswith("/") and module not in crate.folders:
                problems.append(
                    f"{rel(layers_file)}:{number}: {member}: {module} is a file, not a folder"
                )
            if module in member_level:
                problems.append(f"{rel(layers_file)}:{number}: {module} is in two layers")
            member_level[module] = len(names) - 1

    def level_of(module: str) -> int | None:
        parts = module.split("::")
        for end in range(len(parts), 0, -1):
            found = member_level.get("::".join(parts[:end]))
            if found is not None:
                return found
        return None

    level = {m: level_of(m) for m in crate.modules}
    for module in sorted(m for m, lv in level.items() if lv is None):
        problems.append(f"{rel(layers_file)}: module {module} is in no layer")
    for owner, ref in crate.refs:
        if owner == ROOT:
            continue
        if ref.target == ROOT:
            problems.append(
                f"{rel(ref.file)}:{ref.line}: {owner} uses the crate root, which sits above every layer"
            )
            continue
        low, high = level.get(owner), level.get(ref.target)
        if low is not None and high is not None and high > low:
            problems.append(
                f"{rel(ref.file)}:{ref.line}: upward import: {owner} (layer "
                f"{names[low]}) uses {ref.target} (layer {names[high]})"
            )
    return problems


def parse_args(argv: list[str]) -> tuple[list[tuple[Path, Path | None]], bool]:
    crates: list[list] = []
    default_layers: Path | None = None
    include_tests = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if arg == "--include-tests":
            include_tests = True
            i += 1
            continue
        if arg == "--graph":
            global PRINT_GRAPH
            PRINT_GRAPH = True
            i += 1
            continue
        if arg in ("--crate", "--layers") and i + 1 < len(argv):
            value = Path(argv[i + 1])
            if arg == "--crate":
                crates.append([value, None])
            elif crates:
                crates[-1][1] = value
            else:
                default_layers = value
            i += 2
            continue
        raise SystemExit(f"check-layers: unexpected argument {arg!r} (see --help)")
    if not crates:
        raise SystemExit("check-layers: give at least one --crate DIR (see --help)")
    return [(c, layers or default_layers) for c, layers in crates], include_tests


def main(argv: list[str]) -> int:
    crates, include_tests = parse_args(argv)
    failed = False
    for directory, layers in crates:
        crate = load_crate(directory, include_tests)
        scan(crate, include_tests)
        if PRINT_GRAPH:
            for module in sorted(crate.modules):
                uses = sorted(b for a, b in crate.edges if a == module)
                print(f"{rel(crate.src)}: {module} -> {', '.join(uses) or '-'}")
        cycle = find_cycle(crate)
        if cycle:
            failed = True
            print(f"{rel(crate.src)}: module cycle: {' -> '.join(cycle)}")
            for a, b in zip(cycle, cycle[1:]):
                ref = crate.edges[(a, b)]
                print(f"  {a} -> {b}: {rel(ref.file)}:{ref.line}")
        problems = check_layers(crate, layers) if layers else []
        for problem in problems:
            print(problem)
        failed |= bool(problems)
        if not cycle and not problems:
            edges = sum(1 for a, _ in crate.edges if a != ROOT)
            what = f"layers of {rel(layers)} respected" if layers else "no cycle"
            print(f"{rel(crate.src)}: {len(crate.modules)} modules, {edges} edges: {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
