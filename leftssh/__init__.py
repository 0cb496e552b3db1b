"""leftssh: keep a local folder and a folder on an SSH peer in sync."""

import importlib
import sys
import types

__version__ = "0.1.0"


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in for a module until one of its attributes is first used.

    paramiko imports ``invoke`` when it starts, only to run ``Match exec`` lines of
    an ssh_config; that import takes longer than all of leftssh's own modules. With
    this stand-in a run whose config has no ``Match exec`` never loads it, and one
    that has gets the real module at that moment (an ImportError if it is missing).
    """

    def __getattr__(self, attr: str) -> object:
        # Any attribute the stand-in lacks (``run``, or ``__path__`` for a submodule
        # import) loads the real module, which then takes its place in sys.modules.
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


if "invoke" not in sys.modules:
    sys.modules["invoke"] = _ImportedOnFirstUse("invoke")
