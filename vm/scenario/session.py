"""Host side of the guest agent: one SSH channel to `agent.py serve`, a JSON request/answer per step.

Falls back to one exec per request (`agent.py call`) when the guest object offers no raw channel.
Every wait polls the guest's liveness, so a panic or a dead QEMU is noticed within a second."""
import base64
import json
import select
import time
from pathlib import Path

from ..errors import GuestLost, KernelPanic
from ..console import console_tail, shows_panic

AGENT_LOCAL = Path(__file__).with_name("agent.py")
AGENT_REMOTE = "/opt/ubd/scenario/agent.py"
MARGIN = 20.0   # host waits this much beyond a request's own deadline before calling the agent stuck


class AgentStuck(Exception):
    """The agent did not answer in time: a guest command is wedged beyond its own deadline."""


def guest_lost(guest, why: str) -> GuestLost:
    """GuestLost, or KernelPanic when the console shows one (QEMU exits on panic: give it a moment)."""
    guest.machine.wait_exit(5)
    text = guest.machine.console_text()
    tail = console_tail(text)
    if shows_panic(text):
        return KernelPanic(f"guest kernel panic ({why})", tail)
    return GuestLost(why, tail)


class AgentClient:
    """The host's end of the guest's agent.py: starts it, sends requests, reads the answers."""

    def __init__(self, guest):
        self.guest = guest
        self.chan = None
        self.buf = b""

    def start(self):
        self.guest.push(AGENT_LOCAL, AGENT_REMOTE)
        transport = getattr(getattr(getattr(self.guest, "session", None), "client", None),
                            "get_transport", None)
        if transport is None:
            return  # exec-per-call mode
        try:
            self.chan = transport().open_session(timeout=10)
            self.chan.exec_command(f"python3 -u {AGENT_REMOTE} serve")
        except Exception as e:
            raise guest_lost(self.guest, f"could not start the scenario agent: {e}") from e
        ready = self._read_line(30.0, "starting the agent")
        if not ready.get("ready"):
            raise GuestLost(f"the scenario agent did not start: {ready}")

    def close(self):
        if self.chan is not None:
            try:
                self.chan.close()
            except Exception:
                pass
            self.chan = None

    def call(self, op: str, timeout: float = 60.0, **req) -> dict:
        """Sends one request; `timeout` is the guest-side deadline of the work it starts."""
        req = {"op": op, "timeout": timeout, **req}
        if self.chan is None:
            return self._call_exec(req, timeout)
        try:
            self.chan.sendall((json.dumps(req) + "\n").encode())
        except Exception as e:
            raise guest_lost(self.guest, f"lost the agent channel sending {op}: {e}") from e
        return self._read_line(timeout + MARGIN, op)

    def _call_exec(self, req, timeout):
        b64 = base64.b64encode(json.dumps(req).encode()).decode()
        r = self.guest.exec(f"python3 {AGENT_REMOTE} call {b64}", timeout=timeout + MARGIN)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def _read_line(self, timeout, what) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.chan.recv_ready():
                data = self.chan.recv(1 << 16)
                if not data:
                    raise guest_lost(self.guest, f"the agent channel closed during {what} "
                                                 "(sshd or the agent killed?)")
                self.buf += data
                continue
            if self.chan.exit_status_ready() or self.chan.closed:
                raise guest_lost(self.guest, f"the agent exited during {what}")
            if not self.guest.is_alive():
                raise guest_lost(self.guest, f"QEMU exited during {what}")
            t = self.chan.get_transport() if hasattr(self.chan, "get_transport") else None
            if t is not None and not t.is_active():
                raise guest_lost(self.guest, f"the SSH connection dropped during {what}")
            if time.monotonic() > deadline:
                raise AgentStuck(f"no answer from the guest within {timeout:g} s during {what}")
            select.select([self.chan], [], [], 0.5)
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)
