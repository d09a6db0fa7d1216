"""null: completes every request at once, without touching data."""
from .base import Target, TargetError

DEFAULT_SIZE = 250 << 30


class NullTarget(Target):
    name = "null"
    type_id = 0
    complete_inline = True   # the queue does what queue_io does, without the call

    @classmethod
    def spec_from_args(cls, args):
        size = DEFAULT_SIZE if args.size is None else args.size
        if size < 512:
            raise TargetError(f"-s {size}: size must be at least 512 bytes")
        return {"name": cls.name, "dev_size": size // 512 * 512}

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        return nr_sectors << 9
