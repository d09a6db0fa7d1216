"""Per-device log: $UBDSRV_LOG_DIR/dev<N>.log (default /var/log/ubdsrv), one line per event with a
timestamp and the writing pid; appends are single write(2) calls, so processes can share the file."""
import os
import time

DEFAULT_DIR = "/var/log/ubdsrv"


def log_dir():
    return os.environ.get("UBDSRV_LOG_DIR") or DEFAULT_DIR


def log_path(dev_id):
    return os.path.join(log_dir(), f"dev{dev_id}.log")


class Log:
    def __init__(self, dev_id, role="cli"):
        self.role = role
        self.path = log_path(dev_id)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError:
            self.fd = -1

    def __call__(self, msg):
        if self.fd < 0:
            return
        t = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
        line = f"{stamp} {self.role}[{os.getpid()}] {msg}\n"
        try:
            os.write(self.fd, line.encode(errors="replace"))
        except OSError:
            pass

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
