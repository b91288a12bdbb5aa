"""A Ray cluster of separate `ray start` nodes, each in its own Linux network namespace.

    with NamespaceCluster(workers=1) as c:          # needs root and iproute2 (`ip netns`)
        c.start_head(num_cpus=8)
        c.start_worker(0, num_cpus=8)
        c.run_in("head", [python, "-c", "..."])      # a driver inside the head's namespace
        c.stop_worker(0)                             # the worker node goes away as on `ray stop`

Topology: the head's namespace holds a bridge with HEAD_IP; every worker namespace gets one end
of a veth pair (the other end is a port of that bridge) and WORKER_IP(i). Nothing is created in
the caller's namespace, so the nodes reach only each other and their own loopback.

Each node's processes are exactly the processes in its namespace (`ip netns pids`), which is
how a node is stopped without touching any other Ray on the machine: `ray stop` would kill
every Ray process of every user, so it is never called here. Cleanup (on any exit, errors
included) terminates every process in the namespaces, then deletes them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

# Namespace names carry the creating process's pid, so a later run can remove what a killed
# (SIGKILL) run left behind: namespaces whose creator is gone.
NAME = re.compile(r"^cineray-(\d+)-[0-9a-f]{4}-(h|w\d+)$")
SUBNET = "10.231.0"
HEAD_IP = f"{SUBNET}.1"
GCS_PORT = 6379


def worker_ip(i: int) -> str:
    return f"{SUBNET}.{i + 2}"


def netns_available() -> str | None:
    """None if network namespaces can be created here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"crprobe{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _pids(netns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def _kill_namespace(netns: str, grace_s: float) -> None:
    """SIGTERM every process in ``netns``, then SIGKILL what is still there after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _pids(netns):
            time.sleep(0.2)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces (and their processes) left by runs whose process no longer exists."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    stale = []
    for line in r.stdout.splitlines():
        m = NAME.match(line.split(" ")[0]) if line else None
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_namespace(m.group(0), grace_s=2.0)
            subprocess.run(["ip", "netns", "del", m.group(0)], capture_output=True)
            stale.append(m.group(0))
    return stale


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class NamespaceCluster:
    """Network namespaces `<prefix>h` (head) and `<prefix>w<i>` (workers) and the Ray nodes in
    them. Use as a context manager: leaving it stops every node and deletes the namespaces."""

    def __init__(self, workers: int = 1, env: dict[str, str] | None = None):
        prefix = f"cineray-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.names = {"head": f"{prefix}-h"}
        self.names.update({f"w{i}": f"{prefix}-w{i}" for i in range(workers)})
        # A short private temp dir: Ray's unix socket paths must stay under ~100 characters,
        # and a private one keeps this cluster's session files apart from any other Ray here.
        self.temp_dir = tempfile.mkdtemp(prefix="crn", dir="/tmp")
        # Loopback-only test cluster: no auth token, no usage stats, no proxies; and never the
        # address of some other Ray this process may know about.
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = {**base, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "NO_PROXY": "*", "no_proxy": "*", **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    # Namespaces ----------------------------------------------------------------------------------
    def __enter__(self) -> NamespaceCluster:
        remove_stale_namespaces()
        # SIGTERM (a CI runner giving up) unwinds like Ctrl-C, so the cleanup below still runs.
        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)

    def _create(self) -> None:
        head = self.names["head"]
        for name in self.names.values():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", head, "link", "add", "br0", "type", "bridge")
        _ip("-n", head, "addr", "add", f"{HEAD_IP}/24", "dev", "br0")
        _ip("-n", head, "link", "set", "br0", "up")
        for i in range(len(self.names) - 1):
            ns, port = self.names[f"w{i}"], f"vw{i}"
            _ip("-n", head, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", head, "link", "set", port, "master", "br0")
            _ip("-n", head, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{worker_ip(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def pids(self, node: str) -> list[int]:
        return _pids(self.names[node])

    def close(self) -> None:
        """Stop every node, delete the namespaces and the temp dir; never raises."""
        for node in list(self.names):
            try:
                self._stop_node(node, grace_s=5.0)
            except Exception as e:  # keep cleaning up the rest
                print(f"cleanup of {node}: {e}", file=sys.stderr)
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _stop_node(self, node: str, grace_s: float) -> None:
        """SIGTERM the node's processes (as `ray stop` does), SIGKILL what is left after grace_s."""
        proc = self.procs.pop(node, None)
        _kill_namespace(self.names[node], grace_s)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    # Ray nodes -----------------------------------------------------------------------------------
    def exec_argv(self, node: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[node], *argv]

    def _start(self, node: str, args: list[str]) -> None:
        log = Path(self.temp_dir) / f"{node}.log"
        self.logs[node] = log
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [ray, "start", "--block", "--disable-usage-stats",
                f"--temp-dir={self.temp_dir}/{node}", *args]
        with open(log, "wb") as out:
            # cwd: relative paths of the nodes' processes (a default storage folder, say) land in
            # the temp dir, not wherever the caller happens to run.
            self.procs[node] = subprocess.Popen(self.exec_argv(node, argv), stdout=out,
                                                stderr=subprocess.STDOUT, env=self.env,
                                                cwd=self.temp_dir)

    def start_head(self, num_cpus: float, object_store_bytes: int = 200 << 20) -> None:
        self._start("head", ["--head", "--include-dashboard=false",
                             f"--node-ip-address={HEAD_IP}", f"--port={GCS_PORT}",
                             f"--num-cpus={num_cpus}",
                             f"--object-store-memory={object_store_bytes}"])

    def start_worker(self, i: int, num_cpus: float, object_store_bytes: int = 200 << 20) -> None:
        self._start(f"w{i}", [f"--address={HEAD_IP}:{GCS_PORT}",
                              f"--node-ip-address={worker_ip(i)}", f"--num-cpus={num_cpus}",
                              f"--object-store-memory={object_store_bytes}"])

    def wait_started(self, node: str, timeout: float) -> float:
        """Block until ``node``'s `ray start` reports the node up; returns the seconds waited.
        A worker must not start before the head has registered in GCS (it exits if so)."""
        t0 = time.monotonic()
        while "Ray runtime started" not in self.log_tail(node, 1 << 16):
            self.check_alive()
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"ray node {node} not up after {timeout:.0f} s:\n"
                                   f"{self.log_tail(node)}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def check_alive(self) -> None:
        """Raise, with its log, if a node's `ray start --block` has exited."""
        for node, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"ray node {node} exited ({proc.returncode}):\n"
                                   f"{self.log_tail(node)}")

    def stop_worker(self, i: int) -> None:
        self._stop_node(f"w{i}", grace_s=10.0)

    def run_in(self, node: str, argv: list[str], timeout: float,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command inside a node's namespace; raise with its output if it fails."""
        r = subprocess.run(self.exec_argv(node, argv), capture_output=True, text=True,
                           timeout=timeout, env={**self.env, **(env or {})})
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} ... in {node} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def start_probe(self, node: str, timeout: float) -> Probe:
        """A tests.infra.probe driver connected to the cluster from inside ``node``'s namespace."""
        argv = [sys.executable, "-m", "tests.infra.probe", "--address", f"{HEAD_IP}:{GCS_PORT}"]
        proc = subprocess.Popen(self.exec_argv(node, argv), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=Path(__file__).resolve().parents[2])
        probe = Probe(proc)
        probe.expect(timeout)  # {"ready": true} once connected
        return probe

    def log_tail(self, node: str, chars: int = 2000) -> str:
        path = self.logs.get(node)
        return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""


class Probe:
    """Client side of tests.infra.probe: one JSON line out, one JSON line back, with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(proc.stderr, None), daemon=True).start()

    def _pump(self, stream, sink) -> None:
        for line in stream:
            if sink is None:
                self.stderr = (self.stderr + [line])[-50:]
            else:
                sink.put(line)
        if sink is not None:
            sink.put(None)

    def expect(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"probe gave no answer in {timeout:.0f} s; stderr:\n"
                               f"{''.join(self.stderr)}") from None
        if line is None:
            raise RuntimeError(f"probe exited ({self.proc.wait()}):\n{''.join(self.stderr)}")
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"probe: {reply['error']}")
        return reply

    def call(self, timeout: float, /, **msg) -> dict:
        """Send one command (see tests.infra.probe); wait at most ``timeout`` s for its reply."""
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.expect(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
