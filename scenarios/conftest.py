"""pytest plugin: every scenarios/*.toml is a test file and each matrix variant a test item, so
`pytest scenarios/ -k kill --junitxml=x.xml` works as pytest users expect.

Items share one guest through the engine's own pool (a failure or taint gets a fresh one, as with
`just run`). A malformed file is a collection error naming the file and key. Guest options are the
suite's own (`--flavour`, `--accel`, ..., or UBD_FLAVOUR, ...: vm/options.py); the evidence goes to
<--results>/scenarios.

`-n N` (pytest-xdist): each worker has its own guests (named after the worker) and writes its part
to scenarios/workers/<id>/; the controller combines the parts into one scenarios/result.json and
junit.xml. `--shard I/N` keeps the cases `run-all --shard I/N` runs."""
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:   # `pytest scenarios/` without the repo on the path
    sys.path.insert(0, str(HERE.parent))

from vm import options  # noqa: E402
from vm.scenario import baseline, kernel_info, loader, report, shard  # noqa: E402
from vm.scenario.errors import ScenarioError  # noqa: E402
from vm.scenario.progress import Progress  # noqa: E402
from vm.scenario.result import CaseResult  # noqa: E402
from vm.scenario.runner import RunOptions, Runner  # noqa: E402

_RUNNER = pytest.StashKey()


def pytest_addoption(parser):
    options.add_pytest_options(parser)
    g = parser.getgroup("scenarios", "ubd scenario files")
    g.addoption("--scenario-keep", action="store_true",
                help="after a failure keep the guest up and print the ssh command")


def pytest_configure(config):
    options.pytest_check(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    options.pytest_configure_node(node)


def pytest_collection_modifyitems(config, items):
    shard.deselect(config, items)


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".toml" and file_path.parent == HERE:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    def collect(self):
        try:
            cases = loader.load(self.path)
        except ScenarioError as e:
            raise self.CollectError(str(e)) from None
        for case in cases:
            yield ScenarioItem.from_parent(self, name=case.id, case=case)


class ScenarioFailed(Exception):
    def __init__(self, result, run_dir):
        super().__init__(result.message)
        self.result, self.run_dir = result, run_dir


class ScenarioItem(pytest.Item):
    def __init__(self, *, case, **kw):
        super().__init__(**kw)
        self.case = case
        self.add_marker("guest")
        if case.nightly:
            self.add_marker("nightly")
        known = _known_failures(self.config).get(case.id)
        if known:   # the kernel's baseline lists it: a failure is expected, a pass is reported
            self.add_marker(pytest.mark.xfail(reason=f"kernel/baselines: {known}", strict=False))

    def runtest(self):
        runner = _runner(self.config)
        res = runner.run_case(self.case)
        runner.results.append(res)
        self.user_properties.append(("result_dir", str(runner.run_dir / res.dir)))
        # which kernel produced it, in the --junitxml report too
        guest = runner.opts.guest
        self.user_properties += [("kernel_release", runner.pool.kernel_release or ""),
                                 ("kernel_flavour", guest["flavour"]),
                                 ("kernel_tree", str(guest["kernel_tree"] or "")),
                                 ("kernel_debug", str(bool(guest["kernel_tree"] and
                                                           guest["kernel_debug"]))),
                                 ("accel", runner.pool.accel_used or "")]
        if not res.passed:
            raise ScenarioFailed(res, runner.run_dir)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ScenarioFailed):
            return report.failure_text(excinfo.value.result, excinfo.value.run_dir)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"scenario {self.case.id}"


def _known_failures(config) -> dict:
    """case id -> reason, from the flavour's baseline; none for a kernel built from a tree."""
    values = options.values(config.option)
    return {} if values.get("kernel_tree") else baseline.load(values["flavour"]).known


def _scenarios_dir(config) -> Path:
    return options.pytest_run_dir(config) / "scenarios"


def _runner(config) -> Runner:
    runner = config.stash.get(_RUNNER, None)
    if runner is None:
        run_dir = _scenarios_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        worker = options.pytest_worker(config)
        opts = RunOptions(guest=options.values(config.option), keep=config.option.scenario_keep,
                          guest_prefix=f"{worker}-" if worker else "")
        # pytest captures stdout; progress goes to the terminal only with -s.
        runner = Runner(opts, run_dir, Progress(live=False))
        runner.results, runner.finished = [], False
        config.stash[_RUNNER] = runner
        config.add_cleanup(lambda: _finish(config, runner))
    return runner


def pytest_sessionfinish(session):
    """A worker writes its part before telling the controller it is done; the controller (or a
    session without xdist) writes the run's result.json and junit.xml."""
    runner = session.config.stash.get(_RUNNER, None)
    if runner is not None:
        _finish(session.config, runner)
    if getattr(session.config.option, "numprocesses", None) and \
            not options.pytest_worker(session.config):
        _combine_parts(_scenarios_dir(session.config))


def _finish(config, runner):
    """Stop the guest; leave result.json and junit.xml in the run folder, as `just run` does (an
    xdist worker in workers/<id>/)."""
    if runner.finished:
        return
    runner.finished = True
    runner.close()
    guest = runner.opts.guest
    kernel = kernel_info.describe(guest, runner.pool.kernel_release, runner.pool.accel_used)
    known = baseline.Baseline(None, {}) if guest["kernel_tree"] else baseline.load(guest["flavour"])
    baseline.apply(runner.results, known)
    worker = options.pytest_worker(config)
    out = runner.run_dir / "workers" / worker if worker else runner.run_dir
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out, runner.results, {"accel": runner.pool.accel_used,
                                            "flavour": guest["flavour"],
                                            "kernel_tree": str(guest["kernel_tree"] or ""),
                                            "debug_kernel": guest["kernel_debug"], "kernel": kernel,
                                            "baseline": str(known.path or ""),
                                            "worker": worker})
    report.write_junit(out, runner.results, kernel=kernel)


def _combine_parts(run_dir: Path):
    """The xdist workers' parts as one result.json and junit.xml, in case id order."""
    parts = sorted((run_dir / "workers").glob("*/result.json")) if run_dir.is_dir() else []
    if not parts:
        return
    docs = [json.loads(p.read_text()) for p in parts]
    results = sorted((CaseResult(**c) for d in docs for c in d["cases"]), key=lambda r: r.id)
    booted = [d for d in docs if d["kernel"]["release"]] or docs
    meta = {k: booted[0][k] for k in ("accel", "flavour", "kernel_tree", "debug_kernel", "kernel",
                                      "baseline")}
    meta["workers"] = [d["worker"] for d in docs]
    report.write_json(run_dir, results, meta)
    report.write_junit(run_dir, results, kernel=meta["kernel"])
