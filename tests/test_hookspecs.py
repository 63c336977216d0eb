"""Meta-tests of the plugin contract (as datasette does for its hooks).

Every hookspec in ``gateway.hookspecs`` must be documented in docs/plugins.md (a section
with its exact signature), tested by a ``test_hook_<name>`` function somewhere in tests/,
and classified as sync-only or async-capable. The example plugin in docs/plugins.md is
run, so the guide cannot drift from the code.
"""
from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

from gateway import hookspecs
from gateway.hookspecs import ASYNC_CAPABLE_HOOKS, PROJECT, SYNC_ONLY_HOOKS
from gateway.plugins import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, build_plugin_manager, list_plugins
from gateway.types import EvictionRequest, ModelView, Rejection, RequestInfo

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs"
PLUGINS_MD = DOCS / "plugins.md"
SPEC_MARK = f"{PROJECT}_spec"


def hook_specs() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, SPEC_MARK)}


HOOKS = sorted(hook_specs())


def signature_line(name: str) -> str:
    return f"{name}({', '.join(hook_specs()[name].parameters)})"


def doc_sections(text: str) -> dict[str, str]:
    """Markdown heading text -> the body up to the next heading of any level."""
    parts = re.split(r"^(#{1,6} .+)$", text, flags=re.M)
    return {parts[i].lstrip("#").strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_hooks_exist():
    assert len(HOOKS) >= 8
    assert {"register_backends", "startup", "shutdown", "admit_request", "select_backend",
            "select_evictions", "decide_retry", "read_vram"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    sections = doc_sections(PLUGINS_MD.read_text())
    assert hook in sections, f"docs/plugins.md has no section headed {hook!r}"
    assert signature_line(hook) in sections[hook], (
        f"the {hook!r} section of docs/plugins.md does not show {signature_line(hook)}")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    pattern = re.compile(rf"^\s*(async\s+)?def test_hook_{hook}\(", re.M)
    found = [p.name for p in TESTS.rglob("test_*.py") if pattern.search(p.read_text())]
    assert found, f"no test function named test_hook_{hook} in tests/"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_classified_once(hook):
    assert (hook in SYNC_ONLY_HOOKS) != (hook in ASYNC_CAPABLE_HOOKS)


def test_classification_names_only_hooks():
    assert sorted(SYNC_ONLY_HOOKS + ASYNC_CAPABLE_HOOKS) == HOOKS


def test_firstresult_hooks_are_sync_only():
    """A first-result hook with an async impl would return a coroutine, which always wins."""
    for hook in HOOKS:
        opts = getattr(getattr(hookspecs, hook), SPEC_MARK)
        if opts.get("firstresult"):
            assert hook in SYNC_ONLY_HOOKS, hook
        if hook in ASYNC_CAPABLE_HOOKS:
            assert not opts.get("firstresult"), hook


def test_builtins_are_trylast_defaults():
    pm = build_plugin_manager(load_entrypoints=False)
    builtin = {name for name, _ in DEFAULT_PLUGINS}
    for hook in HOOKS:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.plugin_name in builtin:
                assert impl.trylast, f"built-in {impl.plugin_name}.{hook} is not trylast"


def test_builtins_table_in_docs_matches_default_plugins():
    text = PLUGINS_MD.read_text()
    pm = build_plugin_manager(load_entrypoints=False)
    for info in list_plugins(pm):
        module = dict(DEFAULT_PLUGINS)[info.name]
        row = next((line for line in text.splitlines() if line.startswith(f"| `{info.name}` |")),
                   None)
        assert row is not None, f"docs/plugins.md's built-in table lacks {info.name}"
        assert f"`{module}`" in row and all(f"`{h}`" in row for h in info.hooks), row


def test_docs_name_the_switches_and_metrics():
    text = PLUGINS_MD.read_text()
    for needle in (f"[project.entry-points.{ENTRY_POINT_GROUP}]", "from gateway import hookimpl",
                   "VLLM_GATEWAY_LOAD_PLUGINS", "disabled: [", "load_entrypoints",
                   "gateway_plugin_duration_seconds",
                   "gateway_plugin_errors_total", "check_pending", "tryfirst", "trylast"):
        assert needle in text, needle


def test_architecture_doc_places_every_hook():
    text = (DOCS / "architecture.md").read_text()
    for hook in HOOKS:
        assert f"| `{hook}` |" in text, f"docs/architecture.md's hook table lacks {hook}"


# --- the example plugin in docs/plugins.md runs as documented -------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> types.ModuleType:
    """Import ``gw_apikey.py`` exactly as docs/plugins.md prints it."""
    blocks = re.findall(r"```python\n(# gw_apikey\.py\n.*?)```", PLUGINS_MD.read_text(), re.S)
    assert len(blocks) == 1, "docs/plugins.md: want one ```python block starting # gw_apikey.py"
    path = tmp_path_factory.mktemp("docs-example") / "gw_apikey.py"
    path.write_text(blocks[0])
    spec = importlib.util.spec_from_file_location("gw_apikey_docs_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gw_apikey_docs_example", None)


def test_docs_example_pyproject_declares_its_entry_point():
    text = PLUGINS_MD.read_text()
    assert '[project.entry-points.vllm_gateway]\napikey = "gw_apikey"' in text


def test_docs_example_passes_the_contract(example):
    pm = build_plugin_manager(load_entrypoints=False, extra=[("apikey", example)])
    info = {p.name: p for p in list_plugins(pm)}["apikey"]
    assert info.hooks == ("admit_request", "select_evictions", "startup")


def view(name: str, vram: int = 10, **kw) -> ModelView:
    base = dict(backend="process", state="ready", waiting=0, in_flight=0, max_concurrent=1,
                max_queue=1, last_used=0.0, loaded_since=0.0, vram_mib=vram)
    return ModelView(name=name, **{**base, **kw})


async def test_docs_example_admission(example):
    settings = types.SimpleNamespace(plugins=types.SimpleNamespace(
        config={"apikey": {"keys": {"chat-large": ["sk-team-a"]}}}))
    example.startup(types.SimpleNamespace(settings=settings))

    def ask(model: str, auth: str | None):
        headers = {"authorization": auth} if auth is not None else {}
        info = RequestInfo(model=model, path="/v1/chat/completions", method="POST",
                           headers=headers, body={})
        return example.admit_request(info, view(model))

    assert ask("chat-small", None) is None
    assert ask("chat-large", "Bearer sk-team-a") is None
    for auth in (None, "Bearer sk-team-b", "sk-team-a", "Bearer sk-tëam-a"):
        rejection = ask("chat-large", auth)
        assert isinstance(rejection, Rejection) and rejection.status == 401, auth
        assert (rejection.code, rejection.reason) == ("invalid_api_key", "auth")


@pytest.mark.parametrize("loaded, target, expected", [
    ([view("small", 30), view("big", 50)], 40, ["big"]),
    ([view("small", 30), view("big", 50)], 80, ["big", "small"]),
    ([view("small", 30), view("big", 50, in_flight=1)], 60, []),
    ([view("small", 10), view("big", 20)], 40, None),
], ids=["biggest-first", "both", "busy-biggest-cannot-make-room", "fits"])
def test_docs_example_evicts_biggest_first(example, loaded, target, expected):
    req = EvictionRequest(target=view("t", target, state="starting"), loaded=tuple(loaded),
                          total_vram_mib=100, reserved_vram_mib=sum(m.vram_mib for m in loaded),
                          max_models_running=None, min_residency_s=0, now=100.0)
    assert example.select_evictions(req) == expected
