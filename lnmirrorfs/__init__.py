"""lnmirrorfs: a replicating, encrypting, FEC-coding FUSE filesystem for a Lightning node."""

__version__ = "0.1.0"
