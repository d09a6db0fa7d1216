"""--target ssh://: a guest the tests booted stands in for an existing machine. The scenario command
runs on it over SSH without booting QEMU itself; its host key comes from the guest into a
temporary known_hosts, and a wrong or missing entry stops the run before anything is pushed."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vm.paths import REPO

from .ublk_guest import NULL_FIO_SCENARIO

pytestmark = pytest.mark.guest
PUSHED = ("/opt/ubd/ubdsrv", "/opt/ubd/scenario/agent.py")   # the server and the agent


@pytest.fixture(scope="module")
def machine(guest_pool, tmp_path_factory):
    """The shared guest as a target: its URL, the image's client key, a known_hosts with its key."""
    g = guest_pool.get()
    tmp = tmp_path_factory.mktemp("ssh-target")
    host_key = g.exec("cat /etc/ssh/ssh_host_ed25519_key.pub", timeout=30, check=True).stdout.split()
    known = tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{g.machine.port} {host_key[0]} {host_key[1]}\n")
    wrong = tmp / "wrong_known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "other")],
                   check=True)
    other = (tmp / "other.pub").read_text().split()
    wrong.write_text(f"[127.0.0.1]:{g.machine.port} {other[0]} {other[1]}\n")
    yield {"guest": g, "url": f"ssh://root@127.0.0.1:{g.machine.port}", "known": known,
           "wrong": wrong, "key": g.machine.image.client_key, "tmp": tmp}
    if g.is_alive():
        g.push_server()   # the shared guest as the other tests expect it


def _qemus_under(folder) -> list:
    """Command lines of the QEMUs whose files are in folder (a guest the run would have booted)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = proc.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and str(folder).encode() in b" ".join(argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def _run(m, known, results, *names, watch=None):
    """The scenario command against the guest as a target; watch: a list that collects the QEMUs
    started under the run folder while it runs (polled twice a second)."""
    logs = m["tmp"] / f"{Path(results).name}.out", m["tmp"] / f"{Path(results).name}.err"
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "vm.scenario", "run", *names,
                              "--target", m["url"], "--target-identity", str(m["key"]),
                              "--known-hosts", str(known), "--results", str(results)],
                             cwd=REPO, stdout=out, stderr=err, text=True,
                             env={k: v for k, v in os.environ.items()
                                  if not k.startswith("UBD_TARGET")})
        try:
            deadline = time.monotonic() + 900
            while p.poll() is None:
                if watch is not None:
                    watch += _qemus_under(results)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run did not end within 900 s: {p.args}")
                time.sleep(0.5)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, logs[0].read_text(),
                                       logs[1].read_text())


def _remove_pushed(g):
    g.exec("rm -rf " + " ".join(PUSHED), timeout=30, check=True)


def _present(g) -> list:
    return [p for p in PUSHED if g.exec(f"test -e {p}", timeout=30).ok]


def test_wrong_host_key_stops_the_run_before_any_push(machine):
    g = machine["guest"]
    _remove_pushed(g)
    p = _run(machine, machine["wrong"], machine["tmp"] / "wrong", "kill_daemon[target=null]")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = p.stderr
    assert "does NOT match" in err and f"[127.0.0.1]:{g.machine.port}" in err
    assert str(machine["wrong"]) in err and "ssh-keyscan -p" in err
    assert _present(g) == []   # neither the server nor the agent reached the machine
    assert not (machine["tmp"] / "wrong" / "result.json").exists()


def test_unknown_host_stops_the_run_before_any_push(machine):
    g = machine["guest"]
    _remove_pushed(g)
    empty = machine["tmp"] / "empty_known_hosts"
    empty.write_text("")
    p = _run(machine, empty, machine["tmp"] / "unknown", "kill_daemon[target=null]")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"is not in {empty}" in p.stderr
    assert f"ssh-keyscan -p {g.machine.port} 127.0.0.1 >> {empty}" in p.stderr
    assert _present(g) == [] and empty.read_text() == ""   # nothing added either


@pytest.fixture(scope="module")
def target_run(machine):
    g = machine["guest"]
    _remove_pushed(g)
    out = machine["tmp"] / "run"
    qemus = []
    p = _run(machine, machine["known"], out, "kill_daemon[target=null]", "power_cut", watch=qemus)
    doc = json.loads((out / "result.json").read_text())
    return {"p": p, "dir": out, "doc": doc, "qemus": qemus,
            "cases": {c["id"]: c for c in doc["cases"]}, "guest": g}


def test_kill_daemon_passes_on_the_target_without_a_new_guest(target_run):
    p, cases, out = target_run["p"], target_run["cases"], target_run["dir"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    c = cases["kill_daemon[target=null]"]
    assert c["kind"] == "passed", c["message"]
    port = target_run["guest"].machine.port
    assert c["guest"].startswith(f"target root@127.0.0.1:{port}")
    assert not (out / "guests").exists()          # the bench booted no guest of its own
    assert target_run["qemus"] == []              # ... not even for a moment
    doc = target_run["doc"]
    assert doc["target"] == f"ssh://root@127.0.0.1:{port}"   # the run says where it ran
    assert doc["kernel"]["accel"] == f"target ssh://root@127.0.0.1:{port}"
    release = target_run["guest"].exec("uname -r", timeout=30).stdout.strip()
    assert doc["kernel"]["release"] == release
    # what the machine got: the server pushed again, the agent with it
    assert _present(target_run["guest"]) == list(PUSHED)


def test_evidence_from_the_target(target_run):
    c = target_run["cases"]["kill_daemon[target=null]"]
    case_dir = target_run["dir"] / c["dir"]
    server_log = (case_dir / "server.log").read_text()
    assert "==> /var/log/ubdsrv/" in server_log and len(server_log.splitlines()) > 3
    dmesg = (case_dir / "dmesg.txt").read_text()
    assert "I/O error, dev ublkb" in dmesg   # the kill failed IO in flight, as in a guest
    fio = sorted(p.name for p in (case_dir / "fio").glob("*.json"))
    assert fio == ["load-loop1.json", "load-loop2.json", "load-loop3.json"], fio
    for f in fio:   # fio's own error lines (the IO the kill failed) come before its JSON
        text = (case_dir / "fio" / f).read_text()
        assert json.loads(text[text.index("{"):])["jobs"], f   # as agent.fio_summary reads it
    assert len(c["steps"]) == 8 * 3   # every step of every loop ran there


def test_power_cut_is_not_applicable_on_a_target(target_run):
    c = target_run["cases"]["power_cut"]
    assert c["kind"] == "skipped", c
    assert "not applicable on target" in c["message"] and "power_cut needs a VM" in c["message"]
    assert c["steps"] == []
    assert "skipped" in target_run["p"].stdout
    assert "power_cut: SKIP" in target_run["p"].stderr and c["message"] in target_run["p"].stderr
    junit = (target_run["dir"] / "junit.xml").read_text()
    assert 'skipped="1"' in junit and "power_cut needs a VM" in junit


# --- a Vagrant-style machine: `vagrant ssh-config` names a user that is not root --------------------
FAKE_SUDO = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
/* sudo -n CMD...: what the target code asks of sudo, without sudo in the image (setuid root). */
int main(int argc, char **argv) {
    int i = 1;
    if (i < argc && strcmp(argv[i], "-n") == 0) i++;
    if (i >= argc) { fprintf(stderr, "usage: sudo -n CMD...\n"); return 1; }
    if (setgid(0) || setuid(0)) { perror("sudo: setuid"); return 1; }
    setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
    execvp(argv[i], argv + i);
    perror(argv[i]);
    return 127;
}
"""
FAKE_VAGRANT = """#!/bin/sh
[ "$1" = ssh-config ] || {{ echo "fake vagrant: $*" >&2; exit 1; }}
cat <<END
Host default
  HostName 127.0.0.1
  User tester
  Port {port}
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "{key}"
  IdentitiesOnly yes
  LogLevel FATAL
END
"""


@pytest.fixture
def tester(machine):
    """A user `tester` in the guest who logs in with the image's key and has `sudo -n`."""
    g, tmp = machine["guest"], machine["tmp"]
    subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp / "sudo"), "-x", "c", "-"],
                   input=FAKE_SUDO, text=True, check=True)
    g.push(tmp / "sudo", "/usr/local/bin/sudo")
    g.exec("chown 0:0 /usr/local/bin/sudo && chmod 4755 /usr/local/bin/sudo && "
           "{ id tester >/dev/null 2>&1 || useradd -m -s /bin/sh tester; } && "
           "sed -i 's/^tester:!*:/tester:*:/' /etc/shadow && mkdir -p ~tester/.ssh && "
           "cp /root/.ssh/authorized_keys ~tester/.ssh/ && chown -R tester: ~tester/.ssh",
           timeout=60, check=True)
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "vagrant").write_text(FAKE_VAGRANT.format(port=g.machine.port, key=machine["key"]))
    (bin_dir / "vagrant").chmod(0o755)
    wrapper = g.exec("cat /usr/local/bin/ublk", timeout=30, check=True).stdout
    yield bin_dir
    g.exec("rm -f /usr/local/bin/sudo; userdel -r tester 2>/dev/null; true", timeout=60)
    if not g.exec("test -x /usr/local/bin/ublk", timeout=30).ok:   # the image's, as it was
        g.exec("cat > /usr/local/bin/ublk && chmod 755 /usr/local/bin/ublk", timeout=30,
               stdin=wrapper.encode(), check=True)


def test_vagrant_target_with_a_non_root_user(machine, tester):
    g, tmp = machine["guest"], machine["tmp"]
    # tester cannot write where the server goes: the push and every command need sudo
    seen = g.exec("su tester -c 'id -un; test -w /opt/ubd; echo $?'", timeout=30).stdout.split()
    assert seen == ["tester", "1"], seen
    _remove_pushed(g)
    wrapper = g.exec("cat /usr/local/bin/ublk && rm /usr/local/bin/ublk", timeout=30,
                     check=True).stdout   # a machine without the bench's `ublk` gets it
    (tmp / "tiny.toml").write_text(NULL_FIO_SCENARIO)
    out = tmp / "vagrant-run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBD_TARGET")}
    env["PATH"] = f"{tester}:{env['PATH']}"
    p = subprocess.run([sys.executable, "-m", "vm.scenario", "run", str(tmp / "tiny.toml"),
                        "--target", "vagrant", "--known-hosts", str(machine["known"]),
                        "--results", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [c] = json.loads((out / "result.json").read_text())["cases"]
    assert c["kind"] == "passed" and c["guest"].startswith(f"target tester@127.0.0.1:{g.machine.port}")
    # pushed through the user's staging folder, owned by root in place
    owners = g.exec("stat -c %U:%a /opt/ubd/ubdsrv /opt/ubd/scenario/agent.py /usr/local/bin/ublk",
                    timeout=30).stdout.split()
    assert [o.split(":")[0] for o in owners] == ["root"] * 3 and owners[2] == "root:755", owners
    assert g.exec("cat /usr/local/bin/ublk", timeout=30).stdout == wrapper
    assert "==> /var/log/ubdsrv/" in (out / c["dir"] / "server.log").read_text()
    assert list((out / c["dir"] / "fio").glob("short*.json"))
    assert not (out / "guests").exists()
