"""SSH to the guest with paramiko: one connection, pinned host key, exec with deadlines, SFTP."""
import logging
import os
import select
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from .errors import CommandFailed, CommandTimeout, GuestLost

KEEPALIVE_SECONDS = 2
CHUNK = 1 << 16
CONNECT_ATTEMPT_SECONDS = 2.0
# paramiko logs every refused banner of a booting guest with a traceback; failures reach the user
# through our own exceptions instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


@dataclass
class ExecResult:
    command: str
    status: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def ok(self):
        return self.status == 0


def _pinned_host_key(pub_path: Path) -> paramiko.PKey:
    kind, data = pub_path.read_text().split()[:2]
    return paramiko.PKey.from_type_string(kind, __import__("base64").b64decode(data))


class Session:
    def __init__(self, host, port, client_key: Path, host_key_pub: Path, user="root"):
        self.host, self.port, self.user = host, port, user
        self.client_key = paramiko.Ed25519Key.from_private_key_file(str(client_key))
        self.host_key = _pinned_host_key(host_key_pub)
        self.client = None

    def connect(self, timeout=5.0):
        """One attempt; raises on refusal, reset, banner errors (all normal while the guest boots)."""
        client = paramiko.SSHClient()
        # Pin the image's own host key; anything else is rejected, never auto-accepted.
        client.get_host_keys().add(f"[{self.host}]:{self.port}", self.host_key.get_name(),
                                   self.host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(self.host, self.port, username=self.user, pkey=self.client_key,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=False, look_for_keys=False)
        client.get_transport().set_keepalive(KEEPALIVE_SECONDS)
        self.client = client

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def _transport(self):
        t = self.client.get_transport() if self.client else None
        if t is None or not t.is_active():
            raise GuestLost("the SSH connection to the guest is gone")
        return t

    def exec(self, command: str, timeout=60.0, check=False, stdin: bytes = None, on_stdout=None,
             on_stderr=None, alive=None, kill_in_guest=True) -> ExecResult:
        """Runs command in the guest. The guest's `timeout` enforces the deadline on the whole process
        group, so a stuck command is killed there, not only abandoned here. alive() is polled: when it
        says no (QEMU gone), GuestLost is raised at once instead of waiting for the deadline.
        kill_in_guest=False: the deadline is only watched from here (no `timeout` and `sh` started
        in the guest, for a command of shell built-ins that cannot hang)."""
        t0 = time.monotonic()
        wrapped = f"timeout -s KILL {max(1, int(timeout + 0.999))} sh -c {_quote(command)}" \
            if timeout and kill_in_guest else command
        try:
            chan = self._transport().open_session(timeout=10)
            chan.exec_command(wrapped)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise GuestLost(f"could not start a command in the guest: {e}") from e
        out, err = [], []
        deadline = t0 + timeout + 5 if timeout else None
        while True:
            r, _, _ = select.select([chan], [], [], 0.5)
            got = False
            while chan.recv_ready():
                data = chan.recv(CHUNK)
                out.append(data)
                got = True
                if on_stdout:
                    on_stdout(data)
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(CHUNK)
                err.append(data)
                got = True
                if on_stderr:
                    on_stderr(data)
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready() \
                    and chan.eof_received:
                break
            if got:
                continue
            if alive is not None and not alive():
                chan.close()
                raise GuestLost(f"the guest went away while running: {command}")
            if not self._transport_active():
                raise GuestLost(f"the SSH connection dropped while running: {command}")
            if deadline and time.monotonic() > deadline:
                chan.close()
                raise CommandTimeout(f"guest command did not finish within {timeout:g} s (killed): "
                                     f"{command}", _text(out), _text(err))
        status = chan.recv_exit_status()
        chan.close()
        elapsed = time.monotonic() - t0
        # The guest's timeout kills its own process group too: sshd reports a signal death (-1).
        if timeout and kill_in_guest and status in (-1, 124, 137) and elapsed >= timeout - 0.5:
            raise CommandTimeout(f"guest command did not finish within {timeout:g} s (killed): "
                                 f"{command}", _text(out), _text(err))
        result = ExecResult(command, status, _text(out), _text(err), elapsed)
        if check and status != 0:
            raise CommandFailed(f"guest command failed with status {status}: {command}\n"
                                f"{result.stderr.strip()[-2000:]}", result)
        return result

    def _transport_active(self):
        t = self.client.get_transport() if self.client else None
        return t is not None and t.is_active()

    # --- files -----------------------------------------------------------------------------------
    def push(self, local: Path, remote: str):
        """Copies a file or a directory tree (skipping __pycache__) to the guest over SFTP."""
        local = Path(local)
        with self.client.open_sftp() as sftp:
            if local.is_dir():
                for dirpath, dirnames, filenames in os.walk(local):
                    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                    rel = os.path.relpath(dirpath, local)
                    rdir = remote if rel == "." else f"{remote}/{rel}"
                    _sftp_mkdirs(sftp, rdir)
                    for f in filenames:
                        if f.endswith(".pyc"):
                            continue
                        src = os.path.join(dirpath, f)
                        sftp.put(src, f"{rdir}/{f}")
                        sftp.chmod(f"{rdir}/{f}", os.stat(src).st_mode & 0o777)
            else:
                _sftp_mkdirs(sftp, os.path.dirname(remote))
                sftp.put(str(local), remote)
                sftp.chmod(remote, local.stat().st_mode & 0o777)

    def pull(self, remote: str, local: Path):
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.client.open_sftp() as sftp:
            sftp.get(remote, str(local))


def _sftp_mkdirs(sftp, path):
    parts = [p for p in path.split("/") if p]
    cur = ""
    for p in parts:
        cur += "/" + p
        try:
            if not stat.S_ISDIR(sftp.stat(cur).st_mode):
                raise OSError(f"{cur} exists in the guest and is not a directory")
        except FileNotFoundError:
            sftp.mkdir(cur)


def _text(chunks):
    return b"".join(chunks).decode(errors="replace")


def _quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def wait_ready(session: Session, deadline: float, alive, on_fail,
               attempt_seconds=CONNECT_ATTEMPT_SECONDS):
    """Connects, retrying through the resets and banner errors of a booting guest, until deadline
    (monotonic). alive() false → on_fail('exited') is raised; deadline passed → on_fail('timeout').
    attempt_seconds: how long one attempt waits for the banner (longer for a restored guest:
    vm/warm.py CONNECT_SECONDS)."""
    last = None
    while True:
        if not alive():
            raise on_fail("exited", last)
        if time.monotonic() > deadline:
            raise on_fail("timeout", last)
        try:
            session.connect(timeout=max(0.5, min(attempt_seconds, deadline - time.monotonic())))
            return
        except paramiko.BadHostKeyException:
            raise
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as e:
            last = e
            session.close()
            time.sleep(0.2)
