"""The docker backend without a daemon: spec builder, validation, GPU and network
parsing, the GGUF download-once lock, error messages (with a fake docker client),
adoption rules, and the footprints store."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest
from vllm_gateway_plugins import docker_backend
from vllm_gateway_plugins import docker_spec as ds
from vllm_gateway_plugins.docker_backend import DockerBackendError, DockerDriver, DockerUnavailable

from gateway.app import build_gateway
from gateway.config import ConfigError, Docker, ModelConfig, Settings, load_settings
from gateway.vram import FootprintStore


def model(**kw) -> ModelConfig:
    base = {"name": "llama", "backend": "docker", "model": "meta-llama/Llama-3.2-1B-Instruct"}
    base.update(kw)
    return ModelConfig(**base)


def dock(**kw) -> Docker:
    base = {"hf_cache": "/srv/hf", "label_prefix": "gw"}
    base.update(kw)
    return Docker(**base)


# --- spec builder ----------------------------------------------------------------------------

def test_default_vllm_command_image_volumes_labels_and_name():
    s = ds.build_spec(model(args=["--max-model-len", "4096"]),
                      dock(image="vllm/vllm-openai:v0.11.0"), 41234)
    assert s.image == "vllm/vllm-openai:v0.11.0"
    assert s.command == ("--model", "meta-llama/Llama-3.2-1B-Instruct", "--served-model-name",
                         "llama", "--port", "41234", "--host", "127.0.0.1", "--max-model-len",
                         "4096")  # host networking: loopback only, never beside the gateway
    assert s.volumes == ("/srv/hf:/root/.cache/huggingface:rw",)
    assert s.name == "gw-llama"
    assert s.labels["gw.managed"] == "true"
    assert s.labels["gw.model"] == "llama"
    assert s.labels["gw.port"] == "41234"
    assert len(s.labels["gw.config"]) == 16
    # docker_sd_configs can find vLLM's /metrics from these alone
    assert s.labels["prometheus.io/scrape"] == "true"
    assert s.labels["prometheus.io/port"] == "41234"
    assert s.network_mode == "host" and s.url == "http://127.0.0.1:41234"
    assert s.ipc_mode == "host" and s.shm_size is None
    assert s.device_requests == ({"Driver": "", "Count": -1, "DeviceIDs": [],
                                  "Capabilities": [["gpu"]], "Options": {}},)


def test_api_key_goes_to_the_container_and_comes_back_on_adoption():
    s = ds.build_spec(model(), dock(), 41234, api_key="k-123")
    assert s.environment["VLLM_API_KEY"] == "k-123"
    assert "k-123" not in repr(s)  # secrets never show in a repr
    assert ds.api_key_from_env(["A=1", "VLLM_API_KEY=k-123"]) == "k-123"
    assert ds.api_key_from_env(None) is None


def test_bridge_and_named_networks_listen_on_all_interfaces_inside_the_container():
    for network in ("bridge", "mynet"):
        s = ds.build_spec(model(network=network), dock(), 41234, network="mynet")
        host = s.command[s.command.index("--host") + 1]
        assert host == "0.0.0.0"  # published on 127.0.0.1 only / reachable on that network only


def test_model_image_overrides_settings_and_served_name_is_used():
    s = ds.build_spec(model(image="my/vllm:1", served_model_name="llama-3"), dock(), 1)
    assert s.image == "my/vllm:1"
    assert s.command[s.command.index("--served-model-name") + 1] == "llama-3"


def test_command_placeholders_are_filled():
    m = model(command=["serve", "{model}", "--port", "{port}", "--name={name}"])
    s = ds.build_spec(m, dock(), 5000, model_path="/root/.cache/huggingface/x.gguf")
    assert s.command == ("serve", "/root/.cache/huggingface/x.gguf", "--port", "5000",
                         "--name=llama")


def test_hf_token_is_passed_but_never_shown():
    s = ds.build_spec(model(env={"API_KEY": "k1", "PLAIN": "v"}), dock(hf_token="hf_secret"), 1)
    assert s.environment == {"API_KEY": "k1", "PLAIN": "v", "HF_TOKEN": "hf_secret"}
    assert s.run_kwargs()["environment"]["HF_TOKEN"] == "hf_secret"
    for text in (repr(s), str(s)):
        assert "hf_secret" not in text and "k1" not in text
        assert "'HF_TOKEN': '***'" in text and "'PLAIN': 'v'" in text
    assert "hf_secret" not in repr(dock(hf_token="hf_secret"))


@pytest.mark.parametrize("gpus,request_", [
    ("all", {"Count": -1, "DeviceIDs": []}),
    (2, {"Count": 2, "DeviceIDs": []}),
    ("1", {"Count": 1, "DeviceIDs": []}),
    ([0, 2], {"Count": 0, "DeviceIDs": ["0", "2"]}),
    ("none", None),
    (0, None),
    (None, None),
])
def test_gpus_become_device_requests(gpus, request_):
    s = ds.build_spec(model(gpus=gpus), dock(), 1)
    if request_ is None:
        assert s.device_requests == ()
        assert "device_requests" not in s.run_kwargs()
    else:
        (req,) = s.device_requests
        assert {k: req[k] for k in request_} == request_
        assert req["Capabilities"] == [["gpu"]]
        (dr,) = s.run_kwargs()["device_requests"]
        assert isinstance(dr, docker.types.DeviceRequest)
        assert dr["Count"] == request_["Count"] and dr["DeviceIDs"] == request_["DeviceIDs"]


def test_resources_shm_and_extra_volumes():
    m = model(mem_limit="32g", cpus=2.5, shm_size="16g", gpus="none",
              volumes=["/models:/models:ro", "~/data:/data"])
    s = ds.build_spec(m, dock(hf_cache="hf-cache-volume"), 1)
    assert s.ipc_mode is None and s.shm_size == "16g"
    assert s.mem_limit == "32g" and s.nano_cpus == 2_500_000_000
    assert s.volumes == ("hf-cache-volume:/root/.cache/huggingface:rw", "/models:/models:ro",
                         os.path.expanduser("~/data") + ":/data:rw")
    kw = s.run_kwargs()
    assert kw["shm_size"] == "16g" and "ipc_mode" not in kw
    assert kw["mem_limit"] == "32g" and kw["nano_cpus"] == 2_500_000_000
    assert kw["detach"] is True


def test_named_network_uses_container_name_and_vllm_port():
    s = ds.build_spec(model(network="llm"), dock(vllm_port=8000), 41234, network="proj_llm")
    assert s.network == "proj_llm" and s.network_mode is None
    assert s.command[s.command.index("--port") + 1] == "8000"
    assert s.url == "http://gw-llama:8000"
    assert s.labels["gw.port"] == "8000"
    assert s.run_kwargs()["network"] == "proj_llm"


def test_settings_network_applies_when_model_has_none():
    s = ds.build_spec(model(), dock(network="gateway-net"), 1, network="gateway-net")
    assert s.url == "http://gw-llama:8000"
    s = ds.build_spec(model(network="host"), dock(network="gateway-net"), 7)
    assert s.url == "http://127.0.0.1:7"


def test_bridge_network_publishes_on_loopback():
    s = ds.build_spec(model(network="bridge"), dock(), 41234)
    assert s.ports == {"41234/tcp": ("127.0.0.1", 41234)}
    assert s.network_mode is None and s.network is None
    assert s.url == "http://127.0.0.1:41234"


def test_safe_container_names_stay_distinct():
    a = ds.container_name("gw", "org/model:q4")
    b = ds.container_name("gw", "org_model_q4")
    assert a != b
    assert a.startswith("gw-org_model_q4-")
    assert all(c.isalnum() or c in "_.-" for c in a)
    assert ds.container_name("gw", "x" * 200).__len__() <= 66


def test_config_hash_ignores_port_and_token_but_not_args():
    h = ds.config_hash(model(), dock())
    assert h == ds.config_hash(model(), dock(hf_token="t"))
    assert h != ds.config_hash(model(args=["--dtype", "half"]), dock())
    assert h != ds.config_hash(model(), dock(image="other:1"))


def test_container_path_for_gguf():
    assert ds.container_path_for("/srv/hf/hub/models--a--b/snapshots/r/f.gguf", "/srv/hf") == \
        "/root/.cache/huggingface/hub/models--a--b/snapshots/r/f.gguf"
    with pytest.raises(ValueError):
        ds.container_path_for("/elsewhere/f.gguf", "/srv/hf")


# --- gpus, volumes, networks -----------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("all", ds.Gpus(count=-1)), ("ALL", ds.Gpus(count=-1)), ("none", ds.Gpus()),
    (0, ds.Gpus()), (3, ds.Gpus(count=3)), ("2", ds.Gpus(count=2)),
    ([1], ds.Gpus(device_ids=("1",))), ("0,3", ds.Gpus(device_ids=("0", "3"))),
])
def test_parse_gpus(value, expected):
    assert ds.parse_gpus(value) == expected


@pytest.mark.parametrize("value", [-1, "some", [], [0, 0], [-1], ["a"], True, 1.5, [True]])
def test_parse_gpus_rejects(value):
    with pytest.raises(ds.GpuSpecError):
        ds.parse_gpus(value)


@pytest.mark.parametrize("entry,expected", [
    ("/a:/b", ("/a", "/b", "rw")), ("/a:/b:ro", ("/a", "/b", "ro")),
    ("vol:/b:rw", ("vol", "/b", "rw")),
])
def test_parse_volume(entry, expected):
    assert ds.parse_volume(entry) == expected


@pytest.mark.parametrize("entry", ["/a", "/a:b", "/a:/b:rx", ":/b", "/a:/b:ro:z"])
def test_parse_volume_rejects(entry):
    with pytest.raises(ValueError):
        ds.parse_volume(entry)


def test_compose_network_name_resolution():
    names = ["bridge", "host", "none", "myproj_llm", "other_db", "llm-extra"]
    assert ds.resolve_network_name("bridge", names) == "bridge"
    assert ds.resolve_network_name("llm", names) == "myproj_llm"
    assert ds.resolve_network_name("myproj_llm", names) == "myproj_llm"
    with pytest.raises(LookupError, match="'cache' not found"):
        ds.resolve_network_name("cache", names)
    with pytest.raises(LookupError, match="ambiguous: a_llm, myproj_llm"):
        ds.resolve_network_name("llm", names + ["a_llm"])


# --- validate ---------------------------------------------------------------------------------

def test_valid_models_have_no_problems():
    assert ds.validate_model(model()) == []
    assert ds.validate_model(model(model=None, command=["python", "-m", "x", "--port", "{port}"],
                                   gpus="none", volumes=["/a:/a:ro"])) == []
    assert ds.validate_model(model(gguf_file="m-Q4_K_M.gguf", gpus=[0, 1])) == []


def test_validate_names_each_key():
    m = model(model=None, gpus="lots", volumes=["/a:/b", "nocolon", "/a:rel"], mem_limit="big",
              args=["--port", "1"], network=" ", gguf_file="/abs.gguf", url="http://x")
    problems = ds.validate_model(m)
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["model", "args", "gpus", "volumes.1", "volumes.2", "network", "mem_limit",
                    "gguf_file", "gguf_file", "url"], problems
    assert any("must be all, none, a count" in p for p in problems)


def test_validate_command_needs_port_and_excludes_args():
    problems = ds.validate_model(model(command=["serve"], args=["--x"]))
    assert problems == ["command: must contain {port} so the gateway knows where the server "
                        "listens", "args: not used when command is given (put them in command)"]


def test_bad_docker_model_fails_config_check_with_file_and_key(tmp_path):
    settings = load_settings(raw={"models": [{"name": "m", "backend": "docker", "gpus": -2}]})
    with pytest.raises(ConfigError) as err:
        build_gateway(settings, source="gw.yaml")
    assert err.value.lines == [
        "gw.yaml: models[m].model: required for backend docker (a Hugging Face id or a path "
        "inside the container), unless command is given",
        "gw.yaml: models[m].gpus: a GPU count must be >= 0 (got -2)"]


def test_gateway_configures_the_driver_with_its_settings():
    settings = load_settings(raw={"docker": {"stop_on_shutdown": False, "label_prefix": "x"},
                                  "models": [{"name": "m", "backend": "docker", "model": "a/b"}]})
    gw = build_gateway(settings)
    driver = gw.fleet.runtimes["m"].driver
    assert isinstance(driver, DockerDriver)
    assert driver.docker.label_prefix == "x"
    assert driver.stop_on_shutdown is False
    assert gw.fleet._stops_on_shutdown(gw.fleet.runtimes["m"]) is False


# --- a fake docker client ---------------------------------------------------------------------

class FakeContainer:
    def __init__(self, client, name, labels, status="running", cid=None):
        self.client, self.name, self.labels, self.status = client, name, labels, status
        self.id = cid or f"id-{name}-{len(client.all)}"
        self.removed = False

    def reload(self):
        if self.removed:
            raise docker.errors.NotFound("gone")

    def stop(self, timeout=10):
        self.status = "exited"

    def remove(self, force=False):
        self.removed = True
        self.client.all.remove(self)

    def logs(self, tail=20):
        return b"line one\nHF_TOKEN=hf_secret\n"


class FakeClient:
    def __init__(self, images=("img:1",), networks=("bridge", "host")):
        self.all: list[FakeContainer] = []
        self.image_names = set(images)
        self.pulled: list[tuple[str, str]] = []
        self.pull_error: Exception | None = docker.errors.APIError("pull access denied")
        self.run_kwargs: list[dict] = []
        self.containers = SimpleNamespace(get=self._get, list=self._list, run=self._run)
        self.images = SimpleNamespace(get=self._image, pull=self._pull)
        self.networks = SimpleNamespace(list=lambda: [SimpleNamespace(name=n) for n in networks])

    def ping(self):
        return True

    def _get(self, ident):
        for c in self.all:
            if ident in (c.id, c.name):
                return c
        raise docker.errors.NotFound(f"No such container: {ident}")

    def _list(self, filters=None, ignore_removed=False, **kw):
        wanted = dict(f.split("=", 1) for f in filters["label"])
        return [c for c in self.all if kw.get("all") or c.status == "running"
                if all(c.labels.get(k) == v for k, v in wanted.items())]

    def _run(self, **kw):
        self.run_kwargs.append(kw)
        c = FakeContainer(self, kw["name"], kw["labels"])
        self.all.append(c)
        return c

    def _image(self, name):
        if name not in self.image_names:
            raise docker.errors.ImageNotFound(f"No such image: {name}")

    def _pull(self, repo, tag=None):
        self.pulled.append((repo, tag))
        if self.pull_error:
            raise self.pull_error


def driver_with(client, **settings) -> DockerDriver:
    d = DockerDriver(client_factory=lambda: client)
    raw = {"docker": {"image": "img:1", "label_prefix": "gw", **settings.pop("docker", {})},
           **settings}
    d.configure(load_settings(raw=raw))
    return d


async def test_start_runs_container_and_stop_removes_it():
    client = FakeClient()
    d = driver_with(client, docker={"hf_token": "hf_secret"})
    m = model(gpus="none")
    server = await d.start(m, 4321)
    assert server.url == "http://127.0.0.1:4321"
    (kw,) = client.run_kwargs
    assert kw["name"] == "gw-llama" and kw["network_mode"] == "host" and kw["init"] is True
    assert await d.is_running(m, server)
    tail = await d.logs_tail(m, server)
    assert "hf_secret" not in tail and "HF_TOKEN=***" in tail
    await d.stop(m, server)
    assert client.all == []
    assert not await d.is_running(m, server)
    await d.stop(m, server)  # already gone: fine


async def test_missing_image_that_cannot_be_pulled_has_clear_message():
    client = FakeClient(images=())
    d = driver_with(client, docker={"image": "vllm/vllm-openai:v0.11.0"})
    with pytest.raises(DockerBackendError, match=r"^image vllm/vllm-openai:v0.11.0 not found "
                       r"locally and could not be pulled: .*pull access denied"):
        await d.start(model(), 1)
    assert client.pulled == [("vllm/vllm-openai", "v0.11.0")]
    assert client.all == []


async def test_missing_image_is_pulled_once():
    client = FakeClient(images=())
    client.pull_error = None
    d = driver_with(client)
    await d.start(model(), 1)
    assert client.pulled == [("img", "1")]


async def test_daemon_unreachable_has_clear_message(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nowhere/docker.sock")

    attempts = []

    def refuse():
        attempts.append(1)
        raise docker.errors.DockerException("Error while fetching server API version: refused")

    d = DockerDriver(client_factory=refuse)
    d.configure(Settings())
    with pytest.raises(DockerUnavailable, match=r"^Docker daemon not reachable at "
                       r"unix:///nowhere/docker.sock: Error while fetching"):
        await d.start(model(), 1)
    with pytest.raises(DockerUnavailable):
        await d.adopt(model())
    assert len(attempts) == 1  # a failed connection is remembered briefly
    monkeypatch.setattr(docker_backend, "RECONNECT_AFTER_S", 0.0)
    with pytest.raises(DockerUnavailable):
        await d.adopt(model())
    assert len(attempts) == 2
    # a dead daemon is not a dead container: the sweeper must not restart everything
    assert await d.is_running(model(), docker_backend.RunningServer(url="", ident="x"))


async def test_slow_daemon_times_out_without_blocking_the_loop(monkeypatch):
    monkeypatch.setattr(docker_backend, "CONNECT_TIMEOUT_S", 0.3)
    release = threading.Event()

    def hang():
        release.wait(5)
        raise docker.errors.DockerException("late")

    d = DockerDriver(client_factory=hang)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        with pytest.raises(DockerUnavailable, match="did not answer within 0.3s"):
            await d.start(model(), 1)
    finally:
        release.set()
        t.cancel()
    assert time.monotonic() - started < 2
    assert ticks > 5  # the event loop kept running meanwhile


async def test_named_network_not_found_and_compose_prefix():
    client = FakeClient(networks=("bridge", "stack_llm"))
    d = driver_with(client, docker={"network": "llm"})
    server = await d.start(model(), 1)
    assert server.url == "http://gw-llama:8000"
    assert client.run_kwargs[0]["network"] == "stack_llm"
    d = driver_with(FakeClient(), docker={"network": "llm"})
    with pytest.raises(DockerBackendError, match="network 'llm' not found"):
        await d.start(model(), 1)


async def test_stale_container_with_same_name_is_replaced_but_foreign_one_is_not():
    client = FakeClient()
    d = driver_with(client)
    stale = FakeContainer(client, "gw-llama", {"gw.managed": "true", "gw.model": "llama"},
                          status="exited")
    client.all.append(stale)
    server = await d.start(model(), 1)
    assert [c.id for c in client.all] == [server.ident]
    client.all[:] = [FakeContainer(client, "gw-llama", {"other": "x"})]
    with pytest.raises(DockerBackendError, match="was not started by this gateway"):
        await d.start(model(), 2)


async def test_adopt_takes_running_matching_container_and_removes_the_rest():
    client = FakeClient()
    d = driver_with(client)
    m = model()
    good = ds.labels_for("gw", "llama", 5555, ds.config_hash(m, d.docker))
    client.all += [
        FakeContainer(client, "old-exited", {**good}, status="exited"),
        FakeContainer(client, "gw-llama", {**good}),
        FakeContainer(client, "other-model", {**good, "gw.model": "other"}),
    ]
    server = await d.adopt(m)
    assert server is not None and server.url == "http://127.0.0.1:5555"
    assert server.ident == client._get("gw-llama").id
    assert sorted(c.name for c in client.all) == ["gw-llama", "other-model"]


async def test_adopt_ignores_container_from_another_config():
    client = FakeClient()
    d = driver_with(client)
    outdated = ds.labels_for("gw", "llama", 5555, "0000000000000000")
    client.all.append(FakeContainer(client, "gw-llama", outdated))
    assert await d.adopt(model()) is None
    assert client.all == []


# --- GGUF: downloaded once -----------------------------------------------------------------------

async def test_gguf_downloaded_once_for_concurrent_starts(tmp_path):
    calls = []

    def fake_download(repo_id, filename, cache_dir, token):
        calls.append((repo_id, filename, cache_dir, token))
        time.sleep(0.2)  # in a worker thread: concurrent callers must wait, not re-download
        repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        path = repo_dir / "snapshots" / "r" / filename
        path.parent.mkdir(parents=True)
        path.write_text("gguf")
        return str(path)

    client = FakeClient()
    d = DockerDriver(client_factory=lambda: client, download=fake_download)
    d.configure(load_settings(raw={"docker": {"image": "img:1", "hf_cache": str(tmp_path),
                                              "hf_token": "tok"}}))
    m = model(model="org/repo-GGUF", gguf_file="m.Q4_K_M.gguf")
    paths = await asyncio.gather(*(d.gguf_path(m) for _ in range(5)))
    assert len(calls) == 1 and len(set(paths)) == 1
    assert calls[0] == ("org/repo-GGUF", "m.Q4_K_M.gguf", str(tmp_path / "hub"), "tok")
    server = await d.start(m, 9)
    assert len(calls) == 1
    cmd = client.run_kwargs[0]["command"]
    assert cmd[:2] == ["--model", "/root/.cache/huggingface/hub/models--org--repo-GGUF/"
                                  "snapshots/r/m.Q4_K_M.gguf"]
    assert server.url == "http://127.0.0.1:9"
    os.unlink(paths[0])  # the cache was cleaned: download again
    os.rmdir(os.path.dirname(paths[0]))
    await d.gguf_path(m)
    assert len(calls) == 2


async def test_gguf_download_failure_is_reported(tmp_path):
    def failing(**kw):
        raise OSError("hub unreachable")

    d = DockerDriver(client_factory=FakeClient, download=failing)
    d.configure(load_settings(raw={"docker": {"hf_cache": str(tmp_path)}}))
    with pytest.raises(DockerBackendError, match="cannot download f.gguf from a/b: OSError: hub"):
        await d.start(model(model="a/b", gguf_file="f.gguf"), 1)


# --- footprints store -----------------------------------------------------------------------------

def test_footprints_corrupt_file_is_ignored(tmp_path, caplog):
    path = tmp_path / "fp.json"
    path.write_text("{not json")
    store = FootprintStore(path)
    assert store.as_dict() == {}
    assert "unreadable" in caplog.text
    store.learn("a", 1234)
    assert json.loads(path.read_text()) == {"a": 1234}


@pytest.mark.parametrize("content", ['[1, 2]', '{"a": "x", "b": -5, "c": true, "d": 700}'])
def test_footprints_wrong_shapes_are_dropped(tmp_path, content):
    path = tmp_path / "fp.json"
    path.write_text(content)
    assert FootprintStore(path).as_dict() == ({} if content.startswith("[") else {"d": 700})


def test_footprints_persist_and_write_atomically(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "fp.json"
    store = FootprintStore(path)
    store.learn("a", 1000)
    store.learn("b", 2000)
    assert FootprintStore(path).as_dict() == {"a": 1000, "b": 2000}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    store.learn("a", 9999)  # the write fails: logged, old file intact, no temp file left
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1000, "b": 2000}
    assert [p.name for p in path.parent.iterdir()] == ["fp.json"]
    store.learn("c", 0)  # nonsense is not learned
    assert "c" not in store.as_dict()


def test_sleep_mode_adds_vllm_flag_and_dev_mode_env():
    s = ds.build_spec(model(sleep_mode=True), dock(), 41234)
    assert s.command[-1] == "--enable-sleep-mode"
    assert s.environment["VLLM_SERVER_DEV_MODE"] == "1"
    plain = ds.build_spec(model(), dock(), 41234)
    assert "--enable-sleep-mode" not in plain.command
    assert "VLLM_SERVER_DEV_MODE" not in plain.environment
