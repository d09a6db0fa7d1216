"""Scenario file -> validated Cases. Every check happens here, before any guest exists.

Order: TOML syntax, top-level keys, [matrix], then per matrix combination: substitute "${param}",
check [devices] and [[steps]] field by field, then walk the step list as the engine would (a device
is added before use, unmounted before delete, deleted by the end) so a mistake costs no boot."""
import copy
import difflib
import itertools
import re
import tomllib
from pathlib import Path

from .. import device
from ..guest import DATA_DIR
from . import schema
from .errors import ScenarioError
from .model import WORK_DIR, Case, Device, Step

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_VARIANTS = 64


def load(path) -> list:
    """All Cases of one scenario file (one per matrix combination). Raises ScenarioError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ScenarioError(path, "", f"cannot read: {e.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(path, "", f"not valid TOML: {e}") from None
    return _Loader(path).cases(doc)


def _suggest(word, options):
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


class _Loader:
    def __init__(self, path: Path):
        self.path = path
        self.variant = ""

    def fail(self, key, message):
        suffix = f" [matrix variant {self.variant}]" if self.variant else ""
        raise ScenarioError(self.path, key, message + suffix)

    # --- generic table check ---------------------------------------------------------------------
    def table(self, value, fields: dict, key: str, what: str) -> dict:
        """Checks one TOML table against a field spec; returns the normalised values with defaults."""
        if not isinstance(value, dict):
            self.fail(key, f"expected a table ({what})")
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k}" if key else k
            spec = fields.get(k)
            if spec is None:
                self.fail(sub, f"unknown key in {what}{_suggest(k, fields)}; "
                               f"expected one of: {', '.join(fields)}")
            if spec.check is None:
                continue  # structured (matrix/devices/steps): checked by the caller
            try:
                out[k] = spec.check(v)
            except schema.Invalid as e:
                self.fail(sub, f"expected {e}, got {v!r}")
        for k, spec in fields.items():
            if k not in value:
                if spec.required:
                    self.fail(f"{key}.{k}" if key else k, f"missing: {what} needs `{k}`")
                if spec.check is not None:
                    out[k] = spec.default
        return out

    # --- whole document --------------------------------------------------------------------------
    def cases(self, doc: dict) -> list:
        for k in doc:  # values are checked per variant, after substitution
            if k not in schema.TOP:
                self.fail(k, f"unknown key in a scenario{_suggest(k, schema.TOP)}; "
                             f"expected one of: {', '.join(schema.TOP)}")
        matrix = self.matrix(doc.get("matrix", {}))
        body = {k: v for k, v in doc.items() if k != "matrix"}
        self.check_placeholders(body, set(matrix))
        names = list(matrix)
        cases = []
        for values in itertools.product(*matrix.values()) if names else [()]:
            variant = dict(zip(names, values))
            self.variant = ",".join(f"{k}={v}" for k, v in variant.items())
            cases.append(self.case(_substitute(copy.deepcopy(body), variant), variant))
        self.variant = ""
        return cases

    def matrix(self, m) -> dict:
        if not isinstance(m, dict):
            self.fail("matrix", "expected a table: parameter = [values...]")
        total = 1
        for k, v in m.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                self.fail(f"matrix.{k}", "expected a parameter name (letters, digits, _)")
            if not isinstance(v, list) or not v or len(v) > 16:
                self.fail(f"matrix.{k}", "expected a list of 1 to 16 values")
            for i, x in enumerate(v):
                if not isinstance(x, (str, int, float, bool)):
                    self.fail(f"matrix.{k}[{i}]", "expected a string, number or boolean")
            if len(set(map(repr, v))) != len(v):
                self.fail(f"matrix.{k}", "expected distinct values")
            total *= len(v)
        if total > MAX_VARIANTS:
            self.fail("matrix", f"expected at most {MAX_VARIANTS} combinations, got {total}")
        return m

    def check_placeholders(self, body, params: set):
        used = set()
        for key, s in _strings(body, ""):
            for name in PLACEHOLDER.findall(s):
                if name not in params:
                    known = ", ".join(sorted(params)) or "none"
                    self.fail(key, f"${{{name}}} is not a [matrix] parameter (defined: {known})")
                used.add(name)
        for name in sorted(params - used):
            self.fail(f"matrix.{name}", f'not used anywhere; refer to it as "${{{name}}}"')

    def case(self, doc: dict, variant: dict) -> Case:
        top = self.table(doc, schema.TOP, "", "a scenario")
        devices = self.devices(doc.get("devices", {}))
        steps = self.steps(doc["steps"], devices)
        jobs = {s.args["job"]: s for s in steps if s.kind == "fio"}
        return Case(scenario=self.path.stem, path=self.path, description=top["description"],
                    variant=variant, devices=devices, steps=tuple(steps), loops=top["loops"],
                    timeout=top["timeout"], jobs=jobs, nightly=top["nightly"])

    # --- devices ---------------------------------------------------------------------------------
    def devices(self, raw) -> dict:
        if not isinstance(raw, dict):
            self.fail("devices", "expected a table of devices: [devices.NAME]")
        out, taken = {}, set()
        for name, t in raw.items():
            key = f"devices.{name}"
            if not re.fullmatch(schema.NAME, name):
                self.fail(key, "expected a device name: a letter, then letters, digits, _ or -")
            v = self.device(t, key)
            if v.get("id") is not None:
                if v["id"] in taken:
                    self.fail(f"{key}.id", f"device number {v['id']} is used twice")
                taken.add(v["id"])
            out[name] = v
        next_id = 0
        devices = {}
        for name, v in out.items():
            target = device.TARGETS[v["target"]]
            if target.ublk and v["id"] is None:
                while next_id in taken:
                    next_id += 1
                v["id"] = next_id
                taken.add(next_id)
            if target.file_backed(v) and v["file"] is None:
                v["file"] = f"{WORK_DIR}/{name}.img"
            opts = {k: v.pop(k) for k in target.options}
            devices[name] = Device(name=name, options=opts, **v)
        return devices

    def device(self, t, key) -> dict:
        """One device table, checked against the settings its target takes (vm/device.py)."""
        if not isinstance(t, dict):
            self.fail(key, "expected a table (a device)")
        if "target" not in t:
            self.fail(f"{key}.target", "missing: a device needs `target` (one of: "
                                       + ", ".join(device.TARGETS) + ")")
        target = self.table({"target": t["target"]}, {"target": schema.DEVICE["target"]}, key,
                            "a device")["target"]
        fields = schema.device_fields(target)
        for k in t:
            if k not in fields and k in schema.DEVICE:
                self.fail(f"{key}.{k}", f"not a {target} setting ({target} takes: "
                                        f"{', '.join(fields)})")
        v = self.table(t, fields, key, f"a {target} device")
        for k, message in device.rules(v, given=t):
            self.fail(f"{key}.{k}", message)
        if target == "kernel_loop" and v["file"] is None:
            # the kernel's loop is set up on a file the scenario names, to compare with a ublk one
            self.fail(f"{key}.file", "missing: a kernel_loop device needs `file`")
        return v

    # --- steps -----------------------------------------------------------------------------------
    def steps(self, raw, devices: dict) -> list:
        if not isinstance(raw, list) or not raw:
            self.fail("steps", "expected a non-empty array of step tables ([[steps]])")
        steps = []
        for i, t in enumerate(raw):
            key = f"steps[{i}]"
            if not isinstance(t, dict):
                self.fail(key, "expected a table with `do = ...`")
            if "do" not in t:
                self.fail(f"{key}.do", "missing: every step needs `do` (one of: "
                                       + ", ".join(schema.STEPS) + ")")
            kind = t["do"]
            if kind not in schema.STEPS:
                self.fail(f"{key}.do", f"unknown step kind {kind!r}{_suggest(kind, schema.STEPS)}; "
                                       f"expected one of: {', '.join(schema.STEPS)}")
            fields = {**schema.COMMON_STEP, **schema.STEPS[kind].fields}
            v = self.table(t, fields, key, f'a "{kind}" step')
            v.pop("do")
            timeout = v.pop("timeout")
            if kind == "fio" and v["job"] is None:
                v["job"] = f"fio{i + 1}"
            if kind == "fio" and v["verify"] != "none":
                # fio verifies after the write pass; a time-based run would never get there
                if "runtime" in t and v["runtime"]:
                    self.fail(f"{key}.runtime", "a verify job runs until `size` is written and "
                                                "read back: give `size`, not `runtime`")
                v["runtime"] = 0.0
            steps.append(Step(index=i, kind=kind, args=v, timeout=timeout))
        _Walk(self, devices).run(steps)
        return [s if s.timeout is not None else
                Step(s.index, s.kind, s.args, self.step_timeout(s, steps)) for s in steps]

    @staticmethod
    def step_timeout(step, steps):
        if step.kind == "wait":
            job = next(s for s in steps if s.kind == "fio" and s.args["job"] == step.args["job"])
            return schema.default_timeout("fio", job.args)
        return schema.default_timeout(step.kind, step.args)


# steps that act on the ublk driver or server, not on a kernel loop device
UBLK_ONLY_STEPS = ("kill", "stop", "cont", "terminate", "recover", "update_size", "quiesce")


class _Walk:
    """Follows the step list as the engine will, to reject lists that cannot work."""

    def __init__(self, loader, devices):
        self.loader = loader
        self.devices = devices
        self.added, self.mounted, self.jobs, self.background = set(), set(), {}, set()
        # write_acked writers running, and those whose manifest a power_cut/reboot has taken
        self.writers, self.cut_writers, self.lost_jobs = set(), set(), set()
        self.deleting = set()   # background deletes not yet waited for (wait_state GONE)

    def fail(self, step, field, message):
        self.loader.fail(f"steps[{step.index}].{field}", f'(do = "{step.kind}") {message}')

    def device(self, step, must_be_added=True):
        name = step.args.get("device")
        if name is None:
            return None
        if name not in self.devices:
            known = ", ".join(self.devices) or "none defined"
            self.fail(step, "device", f"device {name!r} is not defined in [devices] "
                                      f"(defined: {known}){_suggest(name, self.devices)}")
        # the server of a device being deleted in the background can still be signalled
        being_deleted = name in self.deleting and step.kind in ("kill", "stop", "cont")
        if must_be_added and name not in self.added and not being_deleted:
            self.fail(step, "device", f"device {name!r} is not added at this point "
                                      f'(add it first with do = "add")')
        return self.devices[name]

    def run(self, steps):
        for s in steps:
            getattr(self, "step_" + s.kind, self.step_other)(s)
        for name in sorted(self.mounted):
            self.loader.fail("steps", f"device {name!r} is still mounted at the end of the step list "
                                 f'(add do = "umount")')
        for name in sorted(self.added):
            self.loader.fail("steps", f"device {name!r} is still present at the end of the step list "
                                 f'(add do = "delete": the health check requires no device left)')
        for name in sorted(self.deleting):
            self.loader.fail("steps", f"the background delete of {name!r} is never waited for "
                                      '(add do = "wait_state", state = "GONE")')
        for name in sorted(self.writers):
            self.loader.fail("steps", f"write_acked on {name!r} runs until a power_cut or reboot, "
                                      "and none follows it")

    def step_other(self, s):
        d = self.device(s)
        if d and s.kind in UBLK_ONLY_STEPS and not d.is_ublk:
            self.fail(s, "device", f"{s.kind} needs a ublk device; {d.name!r} is {d.target}")
        if s.kind in ("write_files", "checksum", "write_acked", "verify_acked") and \
                d.name not in self.mounted:
            self.fail(s, "device", f'device {d.name!r} is not mounted here (do = "mount" first)')
        if s.kind in ("mkfs", "fsck") and d.name in self.mounted:
            self.fail(s, "device", f"device {d.name!r} is mounted; unmount it first")

    def step_add(self, s):
        d = self.device(s, must_be_added=False)
        if d.name in self.added:
            self.fail(s, "device", f"device {d.name!r} is already added")
        if d.name in self.deleting:
            self.fail(s, "device", f"device {d.name!r} is still being deleted in the background "
                                   '(wait_state GONE first)')
        if s.args["expect"] == "fails":
            if not d.is_ublk:
                self.fail(s, "expect", f'expect = "fails" needs a ublk device; {d.name!r} is {d.target}')
            return          # a failed add leaves no device
        self.added.add(d.name)

    def step_delete(self, s):
        d = self.device(s)
        if d.name in self.mounted:
            self.fail(s, "device", f"device {d.name!r} is still mounted; umount before delete")
        if s.args["background"]:
            if not d.is_ublk:
                self.fail(s, "background", f"a background delete needs a ublk device; {d.name!r} "
                                           f"is {d.target}")
            self.deleting.add(d.name)
        self.added.discard(d.name)

    def step_kill(self, s):
        d = self.device(s)
        self.step_other(s)
        q = s.args["queue"]
        if q is not None and q >= d.queues:
            self.fail(s, "queue", f"expected a queue index below {d.queues} "
                                  f"(device {d.name!r} has {d.queues} queues), got {q}")

    step_stop = step_cont = step_kill

    def step_module_reload(self, s):
        ublk = sorted(n for n in self.added if self.devices[n].is_ublk)
        if ublk:
            self.fail(s, "do", f"ublk_drv cannot unload while a ublk device exists (added: "
                               f"{', '.join(ublk)}); delete them first")

    def step_write_acked(self, s):
        self.step_other(s)
        d = self.devices[s.args["device"]]
        if not d.file:
            self.fail(s, "device", f"device {d.name!r} ({d.target}) keeps no data to check")
        if not d.file.startswith(DATA_DIR + "/"):
            self.fail(s, "device", f"the backing file of {d.name!r} ({d.file}) must be on the data "
                                   f'disk, which survives a power cut: file = "{DATA_DIR}/..."')
        if d.name in self.writers:
            self.fail(s, "device", f"write_acked already runs on {d.name!r}")
        self.writers.add(d.name)

    def step_verify_acked(self, s):
        self.step_other(s)
        if s.args["device"] not in self.cut_writers:
            self.fail(s, "device", f"no write_acked on {s.args['device']!r} before a power_cut or "
                                   "reboot precedes this step")

    def step_power_cut(self, s):
        """What lived in the old boot is gone: devices, mounts, background jobs, writers."""
        self.cut_writers |= self.writers
        self.lost_jobs |= self.background
        for state in (self.writers, self.added, self.mounted, self.background, self.deleting):
            state.clear()

    step_reboot = step_power_cut

    def step_wait_state(self, s):
        d = self.device(s, must_be_added=s.args["state"] != "GONE")
        if not d.is_ublk:
            self.fail(s, "device", f"wait_state needs a ublk device; {d.name!r} is {d.target}")
        if s.args["state"] == "GONE":
            self.deleting.discard(d.name)

    def step_mount(self, s):
        d = self.device(s)
        if d.name in self.mounted:
            self.fail(s, "device", f"device {d.name!r} is already mounted")
        self.mounted.add(d.name)

    def step_umount(self, s):
        d = self.device(s)
        if d.name not in self.mounted:
            self.fail(s, "device", f"device {d.name!r} is not mounted")
        if d.name in self.writers:
            self.fail(s, "device", f"write_acked writes on {d.name!r} until the power_cut or reboot")
        self.mounted.discard(d.name)

    def step_fio(self, s):
        a = s.args
        if (a["device"] is None) == (a["file"] is None):
            self.fail(s, "device", "expected exactly one of `device` and `file`")
        d = self.device(s)
        if d and d.name in self.mounted and a["rw"] not in ("read", "randread"):
            self.fail(s, "device", f"device {d.name!r} is mounted; writing to it would corrupt "
                                   "the filesystem")
        if a["verify"] != "none" and a["rw"] in ("read", "randread"):
            self.fail(s, "verify", "verify needs a writing pattern (write, randwrite, rw, randrw)")
        if a["file"] and a["size"] is None:
            self.fail(s, "size", "missing: fio on a `file` needs `size`")
        if a["job"] in self.jobs:
            self.fail(s, "job", f"job name {a['job']!r} is used twice")
        self.jobs[a["job"]] = s
        if a["background"]:
            self.background.add(a["job"])

    def step_wait(self, s):
        job = s.args["job"]
        if job not in self.jobs:
            self.fail(s, "job", f"no fio step before this one has job = {job!r}")
        if job in self.lost_jobs:
            self.fail(s, "job", f"fio job {job!r} ended with its boot (power_cut or reboot)")
        if job not in self.background:
            self.fail(s, "job", f"fio job {job!r} is not a background job (background = true)"
                                if not self.jobs[job].args["background"] else
                                f"fio job {job!r} is already waited for")
        self.background.discard(job)

    def step_compare(self, s):
        jobs = s.args["jobs"]
        if len(jobs) != 2:
            self.fail(s, "jobs", f"expected two job names, got {len(jobs)}")
        for j in jobs:
            if j not in self.jobs:
                self.fail(s, "jobs", f"no fio step before this one has job = {j!r}")
            if j in self.background:
                self.fail(s, "jobs", f"fio job {j!r} still runs here (wait for it first)")


def _strings(node, key):
    """(key path, string) for every string in a document."""
    if isinstance(node, str):
        yield key, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")


def _substitute(node, variant):
    """"${p}" alone becomes the value itself (so queues = "${queues}" stays an integer);
    inside a longer string it is replaced by its text."""
    if isinstance(node, str):
        m = PLACEHOLDER.fullmatch(node)
        if m:
            return variant[m.group(1)]
        return PLACEHOLDER.sub(lambda m: str(variant[m.group(1)]), node)
    if isinstance(node, dict):
        return {k: _substitute(v, variant) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, variant) for v in node]
    return node
