"""Separate hosts on one Linux machine, for tests that need hosts to fail apart.

Each host is a network namespace with one veth link (`eth0`, a 10.x address) to a bridge in a
switch namespace of its own; the root namespace (where the test runs) joins the same bridge as
the gateway address, so the test reaches every host and a host reaches services of the root
namespace through `Relay`. Cutting a host's link takes down the switch's end of its veth: the
host's interface loses its carrier and its packets are dropped silently, as when a cable is
pulled or a switch port dies (not the instant "network unreachable" of a removed address).

Names are unique per run (pid and random bytes) and `Topology.close` removes everything, so a
run that crashed earlier collides with nothing. Needs root and iproute2 (`ip netns`).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dawet.processes import Child

PREFIX = "dwh"  # of every namespace and root-namespace link a topology creates
KILL_TIMEOUT_SECONDS = 10.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ip ARGS`; raise with its stderr if it fails and `check`."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (a skip reason), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}-probe-{os.getpid()}-{secrets.token_hex(2)}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One host: a network namespace, its address, and its link's end on the switch."""

    name: str  # the namespace
    address: str
    switch: str  # the switch namespace
    port: str  # the host's veth end in the switch namespace

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` as run on this host (ip netns exec execs it: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kwargs)

    def child(self, name: str, argv: list[str], env: dict[str, str],
              log_path: Path | None = None) -> Child:
        """A dawet.processes.Child running on this host (not started)."""
        return Child(name, self.argv(argv), env, log_path)

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        return [int(pid) for pid in ip("netns", "pids", self.name).stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process on the host, as a power cut would; returns once none is left
        (a process forking meanwhile is caught by the next round)."""
        deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} on {self.name} survive SIGKILL")
            time.sleep(0.05)

    def cut(self) -> None:
        """Partition the host: its link goes down at the switch."""
        ip("-n", self.switch, "link", "set", self.port, "down")

    def heal(self) -> None:
        ip("-n", self.switch, "link", "set", self.port, "up")


class Topology:
    """Hosts on one /24, joined by a bridge in a switch namespace; the root namespace is the
    gateway (`.1`). Use as a context manager, or call close(): it removes everything."""

    def __init__(self, roles: list[str]):
        self.tag = f"{os.getpid() % 10**6}{secrets.token_hex(1)}"  # in every name
        self.switch = f"{PREFIX}-{self.tag}-switch"
        self.gateway_link = f"{PREFIX}{self.tag}"  # in the root namespace: at most 15 chars
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._build(roles)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def _build(self, roles: list[str]) -> None:
        network = _free_subnet()
        addresses = (str(a) for a in network.hosts())
        self.gateway = next(addresses)
        self._add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        ip("link", "add", self.gateway_link, "type", "veth", "peer", "name", "to-gateway",
           "netns", self.switch)
        self._plug("to-gateway")
        ip("addr", "add", f"{self.gateway}/{network.prefixlen}", "dev", self.gateway_link)
        ip("link", "set", self.gateway_link, "up")
        for role in roles:
            self.hosts[role] = self._add_host(role, next(addresses), network.prefixlen)

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _plug(self, port: str) -> None:
        """Attach a veth end in the switch namespace to the bridge."""
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")

    def _add_host(self, role: str, address: str, prefixlen: int) -> Host:
        name, port = f"{PREFIX}-{self.tag}-{role}", f"to-{role}"[:15]
        self._add_namespace(name)
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", name)
        self._plug(port)
        ip("-n", name, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        return Host(name, address, self.switch, port)

    def close(self) -> None:
        """Kill every process on every host, then remove the namespaces and links."""
        for host in self.hosts.values():
            try:
                host.kill_all()
            except RuntimeError:
                pass  # removing the namespace still detaches what is left of it
        for name in reversed(self._namespaces):
            ip("netns", "del", name, check=False)  # its veths, and their peers, go with it
        ip("link", "del", self.gateway_link, check=False)
        self._namespaces.clear()


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route of the root namespace overlaps (another topology,
    a crashed run's leftovers, the machine's own networks)."""
    taken = [ipaddress.ip_network(line.split()[0], strict=False)
             for line in ip("-4", "route", "show", "table", "all").stdout.splitlines()
             if line.split() and line.split()[0][0].isdigit()]
    while True:
        candidate = ipaddress.ip_network(f"10.{secrets.randbelow(190) + 64}."
                                         f"{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate


class Relay:
    """Serve a root-namespace TCP service (one that listens on loopback only) at the gateway
    address, byte for byte, from threads of this process. The service sees loopback clients;
    a cut host's connections stall at the relay as they would at the service."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self._server = socket.create_server(listen)
        self.address = self._server.getsockname()[:2]
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()  # the service refused: so does the relay
                continue
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), name="relay-pump",
                                 daemon=True).start()

    def close(self) -> None:
        self._closed = True
        for sock in [self._server, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction until either side ends; then end the other direction too."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for sock in (source, sink):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
