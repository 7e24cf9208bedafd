"""moeslim: prune experts out of Mixture-of-Experts checkpoints, straight in the safetensors files."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moeslim")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
