"""pytest plugin: every scenarios/*.toml is a test file and each matrix variant a test item, so
`pytest scenarios/ -k kill --junitxml=x.xml` works as pytest users expect.

Items share one guest through the engine's own pool (a failure or taint gets a fresh one, as with
`just run`). A malformed file is a collection error naming the file and key. Guest options are the
suite's own (`--flavour`, `--accel`, ..., or UBD_FLAVOUR, ...: vm/options.py); the evidence goes to
<--results>/scenarios."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:   # `pytest scenarios/` without the repo on the path
    sys.path.insert(0, str(HERE.parent))

from vm import options  # noqa: E402
from vm.scenario import baseline, loader, report  # noqa: E402
from vm.scenario.errors import ScenarioError  # noqa: E402
from vm.scenario.progress import Progress  # noqa: E402
from vm.scenario.runner import RunOptions, Runner  # noqa: E402

_RUNNER = pytest.StashKey()


def pytest_addoption(parser):
    options.add_pytest_options(parser)
    g = parser.getgroup("scenarios", "ubd scenario files")
    g.addoption("--scenario-keep", action="store_true",
                help="after a failure keep the guest up and print the ssh command")


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


def _runner(config) -> Runner:
    runner = config.stash.get(_RUNNER, None)
    if runner is None:
        run_dir = options.pytest_run_dir(config) / "scenarios"
        run_dir.mkdir(parents=True, exist_ok=True)
        opts = RunOptions(guest=options.values(config.option), keep=config.option.scenario_keep)
        # pytest captures stdout; progress goes to the terminal only with -s.
        runner = Runner(opts, run_dir, Progress(live=False))
        runner.results = []
        config.stash[_RUNNER] = runner
        config.add_cleanup(lambda: _finish(runner))
    return runner


def _finish(runner):
    """Stop the guest; leave result.json and junit.xml in the run folder, as `just run` does."""
    runner.close()
    guest = runner.opts.guest
    report.write_json(runner.run_dir, runner.results, {"accel": runner.pool.accel_used,
                                                       "flavour": guest["flavour"],
                                                       "kernel_tree": str(guest["kernel_tree"] or "")})
    report.write_junit(runner.run_dir, runner.results)
