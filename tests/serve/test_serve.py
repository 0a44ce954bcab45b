"""Ray Serve spot checks against a live deployment on localhost (spo_ray/serve/).

One Serve application for the whole module (start-up is the slow part); tests that
reload it first put it back on π_0, so each states what it starts from.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.conftest import TINY_SPEC, compose

PORT = 18431  # not Serve's default 8000: leave that to whatever else runs here
NAME = "spo_ray_test"
KEY = "s3cret"  # the module's app requires this bearer token (changing it would restart the replica)


# ---------------------------------------------------------------------------- helpers
def http(url: str, body: bytes | dict | None = None, *, method: str | None = None, token: str | None = KEY) -> tuple[int, dict]:
    """Status and JSON body of one request (errors included)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method or ("GET" if data is None else "POST"))
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def chat(server, **fields) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": "Describe the sea."}], "max_tokens": 8, **fields}
    return http(server.url + "/v1/chat/completions", body)


def openai_client(server, api_key: str = KEY):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def policies(tiny_policy, tmp_path_factory) -> SimpleNamespace:
    """π_0, a differently seeded π_1, a folder with a garbage config.json, a missing path."""
    from spo_ray.modeling import build_random_policy, save_policy

    root = tmp_path_factory.mktemp("serve")
    model, tokenizer = build_random_policy(SimpleNamespace(**TINY_SPEC), seed=1)
    pi1 = save_policy(model, tokenizer, root / "run" / "iter_1" / "policy")
    broken = root / "broken"
    shutil.copytree(tiny_policy, broken)
    (broken / "config.json").write_text("{ this is not json")
    return SimpleNamespace(pi0=tiny_policy, pi1=str(pi1), broken=str(broken), missing=str(root / "missing"), run=str(root / "run"))


@pytest.fixture(scope="module")
def server(ray_session, policies):
    from ray import serve

    from spo_ray.serve import load_serve_config, serve_policy

    settings = [f"port={PORT}", f"name={NAME}", f"api_key={KEY}", "max_tokens_limit=240", "max_n=4", "reconfigure_timeout_s=120"]
    cfg = load_serve_config(settings)
    info = serve_policy(cfg, policies.pi0, iteration=0)
    try:
        yield SimpleNamespace(cfg=cfg, url=info["url"], first=info)
    finally:
        serve.shutdown()


def on_pi0(server, policies) -> dict:
    from spo_ray.serve import serve_policy

    return serve_policy(server.cfg, policies.pi0, iteration=0)


# ---------------------------------------------------------------------------- the API
def test_binds_to_localhost_and_reports_what_it_serves(server, policies):
    assert server.url == f"http://127.0.0.1:{PORT}"
    status, health = http(server.url + "/healthz")
    assert status == 200 and health["status"] == "ok" and health["error"] is None
    assert health["model"] == NAME and health["iteration"] == 0 and health["checkpoint"] == policies.pi0
    assert KEY not in json.dumps(health)


def test_chat_completion_with_the_openai_client(server, policies):
    on_pi0(server, policies)
    client = openai_client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sea."}]
    first = client.chat.completions.create(model=NAME, messages=messages, n=2, seed=7, max_tokens=12, temperature=0.9, top_p=0.95)
    assert first.object == "chat.completion" and first.model == NAME and first.id.startswith("chatcmpl-")
    assert [c.index for c in first.choices] == [0, 1]
    assert all(c.message.role == "assistant" and isinstance(c.message.content, str) for c in first.choices)
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    assert first.usage.prompt_tokens > 0 and 2 <= first.usage.completion_tokens <= 24
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.model_extra["spo_ray"] == {"iteration": 0, "checkpoint": policies.pi0}
    again = client.chat.completions.create(model=NAME, messages=messages, n=2, seed=7, max_tokens=12, temperature=0.9, top_p=0.95)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]  # same seed, same answers


def test_models_list_and_retrieve(server, policies):
    on_pi0(server, policies)
    client = openai_client(server)
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].owned_by == "spo_ray" and models[0].model_extra["iteration"] == 0
    assert client.models.retrieve(NAME).model_extra["checkpoint"] == policies.pi0
    status, body = http(server.url + "/v1/models/other")
    assert status == 404 and body["error"]["code"] == "model_not_found"


GOOD = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', 400, None),  # malformed JSON
        (b"", 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": GOOD, "frequency_penalty": 0.5}, 400, "frequency_penalty"),  # unknown field
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, 400, "messages.0.tool_calls"),
        ({"messages": GOOD, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": GOOD, "max_tokens": -3}, 400, "max_tokens"),
        ({"messages": GOOD, "max_tokens": 241}, 400, "max_tokens"),  # over serve.max_tokens_limit
        ({"messages": []}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ({"messages": GOOD, "max_tokens": "8"}, 400, "max_tokens"),
        ({"messages": GOOD, "max_tokens": True}, 400, "max_tokens"),
        ({"messages": GOOD, "temperature": "hot"}, 400, "temperature"),
        ({"messages": GOOD, "temperature": 3}, 400, "temperature"),
        ({"messages": GOOD, "top_p": 0}, 400, "top_p"),
        ({"messages": GOOD, "n": 0}, 400, "n"),
        ({"messages": GOOD, "n": 5}, 400, "n"),  # over serve.max_n
        ({"messages": GOOD, "seed": 1.5}, 400, "seed"),
        ({"messages": GOOD, "stream": True}, 400, "stream"),
        ({"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),  # longer than the context
        ({"messages": GOOD, "model": "gpt-4o"}, 404, "model"),
    ],
    ids=lambda v: None if not isinstance(v, (bytes, dict)) else (repr(v)[:40]),
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, answer = http(server.url + "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


def test_unknown_routes_and_methods_get_json_errors(server):
    assert http(server.url + "/v1/completions", {"prompt": "hi"})[0] == 404
    assert http(server.url + "/openapi.json", token=None)[0] == 404  # nothing answers without the token
    status, body = http(server.url + "/v1/chat/completions")  # GET
    assert status == 405 and "error" in body


def test_openai_client_sees_bad_requests_and_the_server_keeps_serving(server):
    import openai

    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=GOOD, max_tokens=0)
    assert err.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=GOOD, extra_body={"bogus": 1})
    status, body = chat(server)
    assert status == 200 and len(body["choices"]) == 1


# ---------------------------------------------------------------------------- reloads
def test_reload_between_two_requests_keeps_the_replica(server, policies):
    from spo_ray.serve import serve_policy

    before = on_pi0(server, policies)
    status, first = chat(server, seed=3)
    assert status == 200 and first["spo_ray"]["iteration"] == 0 and first["system_fingerprint"] == "spo_ray-iter_0"

    after = serve_policy(server.cfg, policies.pi1, iteration=1)
    assert after["status"] == "ok" and after["iteration"] == 1 and after["checkpoint"] == policies.pi1
    assert after["replica"] == before["replica"]  # same pid and replica id: reconfigured in place
    status, second = chat(server, seed=3)
    assert status == 200 and second["spo_ray"] == {"iteration": 1, "checkpoint": policies.pi1}
    assert http(server.url + "/v1/models")[1]["data"][0]["iteration"] == 1
    assert http(server.url + "/healthz")[1]["replica"] == before["replica"]


def test_requests_in_flight_during_a_reload_finish_on_their_engine(server, policies):
    from spo_ray.serve import serve_policy

    on_pi0(server, policies)
    results: list[tuple[int, dict]] = []
    long = dict(max_tokens=200, n=4, temperature=1.0, seed=0)
    threads = [threading.Thread(target=lambda: results.append(chat(server, **long))) for _ in range(3)]
    for t in threads:
        t.start()
    busy = 0
    for _ in range(200):  # until all three hold π_0's engine (the replies come later)
        busy = max(busy, http(server.url + "/healthz")[1]["in_flight"])
        if busy == 3 or len(results) == 3:
            break
        time.sleep(0.02)
    assert busy >= 1  # the reload below starts while requests are running
    info = serve_policy(server.cfg, policies.pi1, iteration=1)
    for t in threads:
        t.join()
    assert info["iteration"] == 1
    assert [status for status, _ in results] == [200] * 3
    assert all(body["spo_ray"]["iteration"] == 0 and len(body["choices"]) == 4 for _, body in results)
    assert chat(server)[1]["spo_ray"]["iteration"] == 1


@pytest.mark.parametrize("which", ["missing", "broken"])
def test_reload_to_a_bad_checkpoint_keeps_the_old_weights_and_reports_it(server, policies, which):
    from spo_ray.serve import serve_policy

    before = on_pi0(server, policies)
    bad = getattr(policies, which)
    info = serve_policy(server.cfg, bad, iteration=2)
    assert info["iteration"] == 0 and info["checkpoint"] == policies.pi0  # still π_0
    assert info["status"] == "degraded" and bad in info["error"]
    assert info["last_reload"]["ok"] is False and info["last_reload"]["iteration"] == 2
    assert info["replica"] == before["replica"]
    status, health = http(server.url + "/healthz")
    assert status == 200 and health["status"] == "degraded" and bad in health["error"] and health["iteration"] == 0
    status, body = chat(server)
    assert status == 200 and body["spo_ray"]["iteration"] == 0
    # A good reload afterwards clears the error.
    recovered = serve_policy(server.cfg, policies.pi1, iteration=1)
    assert recovered["status"] == "ok" and recovered["error"] is None and recovered["iteration"] == 1


# ---------------------------------------------------------------------------- spot check
def test_spot_check_against_the_deployment(server, policies, capsys):
    from spo_ray import spot_check

    on_pi0(server, policies)
    spot_check.main(["--url", server.url, "--api-key", KEY, "--prompts", "2", "--max-tokens", "6"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| # | prompt | spo_ray_test π_0") and len(table) == 4
    assert table[2].startswith(f"| 1 | {spot_check.BUILTIN_PROMPTS[0]} |")
    assert "[HTTP" not in "\n".join(table)


# ---------------------------------------------------------------------------- auth
def test_bearer_token_is_enforced(server, policies):
    import openai

    for token in (None, "wrong", ""):
        for path in ("/healthz", "/v1/models"):
            status, body = http(server.url + path, token=token)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        assert http(server.url + "/v1/chat/completions", {"messages": GOOD}, token=token)[0] == 401
    assert http(server.url + "/v1/chat/completions", b"{not json", token=None)[0] == 401  # auth comes first
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, "wrong").models.list()
    assert len(openai_client(server).chat.completions.create(model=NAME, messages=GOOD, max_tokens=4).choices) == 1


def test_no_token_needed_without_serve_api_key():
    import hashlib

    from spo_ray.serve import APIError, PolicyServer, ServeArgs

    authorize = PolicyServer.func_or_class._authorize
    base = dict(model_name=NAME, max_tokens_limit=8, default_max_tokens=8, max_n=1, dtype="float32")
    open_server = SimpleNamespace(args=ServeArgs(**base))
    locked = SimpleNamespace(args=ServeArgs(**base, api_key_sha256=hashlib.sha256(KEY.encode()).hexdigest()))
    anonymous, bearer = SimpleNamespace(headers={}), SimpleNamespace(headers={"authorization": f"Bearer {KEY}"})
    authorize(open_server, anonymous)
    authorize(locked, bearer)
    with pytest.raises(APIError, match="API key"):
        authorize(locked, anonymous)


# ---------------------------------------------------------------------------- no Ray needed
def test_serve_settings_are_typed_and_checked():
    from spo_ray.serve import load_serve_config

    cfg = load_serve_config(["serve.port=9001", "api_key=k"])
    assert cfg.port == 9001 and cfg.api_key == "k" and cfg.host == "127.0.0.1"
    for bad, key in [("port=abc", "port"), ("prot=1", "prot"), ("default_max_tokens=100000", "default_max_tokens"), ("dtype=int8", "serve.dtype"), ("api_key=' '", "api_key")]:
        with pytest.raises(ValueError, match=key):
            load_serve_config([bad])
    with pytest.raises(ValueError, match="serve.max_n"):
        compose(["experiment=tiny", "serve.max_n=0"])
    assert compose(["experiment=tiny", "serve.enabled=true"])[1].serve.enabled is True


def test_command_line_resolves_checkpoints_before_ray(policies, tmp_path):
    from spo_ray.serve import main, parse_cli

    cfg, path, iteration = parse_cli([f"checkpoint={policies.pi1}", "port=9002"])
    assert path == policies.pi1 and iteration == 1 and cfg.port == 9002
    assert parse_cli([f"checkpoint={policies.run}"])[1:] == (policies.pi1, 1)  # a run dir: its latest policy
    assert parse_cli([f"checkpoint={policies.pi0}", "iteration=4"])[2] == 4
    for argv, message in [([], "checkpoint=PATH is required"), ([f"checkpoint={tmp_path}/nope"], "does not exist"), ([f"checkpoint={tmp_path}"], "no config.json"), ([f"checkpoint={policies.pi0}", "bogus=1"], "bogus")]:
        with pytest.raises(SystemExit, match=message):
            main(argv)


def test_spot_check_compares_two_checkpoints_locally(policies, capsys):
    from spo_ray import spot_check

    spot_check.main(["--checkpoints", policies.pi0, policies.pi1, "--prompt", "Describe the sea.", "--prompt", "Hi | there", "--max-tokens", "8", "--width", "0"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == f"| # | prompt | pi0 ({policies.pi0}) | π_1 ({policies.pi1}) |"
    assert len(table) == 4 and table[3].startswith("| 2 | Hi \\| there |")
    cells = table[2].split(" | ")
    assert cells[2] != cells[3]  # two different policies, greedy: different answers


def test_the_private_ray_serve_names_the_controller_takes_are_still_there():
    """Ray 2.60 has no public API to apply a declarative Serve config or to read the deployed
    ones, so `controller.apply_declaratively` alone uses the private controller client, and
    `SERVE_PRIVATE_API` lists what it takes. A Ray that moves or changes one fails here, by
    name, instead of in the middle of a training run."""
    import importlib
    import inspect
    from pathlib import Path

    from ray.serve.schema import APIType, ApplicationDetails, ServeInstanceDetails

    from spo_ray.serve import controller
    from spo_ray.serve.controller import SERVE_PRIVATE_API

    def resolve(dotted: str):
        module, _, attr = dotted.rpartition(".")
        try:
            return importlib.import_module(dotted)
        except ModuleNotFoundError:
            return getattr(importlib.import_module(module), attr)

    for owner, name in SERVE_PRIVATE_API:
        assert hasattr(resolve(owner), name), f"{owner}.{name} is gone from this Ray: spo_ray/serve/controller.py needs a new way"
    client = resolve("ray.serve._private.client.ServeControllerClient")
    assert list(inspect.signature(resolve("ray.serve.context._get_global_client")).parameters) == ["raise_if_no_controller_running"]
    assert list(inspect.signature(client.get_serve_details).parameters) == ["self"]
    assert list(inspect.signature(client.deploy_apps).parameters)[:2] == ["self", "config"]
    assert isinstance(inspect.getattr_static(client, "http_config"), property)
    assert {"applications", "http_options"} <= set(ServeInstanceDetails.model_fields)
    assert {"source", "deployed_app_config"} <= set(ApplicationDetails.model_fields) and APIType.DECLARATIVE
    # ... and no other file of the package reaches into Ray Serve's privates.
    private = ("_get_global_client", "deploy_apps", "get_serve_details", "http_config", "ray.serve._private")
    for path in Path(controller.__file__).parent.glob("*.py"):
        if path.name != "controller.py":
            assert not [p for p in private if p in path.read_text()], path
    source = inspect.getsource(controller)
    outside = source.replace(inspect.getsource(controller.apply_declaratively), "")
    assert not [p for p in ("import _get_global_client", "_get_global_client(", ".deploy_apps(", ".get_serve_details(", ".http_config") if p in outside]
