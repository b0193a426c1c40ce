"""vlmfast: fast fine-tuning and auditing of CLIP-style vision-language models."""

from vlmfast._version import __version__
from vlmfast._dispatch import BackendError

__all__ = ["__version__", "BackendError"]
