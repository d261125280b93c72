"""Packaging: the metadata is in setup.cfg.

An installed copy carries the child entrypoint as _concurrency_worker.py, not
worker.py: a top-level module named ``worker`` would answer every ``import
worker`` on the machine (and the package index has another project of that
name).  concurrency.py finds it by either name, beside itself; a checkout
keeps worker.py.

It also carries the module's types as a stub-only package,
concurrency-stubs/__init__.pyi (PEP 561): a single module can't say it is
typed with py.typed, and mypy reads no installed module that doesn't.  The
stub is made here from concurrency.py itself -- the TYPE_CHECKING block and
the signatures of the public names, their bodies dropped -- so it can't
drift from the source; mypy's stubtest checks it against the module.
"""

import ast
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
STUB = os.path.join("concurrency-stubs", "__init__.pyi")


def stub_source(source):
    """The stub of module ``source``: its imports, its TYPE_CHECKING block,
    and the signatures of what ``__all__`` names (with the private classes
    those use), each body replaced by ``...``."""
    tree = ast.parse(source)
    public = set(ast.literal_eval(next(
        node.value for node in tree.body if isinstance(node, ast.Assign)
        and any(getattr(target, "id", None) == "__all__" for target in node.targets))))
    wanted = set(public)
    body = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            body.append(node)
        elif isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            body.extend(node.body)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            body.extend(_stub_constants(node))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body.append(node)
    # The private classes a public signature names (deferring()'s scope).
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and node.name in public:
            wanted |= _names_in_signatures(node)
    kept = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name in wanted:
                kept.extend(_stub_definition(node, kept))
        else:
            kept.append(node)
    header = ('# The types of concurrency.py, made from it by setup.py.\n'
              '# mypy: disable-error-code="overload-overlap"\n')
    return header + ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n"


def _names_in_signatures(node):
    if isinstance(node, ast.ClassDef):
        names = {name.id for base in node.bases for name in ast.walk(base)
                 if isinstance(name, ast.Name)}
        for member in node.body:
            if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names |= _names_in_signatures(member)
        return names
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return set()
    parts = [node.args] + ([node.returns] if node.returns else [])
    return {name.id for part in parts for name in ast.walk(part) if isinstance(name, ast.Name)}


def _stub_constants(node):
    """``__all__``, and each public module constant with its type."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = [target.id for target in targets if isinstance(target, ast.Name)]
    if names == ["__all__"]:
        return [node]
    if isinstance(node, ast.AnnAssign):
        kind = node.annotation
    elif isinstance(node.value, ast.Constant):
        kind = ast.Name(id=type(node.value.value).__name__)
    else:
        kind = ast.Name(id="Any")
    return [ast.AnnAssign(target=ast.Name(id=name), annotation=kind, simple=1)
            for name in names if not name.startswith("_") or name == "__version__"]


def _is_overload(node):
    return any(getattr(decorator, "id", None) == "overload" for decorator in node.decorator_list)


def _stub_definition(node, kept):
    """A function's signature, or a class with the signatures and annotated
    attributes of its public members; an overloaded function's
    implementation is left out."""
    if isinstance(node, ast.ClassDef):
        members = []
        for member in node.body:
            if isinstance(member, ast.AnnAssign) and not member.target.id.startswith("_"):
                members.append(ast.AnnAssign(target=member.target, annotation=member.annotation,
                                             simple=1))
            elif isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not member.name.startswith("_") or member.name.endswith("__")):
                members.extend(_stub_definition(member, members))
        return [ast.ClassDef(name=node.name, bases=node.bases, keywords=node.keywords,
                             body=members or [ast.Expr(ast.Constant(...))],
                             decorator_list=[], **_type_params(node))]
    previous = kept[-1] if kept else None
    if (not _is_overload(node) and isinstance(previous, type(node))
            and previous.name == node.name and _is_overload(previous)):
        return []
    arguments = node.args
    for argument in arguments.defaults + arguments.kw_defaults:
        if argument is not None and not _plain_default(argument):
            arguments.defaults = [_plain(default) for default in arguments.defaults]
            arguments.kw_defaults = [None if default is None else _plain(default)
                                     for default in arguments.kw_defaults]
            break
    stub = type(node)(name=node.name, args=arguments, body=[ast.Expr(ast.Constant(...))],
                      decorator_list=[decorator for decorator in node.decorator_list
                                      if getattr(decorator, "id", None) == "overload"],
                      returns=node.returns, **_type_params(node))
    stub.lineno = node.lineno
    return [stub]


def _plain_default(node):
    return isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, (bool, int, float, str)))


def _plain(node):
    """A default as a stub spells it: literal, else ``...``."""
    return node if _plain_default(node) else ast.Constant(...)


def _type_params(node):
    return {"type_params": []} if "type_params" in node._fields else {}


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, "worker.py"),
                       os.path.join(self.build_lib, "_concurrency_worker.py"))
        with open(os.path.join(HERE, "concurrency.py"), encoding="utf-8") as file:
            stub = stub_source(file.read())
        target = os.path.join(self.build_lib, STUB)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as file:
            file.write(stub)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, "_concurrency_worker.py"),
            os.path.join(self.build_lib, STUB)]


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPy})
