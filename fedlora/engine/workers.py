"""Parallel clients: the sampled clients of a round trained in worker processes (``compute.workers``).

Each worker is a fresh interpreter (``python -m fedlora.engine.workers``: the caller's script is never
re-imported) that builds its own :class:`~fedlora.client.node.ClientNode` from the experiment config once
(model, adapters, data; on its own device with ``compute.devices``) and keeps it for the whole run. A round's
instructions are handed out one client at a time to whichever worker is free, longest expected work first
(:class:`PaddedTokenCost`; with 4 clients of unequal length on 2 workers that ordering is what keeps both
busy until the end). What crosses the process boundary is bytes over two pipes, never pickle: a JSON header
(round, client, the plan of :func:`~fedlora.protocol.plan_to_json`) and the payload as safetensors; the
reply likewise (its metrics in the header, its adapter as safetensors).

The result does not depend on the number of workers or on the order: a client's local round depends only on
its payload, its plan and its seed (run seed, round, client), each worker uses ``client.num_threads``
threads like the in-process path, and replies are collected by client id, not by arrival. Personal state
lives in files under the run folder (:class:`~fedlora.client.store.PersonalStore`), which every worker reads
and writes. A worker that dies (killed, out of memory, a crash in native code) costs its current client
that round: the client is reported as having no reply (the engine logs it as dropped) and a fresh worker
takes the dead one's place. So does a worker that has not replied by the round's client deadline
(:class:`~fedlora.engine.deadline.ClientDeadline`: stopped, hung, swapping): it is killed, its client is left
out with reason ``timeout``, and a fresh worker serves the rest of the run. Requests are written by a short
thread, so a worker that stops reading cannot block the parent either. A stop (SIGINT / SIGTERM, often
sent to the whole process group) is the parent's to act on: workers ignore both signals, and the parent abandons the round (the last checkpoint
stands), so that a stop never writes a round short of a client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from fedlora.adapters.state import from_bytes, to_bytes
from fedlora.config.schema import ClientConfig, ComputeConfig
from fedlora.data.encoding import Encoder, steps_for
from fedlora.data.examples import Federation
from fedlora.engine.deadline import ClientDeadline
from fedlora.engine.node_spec import NodeSpec
from fedlora.engine.transport import RunInterrupted, StopFlag
from fedlora.protocol import (
    ClientInstruction,
    ClientReply,
    read_reply,
    read_request,
    reply_header,
    request_header,
    wire_metrics,
)

log = logging.getLogger(__name__)


def _send(conn: Connection, header: dict[str, Any], payload: bytes = b"") -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(payload)


def _receive(conn: Connection) -> tuple[dict[str, Any], bytes]:
    header = json.loads(conn.recv_bytes().decode())
    return header, conn.recv_bytes()


def worker_main(read_fd: int, write_fd: int) -> None:
    """A worker process: read its setup (config, device, store folder), build the client node once, then
    answer train requests until told to stop or the parent goes away."""
    import torch

    from fedlora.engine.setup import build_client_node
    from fedlora.preflight import prepare_node

    # Ctrl-C, and `kill -- -<group>`, reach the whole process group: the parent decides (it abandons the
    # round, keeps the last checkpoint and closes its workers). A worker killed by the same signal would
    # look like a crashed client, and a round whose last client it was would be written without that
    # client. A worker left alone (its parent killed) ends when its pipe closes.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # the parent already showed the model's loading warnings once; N workers would repeat them N times
    warnings.filterwarnings("ignore", category=FutureWarning)
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    setup, _ = _receive(inbox)
    spec = NodeSpec.model_validate_json(setup["node"])
    spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"device": setup["device"]})})
    try:
        prepare_node(spec.plugins)  # this process's entry: plugins and built-in methods
        torch.set_num_threads(spec.client.num_threads)
        node = build_client_node(spec)
    except Exception as err:  # tell the parent why, then end
        _send(outbox, {"ready": False, "error": f"{type(err).__name__}: {err}"})
        return
    node.use_store(Path(setup["store"]))
    _send(outbox, {"ready": True})
    while True:
        try:
            header, payload = _receive(inbox)
        except EOFError:  # the parent went away
            return
        if header.get("stop"):
            return
        client = int(header["client"])
        try:
            server_round, _, instruction = read_request(header, from_bytes(payload))
            reply = node.train(server_round, client, instruction)
        except Exception as err:  # the client's failure, not the worker's: report it, keep serving
            log.exception("client %d failed", client)
            _send(outbox, {"client": client, "error": f"client error: {type(err).__name__}: {err}"})
            continue
        header = {"client": client, **reply_header(reply), "metrics": wire_metrics(reply.metrics)}
        try:
            _send(outbox, header, to_bytes(reply.payload))
        except BrokenPipeError:  # the parent went away while this client trained
            return


class _Worker:
    """One worker process (``python -m fedlora.engine.workers``: a fresh interpreter that imports nothing
    of the caller's script) and the parent's ends of its two pipes."""

    def __init__(self, node_json: str, device: str, store_folder: Path) -> None:
        self.device = device
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedlora.engine.workers", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)
        _send(self.outbox, {"node": node_json, "device": device, "store": str(store_folder)})
        self.busy: int | None = None  # the client in progress
        self.started = 0.0  # when it was handed out (time.monotonic)
        self.sender: threading.Thread | None = None

    def hand_out(self, client_id: int, header: dict[str, Any], payload: bytes) -> None:
        """Send one client's request from a short thread (a worker that has stopped reading cannot block the
        parent: the deadline kills it, which ends the write with a broken pipe)."""
        self.busy, self.started = client_id, time.monotonic()

        def write() -> None:
            with contextlib.suppress(OSError, ValueError):
                _send(self.outbox, header, payload)

        self.sender = threading.Thread(target=write, name=f"fedlora-send-{client_id}", daemon=True)
        self.sender.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            _send(self.outbox, {"stop": True})
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for conn in (self.inbox, self.outbox):
            with contextlib.suppress(OSError):
                conn.close()


class WorkerPoolTransport:
    """Trains a round's clients on ``len(devices)`` worker processes (a :class:`~fedlora.engine.embedded.
    Transport`)."""

    def __init__(
        self,
        node: NodeSpec,
        deadline: ClientDeadline,
        devices: list[str],
        store_folder: Path,
        status: Callable[[str], None] | None = None,
        stop: StopFlag | None = None,
        cost_of: Callable[[int], float] | None = None,
    ) -> None:
        self.node_json = node.model_dump_json()  # what a worker builds its clients from (never the config)
        self.cost_of = cost_of  # expected work of a client (longest first: less waiting at the round's end)
        self.devices = devices
        self.store_folder = store_folder
        self.status = status or (lambda text: None)
        self.stop = stop if stop is not None else StopFlag()
        self.deadline = deadline
        self.workers: list[_Worker] = []

    def start(self) -> None:
        """Start the workers and wait until each has built its node (the first round would anyway)."""
        if self.workers:
            return
        self.workers = [self._spawn(d) for d in self.devices]
        for worker in self.workers:
            self._await_ready(worker)

    def _spawn(self, device: str) -> _Worker:
        return _Worker(self.node_json, device, self.store_folder)

    def _await_ready(self, worker: _Worker) -> None:
        try:
            header, _ = _receive(worker.inbox)
        except (EOFError, OSError):
            code = worker.process.wait()
            raise RuntimeError(f"a worker process ended while loading the model (exit code {code})") from None
        if not header.get("ready"):
            raise RuntimeError(f"a worker process could not build its clients: {header.get('error')}")

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def train_clients(
        self, server_round: int, instructions: dict[int, ClientInstruction]
    ) -> dict[int, ClientReply | str]:
        self.start()
        pending = list(instructions.items())
        cost_of = self.cost_of
        if cost_of is not None:  # longest-processing-time first (the order does not change any reply)
            pending.sort(key=lambda item: -cost_of(item[0]))
        replies: dict[int, ClientReply | str] = {}
        wire: dict[int, bytes] = {}  # one serialisation per distinct payload (clients often share one)
        while pending or any(w.busy is not None for w in self.workers):
            if self.stop:
                self.close()
                raise RunInterrupted(self.stop.signum or 0, server_round - 1)
            for index, worker in enumerate(self.workers):
                if worker.busy is None and pending:
                    if worker.process.poll() is not None:  # died between rounds: a fresh one takes the client
                        self._replace(worker)
                        worker = self.workers[index]
                    client_id, instruction = pending.pop(0)
                    header = request_header(server_round, client_id, instruction)
                    payload = instruction.payload
                    if id(payload) not in wire:
                        wire[id(payload)] = to_bytes(payload)
                    worker.hand_out(client_id, header, wire[id(payload)])
            busy = [w for w in self.workers if w.busy is not None]
            limit = self.deadline.seconds()
            ready = wait([w.inbox for w in busy], timeout=min(1.0, limit))  # a reply, or EOF: a worker died
            for worker in busy:
                if worker.inbox not in ready:
                    late = worker.busy
                    if late is not None and time.monotonic() - worker.started > limit:
                        replies[late] = self.deadline.reason(limit)
                        log.warning(
                            "round %d: client %d: %s; its worker (pid %d) is replaced",
                            server_round,
                            late,
                            replies[late],
                            worker.process.pid,
                        )
                        self._replace(worker)
                    continue
                answering = worker.busy
                assert answering is not None
                try:
                    header, reply_bytes = _receive(worker.inbox)
                except (EOFError, OSError):  # the process died with this client
                    if self.stop:  # died of the stop asked for (a signal to the whole group): not a crash
                        self.close()
                        raise RunInterrupted(self.stop.signum or 0, server_round - 1) from None
                    code = worker.process.wait()
                    reason = f"worker crashed (exit code {code}): no reply"
                    log.warning(
                        "round %d: client %d: %s; starting a new worker", server_round, answering, reason
                    )
                    replies[answering] = reason
                    self._replace(worker)
                    continue
                worker.busy = None
                self.deadline.record(time.monotonic() - worker.started)
                if "error" in header:
                    replies[answering] = str(header["error"])
                else:
                    payload = from_bytes(reply_bytes)
                    replies[answering] = read_reply(answering, header, payload, header["metrics"])
                self.status(
                    f"round {server_round}: {len(replies)}/{len(instructions)} clients done ({len(self.workers)} workers)"
                )
        return {c: replies[c] for c in instructions if c in replies}

    def _replace(self, worker: _Worker) -> None:
        index = self.workers.index(worker)
        if worker.process.poll() is None:
            worker.process.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
        worker.process.wait()
        if worker.sender is not None:  # a write in progress ends in a broken pipe now the reader is gone
            worker.sender.join(timeout=10)
        worker.close_pipes()
        fresh = self._spawn(worker.device)
        self._await_ready(fresh)
        self.workers[index] = fresh


class PaddedTokenCost:
    """A client's expected local work in a round: steps x batch size x the 90th percentile of its training
    examples' token lengths (a batch costs its rows times its longest row). Encoded once per client."""

    def __init__(self, client: ClientConfig, federation: Federation, encoder: Encoder) -> None:
        self.client = client
        self.clients = {c.client_id: c for c in federation.clients}
        self.encoder = encoder
        self.known: dict[int, float] = {}

    def __call__(self, client_id: int) -> float:
        if client_id not in self.known:
            examples = self.clients[client_id].train
            lengths = sorted(self.encoder.token_count(e) for e in examples) or [0]
            c = self.client
            steps = steps_for(len(examples), c.batch_size, c.local_steps, c.local_epochs)
            self.known[client_id] = (
                steps * min(c.batch_size, len(examples)) * lengths[(len(lengths) - 1) * 9 // 10]
            )
        return self.known[client_id]


def worker_devices(compute: ComputeConfig, count: int) -> list[str]:
    """The device of each worker: ``compute.devices`` (one worker each) or ``count`` workers on
    ``compute.device``."""
    from fedlora.compute import resolve_device

    if compute.devices:
        return [str(resolve_device(d)) for d in compute.devices]
    return [str(resolve_device(compute.device))] * count


def parallel_workers(compute: ComputeConfig, num_parameters: int, per_round: int) -> int:
    """How many worker processes this run uses (1: the clients train in this process)."""
    from fedlora.compute import auto_workers, resolve_device

    if compute.devices:
        return len(compute.devices)
    workers = compute.workers
    if workers == "auto":
        return auto_workers(num_parameters, per_round, resolve_device(compute.device))
    return min(int(workers), per_round)


__all__ = ["PaddedTokenCost", "WorkerPoolTransport", "parallel_workers", "worker_devices", "worker_main"]


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))
