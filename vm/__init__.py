"""Host side of the ubd test bench: guest image, QEMU machine, SSH session."""
