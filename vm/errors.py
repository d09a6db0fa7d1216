"""Errors the host side raises. Every BenchError carries a message meant for a user."""


class BenchError(Exception):
    """Bad input or a setup problem: the run cannot go on (exit status 2)."""

    exit_status = 2


class SetupError(BenchError):
    """The host lacks something, or an image build failed."""


class BootTimeout(BenchError):
    """The guest did not answer SSH before the boot deadline."""

    def __init__(self, message, console_tail=""):
        super().__init__(message)
        self.console_tail = console_tail


class GuestLost(BenchError):
    """QEMU went away or the guest stopped answering."""

    def __init__(self, message, console_tail=""):
        super().__init__(message)
        self.console_tail = console_tail


class KernelPanic(GuestLost):
    """The guest kernel panicked; console_tail holds the last console lines."""


class CommandTimeout(BenchError):
    """A guest command did not finish in time and was killed."""

    def __init__(self, message, stdout="", stderr=""):
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class CommandFailed(BenchError):
    """A guest command run with check=True exited non-zero."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result
