"""Environment backends: Docker, libvirt/QEMU and Tart."""
