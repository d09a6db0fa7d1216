"""ubdsrv: a Python ublk (ubd) server, standard library only.

Modules: uring (io_uring over ctypes), uapi (ublk_cmd.h), ctrl (control device), queue (per-queue
serving loop), daemon (opener + queue processes), targets/ (null, loop), cli (`ublk` commands)."""
__version__ = "0.1"
