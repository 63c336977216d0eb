"""The operators' web console (GET /ui) in a real headless chromium, driven over CDP.

One gateway subprocess with the demo's two simulated models (plus one whose server
cannot start, so ``last_error`` holds markup from its output, and whose name holds
``/``, ``:``, ``@`` and ``+``), one chromium, one page; the tests run in order on that
page, as an operator would: look, start, load, pin, unload, read logs, screenshot.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cdp import Browser, CDPError, is_png
from helpers import REPO, sim_command, start_gateway
from tools import require_tool

UI_DIR = REPO / "gateway" / "ui"
SMALL, LARGE, BROKEN = "chat-small", "chat-large", "org/broken:v1@x+y"
XSS = '<img src=x onerror="window.__xss=1"><b>bold</b>'


def console_config(log_dir: Path) -> dict:
    """The demo (two simulated models, started on demand) with slower starts so the page can
    be seen in ``starting``, a VRAM budget to draw against, and a model that fails to start."""
    return {
        "idle_timeout_s": 600,
        "gpu": {"total_vram_mib": 81920},
        "server_logs": {"dir": str(log_dir)},
        "upstream": {"health_interval_s": 0.1, "start_timeout_s": 30, "retries": 0},
        "models": [
            {"name": SMALL, "backend": "process", "max_concurrent": 4, "max_queue": 8,
             "vram_mib": 16000,
             "command": sim_command("--ttft-ms", "50", "--itl-ms", "10", "--startup-s", "2")},
            {"name": LARGE, "backend": "process", "max_concurrent": 8, "max_queue": 32,
             "vram_mib": 40000,
             "command": sim_command("--ttft-ms", "150", "--itl-ms", "25", "--startup-s", "3")},
            {"name": BROKEN, "backend": "process", "max_concurrent": 1, "max_queue": 1,
             "vram_mib": 1000,
             "command": [sys.executable, "-c", "import sys; print(sys.argv[1]); sys.exit(3)",
                         XSS + " {port}"]},
        ],
    }


# Records every state each row shows, in order, and marks the page so a reload is visible.
RECORDER = """(() => {
  window.__noReload = true;
  window.__seen = {};
  const rec = () => {
    for (const tr of document.querySelectorAll('tr[data-model]')) {
      const s = tr.querySelector('.state').textContent;
      const seen = (window.__seen[tr.dataset.model] ||= []);
      if (seen[seen.length - 1] !== s) seen.push(s);
    }
  };
  rec();
  new MutationObserver(rec).observe(document.getElementById('model-rows'),
                                    {subtree: true, childList: true, characterData: true});
  return true;
})()"""


def js_row(name: str) -> str:
    return f"document.querySelector('tr[data-model={json.dumps(name)}]')"


def row_text(page, name: str, selector: str) -> str | None:
    return page.evaluate(f"(() => {{ const r = {js_row(name)}; const e = r && r.querySelector("
                         f"{json.dumps(selector)}); return e ? e.textContent : null; }})()")


def seen(page, name: str) -> list[str]:
    return page.evaluate(f"window.__seen[{json.dumps(name)}] || []")


def chat(gw, model: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, trust_env=False,
                      json={"model": model, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "hi"}]})


class Console:
    def __init__(self, gw, browser: Browser) -> None:
        self.gw, self.browser, self.page = gw, browser, browser.page

    def open(self) -> None:
        self.page.navigate(f"{self.gw.url}/ui")
        self.page.wait_for(f"!!({js_row(SMALL)} && {js_row(LARGE)} && {js_row(BROKEN)})", timeout=15,
                           what="rows for every model")
        self.page.evaluate(RECORDER)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    with start_gateway(console_config(tmp / "server-logs"), tmp / "gateway") as gw:
        yield gw


@pytest.fixture(scope="module")
def console(gateway, tmp_path_factory):
    chromium = require_tool("chromium", "Debian package chromium")
    browser = Browser.launch(chromium, tmp_path_factory.mktemp("browser"))
    try:
        c = Console(gateway, browser)
        c.open()
        yield c
    finally:
        browser.close()
    assert not browser.alive(), "chromium processes left behind"


# --- served files -----------------------------------------------------------------------------

def test_assets_are_static_and_safe():
    """No build step, nothing from the internet, no markup built from data."""
    html = (UI_DIR / "index.html").read_text()
    js = (UI_DIR / "console.js").read_text()
    css = (UI_DIR / "console.css").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/console.js" defer>']
    assert "</script>" in html and not re.search(r"<script[^>]*>\s*\S", html.replace(
        '<script src="/ui/console.js" defer></script>', "")), "inline script"
    assert not re.search(r"\sstyle=|\son[a-z]+=", html), "inline style or handler attribute"
    for text in (html, js, css):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), "external URL"
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function"):
        assert banned not in js, banned


def test_served_with_csp_and_no_cache(gateway):
    url = gateway.url
    with httpx.Client(base_url=url, timeout=5, trust_env=False) as h:
        for path, ctype in (("/ui", "text/html"), ("/ui/", "text/html"),
                            ("/ui/console.js", "text/javascript"), ("/ui/console.css", "text/css")):
            r = h.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["content-type"].startswith(ctype), path
            assert r.headers["cache-control"] == "no-cache", path
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp, csp
            assert r.headers["x-content-type-options"] == "nosniff"
            etag = r.headers["etag"]
            again = h.get(path, headers={"if-none-match": etag})
            assert again.status_code == 304 and again.content == b"", path
        assert h.get("/ui/console.js").content == (UI_DIR / "console.js").read_bytes()
        for path in ("/ui/nope.js", "/ui/index.html", "/ui/..%2Fapp.py", "/ui/../gateway/app.py",
                     "/ui/%2e%2e%2fapp.py"):
            r = h.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert "error" in r.json()


# --- the page ---------------------------------------------------------------------------------

def test_page_renders_every_model(console):
    page = console.page
    for name, queue, inflight in ((SMALL, "0 / 8", "0 / 4"), (LARGE, "0 / 32", "0 / 8")):
        assert row_text(page, name, ".model-name") == name
        assert row_text(page, name, ".state") == "stopped"
        assert row_text(page, name, "td:nth-child(3) .figure") == queue
        assert row_text(page, name, "td:nth-child(4) .figure") == inflight
        assert row_text(page, name, ".idle-for") == "never used"
        assert row_text(page, name, ".idle-limit") == "idle limit 10m 00s"
        assert row_text(page, name, ".last-error") == "—"
        buttons = page.evaluate(f"[...{js_row(name)}.querySelectorAll('button.action')]"
                                ".map(b => [b.textContent, b.disabled])")
        assert buttons == [["load", False], ["unload", True], ["sleep", True], ["wake", True],
                           ["pin", False]]
    # the VRAM column is drawn against the budget (gpu.total_vram_mib: 80 GiB)
    assert row_text(page, LARGE, "td:nth-child(5) .figure").endswith("/ 80.0 GiB")
    assert "models 3" in page.evaluate("document.getElementById('totals').textContent")
    assert page.evaluate("document.getElementById('conn').textContent") in ("live", "reconnecting")
    assert page.exceptions() == []
    csp = [e for e in page.log_entries() if "Content Security Policy" in e.get("text", "")]
    assert csp == [], csp


def test_events_indicator_is_live(console):
    """The indicator says "live" while GET /gateway/events is open."""
    with httpx.stream("GET", f"{console.gw.url}/gateway/events", timeout=5, trust_env=False) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
    console.page.wait_for("document.getElementById('conn').textContent === 'live'", timeout=15,
                          what="the live indicator")


def test_last_error_is_shown_as_text(console):
    """A failed start's last_error (with the server's output: markup here) is text, never HTML."""
    page = console.page
    r = chat(console.gw, BROKEN)
    assert r.status_code == 503, r.text
    page.wait_for(f"{js_row(BROKEN)}.querySelector('.last-error').textContent.includes('<img')",
                  timeout=15, what="the broken model's last_error")
    cell = row_text(page, BROKEN, ".last-error")
    assert XSS in cell
    assert page.evaluate(f"{js_row(BROKEN)}.querySelector('.last-error .error-text').children.length") == 0
    assert page.evaluate("document.querySelectorAll('main img, main b').length") == 0
    assert page.evaluate("window.__xss === undefined")


def test_state_change_shows_without_reload(console):
    """A request starts chat-large on demand; the page follows starting -> ready by itself."""
    page = console.page
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", chat(console.gw, LARGE)))
    t.start()
    try:
        page.wait_for(f"{js_row(LARGE)}.querySelector('.state').textContent === 'ready'",
                      timeout=40, what=f"{LARGE} ready on the page")
    finally:
        t.join(60)
    assert result["r"].status_code == 200, result["r"].text
    history = seen(page, LARGE)
    assert history[0] == "stopped" and history[-1] == "ready", history
    assert "starting" in history, history
    assert page.evaluate("window.__noReload === true"), "the page was reloaded"
    assert row_text(page, LARGE, "td:nth-child(5) .figure") == "39.1 GiB / 80.0 GiB"
    assert row_text(page, LARGE, ".idle-for").endswith("s")  # used a moment ago
    buttons = page.evaluate(f"[...{js_row(LARGE)}.querySelectorAll('button.action')]"
                            ".map(b => [b.textContent, b.disabled])")
    assert buttons == [["load", True], ["unload", False], ["sleep", False], ["wake", True],
                       ["pin", False]]


def notice(page) -> str | None:
    """The notice's text once it is shown, else None."""
    return page.evaluate("(() => { const n = document.getElementById('notice'); return n.hidden ? "
                         "null : document.getElementById('notice-text').textContent; })()")


def clear_notice(page) -> None:
    page.evaluate("document.getElementById('notice').hidden = true")


def test_load_button(console):
    """Clicking "load" on chat-small calls POST /gateway/models/chat-small/load?wait=false
    (202); the row goes starting -> ready without a reload."""
    page = console.page
    assert row_text(page, SMALL, ".state") == "stopped"
    clear_notice(page)
    page.click(f"tr[data-model={json.dumps(SMALL)}] button.action-load")
    page.wait_for(f"{js_row(SMALL)}.querySelector('.state').textContent === 'ready'", timeout=40,
                  what=f"{SMALL} ready on the page")
    history = seen(page, SMALL)
    assert history[0] == "stopped" and "starting" in history and history[-1] == "ready", history
    assert page.evaluate("window.__noReload === true"), "the page was reloaded"
    assert notice(page) in (f"load {SMALL}: accepted", None)  # None once the ok notice faded


def test_loaded_model_stays_loaded(console):
    """A model loaded from the console stays loaded: the sweeper (every 1 s) must not take a
    model nobody has used yet for an idle one (idle_timeout_s is 600 here)."""
    page = console.page
    if console.gw.status()["models"][SMALL]["state"] != "ready":
        pytest.fail(f"{SMALL} is no longer ready after its load; gateway log:\n"
                    + console.gw.log_text()[-1500:])
    time.sleep(2.5)
    assert console.gw.status()["models"][SMALL]["state"] == "ready", console.gw.log_text()[-1500:]
    assert row_text(page, SMALL, ".state") == "ready"


def test_error_message_is_shown(console):
    """An admin call that fails shows the gateway's error message (chat-large has no sleep mode)."""
    page = console.page
    assert row_text(page, LARGE, ".state") == "ready"
    clear_notice(page)
    page.click(f"tr[data-model={json.dumps(LARGE)}] button.action-sleep")
    text = page.wait_for("(() => { const n = document.getElementById('notice'); return !n.hidden"
                         " && document.getElementById('notice-text').textContent; })()", timeout=10)
    assert text == f"sleep {LARGE} failed: model '{LARGE}' is not configured with sleep_mode: true"
    assert page.evaluate("document.getElementById('notice').dataset.kind") == "error"
    assert row_text(page, LARGE, ".state") == "ready"


def test_pin_and_unpin_a_name_with_slashes(console):
    """pin/unpin reach the model even when its name holds / : @ + (sent unescaped)."""
    page = console.page
    sel = f"tr[data-model={json.dumps(BROKEN)}] button.action-pin"
    assert row_text(page, BROKEN, "button.action-pin") == "pin"
    assert page.evaluate(f"{js_row(BROKEN)}.querySelector('.badge.pinned').hidden")
    page.click(sel)
    page.wait_for(f"{js_row(BROKEN)}.querySelector('button.action-pin').textContent === 'unpin'"
                  f" && !{js_row(BROKEN)}.querySelector('.badge.pinned').hidden", timeout=10,
                  what="the pinned badge")
    assert console.gw.status()["models"][BROKEN]["pinned"] is True
    page.click(sel)
    page.wait_for(f"{js_row(BROKEN)}.querySelector('button.action-pin').textContent === 'pin'",
                  timeout=10, what="unpinned")
    assert console.gw.status()["models"][BROKEN]["pinned"] is False


def test_unload_button(console):
    """"unload" stops chat-small; the row follows it back to stopped."""
    page = console.page
    if console.gw.status()["models"][SMALL]["state"] != "ready":
        assert chat(console.gw, SMALL).status_code == 200
    page.wait_for(f"{js_row(SMALL)}.querySelector('.state').textContent === 'ready'", timeout=10)
    page.click(f"tr[data-model={json.dumps(SMALL)}] button.action-unload")
    page.wait_for(f"{js_row(SMALL)}.querySelector('.state').textContent === 'stopped'",
                  timeout=30, what=f"{SMALL} stopped on the page")
    assert seen(page, SMALL)[-1] == "stopped"
    assert console.gw.status()["models"][SMALL]["state"] == "stopped"
    assert not page.evaluate(f"{js_row(SMALL)}.querySelector('button.action-load').disabled")


def test_log_tail_panel(console):
    """Clicking a model's name shows the tail of its server log, as text."""
    page = console.page
    if row_text(page, LARGE, ".state") != "ready":
        assert chat(console.gw, LARGE).status_code == 200
    page.click(f"tr[data-model={json.dumps(LARGE)}] button.model-name")
    page.wait_for("!document.getElementById('log-panel').hidden", timeout=5)
    assert page.evaluate("document.getElementById('log-model').textContent") == LARGE
    status = page.wait_for("(() => { const s = document.getElementById('log-status').textContent;"
                           " return s !== 'loading…' && s; })()", timeout=15,
                           what="the log request's outcome")
    assert re.match(r"\d+ lines · ", status), status
    text = page.evaluate("document.getElementById('log-lines').textContent")
    assert f"vLLM simulator serving '{LARGE}'" in text, text[-2000:]
    assert page.evaluate("document.getElementById('log-lines').children.length") == 0
    assert page.evaluate(f"{js_row(LARGE)}.classList.contains('selected')")


def test_screenshot(console, tmp_path):
    page = console.page
    page.evaluate("window.scrollTo(0, 0)")
    png = page.screenshot()
    path = tmp_path / "console.png"
    path.write_bytes(png)
    size = is_png(path.read_bytes())
    assert size is not None, "not a PNG"
    assert size[0] >= 1000 and size[1] >= 300, size
    assert path.stat().st_size > 10_000
    print(f"console screenshot: {path}")
    assert console.page.exceptions() == []


def test_browser_helpers_fail_fast(console):
    """The CDP client's waits are bounded and report what they waited for."""
    with pytest.raises(CDPError, match="never"):
        console.page.wait_for("false", timeout=0.3, what="never")
    with pytest.raises(CDPError, match="no element"):
        console.page.click("#does-not-exist")
    with pytest.raises(CDPError, match="JS exception"):
        console.page.evaluate("(() => { throw new Error('x'); })()")


# --- a gateway with API keys: the console asks for an admin key -------------------------------

OPS_KEY = "sk-console-ops-" + uuid.uuid4().hex
TEAM_KEY = "sk-console-team-a-" + uuid.uuid4().hex
KEYED = "keyed-chat"
KEY_STORAGE = "vllm-gateway.admin-key"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A gateway with an admin key and a client key (status stays readable without one),
    and a chromium of its own, so its tab starts with empty storage."""
    tmp = tmp_path_factory.mktemp("keyed-console")
    cfg = {"upstream": {"health_interval_s": 0.1, "start_timeout_s": 30, "retries": 0},
           "auth": {"keys": [{"name": "team-a", "key_sha256": sha256(TEAM_KEY)}],
                    "admin_keys": [{"name": "ops", "key_sha256": sha256(OPS_KEY)}]},
           "models": [{"name": KEYED, "backend": "process", "max_concurrent": 2,
                       "vram_mib": 1000,
                       "command": sim_command("--ttft-ms", "5", "--itl-ms", "1",
                                              "--startup-s", "1")}]}
    chromium = require_tool("chromium", "Debian package chromium")
    with start_gateway(cfg, tmp / "gateway") as gw:
        browser = Browser.launch(chromium, tmp / "browser")
        try:
            yield Console(gw, browser)
        finally:
            browser.close()
        assert not browser.alive(), "chromium processes left behind"


def admin_status(gw) -> dict:
    return httpx.get(f"{gw.url}/gateway/status", timeout=5, trust_env=False,
                     headers={"authorization": f"Bearer {OPS_KEY}"}).json()


def key_message(page) -> str:
    return page.evaluate("document.getElementById('key-message').textContent")


def key_form_shown(page) -> bool:
    return page.evaluate("!document.getElementById('key-form').hidden")


def stored(page) -> list:
    """What the tab keeps: [the sessionStorage entry, sessionStorage size, localStorage size]."""
    return page.evaluate(f"[sessionStorage.getItem({json.dumps(KEY_STORAGE)}), "
                         "sessionStorage.length, localStorage.length]")


def enter_key(page, key: str) -> None:
    page.evaluate(f"document.getElementById('key-input').value = {json.dumps(key)}")
    page.click("#key-submit")


def test_keyed_console_asks_for_an_admin_key(keyed):
    page = keyed.page
    page.navigate(f"{keyed.gw.url}/ui")
    page.wait_for(f"!!{js_row(KEYED)}", timeout=15, what="the model's row (status needs no key)")
    page.evaluate(RECORDER)
    page.wait_for("!document.getElementById('key-form').hidden", timeout=15, what="the key form")
    assert "needs an admin key (401)" in key_message(page), key_message(page)
    assert page.evaluate("document.getElementById('conn').textContent") == "key needed"
    assert page.evaluate("document.activeElement.id") == "key-input"
    assert page.evaluate("document.getElementById('key-input').type") == "password"
    assert row_text(page, KEYED, ".urls") == ""  # not an operator yet
    assert page.evaluate("document.getElementById('auth').hidden")
    assert stored(page) == [None, 0, 0]
    assert keyed.gw.status()["totals"]["event_subscribers"] == 0  # the stream was refused


def test_a_wrong_key_shows_the_401(keyed):
    page = keyed.page
    enter_key(page, "sk-not-a-key-" + uuid.uuid4().hex)
    page.wait_for("document.getElementById('key-message').textContent.includes('refused')",
                  timeout=10, what="the refusal")
    assert key_message(page) == "the gateway refused that key (401): the API key is not valid"
    assert key_form_shown(page)
    assert stored(page) == [None, 0, 0], "a refused key is not kept"
    assert page.evaluate("document.getElementById('key-input').value") == ""


def test_a_client_key_is_not_an_admin_key(keyed):
    page = keyed.page
    enter_key(page, TEAM_KEY)
    page.wait_for("document.getElementById('key-message').textContent.includes('403')",
                  timeout=10, what="the 403")
    message = key_message(page)
    assert message.startswith("that key is not an admin key (403): key 'team-a' is not an admin "
                              "key"), message
    assert key_form_shown(page)
    assert page.evaluate("document.getElementById('conn').textContent") == "key needed"
    assert row_text(page, KEYED, ".urls") == ""


def test_the_admin_key_unlocks_the_console(keyed):
    page, gw = keyed.page, keyed.gw
    enter_key(page, OPS_KEY)
    page.wait_for("document.getElementById('key-form').hidden", timeout=10,
                  what="the form gone once the key is accepted")
    page.wait_for("document.getElementById('conn').textContent === 'live'", timeout=10,
                  what="live events with the key")
    assert gw.status()["totals"]["event_subscribers"] >= 1  # the page's fetch() stream
    assert not page.evaluate("document.getElementById('auth').hidden")
    assert stored(page) == [OPS_KEY, 1, 0], "the key lives in sessionStorage only"
    assert OPS_KEY not in page.evaluate("location.href + document.cookie + document.body.innerText")

    # an action: load (the state changes arrive by events), then pin and unpin
    page.click(f"tr[data-model={json.dumps(KEYED)}] button.action-load")
    page.wait_for(f"{js_row(KEYED)}.querySelector('.state').textContent === 'ready'", timeout=40,
                  what=f"{KEYED} ready on the page")
    assert "starting" in seen(page, KEYED), seen(page, KEYED)
    urls = page.wait_for(f"{js_row(KEYED)}.querySelector('.urls').textContent", timeout=10,
                         what="the upstream URL (shown to admins)")
    assert urls == " ".join(admin_status(gw)["models"][KEYED]["urls"]), urls
    assert urls.startswith("http://127.0.0.1:"), urls
    page.click(f"tr[data-model={json.dumps(KEYED)}] button.action-pin")
    page.wait_for(f"{js_row(KEYED)}.querySelector('button.action-pin').textContent === 'unpin'",
                  timeout=10, what="pinned")
    assert admin_status(gw)["models"][KEYED]["pinned"] is True
    page.click(f"tr[data-model={json.dumps(KEYED)}] button.action-pin")
    page.wait_for(f"{js_row(KEYED)}.querySelector('button.action-pin').textContent === 'pin'",
                  timeout=10, what="unpinned")
    assert admin_status(gw)["models"][KEYED]["pinned"] is False

    # the log tail is an admin route too
    page.click(f"tr[data-model={json.dumps(KEYED)}] button.model-name")
    status = page.wait_for("(() => { const s = document.getElementById('log-status').textContent;"
                           " return s !== 'loading…' && s; })()", timeout=15, what="the log tail")
    assert re.match(r"\d+ lines · ", status), status
    assert page.exceptions() == []
    assert [e for e in page.log_entries() if "Content Security Policy" in e.get("text", "")] == []
    assert OPS_KEY not in gw.log_text() and TEAM_KEY not in gw.log_text()


def test_forget_key(keyed):
    page = keyed.page
    page.click("#key-forget")
    page.wait_for("!document.getElementById('key-form').hidden", timeout=5, what="the key form")
    assert key_message(page).startswith("key forgotten"), key_message(page)
    assert stored(page) == [None, 0, 0]
    page.wait_for(f"{js_row(KEYED)}.querySelector('.urls').hidden", timeout=10,
                  what="the upstream URL hidden again")
    page.wait_for("document.getElementById('conn').textContent === 'key needed'", timeout=10)
    clear_notice(page)
    page.click(f"tr[data-model={json.dumps(KEYED)}] button.action-unload")
    text = page.wait_for("(() => { const n = document.getElementById('notice'); return !n.hidden"
                         " && document.getElementById('notice-text').textContent; })()",
                         timeout=10, what="the refused unload")
    assert text.startswith(f"unload {KEYED} failed: no API key given"), text
    assert key_message(page).startswith("key forgotten"), "the form keeps its message"
    assert admin_status(keyed.gw)["models"][KEYED]["state"] == "ready"


def test_protected_status_asks_for_the_key_first(keyed, tmp_path):
    """With ``auth.protect: [status]`` nothing shows until a key is given; a refused key's
    message stays put while the status poll keeps answering 401."""
    cfg = {"auth": {"keys": [{"name": "team-a", "key_sha256": sha256(TEAM_KEY)}],
                    "admin_keys": [{"name": "ops", "key_sha256": sha256(OPS_KEY)}],
                    "protect": ["status"]},
           "models": [{"name": "locked", "backend": "static", "url": "http://127.0.0.1:9"}]}
    page = keyed.page
    with start_gateway(cfg, tmp_path) as gw:
        page.navigate(f"{gw.url}/ui")  # another origin: its own, empty, sessionStorage
        page.wait_for("!document.getElementById('key-form').hidden", timeout=15,
                      what="the key form")
        assert "needs an admin key (401)" in key_message(page)
        assert page.evaluate("document.querySelectorAll('tr[data-model]').length") == 0
        enter_key(page, "sk-wrong-" + uuid.uuid4().hex)
        page.wait_for("document.getElementById('key-message').textContent.includes('refused')",
                      timeout=10, what="the refusal")
        page.pump(3.5)  # a status poll or two, without a key
        assert key_message(page).startswith("the gateway refused that key (401)")
        enter_key(page, OPS_KEY)
        page.wait_for(f"!!{js_row('locked')}", timeout=10, what="the row, with the key")
        page.wait_for("document.getElementById('key-form').hidden", timeout=10)
        assert stored(page) == [OPS_KEY, 1, 0]
        assert page.exceptions() == []
