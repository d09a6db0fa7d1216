"""The guest agent's parsing and its guard on signals, run on the host (it is plain stdlib)."""
import json
import os
import subprocess
import sys
import time

from vm.paths import REPO
from vm.scenario import agent

# agent.py imports the pushed server package (/opt/ubd in the guest); here it is the repo's
AGENT_ENV = dict(os.environ, PYTHONPATH=str(REPO))

LIST = """dev id 0: nr_hw_queues 2 queue_depth 128 block size 512 dev_capacity 2097152
\tmax rq size 524288 daemon pid 1234 state QUIESCED
\tflags 0x4a [ URING_CMD_COMP_IN_TASK RECOVERY CMD_IOCTL_ENCODE ]
\tublkc: 511:0 ublkb: 259:1 owner: 0:0
\tqueue 0: tid 1235 affinity(0 )
\tqueue 1: tid 1236 affinity(1 )
\ttarget {"dev_size":1073741824,"name":"null","type":0}
"""


def test_parse_list_reads_fields_like_the_peers_scripts():
    info = agent.parse_list(LIST)
    assert info == {"state": "QUIESCED", "daemon_pid": 1234, "queue_tids": {0: 1235, 1: 1236}}
    # field positions the peers' awk scripts use: daemon pid = $7, state = $9 of line 2
    fields = LIST.splitlines()[1].split()
    assert (fields[6], fields[8]) == ("1234", "QUIESCED")


def test_parse_list_of_nothing():
    assert agent.parse_list("")["state"] is None


def test_fio_summary_sums_jobs_and_errors(tmp_path):
    f = tmp_path / "fio.json"
    f.write_text("note: some fio warning\n" + json.dumps({"jobs": [
        {"jobname": "a", "error": 0, "read": {"iops": 100.5, "bw": 400}, "write": {"iops": 10, "bw": 40}},
        {"jobname": "b", "error": 5, "read": {"iops": 1, "bw": 4}, "write": {"iops": 0, "bw": 0}}]}))
    s = agent.fio_summary(str(f))
    assert s["parsed"] and s["errors"] == 1 and "job b: error 5" in s["error_text"]
    assert (s["read_iops"], s["write_iops"], s["read_bw_kib"]) == (101.5, 10, 404)


def test_fio_summary_of_a_truncated_file(tmp_path):
    f = tmp_path / "fio.json"
    f.write_text('{"jobs": [')
    assert agent.fio_summary(str(f)) == {"parsed": False, "errors": None}


def test_signal_refuses_pids_that_are_not_the_server():
    for pid in (None, "", "1234", 0, 1, -1, True):
        r = agent.op_signal({"pid": pid, "signal": 9})
        assert r["sent"] is False and "refused" in r["error"], pid
    assert "agent itself" in agent.op_signal({"pid": os.getpid(), "signal": 9})["error"]
    other = subprocess.Popen(["sleep", "30"])
    try:
        r = agent.op_signal({"pid": other.pid, "signal": 9})
        assert not r["sent"] and "not a ubdsrv process" in r["error"]
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    # a shell that merely mentions ubdsrv is not the server either
    sh = subprocess.Popen(["sh", "-c", "sleep 30; echo ubdsrv"])
    try:
        assert not agent.op_signal({"pid": sh.pid, "signal": 9})["sent"]
    finally:
        sh.kill()
        sh.wait()


def test_signal_reaches_a_server_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "ubdsrv"])
    try:
        time.sleep(0.2)
        assert agent.server_pids() and p.pid in [x["pid"] for x in agent.server_pids()]
        r = agent.op_signal({"pid": p.pid, "signal": 15})
        assert r["sent"], r
        assert p.wait(timeout=5) == -15
    finally:
        p.kill()


def test_run_kills_the_process_group_at_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "STATE_DIR", str(tmp_path))
    t0 = time.monotonic()
    r = agent.op_run({"cmd": "sleep 30 & sleep 30; echo never", "timeout": 1})
    assert r["timed_out"] and not r["stuck"] and time.monotonic() - t0 < 10
    assert "never" not in r["stdout"]


def test_background_job_is_reaped_with_its_status(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "JOBS_DIR", str(tmp_path))
    agent.op_spawn({"job": "j", "cmd": "echo hi; exit 3"})
    r = agent.op_reap({"job": "j", "timeout": 10})
    assert (r["status"], r["timed_out"], r["out"].strip()) == (3, False, "hi")
    agent.op_spawn({"job": "slow", "cmd": "sleep 30"})
    r = agent.op_reap({"job": "slow", "timeout": 0.5})
    assert r["timed_out"] and r["status"] == -9


def test_run_does_not_wait_for_daemons_holding_its_output(tmp_path, monkeypatch):
    """Like `ublk add`: the command returns, a daemon it started lives on with the same stdout."""
    monkeypatch.setattr(agent, "STATE_DIR", str(tmp_path))
    t0 = time.monotonic()
    r = agent.op_run({"cmd": "setsid sleep 20 & echo $!", "timeout": 15})
    daemon = int(r["stdout"])
    try:
        assert r["status"] == 0 and time.monotonic() - t0 < 5
        assert os.path.exists(f"/proc/{daemon}")   # still running: we did not wait for it
    finally:
        os.kill(daemon, 9)


def test_serve_answers_one_line_per_request():
    p = subprocess.run([sys.executable, agent.__file__, "serve"], text=True, timeout=30,
                       input='{"op": "run", "cmd": "echo $((6*7))", "timeout": 5}\n{"op": "nope"}\n',
                       capture_output=True, env=AGENT_ENV)
    lines = [json.loads(l) for l in p.stdout.splitlines()]
    assert lines[0]["ready"] and lines[1]["stdout"] == "42\n" and "unknown op" in lines[2]["error"]


def test_call_mode_answers_one_request(tmp_path):
    import base64
    req = base64.b64encode(json.dumps({"op": "ping"}).encode()).decode()
    p = subprocess.run([sys.executable, agent.__file__, "call", req], capture_output=True,
                       text=True, timeout=30, env=AGENT_ENV)
    assert json.loads(p.stdout)["pid"] > 1


def test_write_acked_lists_only_fsynced_files_and_verify_finds_every_loss(tmp_path):
    data, manifest = tmp_path / "acked", tmp_path / "manifest.txt"
    p = subprocess.run([sys.executable, agent.__file__, "write_acked", str(data), str(manifest),
                        "4096", "5"], capture_output=True, text=True, timeout=60, env=AGENT_ENV)
    assert p.returncode == 0, p.stderr
    text = manifest.read_text()
    assert [line.split()[0] for line in text.splitlines()] == [f"f00000{i}" for i in range(1, 6)]
    r = agent.op_verify_acked({"dir": str(data), "manifest": text})
    assert (r["ok"], r["bad"]) == (5, 0)
    (data / "f000002").unlink()                              # lost
    with open(data / "f000003", "r+b") as f:                 # same size, other bytes
        f.write(b"x")
    (data / "f000004").write_bytes((data / "f000004").read_bytes()[:100])   # torn
    r = agent.op_verify_acked({"dir": str(data), "manifest": text})
    assert (r["ok"], r["bad"]) == (2, 3)
    assert r["problems"] == ["f000002: No such file or directory",
                             "f000003: content differs from what was acknowledged",
                             "f000004: 100 bytes, 4096 were acknowledged"]


def test_fio_summary_tells_a_verify_failure_from_an_io_error(tmp_path):
    f = tmp_path / "fio.json"
    f.write_text(json.dumps({"jobs": [{"jobname": "a", "error": 5}]}))
    assert agent.fio_summary(str(f))["verify_failed"] is False
    f.write_text(json.dumps({"jobs": [{"jobname": "a", "error": 5}, {"jobname": "b", "error": 84}]}))
    assert agent.fio_summary(str(f))["verify_failed"] is True


def test_read_text_of_a_missing_manifest(tmp_path):
    assert agent.op_read_text({"path": str(tmp_path / "none")}) == {"missing": True}
    (tmp_path / "m").write_text("a b 1\n")
    assert agent.op_read_text({"path": str(tmp_path / "m")}) == {"missing": False, "text": "a b 1\n"}
