# Minimal stubs for libvirt-python's QEMU-specific module: only what outrunner uses.
from libvirt import virDomain

def qemuAgentCommand(domain: virDomain, cmd: str, timeout: int, flags: int) -> str: ...
