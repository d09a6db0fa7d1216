"""Reading the guest's serial console: did the kernel panic, and which lines tell the story."""

# QEMU exits at once on a panic (panic=-1, -no-reboot), so the closing "end Kernel panic" line is
# often never written: the "not syncing" line is the one that is always there.
PANIC_MARKERS = ("Kernel panic - not syncing", "end Kernel panic")

# Where the story of a crash begins: an oops prints these before the final "Kernel panic" line.
CRASH_START = ("BUG:", "Oops", "general protection fault", "sysrq: Trigger a crash", "Kernel panic")


def shows_panic(text: str) -> bool:
    return any(m in text for m in PANIC_MARKERS)


def console_tail(text: str, window=200, keep=60) -> str:
    """The console's last lines, starting at the first crash line among the last `window` lines
    (a panic's stack dump is long; the line that says what happened comes before it). Without a
    crash, the last 40 lines."""
    lines = text.splitlines()[-window:]
    start = next((i for i, l in enumerate(lines) if any(m in l for m in CRASH_START)),
                 max(0, len(lines) - 40))
    return "\n".join(lines[start:start + keep])
