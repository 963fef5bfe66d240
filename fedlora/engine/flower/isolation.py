"""Flower's simulation in a network namespace of its own: nothing of Ray can be reached from the network.

Ray 2.55's GCS server, raylet and workers bind their gRPC ports to every interface (``0.0.0.0``) whatever
``_node_ip_address`` says (their C++ servers take no bind address), so on a shared host a simulation would
open Ray's unauthenticated cluster API to everyone who can reach the machine. With ``compute.flower_network:
private`` (the default) the simulation runs in a child process that first moves into a new network
namespace (``unshare(CLONE_NEWNET)``; without root, inside a new user namespace too) where the only
interface is loopback, brought up by the child itself; Ray and every process it starts inherit it. The child
is a fresh interpreter running :data:`BOOTSTRAP` (a few lines of ctypes before anything is imported: a user
namespace can only be entered by a process with one thread), then the ``fedlora run`` command.

Where the kernel allows neither (no root, unprivileged user namespaces off), :func:`private_network_available`
says no and the caller runs on the host network with a warning."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from fedlora.config.schema import ExperimentConfig
from fedlora.errors import RunFailed

#: marks the child (already inside its namespace): it runs the simulation itself
INSIDE = "FEDLORA_FLOWER_PRIVATE_NETWORK"

#: Python source run first in the child, with nothing imported yet but the standard library: enter a new
#: network namespace (and a user namespace unless root), bring ``lo`` up, then exec fedlora's command line
#: from ``sys.argv[1:]``; exit code 97 when the kernel refuses
BOOTSTRAP = """
import ctypes, fcntl, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
flags = 0x40000000 if os.geteuid() == 0 else 0x40000000 | 0x10000000
if libc.unshare(flags) != 0:
    print("fedlora: no private network namespace: unshare: " + os.strerror(ctypes.get_errno()), file=sys.stderr)
    sys.exit(97)
if os.geteuid() != 0:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH14x", b"lo", 0)
    up = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, request))[1] | 0x1
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", up))
if sys.argv[1:] == ["--probe"]:
    sys.exit(0)
sys.argv = ["fedlora", *sys.argv[1:]]
from fedlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def inside_private_network() -> bool:
    """Whether this process is the simulation's child, already in its own namespace."""
    return os.environ.get(INSIDE) == "1"


@functools.lru_cache(maxsize=1)
def private_network_available() -> bool:
    """Whether this machine lets a process enter a network namespace of its own (tried once, in a child)."""
    probe = subprocess.run([sys.executable, "-c", BOOTSTRAP, "--probe"], capture_output=True, timeout=60)
    return probe.returncode == 0


def run_in_private_network(cli_args: list[str]) -> int:
    """``fedlora <cli_args>`` in a child inside a private network namespace (marked :data:`INSIDE`, so it runs
    the simulation itself); its exit code."""
    return subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, *cli_args], env={**os.environ, INSIDE: "1"}
    ).returncode


def run_simulation_privately(
    cfg: ExperimentConfig, target: Path, resume: bool, show_progress: bool, stored: ExperimentConfig | None
) -> None:
    """``cfg``'s flower-sim run (or resume, ``stored``: the run's own config) into ``target`` by a child in a
    private network namespace; RunFailed if it does not finish."""
    import tempfile

    from fedlora.config.loader import config_text
    from fedlora.engine.run_folder import config_changes

    flags = [] if show_progress else ["--no-progress"]
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp:
        if resume:
            assert stored is not None
            changes = [f"{k}={json.dumps(v[1])}" for k, v in config_changes(stored, cfg).items()]
            args = ["run", "--resume", str(target), *flags, *changes]
        else:
            path = Path(tmp) / "config.yaml"
            path.write_text(config_text(cfg))
            args = ["run", str(path), "--output", str(target), *flags]
        code = run_in_private_network(args)
    if code != 0:
        raise RunFailed(f"the Flower simulation (in its private network) ended with exit code {code}")
