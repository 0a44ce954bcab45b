"""Ray Serve spot checks: the current policy behind an OpenAI-style HTTP API.

    python -m spo_ray.serve checkpoint=runs/<run>/iter_2/policy [port=8001 api_key=...]

serves a finished checkpoint until Ctrl-C; during training (`serve.enabled=true`)
`train.py` calls `serve_policy` after each iteration, which deploys the application the
first time and afterwards reloads the replica in place to π_t.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /healthz`.

    api.py         the request and config models, errors in OpenAI's shape
    completion.py  the prompt and the answers of an HF policy (also used by spot_check)
    deployment.py  the Serve deployment (`PolicyServer`) and its app builder (`build_app`)
    controller.py  driver side: deploy, reload in place, wait, stop (`serve_policy`)
    cli.py         `python -m spo_ray.serve` (`main`)
"""

from spo_ray.serve.api import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ReloadRequest,
    ServeArgs,
    TextPart,
    parse_chat_request,
)
from spo_ray.serve.cli import CONF_FILE, USAGE, load_serve_config, main, parse_cli, resolve_checkpoint
from spo_ray.serve.completion import Completion, PromptError, complete_chat, load_engine, render_messages
from spo_ray.serve.controller import ServeError, application_config, serve_args, serve_policy, stop_serving
from spo_ray.serve.deployment import DEPLOYMENT, PolicyServer, ReloadOutcome, Served, app, build_app, chat_completion_body

__all__ = [
    "APIError", "ChatCompletionRequest", "ChatMessage", "ReloadRequest", "ServeArgs", "TextPart", "parse_chat_request",
    "CONF_FILE", "USAGE", "load_serve_config", "main", "parse_cli", "resolve_checkpoint",
    "Completion", "PromptError", "complete_chat", "load_engine", "render_messages",
    "ServeError", "application_config", "serve_args", "serve_policy", "stop_serving",
    "DEPLOYMENT", "PolicyServer", "ReloadOutcome", "Served", "app", "build_app", "chat_completion_body",
]
