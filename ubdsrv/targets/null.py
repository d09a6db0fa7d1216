"""null: completes every request at once, without touching data."""
from .base import Option, Target, TargetError

DEFAULT_SIZE = 250 << 30     # ublksrv's null (always this size there)


class NullTarget(Target):
    name = "null"
    help = "completes every request at once; keeps no data"
    options = (
        Option("size", "s", "size", DEFAULT_SIZE, "device size in bytes (K/M/G/T suffixes)", "SIZE"),
    )
    complete_inline = True   # the queue does what queue_io does, without the call

    @classmethod
    def spec_from_options(cls, values, given):
        size = values["size"]
        if size < 512:
            raise TargetError(f"{given.get('size', '-s')} {size}: size must be at least 512 bytes")
        return {"name": cls.name, "dev_size": size // 512 * 512}

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        return nr_sectors << 9
