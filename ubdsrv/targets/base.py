"""What every target provides, and the user_data layout shared with the queue loop.

A target is one module with one class registered in `targets/__init__.py`, like a target of the
kernel selftests' kublk (`parse_cmd_line`, `usage`, `init_tgt`, `queue_io`, `tgt_io_done`):

    name, help          what `ublk add -t NAME` selects and what `ublk help` says of it
    options             its own command-line options (cliargs.Option: name, kind, default, help);
                        the CLI reads them from `ublk add`'s argv and lists them in `ublk help`
    spec_from_options   validates their values (raising TargetError that names the option) and
                        returns the `spec`: a JSON-able dict, saved for `recover`
    describe            the `target` object `ublk list` prints (ublksrv's keys)

The daemon instantiates the class from the spec, `open()`s it once, then every queue process
`attach()`es it to its ring and buffers and calls `queue_io()` for each request and `io_done()` for
each completion of the target's own SQEs; `close()` when the server exits.

Two shapes are common enough that the queue serves them itself, without calling the target per IO
(under TCG a Python call costs microseconds):
    complete_inline = True    every request completes at once with nr_sectors << 9 (null)
    passthrough_fd = fd       READ/WRITE become IORING_OP_READ/WRITE on fd at the request's offset into
                              the tag's buffer, linked to the commit (loop); other ops go to queue_io
`queue_io` must still handle every op: UBDSRV_INLINE=0 turns both shortcuts off.

user_data of every SQE a queue submits (fits a small int, so no big-int arithmetic per IO):
    ublk commands (FETCH, COMMIT_AND_FETCH, NEED_GET_DATA): the tag alone (< queue depth)
    target SQEs: bits 0-15 tag (TAG_MASK), bits 16-23 an op of the target's choosing, bit 24 TGT_IO
"""
from .. import uapi
from ..cliargs import Option

TAG_MASK = 0xFFFF
OP_SHIFT = 16
OP_MASK = 0xFF
TGT_IO = 1 << 24

#: returned by queue_io/io_done when the request is not finished yet (target SQEs in flight)
QUEUED = None

__all__ = ["Option", "QUEUED", "TAG_MASK", "OP_SHIFT", "OP_MASK", "TGT_IO", "Target", "TargetError",
           "target_op"]


def target_op(user_data):
    """The op a target put in its SQE's user_data (see prep_target)."""
    return (user_data >> OP_SHIFT) & OP_MASK


class TargetError(Exception):
    """Bad target options or an unusable backing store; the message names the option."""


class Target:
    name = ""
    help = ""
    #: its own `ublk add` options (cliargs.Option); names must not clash with the common ones
    options = ()
    #: the queue completes every request itself with nr_sectors << 9 (see the module doc)
    complete_inline = False
    #: set (in open()) to an fd to let the queue turn READ/WRITE into linked read/write SQEs
    passthrough_fd = None
    #: called by the queue before it queues each tag's first FETCH (fault injection), or None
    pre_fetch = None

    # ---- CLI side ----
    @classmethod
    def spec_from_options(cls, values, given):
        """`values`: option name -> value for every option of `options` (defaults filled in);
        `given`: option name -> how the user wrote it (only those given). Validate; return the spec
        (raise TargetError naming the option)."""
        raise NotImplementedError

    @classmethod
    def usage(cls):
        """The lines `ublk help` prints for this target: its options, from `options`."""
        lines = [f"  -t {cls.name}: {cls.help}"]
        for o in cls.options:
            lines.append(f"\t{o.usage():<26} {o.help}{o.default_text()}")
        return lines

    def __init__(self, spec):
        self.spec = spec

    def dev_size(self):
        return self.spec["dev_size"]

    def params(self, info):
        """ublk parameters for SET_PARAMS, given the negotiated DevInfo (a pure function of the spec:
        `list -v` recomputes them)."""
        p = uapi.Params()
        p.types = uapi.UBLK_PARAM_TYPE_BASIC
        p.logical_bs_shift = 9
        p.physical_bs_shift = 12
        p.io_opt_shift = 12
        p.io_min_shift = 9
        p.max_sectors = info.max_io_buf_bytes >> 9
        p.dev_sectors = self.dev_size() >> 9
        return p

    def describe(self):
        """The JSON object `list` prints on the `target` line: ublksrv's base keys. ublksrv's
        targets never set `type` (its tgt_json starts zeroed), so it is 0 for every target."""
        return {"name": self.name, "type": 0, "dev_size": self.dev_size()}

    # ---- daemon side ----
    def open(self, log=None):
        """Acquire backing resources (once, in the daemon, before the queues fork)."""

    def close(self):
        """Release them when the server exits (in the daemon)."""

    def attach(self, q):
        """Bind to one queue (in its process): q.bufs (buffer address per tag), q.q_id, q.desc (the
        descriptor area), and q.prep_target() to queue the target's SQE for a tag."""
        self.q = q

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        """Handle a new request: return its result (bytes done or -errno) or QUEUED after queueing one
        SQE with q.prep_target(tag, ...) (one target SQE per tag in flight)."""
        raise NotImplementedError

    def io_done(self, tag, res, user_data):
        """A target SQE completed: return the request's result or QUEUED (more pending)."""
        return res

    def request(self, tag):
        """(op_flags, nr_sectors, start_sector) of the request in flight on `tag` (from the
        descriptor area, which stays put until the request is committed)."""
        op_flags, nr_sectors, start_sector, _addr = uapi.IO_DESC.unpack_from(self.q.desc, tag * 24)
        return op_flags, nr_sectors, start_sector
