"""Ray Serve spot checks: the current policy behind an OpenAI-style HTTP API.

    python -m spo_ray.serve checkpoint=runs/<run>/iter_2/policy [port=8001 api_key=...]

serves a finished checkpoint until Ctrl-C; during training (`serve.enabled=true`)
`train.py` calls `serve_policy` after each iteration, which deploys the application the
first time and afterwards reloads the replica in place to π_t.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /healthz`.

How a reload stays in place (Ray 2.60): `serve.run` with a newly bound deployment gets a
random code version (`ServeControllerClient.deploy_applications`), so Serve replaces the
replica. A *declarative* config (what `serve deploy` sends) hashes only the import path,
args and runtime_env into the code version (`deploy_utils.get_app_code_version`), so
re-applying the same application with a new `user_config` is a lightweight update: the
running replica's `reconfigure(user_config)` is called and the process stays. We apply
such configs through the controller client; the checkpoint lives in `user_config`, and
everything fixed for the app's lifetime (limits, the API key's hash) in `args`.

A reload loads the new engine first, then swaps the reference: requests already running
finish on the engine they started with. A reload that fails keeps the old weights and
reports the error in `/healthz`.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from spo_ray.config import ServeConfig
from spo_ray.data.chat import format_prompt

log = logging.getLogger(__name__)
replica_log = logging.getLogger("ray.serve")  # lands in the replica's Serve log file

DEPLOYMENT = "PolicyServer"
CONF_FILE = Path(__file__).resolve().parents[1] / "conf" / "serve" / "default.yaml"


# ---------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    # Unknown fields are errors (a typo must not be silently ignored); no type coercion.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Strict):
    """The subset of OpenAI's chat completion request that a spot check needs."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, gt=0)
    max_completion_tokens: Optional[int] = Field(None, gt=0)  # OpenAI's newer name for max_tokens
    temperature: Optional[float] = Field(None, ge=0, le=2)  # OpenAI's range; 0 is greedy
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stream: Optional[bool] = None


class ReloadRequest(_Strict):
    """The deployment's `user_config`: which checkpoint to serve."""

    checkpoint: str
    iteration: Optional[int] = None


class ServeArgs(BaseModel):
    """The application builder's `args`: fixed for the application's lifetime (changing
    them restarts the replica)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    max_tokens_limit: int
    default_max_tokens: int
    max_n: int
    dtype: str
    api_key_sha256: Optional[str] = None

    def digest(self) -> str:
        """Tells replicas of different args apart (a changed key restarts the replica)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a raw request body; any problem becomes a 400 naming the field."""
    try:
        return ChatCompletionRequest.model_validate_json(body or b"")
    except ValidationError as err:
        first = err.errors()[0]
        # Drop the union-member tags pydantic adds to a location ("content.str").
        loc = [p for p in first["loc"] if not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p))]
        param = ".".join(str(part) for part in loc) or None
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        where = f"{param}: " if param else ""
        raise APIError(400, f"{where}{first['msg']}", param=param) from None


# ---------------------------------------------------------------------------- generation
class PromptError(ValueError):
    """The messages cannot be turned into a prompt for this model (answered as a 400)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Completion:
    texts: list[str]
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int  # over all n texts, EOS included


def render_messages(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The text the policy continues: the chat template of the whole conversation up to
    the assistant turn; without a template, a single user message as is or `role: content`
    lines (`data.chat.format_prompt`)."""
    try:
        return format_prompt(tokenizer, messages)
    except Exception as err:  # jinja raises for conversations a template rejects
        raise PromptError(f"the model's chat template rejects these messages: {err}") from None


@torch.inference_mode()
def complete_chat(
    model: Any,
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    n: int,
    seed: int,
) -> Completion:
    """n answers to a conversation from an HF causal LM (temperature 0: greedy).

    Seeds torch's global generator: callers that generate concurrently must serialize.
    """
    text = render_messages(tokenizer, messages)
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(model.device)
    prompt_tokens = enc["input_ids"].shape[1]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and prompt_tokens + max_tokens > context:
        raise PromptError(
            f"this model's maximum context length is {context} tokens; the messages take "
            f"{prompt_tokens} and max_tokens asks for {max_tokens}: shorten them or lower max_tokens",
            code="context_length_exceeded",
        )
    greedy = temperature == 0
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=enc["input_ids"].repeat(n, 1),  # n rows rather than num_return_sequences: greedy allows that too
        attention_mask=enc["attention_mask"].repeat(n, 1),
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        max_new_tokens=max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts, reasons, total = [], [], 0
    for row in out[:, prompt_tokens:].cpu().tolist():
        stop = tokenizer.eos_token_id in row
        length = row.index(tokenizer.eos_token_id) + 1 if stop else len(row)
        texts.append(tokenizer.decode(row[:length], skip_special_tokens=True).strip())
        reasons.append("stop" if stop else "length")
        total += length
    return Completion(texts, reasons, prompt_tokens, total)


# ---------------------------------------------------------------------------- the deployment
@dataclass(frozen=True)
class Served:
    """What the replica serves now; swapped as a whole on reload."""

    engine: Any  # spo_ray.rollout.hf.HFEngine
    checkpoint: str
    iteration: Optional[int]
    loaded_at: float


@dataclass(frozen=True)
class ReloadOutcome:
    checkpoint: str
    iteration: Optional[int]
    ok: bool
    error: Optional[str]
    at: float


def load_engine(checkpoint: str, dtype: str) -> Any:
    from spo_ray.rollout.hf import HFEngine

    if not Path(checkpoint, "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint!r} is not a Hugging Face checkpoint folder (no config.json)")
    return HFEngine(checkpoint, dtype=dtype)


def chat_completion_body(completion: Completion, model_name: str, served: Served) -> dict:
    """A response in OpenAI's `chat.completion` schema, plus which checkpoint answered."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": "spo_ray" if served.iteration is None else f"spo_ray-iter_{served.iteration}",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(zip(completion.texts, completion.finish_reasons))
        ],
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
        "spo_ray": {"iteration": served.iteration, "checkpoint": served.checkpoint},
    }


app = FastAPI(title="spo_ray policy", docs_url=None, redoc_url=None, openapi_url=None)  # only the routes below


@app.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return err.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None).response()


@app.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    replica_log.exception("request failed")
    return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()


# `serve.deployment` pickles the class right here: whatever it uses is defined above.
# Generation is serialized inside the replica; a roomy max_ongoing_requests lets requests
# wait there (holding their engine) while /healthz and reload checks still get through.
@serve.deployment(name=DEPLOYMENT, num_replicas=1, max_ongoing_requests=32)
@serve.ingress(app)
class PolicyServer:
    """One replica holding one policy; `reconfigure` swaps it for another checkpoint."""

    def __init__(self, args: dict) -> None:
        self.args = ServeArgs.model_validate(args)
        self._served: Optional[Served] = None
        self._swap_lock = threading.Lock()
        self._generate_lock = threading.Lock()  # complete_chat seeds torch's global RNG
        self._reload_lock = asyncio.Lock()
        self._last_reload: Optional[ReloadOutcome] = None
        self._applied: Optional[dict] = None  # the last user_config whose reload has finished
        self._in_flight = 0  # chat requests holding an engine (changed on the event loop only)

    # -- reload ------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        async with self._reload_lock:
            try:
                await self._reload(user_config)
            finally:
                self._applied = dict(user_config)

    async def _reload(self, user_config: dict) -> None:
        current = self._snapshot()
        try:
            wanted = ReloadRequest.model_validate(user_config)
        except ValidationError as err:
            wanted, error = None, f"invalid user_config {user_config!r}: {err}"
        else:
            if current and (current.checkpoint, current.iteration) == (wanted.checkpoint, wanted.iteration):
                return  # already served (e.g. a config re-applied after a failed reload)
            try:
                # Load outside the event loop: requests keep being answered meanwhile.
                engine = await asyncio.to_thread(load_engine, wanted.checkpoint, self.args.dtype)
            except Exception as err:  # a missing or broken folder: keep the old weights
                error = f"cannot load {wanted.checkpoint!r}: {type(err).__name__}: {err}"
            else:
                with self._swap_lock:
                    self._served = Served(engine, wanted.checkpoint, wanted.iteration, time.time())
                self._last_reload = ReloadOutcome(wanted.checkpoint, wanted.iteration, True, None, time.time())
                replica_log.info("serving iteration %s from %s", wanted.iteration, wanted.checkpoint)
                return
        checkpoint = wanted.checkpoint if wanted else str(user_config.get("checkpoint"))
        iteration = wanted.iteration if wanted else None
        self._last_reload = ReloadOutcome(checkpoint, iteration, False, error, time.time())
        if current is None:  # nothing to fall back to: the replica cannot start
            raise RuntimeError(error)
        replica_log.error("reload failed, still serving %s: %s", current.checkpoint, error)

    def _snapshot(self) -> Optional[Served]:
        with self._swap_lock:
            return self._served

    # -- status ------------------------------------------------------------------------
    def info(self) -> dict:
        """What /healthz reports; also called through a handle by `serve_policy`."""
        served = self._snapshot()
        last = self._last_reload
        context = serve.get_replica_context()
        return {
            "status": "ok" if last is None or last.ok else "degraded",
            "model": self.args.model_name,
            "iteration": served.iteration if served else None,
            "checkpoint": served.checkpoint if served else None,
            "loaded_at": served.loaded_at if served else None,
            "error": None if last is None or last.ok else last.error,
            "last_reload": asdict(last) if last else None,
            "applied": self._applied,
            "in_flight": self._in_flight,
            "args_digest": self.args.digest(),
            "replica": {"pid": os.getpid(), "replica_id": context.replica_id.unique_id},
        }

    def _authorize(self, request: Request) -> None:
        expected = self.args.api_key_sha256
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <serve.api_key>'", code="invalid_api_key")

    # -- routes ------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz(self, request: Request) -> dict:
        self._authorize(request)
        return self.info()

    @app.get("/v1/models")
    def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id}")
    def retrieve_model(self, model_id: str, request: Request) -> dict:
        self._authorize(request)
        if model_id != self.args.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {self.args.model_name!r}", param="model", code="model_not_found")
        return self._model_card()

    def _model_card(self) -> dict:
        served = self._snapshot()
        return {
            "id": self.args.model_name,
            "object": "model",
            "created": int(served.loaded_at) if served else 0,
            "owned_by": "spo_ray",
            "iteration": served.iteration if served else None,
            "checkpoint": served.checkpoint if served else None,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        self._authorize(request)
        req = parse_chat_request(await request.body())
        a = self.args
        if req.stream:
            raise APIError(400, "stream=true is not supported by this server", param="stream")
        if req.model is not None and req.model != a.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {a.model_name!r}", param="model", code="model_not_found")
        if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ: set one of them", param="max_tokens")
        max_tokens = req.max_tokens or req.max_completion_tokens or a.default_max_tokens
        if max_tokens > a.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {a.max_tokens_limit} (serve.max_tokens_limit)", param="max_tokens")
        n = req.n or 1
        if n > a.max_n:
            raise APIError(400, f"n={n} is over this server's limit of {a.max_n} (serve.max_n)", param="n")
        served = self._snapshot()  # this request keeps this engine, whatever reloads meanwhile
        if served is None:
            raise APIError(503, "no policy is loaded yet", type="server_error")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        sampling = dict(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature, top_p=req.top_p or 1.0, n=n, seed=seed)
        self._in_flight += 1
        try:
            completion = await asyncio.to_thread(self._generate, served.engine, messages, sampling)
        except PromptError as err:
            raise APIError(400, str(err), param="messages", code=err.code) from None
        finally:
            self._in_flight -= 1
        return JSONResponse(chat_completion_body(completion, a.model_name, served))

    def _generate(self, engine: Any, messages: list[dict], sampling: dict) -> Completion:
        with self._generate_lock:
            return complete_chat(engine.model, engine.tokenizer, messages, **sampling)


def build_app(args: dict) -> serve.Application:
    """The application builder named by the declarative config (`import_path`)."""
    return PolicyServer.bind(ServeArgs.model_validate(args).model_dump())


# ---------------------------------------------------------------------------- driver side
class ServeError(RuntimeError):
    pass


def serve_args(cfg: ServeConfig) -> ServeArgs:
    return ServeArgs(
        model_name=cfg.name,
        max_tokens_limit=cfg.max_tokens_limit,
        default_max_tokens=cfg.default_max_tokens,
        max_n=cfg.max_n,
        dtype=cfg.dtype,
        # Only a hash reaches the config (visible in the dashboard): the key itself stays here.
        api_key_sha256=hashlib.sha256(cfg.api_key.encode()).hexdigest() if cfg.api_key else None,
    )


def application_config(cfg: ServeConfig, checkpoint: str, iteration: Optional[int]) -> dict:
    """The declarative config of the app; only `user_config` changes between reloads."""
    import ray

    # Under `ray job submit` the code arrives as the job's working_dir: the app needs it too.
    job_env = ray.get_runtime_context().runtime_env if ray.is_initialized() else {}
    runtime_env = {k: job_env[k] for k in ("working_dir", "py_modules", "env_vars", "pip", "uv", "conda", "container", "image_uri") if job_env.get(k)}
    return {
        "name": cfg.name,
        "route_prefix": cfg.route_prefix,
        "import_path": "spo_ray.serve:build_app",
        "args": serve_args(cfg).model_dump(),
        "runtime_env": runtime_env,
        "deployments": [
            {
                "name": DEPLOYMENT,
                "num_replicas": 1,
                "user_config": {"checkpoint": checkpoint, "iteration": iteration},
                "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            }
        ],
    }


def _controller_client(cfg: ServeConfig) -> Any:
    """Start Serve (HTTP on cfg.host:cfg.port) or join the running instance."""
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
    client = _get_global_client()
    http = client.http_config
    if (http.host, http.port) != (cfg.host, cfg.port):
        log.warning("Serve already runs on %s:%s in this cluster; serve.host/serve.port (%s:%s) are ignored", http.host, http.port, cfg.host, cfg.port)
    return client


def _apply(client: Any, app_config: dict) -> None:
    """Apply our app's config, keeping every other declaratively deployed app as it is
    (a declarative config replaces the whole set)."""
    from ray.serve.schema import APIType, ServeApplicationSchema, ServeDeploySchema, ServeInstanceDetails

    details = ServeInstanceDetails(**client.get_serve_details())
    others = [
        app.deployed_app_config
        for name, app in details.applications.items()
        if name != app_config["name"] and app.source == APIType.DECLARATIVE and app.deployed_app_config is not None
    ]
    client.deploy_apps(ServeDeploySchema(applications=[*others, ServeApplicationSchema(**app_config)]))


def _wait_applied(cfg: ServeConfig, user_config: dict) -> dict:
    """Poll until the app runs a replica with cfg's args that has finished the reload to
    `user_config`; that replica's `info()`."""
    digest = serve_args(cfg).digest()
    deadline = time.monotonic() + cfg.reconfigure_timeout_s
    last = "not deployed yet"
    while time.monotonic() < deadline:
        app_status = serve.status().applications.get(cfg.name)
        if app_status is not None:
            status = getattr(app_status.status, "value", app_status.status)
            last = f"{status}: {app_status.message or ''}".strip()
            messages = "; ".join(d.message for d in app_status.deployments.values() if d.message)
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                # Serve's message ends with the replica's traceback: its last line is the cause.
                lines = [line for line in f"{app_status.message}\n{messages}".splitlines() if line.strip()]
                cause = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else "".join(lines)
                raise ServeError(f"the Serve app {cfg.name!r} is {status}: {cause} (full text: `serve status`)")
            if status == "RUNNING":  # not while an update rolls out
                try:
                    info = serve.get_app_handle(cfg.name).info.remote().result(timeout_s=30)
                except Exception as err:  # the replica is still starting
                    last = f"{last}; replica: {type(err).__name__}"
                else:
                    if info["applied"] == user_config and info["args_digest"] == digest:
                        return info
                    last = f"{last}; replica still on {info['applied']}"
        time.sleep(0.5)
    raise ServeError(
        f"the Serve app {cfg.name!r} (deployment replica) did not load {user_config['checkpoint']!r} within "
        f"serve.reconfigure_timeout_s={cfg.reconfigure_timeout_s}s (last state: {last}); check `serve status` and the "
        "replica's log, or raise serve.reconfigure_timeout_s; a training run that stopped here resumes with the "
        "same command and run.dir (the checkpoint is kept)"
    )


def serve_policy(cfg: ServeConfig, policy_path: str, iteration: Optional[int]) -> dict:
    """Serve the checkpoint `policy_path` (π_iteration): deploy the app if absent, else
    reload its replica in place. A failed reload keeps the old weights, logs a warning
    and is reported in the returned status (the same dict as `/healthz`, plus `url`); a
    first deployment that cannot load raises `ServeError`."""
    checkpoint = os.path.abspath(policy_path) if os.path.exists(policy_path) else policy_path
    client = _controller_client(cfg)
    user_config = {"checkpoint": checkpoint, "iteration": iteration}
    _apply(client, application_config(cfg, checkpoint, iteration))
    info = _wait_applied(cfg, user_config)
    if info["error"] and (info["last_reload"] or {}).get("checkpoint") == checkpoint:
        log.warning("Serve kept π_%s (%s): %s", info["iteration"], info["checkpoint"], info["error"])
        # Point the config back at what is served, so a restarted replica loads that.
        served = {"checkpoint": info["checkpoint"], "iteration": info["iteration"]}
        _apply(client, application_config(cfg, info["checkpoint"], info["iteration"]))
        info = _wait_applied(cfg, served)
    http = client.http_config
    info["url"] = f"http://{http.host}:{http.port}{cfg.route_prefix.rstrip('/')}"
    if not info["error"]:
        log.info("Serve: %s serves π_%s (%s) at %s/v1", cfg.name, info["iteration"], info["checkpoint"], info["url"])
    return info


def stop_serving(name: str) -> None:
    """Delete the app; shut Serve down when no other app is left."""
    serve.delete(name)
    if not serve.status().applications:
        serve.shutdown()


# ---------------------------------------------------------------------------- command line
def load_serve_config(overrides: Sequence[str] = ()) -> ServeConfig:
    """conf/serve/default.yaml with `key=value` overrides (`port=8001` or
    `serve.port=8001`), typed and validated by `ServeConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dotlist = [o.removeprefix("serve.") for o in overrides]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), OmegaConf.load(CONF_FILE), OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"invalid serve setting{f' {key}' if key else ''}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise ValueError(f"invalid serve setting: {err}") from None


def resolve_checkpoint(path: str) -> tuple[str, Optional[int]]:
    """A policy folder and its iteration (from `iter_<t>/policy`; None when the path does
    not say). A run directory resolves to its latest finished policy."""
    from spo_ray.run_dir import finished_policies, iteration_of

    p = Path(path)
    if (p / "config.json").is_file():
        return str(p.resolve()), iteration_of(p.parent) if p.name == "policy" else None
    policies = finished_policies(p)
    if policies:
        t, folder = policies[-1]
        return str(folder.resolve()), t
    if not p.exists():
        raise FileNotFoundError(f"checkpoint={path!r} does not exist: give a policy folder (runs/<run>/iter_<t>/policy) or a run directory")
    raise FileNotFoundError(f"checkpoint={path!r} has no config.json and no iter_<t>/policy folders: it is not a Hugging Face policy folder or a run directory")


USAGE = """usage: python -m spo_ray.serve checkpoint=PATH [iteration=T] [key=value ...]

Serves PATH (an HF policy folder, or a run directory: its latest iter_<t>/policy) with
Ray Serve until Ctrl-C. key=value overrides conf/serve/default.yaml, e.g. port=8001
host=0.0.0.0 api_key=secret max_tokens_limit=1024 dtype=bfloat16 num_gpus=1."""


def parse_cli(argv: Sequence[str]) -> tuple[ServeConfig, str, Optional[int]]:
    checkpoint, iteration, overrides = None, None, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"{arg!r}: expected key=value\n{USAGE}")
        if key in ("checkpoint", "+checkpoint"):
            checkpoint = value
        elif key in ("iteration", "+iteration"):
            iteration = int(value)
        else:
            overrides.append(arg)
    if checkpoint is None:
        raise ValueError(f"checkpoint=PATH is required\n{USAGE}")
    cfg = load_serve_config(overrides)
    path, inferred = resolve_checkpoint(checkpoint)
    return cfg, path, inferred if iteration is None else iteration


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    import signal

    import ray

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        cfg, checkpoint, iteration = parse_cli(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"spo_ray.serve: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and `kill` both end in the clean-up below (also when started in the background).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:  # join the cluster this runs in; start a local one only when there is none
        ray.init(address="auto")
    except ConnectionError:
        ray.init()
    failure = None
    try:
        info = serve_policy(cfg, checkpoint, iteration)
        if info["error"]:
            raise ServeError(info["error"])
        which = f"π_{info['iteration']}" if info["iteration"] is not None else "the checkpoint"
        print(
            f"[spo_ray] serving {cfg.name} = {which} ({info['checkpoint']})\n"
            f"[spo_ray] OpenAI base URL: {info['url']}/v1   health: {info['url']}/healthz   "
            f"auth: {'bearer token' if cfg.api_key else 'none'}   Ctrl-C stops it",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[spo_ray] stopping", flush=True)
    except ServeError as err:
        failure = err
    finally:
        try:
            stop_serving(cfg.name)
        finally:
            ray.shutdown()
    if failure is not None:
        raise SystemExit(f"spo_ray.serve: {failure}")

if __name__ == "__main__":
    main()
