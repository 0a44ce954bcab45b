"""The driver side of Serve: deploy the policy app, reload it in place to each new π_t, wait
until the replica serves it, and stop it.

How a reload stays in place (Ray 2.60): `serve.run` with a newly bound deployment gets a
random code version (`ServeControllerClient.deploy_applications`), so Serve replaces the
replica. A *declarative* config (what `serve deploy` sends) hashes only the import path,
args and runtime_env into the code version (`deploy_utils.get_app_code_version`), so
re-applying the same application with a new `user_config` is a lightweight update: the
running replica's `reconfigure(user_config)` is called and the process stays. We apply
such configs through the controller client (`apply_declaratively`); the checkpoint lives in `user_config`, and
everything fixed for the app's lifetime (limits, the API key's hash) in `args`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Optional

from ray import serve

from spo_ray.config import ServeConfig
from spo_ray.serve.api import ServeArgs
from spo_ray.serve.deployment import DEPLOYMENT

log = logging.getLogger(__name__)


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


# Ray 2.60 has no public API for the two things below, so Ray Serve's private controller
# client is used here, in `apply_declaratively` alone, and SERVE_PRIVATE_API lists what it
# takes (tests/serve/test_serve.py checks the list against the installed Ray):
# - applying a declarative config: `serve.run` always gives the deployment a new random code
#   version, so it replaces the replica; only a declarative config (what `serve deploy` sends
#   through the dashboard's REST API) reloads it in place;
# - reading the deployed configs (to keep the other apps of the declarative set) and the
#   address Serve's HTTP proxy listens on: the public `serve.status()` has neither.
SERVE_PRIVATE_API: tuple[tuple[str, str], ...] = (
    ("ray.serve.context", "_get_global_client"),
    ("ray.serve._private.client.ServeControllerClient", "get_serve_details"),
    ("ray.serve._private.client.ServeControllerClient", "deploy_apps"),
    ("ray.serve._private.client.ServeControllerClient", "http_config"),
)


def apply_declaratively(app_config: dict) -> tuple[str, int]:
    """Apply our app's declarative config to the running Serve instance, keeping every other
    declaratively deployed app as it is (a declarative config replaces the whole set); the
    host and port Serve's HTTP proxy listens on."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import APIType, ServeApplicationSchema, ServeDeploySchema, ServeInstanceDetails

    client = _get_global_client()
    details = ServeInstanceDetails(**client.get_serve_details())
    others = [
        app.deployed_app_config
        for name, app in details.applications.items()
        if name != app_config["name"] and app.source == APIType.DECLARATIVE and app.deployed_app_config is not None
    ]
    client.deploy_apps(ServeDeploySchema(applications=[*others, ServeApplicationSchema(**app_config)]))
    http = client.http_config
    return http.host, http.port


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
    # Start Serve (HTTP on cfg.host:cfg.port) or join the running instance.
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
    user_config = {"checkpoint": checkpoint, "iteration": iteration}
    host, port = apply_declaratively(application_config(cfg, checkpoint, iteration))
    if (host, port) != (cfg.host, cfg.port):
        log.warning("Serve already runs on %s:%s in this cluster; serve.host/serve.port (%s:%s) are ignored", host, port, cfg.host, cfg.port)
    info = _wait_applied(cfg, user_config)
    if info["error"] and (info["last_reload"] or {}).get("checkpoint") == checkpoint:
        log.warning("Serve kept π_%s (%s): %s", info["iteration"], info["checkpoint"], info["error"])
        # Point the config back at what is served, so a restarted replica loads that.
        served = {"checkpoint": info["checkpoint"], "iteration": info["iteration"]}
        apply_declaratively(application_config(cfg, info["checkpoint"], info["iteration"]))
        info = _wait_applied(cfg, served)
    info["url"] = f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"
    if not info["error"]:
        log.info("Serve: %s serves π_%s (%s) at %s/v1", cfg.name, info["iteration"], info["checkpoint"], info["url"])
    return info


def stop_serving(name: str) -> None:
    """Delete the app; shut Serve down when no other app is left."""
    serve.delete(name)
    if not serve.status().applications:
        serve.shutdown()
