"""deploy/modal_app.py against autospecs of the installed `modal` classes, so a parameter the installed client does
not take fails here: what a deploy defines (web servers and their ports, the image, the secrets, the containers),
and what each function starts, run on this machine: both MCP servers and the service for real, the service
reaching the servers through the mcp.json it writes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest.mock import create_autospec
from urllib.parse import urlsplit

import httpx
import modal
import pytest

from orchestrator.config import Settings
from orchestrator.mcp_pool import load_config
from servers.sandbox.manager import Settings as SandboxSettings
from servers.sandbox.modal_setup import has_credentials
from tests.conftest import remove_sandbox_root
from tests.postgres import psql
from tests.servers.sandbox.conftest import free_port, proc_wait

MODULE = "deploy.modal_app"
ROOT = Path(__file__).resolve().parents[2]
# In the environment while the app is defined: none may reach its definition.
SECRET_VALUES = {"TB_API_TOKEN": "tb-api-" + "a" * 40, "MCP_AUTH_TOKEN": "mcp-auth-" + "b" * 40,
                 "TB_DATABASE_URL": "postgresql://tb:Pg-pa55word-" + "c" * 20 + "@db.example.com:5432/tb",
                 "ANTHROPIC_API_KEY": "sk-ant-api03-" + "d" * 40, "GITHUB_TOKEN": "ghp_" + "e" * 36}
URLS = {"orchestrator": "https://me--tiny-backspace-orchestrator.modal.run",
        "sandbox": "https://me--tiny-backspace-sandbox.modal.run",
        "github": "https://me--tiny-backspace-github.modal.run"}
SERVICE_HOST = urlsplit(URLS["orchestrator"]).hostname
# The real classes, kept before a test replaces them in the `modal` module.
App, Image, Secret, Function, web_server, concurrent = (modal.App, modal.Image, modal.Secret, modal.Function,
                                                        modal.web_server, modal.concurrent)


@dataclass
class Declared:
    """One Modal function as the module declared it: each decorator's arguments, its body, the handle it holds."""

    options: dict[str, Any]
    web_server: dict[str, Any]
    concurrent: dict[str, Any]
    body: Callable[[], None]
    handle: Any


@dataclass
class FakeModal:
    """`modal.App`, `Image`, `Secret`, `Function`, `web_server` and `concurrent` replaced by autospecs that record
    what the module asks of them; `urls` is what each function's `get_web_url()` answers."""

    monkeypatch: pytest.MonkeyPatch
    urls: dict[str, str] = field(default_factory=lambda: dict(URLS))
    functions: dict[str, Declared] = field(default_factory=dict)
    secrets: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # id of a Secret -> name, required keys

    def __post_init__(self) -> None:
        self.App, self.Image, self.Secret, self.Function = (create_autospec(c) for c in (App, Image, Secret, Function))
        self.app = create_autospec(App, instance=True)
        self.App.return_value = self.app
        self.image = create_autospec(Image, instance=True)
        self.Image.debian_slim.return_value = self.image
        for step in ("apt_install", "pip_install", "uv_pip_install", "pip_install_from_pyproject", "run_commands",
                     "add_local_python_source", "add_local_dir", "add_local_file", "env", "workdir"):
            getattr(self.image, step).return_value = self.image
        self.Secret.from_name.side_effect = self._secret
        self.app.function.side_effect = self._function
        self.web_server = create_autospec(web_server, side_effect=self._web_server)
        self.concurrent = create_autospec(concurrent, side_effect=self._concurrent)
        self._pending: dict[str, dict[str, Any]] = {}
        for name in ("App", "Image", "Secret", "Function", "web_server", "concurrent"):
            self.monkeypatch.setattr(modal, name, getattr(self, name))

    def _secret(self, name: str, **options: Any) -> Any:
        secret = create_autospec(Secret, instance=True)
        self.secrets[id(secret)] = (name, list(options.get("required_keys", [])))
        return secret

    def _web_server(self, port: int, **options: Any) -> Callable:
        def decorate(f: Callable) -> Callable:
            self._pending.setdefault(f.__name__, {})["web_server"] = {"port": port, **options}
            return f
        return decorate

    def _concurrent(self, **options: Any) -> Callable:
        def decorate(f: Callable) -> Callable:
            self._pending.setdefault(f.__name__, {})["concurrent"] = options
            return f
        return decorate

    def _function(self, **options: Any) -> Callable:
        def register(f: Callable) -> Any:
            handle = create_autospec(Function, instance=True)
            handle.get_web_url.side_effect = lambda: self.urls[f.__name__]
            pending = self._pending.pop(f.__name__, {})
            self.functions[f.__name__] = Declared(options, pending.get("web_server", {}), pending.get("concurrent", {}),
                                                  f, handle)
            return handle
        return register

    def secret_names(self, name: str) -> list[str]:
        """The names of the secrets function `name` is given."""
        return [self.secrets[id(s)][0] for s in self.functions[name].options.get("secrets", [])]


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[ModuleType, FakeModal]]:
    """deploy/modal_app.py imported afresh over a FakeModal, with secret values in the environment."""
    for key, value in SECRET_VALUES.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the service's mcp.json is written
    fake = FakeModal(monkeypatch)
    sys.modules.pop(MODULE, None)
    try:
        yield importlib.import_module(MODULE), fake
    finally:
        sys.modules.pop(MODULE, None)


def start(module: ModuleType, fake: FakeModal, name: str, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[list[str], dict[str, Any]]:
    """Run function `name`'s body as Modal would at container start; the argv and options it gave Popen."""
    popen = create_autospec(subprocess.Popen)
    monkeypatch.setattr(module, "subprocess", SimpleNamespace(Popen=popen))
    fake.functions[name].body()
    popen.assert_called_once()
    (argv, *_), options = popen.call_args
    return argv, options


def test_with_the_installed_modal_the_app_defines_three_web_functions():
    # No fake: modal's own decorators check what they are given (a web server is a plain function without
    # arguments, min_containers <= max_containers, a scale-down window Modal accepts...).
    sys.modules.pop(MODULE, None)
    try:
        module = importlib.import_module(MODULE)
        assert isinstance(module.app, App) and module.app.name == "tiny-backspace"
        for name in ("orchestrator", "sandbox", "github"):
            assert isinstance(getattr(module, name), Function), name
    finally:
        sys.modules.pop(MODULE, None)


def test_each_function_serves_the_port_its_command_listens_on(deployed, monkeypatch):
    module, fake = deployed
    modules = {"orchestrator": "orchestrator", "sandbox": "servers.sandbox", "github": "servers.github"}
    ports = set()
    for name, package in modules.items():
        declared = fake.functions[name]
        argv, options = start(module, fake, name, monkeypatch)
        port = declared.web_server["port"]
        assert argv[:3] == [sys.executable, "-m", package]
        if name != "orchestrator":
            assert argv[argv.index("--transport") + 1] == "http"
        assert argv[argv.index("--port") + 1] == str(port) and argv[argv.index("--host") + 1] == "0.0.0.0"
        assert Path(options["cwd"], *package.split(".")).is_dir()  # where `python -m` finds the package
        assert declared.web_server["startup_timeout"] >= 60, "Modal's default of 5 s is too short for a cold start"
        ports.add(port)
    assert len(ports) == 3


def test_the_image_installs_the_project_with_git_and_holds_no_secret(deployed):
    module, fake = deployed
    fake.Image.debian_slim.assert_called_once_with(python_version="3.11")
    assert "git" in fake.image.apt_install.call_args.args
    (pyproject,), _ = fake.image.pip_install_from_pyproject.call_args
    assert Path(pyproject) == ROOT / "pyproject.toml"
    fake.image.pip_install.assert_called_once_with(f"modal=={modal.__version__}")
    sources = fake.image.add_local_python_source.call_args
    assert set(sources.args) == {"common", "servers", "orchestrator"}
    fake.App.assert_called_once_with("tiny-backspace", image=fake.image)
    # The page and the demo's trajectory go along; compiled files do not.
    ignored = modal.FilePatternMatcher(*sources.kwargs["ignore"])
    shipped = subprocess.run(["git", "ls-files", "common", "servers", "orchestrator"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    assert "orchestrator/web/index.html" in shipped
    assert not [p for p in shipped if ignored(Path(p).relative_to(p.split("/")[0]))]
    assert ignored(Path("web/__pycache__/app.cpython-311.pyc"))
    definition = repr([fake.Image.mock_calls, fake.image.mock_calls, fake.App.mock_calls, fake.app.mock_calls])
    for key, value in SECRET_VALUES.items():
        assert value not in definition, key
    for step in fake.image.mock_calls:
        assert not step.kwargs.get("secrets") and not step.kwargs.get("env"), step


def test_secrets_come_by_name_each_only_to_the_functions_that_need_it(deployed):
    module, fake = deployed
    assert fake.secret_names("orchestrator") == ["tiny-backspace", "tiny-backspace-mcp"]
    assert fake.secret_names("sandbox") == ["tiny-backspace-mcp"]
    assert fake.secret_names("github") == ["tiny-backspace-mcp", "tiny-backspace-github"]
    required = dict(fake.secrets.values())
    assert {"TB_API_TOKEN", "TB_DATABASE_URL"} <= set(required["tiny-backspace"])  # `modal deploy` checks these
    assert required["tiny-backspace-mcp"] == ["MCP_AUTH_TOKEN"]
    assert required["tiny-backspace-github"] == ["GITHUB_TOKEN"]
    for made_from_values in (fake.Secret.from_dict, fake.Secret.from_local_environ, fake.Secret.from_dotenv):
        made_from_values.assert_not_called()
    for declared in fake.functions.values():
        assert not declared.options.get("env"), "settings in `env` would be stored with the function"


def test_the_mcp_servers_stay_in_one_container_and_the_service_may_scale(deployed):
    module, fake = deployed
    for name in ("sandbox", "github"):
        declared = fake.functions[name]
        assert declared.options["max_containers"] == 1, f"{name}: its sessions live in one process"
        assert declared.concurrent["max_inputs"] >= 100, f"{name}: every replica's calls share one container"
    service = fake.functions["orchestrator"]
    assert service.options["min_containers"] == module.MIN_REPLICAS >= 1
    assert service.options["max_containers"] == module.MAX_REPLICAS > 1
    assert service.concurrent["target_inputs"] <= service.concurrent["max_inputs"]
    # A replica is stopped only after being idle longer than a run may last.
    assert service.options["scaledown_window"] > Settings.from_env({}).limits.run_seconds
    for declared in fake.functions.values():
        assert declared.options["timeout"] > Settings.from_env({}).limits.run_seconds


def test_the_service_gets_an_mcp_json_of_both_urls_with_the_token_left_to_expand(deployed, monkeypatch):
    module, fake = deployed
    argv, options = start(module, fake, "orchestrator", monkeypatch)
    path = Path(argv[argv.index("--mcp-config") + 1])
    text = path.read_text()
    assert SECRET_VALUES["MCP_AUTH_TOKEN"] not in text and "Bearer ${MCP_AUTH_TOKEN}" in text
    specs = {spec.name: spec for spec in load_config(path, options["env"])}
    assert specs.keys() == {"sandbox", "github"}
    for name, spec in specs.items():
        assert spec.target == URLS[name] + "/mcp"
        assert spec.headers == {"Authorization": "Bearer " + SECRET_VALUES["MCP_AUTH_TOKEN"]}
    assert json.loads(text)["mcpServers"]["sandbox"]["type"] == "http"


def test_the_service_answers_to_its_modal_name_and_page_origin(deployed, monkeypatch):
    module, fake = deployed
    monkeypatch.setenv("TB_ALLOWED_HOSTS", "tb.example.com")  # an operator's own name stays
    _, options = start(module, fake, "orchestrator", monkeypatch)
    settings = Settings.from_env(options["env"])
    assert settings.allowed_hosts == ("tb.example.com", SERVICE_HOST)
    assert settings.allowed_origins == (URLS["orchestrator"],)
    assert settings.public_url == URLS["orchestrator"]
    assert settings.api_token == SECRET_VALUES["TB_API_TOKEN"]
    assert settings.database_url == SECRET_VALUES["TB_DATABASE_URL"]


@pytest.mark.parametrize("unset", ["TB_DATABASE_URL", "TB_API_TOKEN", "MCP_AUTH_TOKEN"])
def test_the_service_refuses_to_start_without_a_secret_it_needs(deployed, monkeypatch, unset):
    module, fake = deployed
    monkeypatch.setenv(unset, "")
    popen = create_autospec(subprocess.Popen)
    monkeypatch.setattr(module, "subprocess", SimpleNamespace(Popen=popen))
    with pytest.raises(module.MissingSecret, match=unset):
        fake.functions["orchestrator"].body()
    popen.assert_not_called()


def test_the_sandbox_server_runs_its_commands_on_modal(deployed, monkeypatch):
    module, fake = deployed
    monkeypatch.setenv("SANDBOX_BACKEND", "local")
    _, options = start(module, fake, "sandbox", monkeypatch)
    settings = SandboxSettings.from_env(options["env"])
    assert settings.backend == "modal" and settings.disk_mib == 0


def test_inside_a_modal_container_the_sandbox_server_finds_modal_credentials():
    assert has_credentials({"MODAL_IS_REMOTE": "1", "MODAL_CONFIG_PATH": "/nonexistent/.modal.toml"})


def test_the_functions_start_both_servers_and_the_service_reaches_them(deployed, monkeypatch, tmp_path,
                                                                       database_url):
    module, fake = deployed
    ports = {name: free_port() for name in ("orchestrator", "sandbox", "github")}
    for name, port in ports.items():
        monkeypatch.setattr(module, f"{name.upper()}_PORT", port)
    fake.urls.update(sandbox=f"http://127.0.0.1:{ports['sandbox']}", github=f"http://127.0.0.1:{ports['github']}")
    root = Path(tempfile.mkdtemp(prefix="tb-test-deploy-sandboxes-"))
    root.chmod(0o711)
    for key, value in {"TB_DATABASE_URL": database_url, "TB_DATA_DIR": str(tmp_path / "data"),
                       "SANDBOX_ROOT": str(root)}.items():
        monkeypatch.setenv(key, value)
    procs: list[subprocess.Popen] = []

    class Started(subprocess.Popen):
        def __init__(self, argv: list[str], **options: Any):
            log = open(tmp_path / f"{argv[2]}.log", "w")  # noqa: SIM115 - closed with the test's folder
            super().__init__(argv, stdout=log, stderr=subprocess.STDOUT, **options)
            procs.append(self)

    monkeypatch.setattr(module, "subprocess", SimpleNamespace(Popen=Started))
    service = f"http://127.0.0.1:{ports['orchestrator']}"
    token = {"Authorization": "Bearer " + SECRET_VALUES["TB_API_TOKEN"]}
    try:
        fake.functions["sandbox"].body()
        fake.functions["github"].body()
        fake.functions["orchestrator"].body()
        health = wait_healthy(service, procs, tmp_path)
        assert {name: s["state"] for name, s in health["servers"].items()} == {"sandbox": "up", "github": "up"}
        assert all(s["tools"] > 0 for s in health["servers"].values())
        # The replica keeps its lease in the shared database, where other replicas find it.
        assert psql(database_url, "SELECT id FROM replicas") == health["replica"]
        with httpx.Client(base_url=service, headers={"Host": SERVICE_HOST}, timeout=10) as http:
            assert http.get("/runs").status_code == 401
            assert http.get("/runs", headers=token).status_code == 200
            assert http.get("/runs", headers={**token, "Host": "evil.example"}).status_code == 421
            own = http.post("/code", json={}, headers={**token, "Origin": URLS["orchestrator"]})
            assert own.status_code not in (403, 421), own.text
            foreign = http.post("/code", json={}, headers={**token, "Origin": "https://evil.example"})
            assert foreign.status_code == 403
        for name in ("sandbox", "github"):  # the servers answer only with the token the service was given
            assert httpx.post(fake.urls[name] + "/mcp", json={}, timeout=10).status_code == 401
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc_wait(proc, 10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        remove_sandbox_root(root)


def wait_healthy(service: str, procs: list[subprocess.Popen], logs: Path) -> dict:
    """The service's /health once both MCP servers are up in it (bounded: about 80 s, as the service itself waits up
    to 60 s for its MCP servers before it listens)."""
    answer: dict = {}
    with httpx.Client(base_url=service, headers={"Host": SERVICE_HOST}, timeout=5) as http:
        for _ in range(400):
            if dead := [p for p in procs if p.poll() is not None]:
                pytest.fail(f"{dead[0].args[2]} exited with {dead[0].returncode}: "
                            + (logs / f"{dead[0].args[2]}.log").read_text()[-2000:])
            try:
                response = http.get("/health")
            except httpx.TransportError:
                proc_wait(procs[-1], 0.2)
                continue
            answer = response.json()
            assert response.status_code != 421, f"the service refuses its own Modal name: {answer}"
            if all(s["state"] == "up" for s in answer["servers"].values()):
                return answer
            proc_wait(procs[-1], 0.2)
    pytest.fail(f"the service did not see both MCP servers up: {answer}")
