"""The server's CPU time: /proc/<pid>/stat snapshots of every process whose cmdline contains `ubdsrv`
(the daemon and its per-queue processes), taken before and after each fio run in the guest."""

CLK_TCK = 100  # USER_HZ on Linux x86; the guest reports it (getconf CLK_TCK) and the runner checks


def parse_stat(line: str):
    """(pid, comm, starttime, utime+stime in ticks) from one /proc/<pid>/stat line, or None."""
    line = line.strip()
    if not line or "(" not in line or ")" not in line:
        return None
    head, _, rest = line.rpartition(")")
    pid_s, _, comm = head.partition("(")
    f = rest.split()
    try:
        # fields after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime cutime cstime priority nice threads itrealvalue starttime ...
        return int(pid_s), comm, int(f[19]), int(f[11]) + int(f[12])
    except (IndexError, ValueError):
        return None


def parse_snapshot(text: str) -> dict:
    """{(pid, starttime): (comm, ticks)} for every stat line in text."""
    out = {}
    for line in text.splitlines():
        p = parse_stat(line)
        if p:
            out[(p[0], p[2])] = (p[1], p[3])
    return out


def delta(before: str, after: str, clk_tck: int = CLK_TCK) -> dict:
    """CPU seconds used between two snapshots: the total over processes present in both (a process
    that appeared or vanished in between counts from/to zero) and the per-process breakdown by comm."""
    b, a = parse_snapshot(before), parse_snapshot(after)
    per = {}
    for key in set(a) | set(b):
        comm = (a.get(key) or b.get(key))[0]
        ticks = (a[key][1] if key in a else b[key][1]) - (b[key][1] if key in b else 0)
        if key not in a:  # vanished: we cannot know what it used after the first snapshot
            ticks = 0
        name = f"{comm}[{key[0]}]"
        per[name] = max(ticks, 0) / clk_tck
    return {"cpu_s": sum(per.values()), "per_process": dict(sorted(per.items()))}
