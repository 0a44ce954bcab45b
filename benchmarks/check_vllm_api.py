"""Check `spo_ray.rollout.vllm.VLLM_API` (every vLLM name spo_ray uses) against a vLLM.

Two ways, same checks (each call's keyword names exist in the signature, or — for
`vllm.LLM`, which forwards **kwargs — among EngineArgs' fields; TypedDict keys and result
fields exist; worker attributes exist or are assigned as `self.<name> = …`):

    # against the installed vLLM (here: vLLM's CPU build, which `make` installs; a test runs this):
    python benchmarks/check_vllm_api.py

    # or statically, from a downloaded wheel, without installing it:
    pip download --no-deps vllm==0.16.0 -d /tmp/w && unzip -q /tmp/w/vllm-*.whl 'vllm/*' -x '*.so' -d /tmp/vllm-0.16.0
    python benchmarks/check_vllm_api.py --source /tmp/vllm-0.16.0

It prints one line per use and exits 1 when something is missing. The installed mode runs in
`make test` (tests/rollout/test_vllm_real.py); the static one by hand when the supported
range of GPU vLLM (`VLLM_VERSIONS`) changes.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spo_ray.rollout.vllm import VLLM_API, VLLMUse  # noqa: E402

# vllm.LLM(**kwargs) hands what its own signature lacks to EngineArgs.
KWARGS_FORWARDED_TO = {"vllm.LLM": "vllm.engine.arg_utils.EngineArgs"}


# ----------------------------------------------------------------------------- static (AST)
class SourceTree:
    """Resolves dotted names to class/function definitions in unpacked vLLM sources."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, ast.Module] = {}

    def _module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def _tree(self, path: Path) -> ast.Module:
        if path not in self._cache:
            self._cache[path] = ast.parse(path.read_text())
        return self._cache[path]

    def _find_in_module(self, module: str, name: str, depth: int = 0):
        """(module, ClassDef/FunctionDef) of `name` as seen from `module`, following imports
        and vLLM's lazy MODULE_ATTRS re-exports."""
        path = self._module_file(module)
        if path is None or depth > 8:
            return None
        tree = self._tree(path)
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return module, node
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                source = self._absolute(package, node.module, node.level)
                real = next(a.name for a in node.names if (a.asname or a.name) == name)
                found = self._find_in_module(source, real, depth + 1)
                if found:
                    return found
            if isinstance(node, ast.Dict):  # MODULE_ATTRS = {"LLM": ".entrypoints.llm:LLM"}
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == name and isinstance(v, ast.Constant) and ":" in str(v.value):
                        mod, attr = v.value.split(":")
                        level = len(mod) - len(mod.lstrip("."))
                        found = self._find_in_module(self._absolute(package, mod.lstrip(".") or None, level), attr, depth + 1)
                        if found:
                            return found
        return None

    @staticmethod
    def _absolute(package: str, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = package.split(".")
        base = parts[: len(parts) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def resolve(self, target: str):
        """(module, node, member) for 'pkg.mod.Class[.member]'."""
        parts = target.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if self._module_file(module) is None:
                continue
            found = self._find_in_module(module, parts[cut])
            if found is None:
                continue
            rest = parts[cut + 1 :]
            if len(rest) > 1:
                return None
            return found[0], found[1], (rest[0] if rest else None)
        return None

    def _class_chain(self, module: str, cls: ast.ClassDef, depth: int = 0):
        yield module, cls
        if depth > 8:
            return
        for base in cls.bases:
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            found = name and self._find_in_module(module, name)
            if found and isinstance(found[1], ast.ClassDef):
                yield from self._class_chain(found[0], found[1], depth + 1)

    def method(self, module: str, cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
        for _, c in self._class_chain(module, cls):
            for node in c.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                    return node
        return None

    def fields(self, module: str, cls: ast.ClassDef) -> set[str]:
        out = set()
        for _, c in self._class_chain(module, cls):
            out |= {n.target.id for n in c.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        return out

    def assigned(self, module: str, cls: ast.ClassDef) -> set[str]:
        out = set()
        for _, c in self._class_chain(module, cls):
            for node in ast.walk(c):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        out.add(t.attr)
        return out


def _params(fn: ast.FunctionDef) -> tuple[set[str], bool]:
    a = fn.args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self", "cls"}
    return names, a.kwarg is not None


def check_static(tree: SourceTree, use: VLLMUse) -> list[str]:
    resolved = tree.resolve(use.target)
    if resolved is None:
        return [f"{use.target} not found"]
    module, node, member = resolved
    if use.kind == "call":
        if member is not None:
            fn = tree.method(module, node, member) if isinstance(node, ast.ClassDef) else None
            if fn is None:
                return [f"{use.target}: no such method"]
            names, var_kw = _params(fn)
        elif isinstance(node, ast.ClassDef):
            init = tree.method(module, node, "__init__")
            names, var_kw = _params(init) if init else (tree.fields(module, node), False)
        else:
            names, var_kw = _params(node)
        missing = [n for n in use.names if n not in names]
        if missing and var_kw and use.target in KWARGS_FORWARDED_TO:
            fwd = tree.resolve(KWARGS_FORWARDED_TO[use.target])
            forwarded = tree.fields(fwd[0], fwd[1]) if fwd else set()
            missing = [n for n in missing if n not in forwarded]
        return [f"{use.target}: no parameter {n!r}" for n in missing]
    if not isinstance(node, ast.ClassDef):
        return [f"{use.target}: not a class"]
    have = tree.fields(module, node) | tree.assigned(module, node)
    if use.kind == "attrs":
        have |= {n.name for _, c in tree._class_chain(module, node) for n in c.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return [f"{use.target}: no field/attribute {n!r}" for n in use.names if n not in have]


# ----------------------------------------------------------------------------- installed
def _import(target: str):
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def check_installed(use: VLLMUse) -> list[str]:
    try:
        obj = _import(use.target)
    except (ImportError, AttributeError) as err:
        return [f"{use.target} not found ({err})"]
    if use.kind == "call":
        sig = inspect.signature(obj)
        names = set(sig.parameters)
        var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        missing = [n for n in use.names if n not in names]
        if missing and var_kw and use.target in KWARGS_FORWARDED_TO:
            forwarded = set(inspect.signature(_import(KWARGS_FORWARDED_TO[use.target])).parameters)
            missing = [n for n in missing if n not in forwarded]
        return [f"{use.target}: no parameter {n!r}" for n in missing]
    have = set()
    for cls in inspect.getmro(obj):
        have |= set(getattr(cls, "__annotations__", {})) | set(vars(cls))
        try:
            have |= set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=", inspect.getsource(cls)))
        except (OSError, TypeError):
            pass
    return [f"{use.target}: no field/attribute {n!r}" for n in use.names if n not in have]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="unpacked vLLM sources (the folder that holds vllm/); default: import vllm")
    args = parser.parse_args()
    if args.source:
        tree = SourceTree(args.source)
        version_file = args.source / "vllm" / "_version.py"
        version = re.search(r"version = .*?['\"]([^'\"]+)['\"]", version_file.read_text()).group(1) if version_file.is_file() else "?"
        check = lambda use: check_static(tree, use)  # noqa: E731
    else:
        import vllm

        version = vllm.__version__
        check = check_installed
    print(f"vLLM {version} ({'static, ' + str(args.source) if args.source else 'installed'})")
    problems = 0
    for use in VLLM_API:
        errors = check(use)
        problems += len(errors)
        print(f"  {'ok ' if not errors else 'BAD'} {use.kind:6s} {use.target} {', '.join(use.names)}")
        for e in errors:
            print(f"      {e}")
    print("all uses found" if not problems else f"{problems} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
