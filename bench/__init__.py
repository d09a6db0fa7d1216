"""`python -m bench`: the Python ublk server against the kernel null_blk and loop drivers."""
