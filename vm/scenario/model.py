"""A scenario after loading: validated, variants expanded, defaults filled in. Plain data."""
from dataclasses import dataclass, field
from pathlib import Path

from .. import device

WORK_DIR = "/var/tmp/ubd-scenario"   # guest: backing files, fio output, manifests
MOUNT_DIR = "/mnt"


@dataclass(frozen=True, kw_only=True)
class Device(device.Device):
    """A device of a scenario: the vocabulary's device (vm/device.py) under its scenario name."""
    name: str

    @property
    def mountpoint(self):
        return f"{MOUNT_DIR}/{self.name}"


@dataclass(frozen=True)
class Step:
    index: int             # 0-based position in the step list
    kind: str              # the `do` value
    args: dict             # normalised fields of that kind (defaults filled)
    timeout: float         # per-step deadline, seconds

    def describe(self) -> str:
        a = self.args
        if self.kind == "fio":
            where = a.get("device") or a.get("file")
            bg = " &" if a["background"] else ""
            ver = f" verify={a['verify']}" if a["verify"] != "none" else ""
            return (f"fio {a['job']} {a['rw']} bs={human_size(a['bs'])} qd={a['iodepth']}x{a['numjobs']} "
                    f"on {where}{ver}{bg}")
        if self.kind == "kill":
            import signal
            sig = signal.Signals(a["signal"]).name
            who = f"queue {a['queue']} of " if a.get("queue") is not None else ""
            return f"kill -{sig[3:]} {who}{a['device']}"
        if self.kind == "wait_state":
            return f"wait {a['device']} {a['state']} within {a['within']:g}s"
        if self.kind == "sleep":
            return f"sleep {a['seconds']:g}s"
        if self.kind == "wait":
            return f"wait for fio {a['job']}"
        if self.kind == "shell":
            return f"shell: {a['run'][:50]}"
        if self.kind == "compare":
            return "compare " + " vs ".join(a["jobs"])
        return f"{self.kind} {a.get('device', '')}".strip()


@dataclass(frozen=True)
class Case:
    """One runnable test: a scenario file with one combination of its matrix values."""
    scenario: str          # file stem, e.g. kill_daemon
    path: Path
    description: str
    variant: dict          # matrix parameter -> value; empty without a matrix
    devices: dict          # name -> Device
    steps: tuple           # of Step
    loops: int
    timeout: float
    jobs: dict = field(default_factory=dict)   # fio job name -> its fio Step
    nightly: bool = False  # long: left out of run-all and of the default pytest run

    @property
    def variant_id(self) -> str:
        return ",".join(f"{k}={_fmt(v)}" for k, v in self.variant.items())

    @property
    def id(self) -> str:
        return f"{self.scenario}[{self.variant_id}]" if self.variant else self.scenario

    @property
    def safe_id(self) -> str:
        """For folder names: kill_daemon-target=null."""
        return self.id.replace("[", "-").replace("]", "").replace(",", "-").replace("/", "_")


def human_size(n: int) -> str:
    """4096 -> 4k, 134217728 -> 128M; sizes that are no whole unit stay in bytes."""
    for unit, shift in (("G", 30), ("M", 20), ("k", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _fmt(v):
    if isinstance(v, bool):
        return str(int(v))
    return str(v)
