"""--target: an existing machine instead of booted guests. Parsing of the option and of `vagrant
ssh-config`, the host key checked against known_hosts before anything is pushed (a real paramiko
server on localhost records every command it was asked to run), and the cases a machine cannot run
reported as not applicable."""
import io
import json
import socket
import subprocess
import threading
import time

import paramiko
import pytest

from vm.errors import SetupError
from vm.paths import REPO
from vm.scenario import cli, loader, report, runner, target
from vm.scenario.errors import PANIC, PASSED, SKIPPED
from vm.scenario.progress import Progress
from vm.scenario.result import CaseResult

VAGRANT_SSH_CONFIG = """\
Host default
  HostName 127.0.0.1
  User vagrant
  Port 2200
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "/home/me/my boxes/.vagrant/machines/default/libvirt/private_key"
  IdentityFile /home/me/.vagrant.d/insecure_private_key
  IdentitiesOnly yes
  LogLevel FATAL

Host web
  HostName 192.168.121.7
  User vagrant
  Port 22
  IdentityFile /home/me/web_key
"""


# --- the option ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, user, host, port, known", [
    ("ssh://root@box", "root", "box", 22, "box"),
    ("ssh://tester@10.0.0.5:2222", "tester", "10.0.0.5", 2222, "[10.0.0.5]:2222"),
    ("ssh://root@[::1]:2022", "root", "::1", 2022, "[::1]:2022"),
])
def test_ssh_urls(text, user, host, port, known):
    s = target.parse(text)
    assert (s.user, s.host, s.port, s.vagrant) == (user, host, port, None)
    assert s.known_hosts_name == known


def test_vagrant_forms():
    assert target.parse("vagrant").vagrant == ""
    assert target.parse("vagrant:web").vagrant == "web"


@pytest.mark.parametrize("text, why", [
    ("box", "expected ssh://USER@HOST[:PORT]"),
    ("http://root@box", "expected ssh://USER@HOST[:PORT]"),
    ("ssh://box", "both the user and the host"),
    ("ssh://root@", "both the user and the host"),
    ("ssh://root@box:70000", "port must be a number"),
    ("ssh://root@box:0", "port must be a number"),
    ("ssh://root@box:22x", "port must be a number"),
    ("ssh://root:secret@box", "no password"),
    ("ssh://root@box/var", "nothing may follow"),
    ("vagrant:a b", "vagrant machine name"),
])
def test_bad_urls_say_what_was_expected(text, why):
    with pytest.raises(ValueError) as e:
        target.parse(text)
    assert why in str(e.value) and repr(text) in str(e.value)


def test_bad_url_on_the_command_line_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["run", "kill_daemon", "--target", "ssh://box"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--target" in err and "both the user and the host" in err and "UBD_TARGET" in err


def test_target_from_the_environment(monkeypatch):
    monkeypatch.setenv("UBD_TARGET", "ssh://tester@box:2022")
    monkeypatch.setenv("UBD_KNOWN_HOSTS", "/tmp/kh")
    a = cli.parser().parse_args(["run", "kill_daemon"])
    assert (a.target.user, a.target.host, a.target.port) == ("tester", "box", 2022)
    assert str(a.known_hosts) == "/tmp/kh"


@pytest.mark.parametrize("extra, clash", [
    (["-j", "2"], "-j N"), (["--flavour", "all"], "--flavour all"),
    (["--update-baseline"], "--update-baseline"),
])
def test_one_machine_refuses_what_needs_more(extra, clash, capsys, monkeypatch):
    monkeypatch.setattr(runner.GuestPool, "acquire", lambda *a: pytest.fail("something started"))
    monkeypatch.setattr(target.RemoteMachine, "connect", lambda *a: pytest.fail("connected"))
    assert cli.main(["run", "kill_daemon", "--target", "ssh://root@box", *extra]) == 2
    assert f"not with {clash}" in capsys.readouterr().err


# --- vagrant ssh-config --------------------------------------------------------------------------
def test_vagrant_ssh_config_first_block():
    s = target.parse_ssh_config(VAGRANT_SSH_CONFIG)
    assert (s.user, s.host, s.port) == ("vagrant", "127.0.0.1", 2200)
    assert str(s.identity) == "/home/me/my boxes/.vagrant/machines/default/libvirt/private_key"
    assert s.known_hosts_name == "[127.0.0.1]:2200"


def test_vagrant_ssh_config_without_port_is_an_error():
    with pytest.raises(SetupError) as e:
        target.parse_ssh_config("Host default\n  HostName 1.2.3.4\n  User vagrant\n")
    assert "no port" in str(e.value)


def _fake_vagrant(monkeypatch, returncode, stdout="", stderr=""):
    calls = []
    monkeypatch.setattr(target.shutil, "which", lambda name: f"/usr/bin/{name}")

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)
    return calls, run


def test_vagrant_target_resolves_through_ssh_config(monkeypatch):
    calls, run = _fake_vagrant(monkeypatch, 0, VAGRANT_SSH_CONFIG.split("\n\n")[1])
    s = target.resolve(target.parse("vagrant:web"), run=run)
    assert calls == [["vagrant", "ssh-config", "web"]]
    assert (s.user, s.host, s.port, str(s.identity)) == ("vagrant", "192.168.121.7", 22,
                                                          "/home/me/web_key")
    assert s.where == "vagrant@192.168.121.7"


def test_vagrant_box_not_up(monkeypatch):
    _, run = _fake_vagrant(monkeypatch, 1, stderr="The provider for this Vagrant-managed machine "
                                                   "is reporting that it is not yet ready for SSH.")
    with pytest.raises(SetupError) as e:
        target.resolve(target.parse("vagrant:web"), run=run)
    msg = str(e.value)
    assert "`vagrant ssh-config web` failed" in msg and "`vagrant up web`" in msg
    assert "not yet ready for SSH" in msg


def test_vagrant_missing(monkeypatch):
    monkeypatch.setattr(target.shutil, "which", lambda name: None)
    with pytest.raises(SetupError) as e:
        target.resolve(target.parse("vagrant"), run=lambda *a, **k: pytest.fail("ran vagrant"))
    assert "`vagrant` is not installed" in str(e.value)


# --- host keys: a real SSH server on localhost ---------------------------------------------------
class _Server(paramiko.ServerInterface):
    def __init__(self, log):
        self.log = log

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        self.log.append(("auth", username))
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        self.log.append(("channel", kind))
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        self.log.append(("exec", command.decode()))

        def answer():
            time.sleep(0.1)
            try:
                channel.send_stderr(b"test server runs nothing\n")
                channel.send_exit_status(1)
                channel.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass   # the client went away first
        threading.Thread(target=answer, daemon=True).start()
        return True

    def check_channel_subsystem_request(self, channel, name):
        self.log.append(("subsystem", name))   # sftp: a push
        return False


@pytest.fixture(scope="module")
def keys():
    return paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)


@pytest.fixture
def server(keys, tmp_path):
    """An SSH server on 127.0.0.1 with host key keys[0]; .log lists what clients asked of it."""
    host_key = keys[0]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(0.2)
    log, stop, transports = [], threading.Event(), []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            transports.append(t)
            try:
                t.start_server(server=_Server(log))
            except (paramiko.SSHException, EOFError, OSError):
                pass   # a client that refused our host key hangs up mid-handshake
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    identity = tmp_path / "id_rsa"
    keys[1].write_private_key_file(str(identity))
    srv = type("S", (), {})()
    srv.port, srv.log, srv.identity, srv.host_key = sock.getsockname()[1], log, identity, host_key
    yield srv
    stop.set()
    thread.join(5)
    for t in transports:
        t.close()
    sock.close()


def _machine(server, known_hosts, tmp_path):
    spec = target.parse(f"ssh://root@127.0.0.1:{server.port}")
    return target.RemoteMachine(spec, tmp_path / "run", known_hosts, server.identity)


def _known(tmp_path, name, key) -> str:
    p = tmp_path / "known_hosts"
    p.write_text(f"{name} {key.get_name()} {key.get_base64()}\n")
    return str(p)


def _pushes(log):
    return [e for e in log if e[0] in ("exec", "subsystem")]


def test_unknown_host_refused_before_anything_runs(server, tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(target.RemoteMachine, "push", lambda self, *a: pushed.append(a))
    known = _known(tmp_path, "[127.0.0.1]:1", server.host_key)   # another port: not this host
    m = _machine(server, known, tmp_path)
    with pytest.raises(SetupError) as e:
        m.start()
    msg = str(e.value)
    assert f"root@127.0.0.1:{server.port}" in msg and f"[127.0.0.1]:{server.port}" in msg
    assert f"is not in {known}" in msg and "nothing was pushed" in msg
    assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> {known}" in msg
    assert f"StrictHostKeyChecking=ask root@127.0.0.1`" in msg
    assert _pushes(server.log) == [] and pushed == []
    assert (tmp_path / "known_hosts").read_text().count("\n") == 1   # nothing added


def test_missing_known_hosts_file_is_an_unknown_host(server, tmp_path):
    m = _machine(server, tmp_path / "nothing-here", tmp_path)
    with pytest.raises(SetupError) as e:
        m.connect()
    assert "is not in" in str(e.value) and not (tmp_path / "nothing-here").exists()
    assert _pushes(server.log) == []


def test_changed_host_key_refused_before_anything_runs(server, keys, tmp_path):
    known = _known(tmp_path, f"[127.0.0.1]:{server.port}", keys[1])   # the wrong key
    m = _machine(server, known, tmp_path)
    with pytest.raises(SetupError) as e:
        m.start()
    msg = str(e.value)
    assert "does NOT match" in msg and known in msg and "nothing was pushed" in msg
    assert f"ssh-keygen -R '[127.0.0.1]:{server.port}'" in msg
    assert _pushes(server.log) == [] and ("auth", "root") not in server.log


def test_known_host_gets_as_far_as_running_commands(server, tmp_path):
    """The control of the two above: with the right key the same machine is logged in and asked
    to run its checks (which this server refuses)."""
    known = _known(tmp_path, f"[127.0.0.1]:{server.port}", server.host_key)
    m = _machine(server, known, tmp_path)
    with pytest.raises(SetupError) as e:
        m.connect()
    assert "checking the machine failed" in str(e.value)
    assert ("auth", "root") in server.log
    assert any(kind == "exec" and "uname -r" in cmd for kind, cmd in _pushes(server.log))


def test_non_root_user_runs_commands_under_sudo():
    class Chan:
        def exec_command(self, cmd):
            self.cmd = cmd

    class Transport:
        def open_session(self, timeout=None):
            return Chan()

        def is_active(self):
            return True
    client = target._SudoClient(type("C", (), {"get_transport": lambda self: Transport()})())
    chan = client.get_transport().open_session(timeout=3)
    chan.exec_command("python3 -u /opt/ubd/scenario/agent.py serve")
    assert chan.cmd == "sudo -n python3 -u /opt/ubd/scenario/agent.py serve"
    assert client.get_transport().is_active()


# --- what a machine cannot do --------------------------------------------------------------------
def _unconnected(tmp_path, has_data=False):
    m = target.RemoteMachine(target.parse("ssh://root@box:2022"), tmp_path / "run",
                             tmp_path / "known_hosts")
    m.has_data_dir = has_data
    return m


def test_vm_steps_come_from_the_step_table():
    assert set(target.VM_STEPS) == {"power_cut", "reboot"}


def test_power_cut_not_applicable(tmp_path):
    [case] = loader.load(REPO / "scenarios/power_cut.toml")
    why = _unconnected(tmp_path, has_data=True).not_applicable(case)
    assert why.startswith("not applicable on target root@box:2022: step power_cut needs a VM")


def test_data_disk_case_needs_data_on_the_target(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text('description = "d"\n[devices.ubd]\ntarget = "loop"\nfile = "/data/x.img"\n'
                 '[[steps]]\ndo = "add"\ndevice = "ubd"\n[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    [case] = loader.load(p)
    assert "/data, which the machine does not have" in _unconnected(tmp_path).not_applicable(case)
    assert _unconnected(tmp_path, has_data=True).not_applicable(case) == ""
    [kill] = loader.load(REPO / "scenarios/kill_daemon.toml")[:1]
    assert _unconnected(tmp_path).not_applicable(kill) == ""


def _runner(tmp_path, machine):
    return runner.Runner(runner.RunOptions(target=machine), tmp_path / "run",
                         Progress(io.StringIO(), live=False))


def test_not_applicable_is_a_skip_in_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.GuestPool, "acquire", lambda *a: pytest.fail("asked for a machine"))
    [case] = loader.load(REPO / "scenarios/power_cut.toml")
    res = _runner(tmp_path, _unconnected(tmp_path, has_data=True)).run_case(case)
    assert res.kind == SKIPPED and "power_cut needs a VM" in res.message and not res.failed
    report.write_json(tmp_path, [res], {})
    report.write_junit(tmp_path, [res])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert "power_cut needs a VM" in json.dumps(saved)
    assert "<skipped" in (tmp_path / "junit.xml").read_text()
    assert report.exit_status([res]) == 0
    assert "1 skipped" in report.summary([res], tmp_path, {}, {})


def test_cases_after_a_panic_are_not_applicable(tmp_path, monkeypatch):
    """A target cannot give the fresh kernel a guest would after a panic: later cases say so
    instead of running on it (and nothing is pushed again)."""
    m = _unconnected(tmp_path)
    connects, pushes = [], []
    monkeypatch.setattr(target.RemoteMachine, "connect", lambda self: connects.append(1))
    monkeypatch.setattr(target.RemoteMachine, "push_server", lambda self: pushes.append(1))
    m.case_done(CaseResult(id="ok", scenario="ok", variant={}, description="", kind=PASSED))
    m.start()
    assert pushes == [1]
    m.case_done(CaseResult(id="boom", scenario="boom", variant={}, description="", kind=PANIC))
    [case] = loader.load(REPO / "scenarios/kill_daemon.toml")[:1]
    res = _runner(tmp_path, m).run_case(case)
    assert res.kind == SKIPPED and "boom: kernel panic" in res.message
    assert "fresh kernel" in res.message and pushes == [1]


# --- the machine check on connecting (its commands answered here) --------------------------------
def _probing(tmp_path, monkeypatch, answers):
    """A machine whose exec answers from `answers` (a list of (status, stdout), in order)."""
    from vm.ssh import ExecResult
    m = _unconnected(tmp_path)
    m.spec, m.session = m.given, type("Session", (), {"close": lambda self: None})()
    asked = []

    def exec_(self, command, timeout=60.0, check=False, **kw):
        asked.append(command)
        status, out = answers.pop(0)
        return ExecResult(command, status, out, "", 0.1)
    monkeypatch.setattr(target.RemoteMachine, "exec", exec_)
    return m, asked


def test_probe_reads_release_taint_and_data(tmp_path, monkeypatch):
    m, asked = _probing(tmp_path, monkeypatch, [(0, "6.12.9-test\n0\ndata\n"), (0, "")])
    m._probe()
    assert m.machine.image.kernel_release == "6.12.9-test" and m.has_data_dir and m.taint0 == 0
    assert asked[1].startswith("modprobe ublk_drv")
    assert "connected to root@box:2022 (6.12.9-test, taint 0)" in m.console_log.read_text()


@pytest.mark.parametrize("first, second, why", [
    ("6.1\n0\n/dev/ublkc0\n", "", "ublk devices exist already (/dev/ublkc0)"),
    ("6.1\n0\nmissing fio\n", "", "need fio on the machine"),
    ("6.1\n0\n", None, "its kernel (6.1) has no ublk"),
])
def test_probe_refuses_an_unfit_machine(tmp_path, monkeypatch, first, second, why):
    m, _ = _probing(tmp_path, monkeypatch, [(0, first), (0 if second is not None else 1, "")])
    with pytest.raises(SetupError) as e:
        m._probe()
    assert why in str(e.value)


def test_new_taint_on_reconnecting_spoils_the_machine(tmp_path, monkeypatch):
    m, _ = _probing(tmp_path, monkeypatch, [(0, "6.1\n0\n"), (0, ""), (0, "6.1\n512\n"), (0, "")])
    m._probe()
    assert m.spoiled_by is None
    m._probe()   # a case in between tainted the kernel (512: a warning)
    assert m.spoiled_by == "taint W kernel warning"
    monkeypatch.setattr(target.RemoteMachine, "connect", lambda self: None)
    with pytest.raises(target.NotApplicable) as e:
        m.start()
    assert "fresh kernel" in str(e.value) and m.pushed is False


def test_devices_a_case_left_spoil_the_machine_instead_of_stopping_the_run(tmp_path, monkeypatch):
    m, _ = _probing(tmp_path, monkeypatch, [(0, "6.1\n0\n"), (0, ""),
                                            (0, "6.1\n0\n/dev/ublkc3\n"), (0, "")])
    m._probe()
    m._probe()   # ours now: the first connect found none
    assert m.spoiled_by == "ublk devices left behind: /dev/ublkc3"
