"""Deployment on Flower's runtime: write the Flower app folder for a fedlora config, and the commands.

``fedlora flower APP_DIR CONFIG.yaml --run-dir RUNS/x`` writes:

- ``APP_DIR/pyproject.toml``: the Flower app (its ServerApp and ClientApp are fedlora's, its run config holds
  the experiment config as YAML text and the run directory where the server writes metrics, checkpoints
  and the global adapter);
- ``APP_DIR/fedlora_flower_app.py``: the two components;
- ``APP_DIR/flwr-home/config.toml``: the SuperLink connection ``flwr run`` uses (``FLWR_HOME``);

and prints how to start one SuperLink, one SuperNode per client (each with its own ``partition-id`` and
optionally ``rank-budget``) and the run. Insecure mode is only for loopback; with ``--tls DIR`` fedlora makes
a CA, the SuperLink's certificate and one key pair per SuperNode (:mod:`fedlora.engine.flower.tls`) and
prints the secure commands: TLS (``--ssl-*`` on the SuperLink, ``--root-certificates`` on SuperNodes and in
the ``flwr`` connection) and SuperNode authentication (``--enable-supernode-auth``; each node's public key
registered with ``flwr supernode register``; ``--auth-supernode-private-key`` on each SuperNode).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from fedlora.config.loader import dump_config
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.flower import scalar_fields
from fedlora.engine.flower.apps import NODE_KEYS
from fedlora.engine.flower.tls import Credentials

APP_MODULE = "fedlora_flower_app"

APP_CODE = '''"""Flower components of a fedlora experiment (written by `fedlora flower`)."""

from fedlora.runner import flower_client_app, flower_server_app

server_app = flower_server_app()
client_app = flower_client_app()
'''


def app_name(name: str) -> str:
    """A valid Flower app name: a letter first, letters, digits and hyphens, at most 32 characters."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-") or "fedlora"
    if not cleaned[0].isalpha():
        cleaned = "fedlora-" + cleaned
    return cleaned[:32].rstrip("-")


def toml_string(text: str) -> str:
    """A TOML basic string (JSON string escaping is valid TOML)."""
    return json.dumps(text)


def toml_value(value: bool | int | float | str) -> str:
    """A TOML value for a config scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return toml_string(value)


def write_app(
    app_dir: Path,
    cfg: ExperimentConfig,
    run_dir: Path,
    address: str = "127.0.0.1:9093",
    root_certificates: Path | None = None,
    node_keys: dict[int, str] | None = None,
) -> Path:
    """Write the Flower app folder for ``cfg`` (see the module docstring); returns ``app_dir``.

    ``root_certificates``: the CA certificate ``flwr`` verifies the SuperLink with (TLS); None: insecure
    (loopback only). ``node_keys``: partition -> the SuperNode public key bound to it
    (:func:`~fedlora.engine.flower.tls.bound_keys`); each node then proves its partition by signing the
    server's query with its key (``auth-key`` in its ``--node-config``)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, app_dir / "fedlora.yaml")
    config_text = (app_dir / "fedlora.yaml").read_text()
    (app_dir / f"{APP_MODULE}.py").write_text(APP_CODE)
    (app_dir / "pyproject.toml").write_text(
        "\n".join(
            [
                "[build-system]",
                'requires = ["hatchling"]',
                'build-backend = "hatchling.build"',
                "",
                "[project]",
                f'name = "{app_name(cfg.name)}"',
                'version = "1.0.0"',
                'description = "A fedlora experiment on Flower"',
                'license = "Apache-2.0"',
                "dependencies = []  # fedlora is installed on every machine; nothing is installed at run time",
                "",
                "[tool.hatch.build.targets.wheel]",
                f'packages = ["{APP_MODULE}.py"]',
                "",
                "[tool.flwr.app]",
                'publisher = "fedlora"',
                "",
                "[tool.flwr.app.components]",
                f'serverapp = "{APP_MODULE}:server_app"',
                f'clientapp = "{APP_MODULE}:client_app"',
                "",
                "[tool.flwr.app.config]",
                f"fedlora-config = {toml_string(config_text)}",
                f"run-dir = {toml_string(str(run_dir.resolve()))}",
                f"{toml_string(NODE_KEYS)} = {toml_string(json.dumps({str(k): v for k, v in (node_keys or {}).items()}))}",
                "# every scalar field of the config, overridable one by one: flwr run . --run-config 'federation.rounds=3'",
                *(
                    f"{toml_string(key)} = {toml_value(value)}"
                    for key, value in scalar_fields(cfg.model_dump(mode="json")).items()
                ),
                "",
            ]
        )
    )
    home = app_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    security = (
        f"root-certificates = {toml_string(str(root_certificates.resolve()))}\ninsecure = false\n"
        if root_certificates is not None
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedlora"\n\n[superlink.fedlora]\naddress = "{address}"\n{security}'
    )
    return app_dir


def commands(
    app_dir: Path, num_clients: int, superlink_port: int = 9093, credentials: Credentials | None = None
) -> list[str]:
    """The shell commands of a deployment (one line each): insecure on loopback, or with ``credentials``
    TLS and SuperNode authentication (the key of each node registered before it starts)."""
    env = "FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0"
    home = f"FLWR_HOME={app_dir.resolve() / 'flwr-home'}"
    if credentials is None:
        link_security, node_security = "--insecure", lambda i: "--insecure"
    else:
        c = credentials
        link_security = (
            f"--ssl-certfile {c.superlink_cert} --ssl-keyfile {c.superlink_key} --ssl-ca-certfile {c.ca_cert} "
            "--enable-supernode-auth"
        )

        def node_security(i: int) -> str:
            return f"--root-certificates {c.ca_cert} --auth-supernode-private-key {c.node_key(i)}"

    lines = [
        f"{env} flower-superlink {link_security} --host 127.0.0.1 --port {superlink_port} "
        "--disable-runtime-dependency-installation &"
    ]
    if credentials is not None:
        lines += [
            f"{home} {env} flwr supernode register {credentials.node_public_key(i)} fedlora"
            for i in range(num_clients)
        ]
    for client in range(num_clients):
        lines.append(
            f"{env} flower-supernode {node_security(client)} --superlink 127.0.0.1:{superlink_port} "
            f'--port {superlink_port + 10 + client} --node-config "{node_config(client, num_clients, credentials)}" &'
        )
    lines.append(f"{home} {env} fedlora flower-run {app_dir.resolve()}  # flwr run + its log + how it ended")
    return lines


def flwr_run(
    app_dir: Path, env: dict[str, str], cwd: Path, timeout_s: float | None = None, echo: bool = False
) -> subprocess.CompletedProcess[str]:
    """Submit the app (``flwr run APP fedlora``), follow its log (``flwr log RUN --stream``) and read how it
    ended (``flwr ls --run-id RUN``). ``flwr run --stream`` exits 0 even when the ServerApp fails; here the
    return code is 0 only for ``finished:completed``, and the last stderr line says how the run ended.
    ``echo``: the log goes to this process's stdout as it comes (the ``fedlora flower-run`` command)."""
    import time

    def flwr(
        *args: str, stream: bool = False, timeout: float | None = 120
    ) -> subprocess.CompletedProcess[str]:
        if stream and echo:
            proc = subprocess.run(["flwr", *args], env=env, cwd=cwd, text=True, timeout=timeout)
            return subprocess.CompletedProcess(proc.args, proc.returncode, "", "")
        return subprocess.run(
            ["flwr", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    started = flwr("run", str(app_dir), "fedlora", "--format", "json")
    try:
        run_id = str(json.loads(started.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        message = f"flwr run did not start a run: {(started.stdout + started.stderr).strip()[-1000:]}"
        return subprocess.CompletedProcess(started.args, started.returncode or 1, started.stdout, message)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    log = flwr("log", run_id, "fedlora", "--stream", stream=True, timeout=timeout_s)
    status, details = "unknown", ""
    while True:  # the log ends when the run does; its final status may take a moment to be recorded
        listed = flwr("ls", "--run-id", run_id, "--format", "json")
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            row = json.loads(listed.stdout)["runs"][0]
            status, details = str(row["status"]), str(row.get("status-details") or "")
        if status.startswith("finished") or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(1.0)
    code = 0 if status == "finished:completed" else 1
    ended = f"flower run {run_id}: {status}" + (f" ({details})" if details else "")
    return subprocess.CompletedProcess(log.args, code, log.stdout, (log.stderr + "\n" + ended).strip())


def node_config(partition: int, num_partitions: int, credentials: Credentials | None = None) -> str:
    """A SuperNode's ``--node-config``: its partition, and with credentials the key that proves it is its own."""
    text = f"partition-id={partition} num-partitions={num_partitions}"
    return with_auth_key(text, credentials.node_key(partition)) if credentials is not None else text


def with_auth_key(node_config: str, key: Path) -> str:
    """``node_config`` naming the SuperNode key the node signs fedlora's partition query with."""
    return f"{node_config} auth-key='{key.resolve()}'"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackDeployment:
    """One SuperLink and one SuperNode per client on 127.0.0.1 (insecure: loopback only), as processes
    in their own sessions, and ``flwr run`` against them. ``stop()`` ends exactly the process groups it
    started (SuperExec and app processes included). Use as a context manager."""

    def __init__(
        self,
        app_dir: Path,
        node_configs: list[str],
        link_port: int,
        workdir: Path,
        credentials: Credentials | None = None,
        registered: list[int] | None = None,
    ) -> None:
        """``credentials``: TLS and SuperNode authentication; node i uses key i, and only the keys of
        ``registered`` (default: every node) are registered with the SuperLink."""
        import os
        import sys

        self.credentials = credentials
        self.registered = list(range(len(node_configs))) if registered is None else registered
        self.app_dir, self.node_configs, self.link_port, self.workdir = (
            app_dir,
            node_configs,
            link_port,
            workdir,
        )
        bin_dir = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(app_dir / "flwr-home"),
            "HF_HUB_OFFLINE": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self.started: list = []

    def _start(self, args: list[str], log: str) -> None:
        import subprocess

        with open(self.workdir / log, "w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                args,
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)

    def start(self, settle_s: float = 5.0) -> None:
        import subprocess
        import time

        c = self.credentials
        link = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.link_port)]
        if c is None:
            link.append("--insecure")
        else:
            link += ["--ssl-certfile", str(c.superlink_cert), "--ssl-keyfile", str(c.superlink_key)]
            link += ["--ssl-ca-certfile", str(c.ca_cert), "--enable-supernode-auth"]
        self._start([*link, "--disable-runtime-dependency-installation"], "superlink.log")
        time.sleep(settle_s)
        if c is not None:
            for i in self.registered:
                subprocess.run(
                    ["flwr", "supernode", "register", str(c.node_public_key(i)), "fedlora"],
                    env=self.env,
                    cwd=self.workdir,
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
        for i, node_config in enumerate(self.node_configs):
            node = ["flower-supernode", "--superlink", f"127.0.0.1:{self.link_port}"]
            if c is None:
                node.append("--insecure")
            else:
                node += [
                    "--root-certificates",
                    str(c.ca_cert),
                    "--auth-supernode-private-key",
                    str(c.node_key(i)),
                ]
                node_config = with_auth_key(node_config, c.node_key(i))  # proves its partition to fedlora
            self._start(
                [*node, "--port", str(free_port()), "--node-config", node_config], f"supernode{i}.log"
            )

    def run(self, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
        """``flwr run`` of the app, its log, and a non-zero return code unless the run completed."""
        return flwr_run(self.app_dir, self.env, self.workdir, timeout_s)

    def stop(self) -> None:
        import contextlib
        import os
        import signal
        import subprocess
        import time

        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        for proc in self.started:
            while time.time() < deadline + 15:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)

    def __enter__(self) -> LoopbackDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
