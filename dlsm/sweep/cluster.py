"""Ray start-up in one place: a project-started Ray that stays on loopback, or an existing cluster.

A **local** Ray (no ``--address``, no ``RAY_ADDRESS``) binds and talks on 127.0.0.1 only and makes no
cloud-metadata, DNS or internet probe. What each setting does, as read in Ray 2.60's source:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: ``ray._private.services.get_node_ip_address`` then returns
  127.0.0.1 instead of asking ``node_ip_address_from_perspective`` (a UDP ``connect`` to 8.8.8.8:53).
  Without it ``ray.init`` turns ``_node_ip_address='127.0.0.1'`` back into the machine's external
  address (``resolve_ip_for_localhost``), the GCS and raylet listen there, and the driver and the
  runtime-env agent both probe 8.8.8.8. Child processes inherit it from the driver's environment.
- ``_node_ip_address='127.0.0.1'``: every service of the node is announced (and reached) on loopback;
  ``address='local'``: always a new instance (``None`` joins a ``ray start`` cluster it finds here).
- No dashboard process unless asked: ``include_dashboard=False`` still starts Ray's API-server
  ("dashboard") process with one module, ``UsageStatsHead``, whose ``run()`` calls
  ``usage_lib.get_cluster_config_to_report``, which asks the cloud-metadata addresses
  (169.254.169.254, metadata.google.internal: a DNS query) whether usage stats are on or not. No
  environment variable or ``ray.init`` argument stops it, so :func:`_patched_ray` skips that process
  (``Node.start_api_server``) when no dashboard is wanted; nothing else runs in it then. With
  ``dashboard=True`` the dashboard binds 127.0.0.1 and runs through :mod:`dlsm.sweep._ray_dashboard`,
  which answers the cloud question with ``'unknown'`` instead of probing.
- ``RAY_USAGE_STATS_ENABLED=0`` (no usage reports) and ``RAY_USAGE_STATS_REPORT_URL`` on a closed
  loopback port: a cluster started with ``ray start`` sends a "usage stats disabled" report to Ray's
  server even with usage stats off (``UsageStatsHead._report_disabled_usage_sync``).

An **existing cluster** (``--address HOST:PORT``, ``auto`` or ``RAY_ADDRESS``) started with
``ray start --head`` uses token authentication in Ray 2.60. ``ray.init`` enables the token only for
``address='auto'``; for an explicit address the driver needs ``RAY_AUTH_MODE=token``, which
:func:`connect` sets when a token is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or Ray's
default file ``~/.ray/auth_token``: ``ray start --head`` turns authentication on when that file exists,
and any ``ray.init`` on the machine writes one). From another machine, copy that file (or the output
of ``ray get-auth-token`` on the head node) first.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from dlsm.errors import ConfigError

__all__ = ["LOCAL_ENV", "Connection", "connect", "is_loopback_address", "preflight", "ray_env"]

LOOPBACK = "127.0.0.1"
CLOSED_PORT_URL = "http://127.0.0.1:9/"  # the discard port: nothing listens, a request fails at once

#: Environment for every Ray process the project starts (and for the trials it runs).
LOCAL_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": CLOSED_PORT_URL,
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def ray_env(*, local: bool) -> dict[str, str]:
    """Environment for the driver and the trials. On a remote cluster the node IP must be discovered
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is left to Ray); everything else stays off."""
    env = dict(LOCAL_ENV)
    if not local:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    return env


def is_loopback_address(address: str) -> bool:
    """Whether ``HOST:PORT`` (or ``ray://HOST:PORT``) names this machine's loopback interface."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "::1"):
        return True
    try:
        return socket.gethostbyname(host).startswith("127.") if host else False
    except OSError:
        return False


def _token_available() -> str | None:
    """Where Ray would read an authentication token from, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


@contextlib.contextmanager
def _patched_ray(dashboard: bool) -> Iterator[None]:
    """Start Ray's API-server ("dashboard") process only when asked, and then without the probe."""
    from ray._private import node, services

    saved_api, saved_start = node.Node.start_api_server, services.start_ray_process
    if not dashboard:
        def start_api_server(self, *, include_dashboard, raise_on_failure):  # noqa: ARG001
            self._webui_url = None

        node.Node.start_api_server = start_api_server
    else:
        def start_ray_process(command, process_type, *args, **kwargs):
            if process_type == "dashboard":
                i = next(i for i, c in enumerate(command) if c.endswith("dashboard.py"))
                command = [*command[:i], "-m", "dlsm.sweep._ray_dashboard", *command[i:]]
            return saved_start(command, process_type, *args, **kwargs)

        services.start_ray_process = start_ray_process
    try:
        yield
    finally:
        node.Node.start_api_server, services.start_ray_process = saved_api, saved_start


class Connection:
    """What :func:`connect` joined: ``address`` (the GCS address), ``local`` (started here), ``env``."""

    def __init__(self, address: str, local: bool, env: dict[str, str], dashboard_url: str | None) -> None:
        self.address, self.local, self.env, self.dashboard_url = address, local, env, dashboard_url


def _prepare(address: str | None) -> tuple[str | None, bool, dict[str, str], str | None]:
    """Resolve the address and set this process's environment, before Ray reads it (at import)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None or address == "auto" or is_loopback_address(address)
    env = ray_env(local=local)
    os.environ.update(env)  # inherited by every process Ray starts from this driver
    if not local:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    source = _token_available() if address is not None else None
    if source is not None and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # ray.init enables it by itself only for address='auto'
    from ray._private import ray_constants
    from ray._raylet import Config

    ray_constants.ENABLE_RAY_CLUSTER = not local  # read at import time: ray may have been imported already
    Config.initialize("")  # Ray caches its config (the auth mode among it): make it see the environment
    return address, local, env, source


def _token_error(address: str, source: str | None) -> ConfigError:
    found = f"the token from {source} was refused" if source else "no token found"
    return ConfigError(
        f"--address {address}: the Ray cluster requires its authentication token ({found}); copy "
        "~/.ray/auth_token from the head node (`ray get-auth-token` there prints it) to this machine's "
        "~/.ray/auth_token, or set RAY_AUTH_TOKEN_PATH to a copy or RAY_AUTH_TOKEN to its contents")


def preflight(address: str | None, *, dashboard: bool = False, timeout: float = 5.0) -> None:
    """Fail within seconds, with one line, if an explicit cluster address is unreachable or refuses
    this driver's token (``ray.init`` itself waits 40 s and prints C++ log lines), or if a dashboard is
    asked for without Ray's dashboard packages."""
    address, _, _, source = _prepare(address)
    if dashboard and address is None:
        from ray._private.utils import get_dashboard_dependency_error

        missing = get_dashboard_dependency_error()
        if missing is not None:
            raise ConfigError(f"sweep.dashboard = True needs Ray's dashboard packages ({missing}); "
                              "pip install 'ray[default]', or leave sweep.dashboard off")
    if address is None or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster ({err}); is `ray start --head` "
                          "running there?") from None
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    saved = os.dup(2)  # Ray's C++ client logs the refusal on fd 2 itself; the user gets our line instead
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                GcsClient(address=address)
            except AuthenticationError:
                raise _token_error(address, source) from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def connect(address: str | None = None, *, dashboard: bool = False, extra_env: dict[str, str] | None = None,
            checked: bool = False, num_gpus: float | None = None) -> Connection:
    """Start a loopback-only Ray (``address`` None and no ``RAY_ADDRESS``) or join an existing cluster.

    ``extra_env`` is added to the trials' environment (``runtime_env``). ``num_gpus`` (a Ray started here): the GPUs
    Ray announces, whatever the machine has (``sweep.logical_gpus``); a cluster's own count otherwise. Raises
    ConfigError with one line when the cluster cannot be reached or refuses the driver's token; ``checked=True`` when
    the caller ran :func:`preflight` already (a sweep does, before its shared stages)."""
    if not checked:
        preflight(address, dashboard=dashboard)
    address, local, env, source = _prepare(address)
    import ray

    runtime_env = {"env_vars": {**env, **(extra_env or {})}}
    common = {"runtime_env": runtime_env, "log_to_driver": False, "configure_logging": False}
    if address is None:
        with _patched_ray(dashboard):
            # 'local': always a new instance; None would join a `ray start` cluster found on this machine
            ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host=LOOPBACK,
                           _node_ip_address=LOOPBACK, **({"num_gpus": num_gpus} if num_gpus is not None else {}),
                           **common)
        return Connection(ray.get_runtime_context().gcs_address, True, env, ctx.dashboard_url or None)
    try:
        ctx = ray.init(address=address, **({"_node_ip_address": LOOPBACK} if local and address != "auto" else {}),
                       **common)
    except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, AuthenticationError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "auth" in (type(err).__name__ + first).lower() or "token" in first.lower():
            raise _token_error(address, source) from None
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster ({first})") from None
    return Connection(ray.get_runtime_context().gcs_address, False, env, ctx.dashboard_url or None)
