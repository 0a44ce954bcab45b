"""The Serve deployment: one replica holding one policy behind the OpenAI-style routes;
`reconfigure(user_config)` swaps it for another checkpoint in place (spo_ray/serve/controller.py
says why that keeps the process).

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
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from spo_ray.serve.api import APIError, ReloadRequest, ServeArgs, parse_chat_request
from spo_ray.serve.completion import Completion, PromptError, complete_chat, load_engine

replica_log = logging.getLogger("ray.serve")  # lands in the replica's Serve log file

DEPLOYMENT = "PolicyServer"


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
