"""Model servers never outlive their gateway, and their logs stay small and go away.

Real processes throughout: a gateway SIGKILLed with servers running takes them along
(the process guard's parent-death signal), a gateway starting up stops what a dead
gateway left behind (owner markers in /proc/*/environ) and never what a live one runs,
and each server's output goes to a size-capped file under ``server_logs.dir`` that is
removed when the server stops. The Docker driver's counterpart removes containers of
models no longer configured.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import test_docker_backend as dockertests
import vllm_gateway_plugins.process_backend as pb
from helpers import REPO, gateway_env, pid_alive, sim_command, start_gateway, wait_until

from gateway.config import load_settings

# The Docker tests' fixtures: the daemon (skips or fails without one, as there), the empty
# image, a label prefix per test whose containers go at teardown, gateway subprocesses.
docker_client = dockertests.docker_client
prefix = dockertests.prefix
gateways = dockertests.gateways

pytestmark = pytest.mark.timeout(60)

OWNER = "VLLM_GATEWAY_OWNER"
MODEL = "VLLM_GATEWAY_MODEL"
FAST = ("--ttft-ms", "0", "--itl-ms", "0", "--startup-s", "0.2")


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def marked_by(owner_pid: int) -> list[int]:
    """Live processes whose VLLM_GATEWAY_OWNER names ``owner_pid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and pid_alive(int(name)):
            if environ_of(int(name)).get(OWNER, "").startswith(f"{owner_pid}:"):
                out.append(int(name))
    return out


def start_ticks(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2:].split()[19])


def config(*models: dict, **top) -> dict:
    base = {"idle_timeout_s": 600, "plugins": {"load_entrypoints": False},
            "upstream": {"retries": 1, "backoff_s": 0.05, "health_interval_s": 0.05,
                         "start_timeout_s": 20}}
    base.update(top)
    base["models"] = list(models)
    return base


def chat_ok(gw, model: str) -> None:
    import httpx

    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, trust_env=False,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 1})
    assert r.status_code == 200, r.text


# A server that first starts a grandchild (like vLLM's engine core), then becomes the
# simulator: argv = [port, name, grandchild tag].
SPAWNER = textwrap.dedent("""
    import os, subprocess, sys
    port, name, tag = sys.argv[1:4]
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", tag])
    os.execv(sys.executable, [sys.executable, "-m", "vllm_simulator", "--port", port,
                              "--served-model-name", name, "--ttft-ms", "0", "--itl-ms", "0"])
""")


def test_sigkilled_gateway_takes_servers_and_grandchildren_along(tmp_path):
    plain, spawner, tag = unique("plain"), unique("spawner"), unique("grandchild")
    models = [{"name": plain, "backend": "process", "command": sim_command(*FAST)},
              {"name": spawner, "backend": "process",
               "command": [sys.executable, "-c", SPAWNER, "{port}", "{name}", tag]}]
    log_dir = tmp_path / "logs"
    cfg = config(*models, server_logs={"dir": str(log_dir)})
    gw = start_gateway(cfg, tmp_path)
    try:
        chat_ok(gw, plain)
        chat_ok(gw, spawner)
        guards = sorted(gw.children())
        assert sorted(p.name for p in log_dir.iterdir()) == sorted(
            f"{m}-{pid}.log" for m, pid in zip(
                [environ_of(p)[MODEL] for p in guards], guards, strict=True))
        procs = marked_by(gw.proc.pid)
        tagged = [p for p in procs if tag in Path(f"/proc/{p}/cmdline").read_bytes().decode()]
        # two guards, two servers, the grandchild (and the guards' argv hold the tag too)
        assert len(procs) >= 5, procs
        grandchild = [p for p in tagged if environ_of(p).get(MODEL) == spawner
                      and Path(f"/proc/{p}/cmdline").read_bytes().startswith(
                          sys.executable.encode() + b"\0-c\0import time")]
        assert len(grandchild) == 1, tagged
        assert {environ_of(p)[MODEL] for p in procs} == {plain, spawner}

        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
        started = time.monotonic()
        wait_until(lambda: not marked_by(gw.proc.pid), 8,
                   what="the dead gateway's servers to go away")
        assert time.monotonic() - started < 8
        assert not pid_alive(grandchild[0])
    finally:
        gw.stop()
        for pid in marked_by(gw.proc.pid):  # only if the test failed
            os.kill(pid, signal.SIGKILL)
    # Nobody stopped those servers, so their log files are still there, until the next
    # gateway on the same directory starts and sees that their guards are gone.
    assert len(list(log_dir.iterdir())) == 2
    with start_gateway(cfg, tmp_path):
        assert list(log_dir.iterdir()) == []


def _spawn_marked(owner: str, model: str, *, ignore_term: bool = False,
                  grandchild: bool = False) -> subprocess.Popen:
    script = "import signal, subprocess, sys, time\n"
    if ignore_term:
        script += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    if grandchild:
        script += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    script += "print('up', flush=True)\ntime.sleep(600)\n"
    env = {**os.environ, OWNER: owner, MODEL: model}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout.readline() == b"up\n"
    return proc


def test_orphans_of_a_dead_gateway_are_reaped_at_start_up(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid  # a pid that no longer runs
    me = os.getpid()
    ghost, stubborn, reused, live = (unique(n) for n in ("ghost", "stubborn", "reused", "live"))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = []
    try:
        orphan = _spawn_marked(f"{dead}:12345", ghost, grandchild=True)
        procs.append(orphan)
        orphan_group = pb_group(orphan.pid)
        assert len(orphan_group) == 2, orphan_group  # it and its grandchild
        deaf = _spawn_marked(f"{dead}:12345", stubborn, ignore_term=True)
        procs.append(deaf)
        # the owner pid runs, but it is another process than the one that started it
        recycled = _spawn_marked(f"{me}:{start_ticks(me) + 1}", reused)
        procs.append(recycled)
        keeper = _spawn_marked(f"{me}:{start_ticks(me)}", live)  # a live gateway's child
        procs.append(keeper)
        stale = [log_dir / f"{ghost}-{dead}.log", log_dir / f"{ghost}-{dead}.log.1"]
        kept = [log_dir / f"{live}-{keeper.pid}.log", log_dir / "notes.txt"]
        for path in stale + kept:
            path.write_text("old output\n")

        gw = start_gateway(config({"name": unique("m"), "backend": "process",
                                   "command": sim_command(*FAST)},
                                  server_logs={"dir": str(log_dir)}), tmp_path)
        try:
            victims = orphan_group + [deaf.pid, recycled.pid]
            wait_until(lambda: not any(pid_alive(p) for p in victims), 8,
                       what="the orphans to be stopped")
            assert pid_alive(keeper.pid), "a live gateway's server was touched"
            text = gw.log_text()
            for model in (ghost, stubborn, reused):
                assert f"model {model}: stopped" in text, text
            assert f"gateway pid {dead}" in text
            assert live not in text
            assert not any(p.exists() for p in stale)
            assert all(p.exists() for p in kept)
        finally:
            gw.stop()
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(5)


def pb_group(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and pid_alive(int(name)):
            try:
                if os.getpgid(int(name)) == pgid:
                    out.append(int(name))
            except OSError:
                pass
    return out


# --- the driver itself, in this process -----------------------------------------------------

def driver_for(tmp_path: Path, command: list[str], **logs) -> tuple[pb.ProcessDriver, object]:
    raw = {"server_logs": {"dir": str(tmp_path / "server-logs"), **logs},
           "models": [{"name": "m/odd:name", "backend": "process", "command": command,
                       "env": {"PYTHONPATH": str(REPO), "MY_API_KEY": "hush-hush-value"}}]}
    settings = load_settings(raw=raw, environ={})
    driver = pb.ProcessDriver()
    driver.configure(settings)
    return driver, settings.models[0]


def vllm_gateway_temp_files() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("vllm-gateway-")}


CHATTY = textwrap.dedent("""
    import sys, time
    out = sys.stdout
    for i in range(400):
        out.write(f"line {i:04d} " + "x" * 90 + "\\n")
    out.write("all written\\n")
    out.flush()
    time.sleep(600)
""")


async def test_server_log_is_capped_rotated_and_removed_on_stop(tmp_path):
    before = vllm_gateway_temp_files()
    driver, model = driver_for(tmp_path, [sys.executable, "-c", CHATTY, "{port}"],
                               max_bytes=4096)
    server = await driver.start(model, 1)
    try:
        log = Path(server.extra["log"])
        assert log.parent == tmp_path / "server-logs"
        assert log.name == f"m_odd_name-{server.ident}.log"

        async def written():
            while "all written" not in (log.read_text() if log.exists() else ""):
                await asyncio.sleep(0.02)
        await asyncio.wait_for(written(), 10)
        files = sorted(p.name for p in log.parent.iterdir())
        assert files == [log.name, log.name + ".1"]
        for path in (log, Path(str(log) + ".1")):
            assert 0 < path.stat().st_size <= 4096 + 101, (path, path.stat().st_size)
        backup = Path(str(log) + ".1").read_text()
        assert backup.endswith("\n")  # rotation happens at a line end
        tail = await driver.logs_tail(model, server, lines=3)
        assert tail.splitlines()[-1] == "all written"
        assert tail.splitlines()[0].startswith("line 0398")
        assert await driver.is_running(model, server)
    finally:
        await driver.stop(model, server)
    assert not await driver.is_running(model, server)
    assert list((tmp_path / "server-logs").iterdir()) == []
    assert vllm_gateway_temp_files() <= before


async def test_relative_log_dir_is_resolved_at_configure_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(raw={"server_logs": {"dir": "rel/logs"}}, environ={})
    driver = pb.ProcessDriver()
    driver.configure(settings)
    monkeypatch.chdir("/")
    assert driver.log_dir == tmp_path / "rel" / "logs"


FAILING = ("import sys; print('loading with hush-hush-value and token=abc123'); "
           "print('boom hf_abcdefghijkl', file=sys.stderr); sys.exit(3)")


async def test_exited_server_keeps_its_tail_until_stop_and_tail_is_redacted(tmp_path):
    driver, model = driver_for(tmp_path, [sys.executable, "-c", FAILING, "{port}"])
    server = await driver.start(model, 1)

    async def exited():
        while await driver.is_running(model, server):
            await asyncio.sleep(0.02)
    await asyncio.wait_for(exited(), 10)
    assert driver._procs[server.ident].returncode == 3  # the guard reports the server's code
    tail = await driver.logs_tail(model, server)
    assert "boom ***" in tail and "loading with *** and token=***" in tail, tail
    assert "hush-hush-value" not in tail and "abc123" not in tail and "hf_abc" not in tail
    await driver.stop(model, server)
    assert list((tmp_path / "server-logs").iterdir()) == []
    assert await driver.logs_tail(model, server) == ""


GROUP = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c",
                      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(600)"])
    print("ready", flush=True)
    time.sleep(600)
""")


async def wait_log(server, text: str, timeout: float = 10) -> None:
    path = Path(server.extra["log"])

    async def seen():
        while text not in (path.read_text() if path.exists() else ""):
            await asyncio.sleep(0.02)
    await asyncio.wait_for(seen(), timeout)


async def test_stop_sigkills_a_group_that_ignores_sigterm_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(pb, "STOP_GRACE_S", 1.0)
    driver, model = driver_for(tmp_path, [sys.executable, "-c", GROUP, "{port}"])
    server = await driver.start(model, 1)
    await wait_log(server, "ready")
    group = pb_group(int(server.ident))
    assert len(group) == 3, group  # guard, server, grandchild
    started = time.monotonic()
    await driver.stop(model, server)
    took = time.monotonic() - started
    assert 0.9 <= took < 1.0 + pb.STOP_MARGIN_S, took  # the guard's own SIGKILL, not ours
    assert not any(pid_alive(p) for p in group)


LEAVER = ("import subprocess, sys; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
          "print('leaving', flush=True); sys.exit(5)")


async def test_server_exiting_by_itself_takes_its_leftovers_along(tmp_path):
    driver, model = driver_for(tmp_path, [sys.executable, "-c", LEAVER, "{port}"])
    server = await driver.start(model, 1)

    async def exited():
        while await driver.is_running(model, server):
            await asyncio.sleep(0.02)
    await asyncio.wait_for(exited(), 10)
    assert driver._procs[server.ident].returncode == 5
    assert pb_group(int(server.ident)) == []  # the grandchild went with it
    await driver.stop(model, server)


SIGNALS = textwrap.dedent("""
    import time
    for line in open("/proc/self/status"):
        if line.startswith(("SigIgn:", "SigBlk:")):
            print(line.strip(), flush=True)
    print("checked", flush=True)
    time.sleep(600)
""")


async def test_server_gets_default_signals_even_if_the_gateway_ignores_them(tmp_path):
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
    try:
        driver, model = driver_for(tmp_path, [sys.executable, "-c", SIGNALS, "{port}"])
        server = await driver.start(model, 1)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    try:
        await wait_log(server, "checked")
        masks = dict(line.split(":\t") for line in
                     Path(server.extra["log"]).read_text().splitlines() if ":\t" in line)
        for name in ("SigIgn", "SigBlk"):
            bits = int(masks[name], 16)
            assert not any(bits >> (sig - 1) & 1 for sig in stops), (name, masks[name])
    finally:
        started = time.monotonic()
        await driver.stop(model, server)
    assert time.monotonic() - started < 3  # SIGTERM worked: no grace period sat out


def test_guard_refuses_to_start_when_its_gateway_is_already_gone(tmp_path):
    touched = tmp_path / "ran"
    result = subprocess.run(
        [sys.executable, "-m", pb.GUARD_MODULE, "--owner", "1", "--", "touch", str(touched)],
        env=gateway_env(), timeout=10)
    assert result.returncode == 125
    assert not touched.exists()


def test_guard_runs_as_a_plain_script_too(tmp_path):
    script = Path(pb.process_guard.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--owner", str(os.getpid()), "--log-dir", str(tmp_path),
         "--log-name", "s", "--", sys.executable, "-c", "print('hello'); raise SystemExit(7)"],
        timeout=10, start_new_session=True)
    assert result.returncode == 7
    (log,) = tmp_path.glob("s-*.log")
    assert log.read_text() == "hello\n"


# --- docker ---------------------------------------------------------------------------------

async def test_docker_reap_removes_only_unconfigured_models_containers():
    from test_docker_spec import FakeClient, FakeContainer, driver_with  # a fake daemon

    client = FakeClient()
    d = driver_with(client)
    for name, labels in [("gw-keep", {"gw.managed": "true", "gw.model": "keep"}),
                         ("gw-gone", {"gw.managed": "true", "gw.model": "gone"}),
                         ("other", {"other.managed": "true", "other.model": "gone"})]:
        client.all.append(FakeContainer(client, name, labels))
    await d.reap_orphans([SimpleModel("keep")])
    assert sorted(c.name for c in client.all) == ["gw-keep", "other"]


class SimpleModel:
    def __init__(self, name: str) -> None:
        self.name = name


async def test_docker_reap_with_daemon_unreachable_raises_nothing():
    from vllm_gateway_plugins.docker_backend import DockerDriver

    def unreachable():
        raise ConnectionError("no daemon here")

    d = DockerDriver(client_factory=unreachable)
    await d.reap_orphans([SimpleModel("m")])  # logged, not raised


@pytest.mark.docker
def test_container_of_a_model_no_longer_configured_is_removed_at_start_up(
        docker_client, prefix, gateways, tmp_path):
    old, kept = dockertests.docker_model("old"), dockertests.docker_model("kept")
    leave_running = {"stop_on_shutdown": False}
    gw1 = gateways(dockertests.gateway_config(prefix, [old, kept], tmp_path,
                                              docker=leave_running), tmp_path)
    assert gw1.chat("old").status_code == 200
    assert gw1.chat("kept").status_code == 200
    gw1.proc.kill()  # a crash, say; containers outlive it either way
    gw1.stop()
    assert len(dockertests._labelled(docker_client, prefix, running_only=True)) == 2

    gw2 = gateways(dockertests.gateway_config(prefix, [kept], tmp_path, docker=leave_running),
                   tmp_path)
    remaining = dockertests._labelled(docker_client, prefix)
    assert [c.labels[f"{prefix}.model"] for c in remaining] == ["kept"]
    assert gw2.status()["models"]["kept"]["state"] == "ready"  # adopted, as before
    assert f"removing container {prefix}-old of model old, which is no longer configured" in (
        gw2.log())
    gw2.proc.kill()  # leaves "kept" running; the prefix fixture removes it
