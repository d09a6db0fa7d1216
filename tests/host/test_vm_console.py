"""The console excerpt attached to a panic must name the panic, however long the stack dump is."""
from pathlib import Path

from vm.console import console_tail, shows_panic

SYSRQ_PANIC = (Path(__file__).parent.parent / "data/console/sysrq-panic.log").read_text()


def test_a_panic_excerpt_starts_at_the_crash_not_at_the_last_40_lines():
    tail = console_tail(SYSRQ_PANIC)
    assert tail.splitlines()[0].endswith("sysrq: Trigger a crash")
    assert "Kernel panic - not syncing: sysrq triggered crash" in tail
    assert tail.splitlines()[-1].endswith(SYSRQ_PANIC.splitlines()[-1])


def test_without_a_crash_the_excerpt_is_the_last_40_lines():
    text = "\n".join(f"line {i}" for i in range(100))
    assert console_tail(text).splitlines() == [f"line {i}" for i in range(60, 100)]


def test_the_panic_is_recognised_without_the_closing_end_marker():
    # QEMU exits on panic=-1 before the kernel prints "---[ end Kernel panic".
    assert "end Kernel panic" not in SYSRQ_PANIC
    assert shows_panic(SYSRQ_PANIC)
    assert not shows_panic("[ 1.0] sysrq: Show Memory\n")
