"""``import kiapi_core`` is the plugin API: complete, documented in docs/api.md, cheap to import,
and the only thing the plugins we ship (and the docs' plugin) import from the host."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT
from pydantic import BaseModel

import kiapi_core

API_DOC = Path(ROOT) / "docs" / "api.md"
# Classes a plugin receives but never builds: documented by their attributes and methods.
RECEIVED = {"JobContext", "Host"}
_HEADING = re.compile(r"^### `(\w+)`\n+```python\n(.*?)\n```", re.M | re.S)


class _Raw(str):
    """An annotation kept as written in the source (``from __future__ import annotations``)."""

    def __repr__(self) -> str:
        return str(self)


def _default(value: Any) -> Any:
    if callable(value) and not isinstance(value, type):
        return _Raw("...")  # a function's repr carries its address
    return value


def signature_text(name: str) -> str:
    """How docs/api.md shows a public name: its call signature, or what it is."""
    obj = getattr(kiapi_core, name)
    if name in RECEIVED:
        return f"class {name}"
    if isinstance(obj, type) and issubclass(obj, BaseModel):
        return f"{name}(**fields)"
    if not callable(obj) or not (inspect.isfunction(obj) or isinstance(obj, type)):
        return f"{name} = ..."  # a type alias or a marker object
    try:
        sig = inspect.signature(obj)
    except ValueError:  # e.g. an exception class that keeps Exception's constructor
        assert isinstance(obj, type)
        return f"class {name}({obj.__bases__[0].__name__})"
    return name + _render(sig, drop_return=isinstance(obj, type))


def _render(sig: inspect.Signature, drop_return: bool = False) -> str:
    params = [
        p.replace(
            annotation=_Raw(p.annotation) if isinstance(p.annotation, str) else p.annotation,
            default=_default(p.default),
        )
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    ret = inspect.Signature.empty if drop_return else _Raw(ret) if isinstance(ret, str) else ret
    return str(sig.replace(parameters=params, return_annotation=ret))


def documented() -> dict[str, str]:
    """Name -> the signature shown under its heading in docs/api.md."""
    return {m[1]: m[2].strip() for m in _HEADING.finditer(API_DOC.read_text())}


def test_every_public_name_is_documented_in_api_md_and_nothing_else() -> None:
    assert sorted(documented()) == sorted(kiapi_core.__all__)


@pytest.mark.parametrize("name", kiapi_core.__all__)
def test_api_md_shows_the_real_signature(name: str) -> None:
    assert documented()[name] == signature_text(name), (
        f"docs/api.md is out of step for {name}; it should show:\n{signature_text(name)}"
    )


def _sections() -> Iterator[tuple[str, str]]:
    text = API_DOC.read_text()
    starts = [(m.start(), m[1]) for m in re.finditer(r"^### `(\w+)`", text, re.M)]
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(text), "")], strict=True):
        yield name, text[start:end]


def test_methods_listed_in_api_md_have_their_real_signatures() -> None:
    checked = 0
    for name, section in _sections():
        obj = getattr(kiapi_core, name)
        for method, shown in re.findall(r"^- `(\w+)(\(.*?\)(?: -> [^`]+)?)`", section, re.M):
            member = inspect.getattr_static(obj, method)
            function = member.fget if isinstance(member, property) else member
            assert callable(function), f"{name}.{method} is not a method"
            sig = inspect.signature(function)
            real = _render(sig.replace(parameters=list(sig.parameters.values())[1:]))
            assert shown == real, f"{name}.{method}: docs/api.md shows {shown}, it is {real}"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("name", kiapi_core.__all__)
def test_every_public_name_resolves_and_says_what_it_is(name: str) -> None:
    obj = getattr(kiapi_core, name)
    if inspect.isfunction(obj) or isinstance(obj, type):
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    section = dict(_sections())[name]
    prose = re.sub(r"```.*?```", "", section, flags=re.S).replace(f"### `{name}`", "").strip()
    assert prose, f"docs/api.md says nothing about {name}"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kiapi_core.nope  # noqa: B018


def test_import_kiapi_core_stays_cheap() -> None:
    # The CLI and the worker process import the package first: the lazily imported names
    # (Starlette, pydantic, the stores) must wait until a plugin asks for them.
    code = (
        "import json, sys; import kiapi_core; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'pydantic', 'pydantic_settings', 'sqlite3', 'httpx'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    code = "import sys; from kiapi_core import Operation, read_json; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- plugins import only kiapi_core ----------------------------------------------------------
ALLOWED_ROOTS = {"kiapi_core", "pydantic", "starlette", "click"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def _plugin_sources() -> Iterator[tuple[str, str, str, bool]]:
    """(label, source, the plugin's own top-level package, is a test) for every file checked."""
    for own in ("kiapi_ideogram4", "kiapi_zimage"):
        package = Path(ROOT) / "plugins" / own.removeprefix("kiapi_") / own
        for path in sorted(package.glob("*.py")):
            # A plugin's testing.py (its tiny-checkpoint builder) is test support: it may use
            # kiapi_core.testing, like the tests.
            yield str(path.relative_to(ROOT)), path.read_text(), own, path.name == "testing.py"
    echo = Path(ROOT) / "tests" / "plugins" / "echo" / "kiapi_echo.py"
    yield str(echo.relative_to(ROOT)), echo.read_text(), "kiapi_echo", False
    for i, (info, body) in enumerate(
        _FENCE.findall((Path(ROOT) / "docs" / "plugins.md").read_text())
    ):
        yield f"docs/plugins.md python block {i + 1}", body, "kiapi_shout", not info.strip()


def _imports(source: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def import_problems(source: str, own: str, is_test: bool, extra: set[str]) -> list[str]:
    problems = []
    for line, module in _imports(source):
        root = module.split(".")[0]
        if module.startswith("kiapi_core."):
            if not (is_test and (module == "kiapi_core.testing")):
                problems.append(f"line {line}: imports {module}; import from kiapi_core instead")
        elif root not in ALLOWED_ROOTS | STDLIB | extra | {own}:
            problems.append(f"line {line}: imports {module}")
    return problems


# Libraries the mflux plugins drive (imported lazily, in the worker).
IDEOGRAM4_LIBRARIES = {
    "huggingface_hub",
    "mflux",
    "mlx",
    "numpy",
    "PIL",
    "safetensors",
    "tokenizers",
}


@pytest.mark.parametrize("label", [label for label, *_ in _plugin_sources()])
def test_plugins_import_only_kiapi_core(label: str) -> None:
    _, source, own, is_test = next(s for s in _plugin_sources() if s[0] == label)
    extra = (
        IDEOGRAM4_LIBRARIES
        if own in ("kiapi_ideogram4", "kiapi_zimage")
        else {"kiapi_shout", "pytest"}
    )
    assert import_problems(source, own, is_test, extra) == []


def test_the_import_walk_catches_an_internal_import() -> None:
    source = "from kiapi_core import hookimpl\nfrom kiapi_core.web.body import read_json\n"
    assert import_problems(source, "p", False, set()) == [
        "line 2: imports kiapi_core.web.body; import from kiapi_core instead"
    ]
    nested = "def f():\n    import kiapi_core.jobs.respond\n"
    assert import_problems(nested, "p", False, set()) != []
    assert import_problems("from kiapi_core.testing import create_app\n", "p", True, set()) == []
    assert import_problems("from kiapi_core.testing import create_app\n", "p", False, set()) != []


def test_a_server_start_leaves_what_it_does_not_need_unimported(tmp_path: Path) -> None:
    # Cold start (docs/performance.md): httpx waits for the first webhook delivery, the CLI's
    # other commands for their own use.
    code = (
        "import json, sys; from kiapi_core.cli import cli; import click;"
        " cli.get_command(click.Context(cli), 'serve');"
        " from kiapi_core.app import create_app; from kiapi_core.settings import Settings;"
        f" create_app(Settings(home={str(tmp_path)!r}));"
        " print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'rich')"
        " or m in ('kiapi_core.cli.admin', 'kiapi_core.cli.client', 'kiapi_core.cli.install'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


# -- kiapi_core.Schema: models built at first use --------------------------------------------
def _first_use_from_threads(cls: type[BaseModel], threads: int, **values: Any) -> list[object]:
    """What ``threads`` threads released at once get from building ``cls(**values)``."""
    import threading

    start = threading.Barrier(threads)
    got: list[object] = []

    def build() -> None:
        start.wait()
        try:
            got.append(cls(**values))
        except BaseException as exc:  # whatever a racing build raises is the result
            got.append(exc)

    running = [threading.Thread(target=build) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    return got


def test_a_schema_is_built_at_first_use_and_correctly_under_concurrent_first_use() -> None:
    from pydantic import Field, ValidationError

    from kiapi_core import Schema

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch mid-build, as on a busy server
    try:
        for size in range(1, 81):  # a fresh pair each round: the race is at the first build

            class Parent(Schema):
                name: str

            class Child(Parent):
                size: int = Field(ge=1)

            Parent(name="built first")  # the parent's validator exists while the child builds
            assert Parent.__pydantic_complete__ and not Child.__pydantic_complete__
            got = _first_use_from_threads(Child, 16, name="n", size=size)
            # Each thread got the child's validator: pydantic < 2.14 could hand one the parent's
            # (no `size`) or a half-built class while another thread rebuilt the child.
            assert [getattr(g, "size", g) for g in got] == [size] * 16
    finally:
        sys.setswitchinterval(switch)
    with pytest.raises(ValidationError, match="size"):
        Child(name="n", size=0)
