"""xenpool: highly available virtual machines on a pool of hypervisor hosts (RSerPool)."""

__version__ = "0.1.0"
