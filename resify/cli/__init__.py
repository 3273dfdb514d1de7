"""The command line: ``resify inspect`` and ``resify convert``, a thin click shell over the library.

``commands`` holds the commands, ``flags`` the policy keywords as flags, ``loading`` the MODEL_SPEC
forms, ``export`` the written model (readable source and weights).
"""

from .commands import cli, main

__all__ = ["cli", "main"]
