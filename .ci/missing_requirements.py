"""Print the requirements that the distributions installed in DIR declare and the environment does not
meet (DIR first on the path, as the tests will see it), one per line, for pip to add to DIR.

.ci/check.sh installs the newest transformers beside the pinned one with --no-deps (so no install can
pull a torch from the registry), then adds what this prints: a release that starts needing a package
(transformers 5.25 needs `kernels`) is tested with it rather than failing for want of it.
Usage: python .ci/missing_requirements.py DIR
"""

import sys
from importlib.metadata import PackageNotFoundError, distributions, version

from packaging.requirements import Requirement

target = sys.argv[1]
sys.path.insert(0, target)
for dist in distributions(path=[target]):
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's, or another platform's
        try:
            found = version(req.name)
        except PackageNotFoundError:
            found = None
        if found is None or not req.specifier.contains(found, prereleases=True):
            req.marker = None
            print(req)
