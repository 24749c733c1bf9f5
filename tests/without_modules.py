"""Run a command in a fresh Python process where some modules cannot be imported, as on a
machine that never installed them (a deploying machine has no torch).

Every meta path finder is wrapped so that none of them finds the modules or their
submodules: ``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` returns
None, exactly as for a package that is not installed; everything else imports as usual.
"""
from __future__ import annotations

import subprocess
import sys

_PRELUDE = """\
import sys

class _Without:
    '''Finds what the wrapped finder finds, except {names}.'''

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {names!r}:
            return None
        find = getattr(self.finder, 'find_spec', None)
        return find(name, path, target) if find else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)

sys.meta_path[:] = [_Without(finder) for finder in sys.meta_path]
for _loaded in [m for m in sys.modules if m.split('.')[0] in {names!r}]:
    del sys.modules[_loaded]
"""


def run_without(modules: tuple[str, ...], code: str, args: list, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` (Python source; ``sys.argv[1:]`` is ``args``) with ``modules`` unimportable."""
    source = _PRELUDE.format(names=tuple(modules)) + code
    return subprocess.run([sys.executable, "-c", source, *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=600, **kwargs)
