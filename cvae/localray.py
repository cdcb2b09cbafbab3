"""Ray for jobs and tests: connect to a cluster, or start a local Ray that lets nobody in.

A local Ray started here
- uses Ray's token authentication (RAY_AUTH_MODE=token), with a fresh random token held
  only in this process's environment (and so in the Ray processes it starts): nothing is
  written to ~/.ray/auth_token, which `ray.init()` of Ray 2.60 would otherwise create;
- binds every port to 127.0.0.1: on Linux Ray replaces a loopback node address by the
  machine's own address unless multi-machine clusters are switched off
  (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the laptop setting);
- starts no dashboard, so no Jobs API port at all. Without it Ray's State API is down, so
  Ray Train's placement-group cleaner (a safety net for a controller that dies while its
  cluster lives on) would warn every second that it cannot ask; its placement groups end
  with this Ray anyway, so each worker process silences that one logger (`quiet_workers`).
Inside a submitted job (RAY_ADDRESS is set) or with an explicit address, it connects
instead, and the cluster's own token settings apply.
"""
from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import MutableMapping
from typing import Any

from cvae.logs import ray_detail

AUTH_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# ray.init arguments that only make sense when starting Ray; connecting with them is an error.
START_ONLY = ("num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard",
              "dashboard_host", "dashboard_port")


def secure_local_env(env: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Set the variables above in `env` (an explicit RAY_AUTH_MODE of the user is kept)."""
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"] == "token" and not any(env.get(k) for k in AUTH_ENV):
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


# Loggers that only say the State API (the dashboard) is missing; silenced in a local Ray.
NO_DASHBOARD_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_workers() -> None:
    """worker_process_setup_hook of the local Ray: run in every worker process at start."""
    for name in NO_DASHBOARD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str | None = None, **kwargs: Any):
    """ray.init for a job: connect to `address` or RAY_ADDRESS, else start a secured local Ray.

    kwargs go to ray.init (num_cpus, log_to_driver, ...); those that only apply to starting
    a Ray (START_ONLY) are dropped when connecting. Returns ray.init's context. Ray's own
    INFO lines in this process ("Started a local Ray instance") show only when the job logs
    at DEBUG (cvae.logs.ray_detail), unless `logging_level` is given.
    """
    kwargs.setdefault("logging_level", logging.INFO if ray_detail() else logging.WARNING)
    if not sys.stdout.isatty():  # worker log prefixes without ANSI colour codes in files and pipes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address is not None or os.environ.get("RAY_ADDRESS"):
        import ray  # here, not at the top: importing cvae.localray stays cheap

        return ray.init(address=address, **{k: v for k, v in kwargs.items() if k not in START_ONLY})
    already_imported = "ray" in sys.modules
    secure_local_env()
    import ray  # after the settings above, which Ray reads when it is imported

    if already_imported:
        # Ray read these settings when it was imported: refresh them the way Ray itself
        # does when it turns token auth on (authentication_token_setup._enable_token_auth).
        from ray._private import ray_constants  # (Ray's own, needed only here)
        from ray._raylet import Config

        Config.initialize("")
        ray_constants.ENABLE_RAY_CLUSTER = False
    kwargs.setdefault("include_dashboard", False)
    if not kwargs["include_dashboard"]:
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        runtime_env.setdefault("worker_process_setup_hook", "cvae.localray.quiet_workers")
        kwargs["runtime_env"] = runtime_env
    return ray.init(**kwargs)
