"""What every target provides, and the user_data layout shared with the queue loop.

A target is one module with one class registered in `targets/__init__.py`. The CLI builds a `spec`
(a JSON-able dict, saved for `recover`) from the command line; the daemon instantiates the class from
the spec, `open()`s it once, then every queue process `attach()`es it to its ring and buffers and calls
`queue_io()` for each request and `io_done()` for each completion of the target's own SQEs.

Two shapes are common enough that the queue serves them itself, without calling the target per IO
(under TCG a Python call costs microseconds):
    complete_inline = True    every request completes at once with nr_sectors << 9 (null)
    passthrough_fd = fd       READ/WRITE become IORING_OP_READ/WRITE on fd at the request's offset into
                              the tag's buffer, linked to the commit (loop); other ops go to queue_io
`queue_io` must still handle every op: UBDSRV_INLINE=0 turns both shortcuts off.

user_data of every SQE a queue submits (fits a small int, so no big-int arithmetic per IO):
    ublk commands (FETCH, COMMIT_AND_FETCH, NEED_GET_DATA): the tag alone (< queue depth)
    target SQEs: bits 0-15 tag, bits 16-23 op (for debugging), bit 24 TGT_IO
"""
from .. import uapi

TAG_MASK = 0xFFFF
OP_SHIFT = 16
TGT_IO = 1 << 24

#: returned by queue_io/io_done when the request is not finished yet (target SQEs in flight)
QUEUED = None


class TargetError(Exception):
    """Bad target arguments or an unusable backing store; the message names the option."""


class Target:
    name = ""
    type_id = 0
    #: the queue completes every request itself with nr_sectors << 9 (see the module doc)
    complete_inline = False
    #: set (in open()) to an fd to let the queue turn READ/WRITE into linked read/write SQEs
    passthrough_fd = None

    # ---- CLI side ----
    @classmethod
    def spec_from_args(cls, args):
        """Validate the `add` arguments; return the spec dict (raise TargetError naming the option)."""
        raise NotImplementedError

    def __init__(self, spec):
        self.spec = spec

    def dev_size(self):
        return self.spec["dev_size"]

    def params(self, info):
        """ublk parameters for SET_PARAMS, given the negotiated DevInfo."""
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
        """The JSON object `list` prints on the `target` line."""
        return {"name": self.name, "type": self.type_id, "dev_size": self.dev_size()}

    # ---- daemon side ----
    def open(self, log=None):
        """Acquire backing resources (once, in the daemon, before the queues fork)."""

    def close(self):
        pass

    def attach(self, q):
        """Bind to one queue (in its process): q.bufs (buffer address per tag), q.q_id, and
        q.prep_target() to queue the target's SQE for a tag."""
        self.q = q

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        """Handle a new request: return its result (bytes done or -errno) or QUEUED after queueing one
        SQE with q.prep_target(tag, ...) (one target SQE per tag in flight)."""
        raise NotImplementedError

    def io_done(self, tag, res, user_data):
        """A target SQE completed: return the request's result or QUEUED (more pending)."""
        return res
