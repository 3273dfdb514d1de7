"""Fail unless the built sdist and wheel carry every module and data file of the work tree's resify/.

Usage: python .ci/check_dist.py DIST_FOLDER (what .ci/setup.sh runs after ``python -m build``).
"""

import sys
import tarfile
import zipfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
wanted = {
    p.relative_to(root).as_posix()
    for p in (root / "resify").rglob("*")
    if p.is_file() and p.suffix in (".py", ".typed")
}
wanted = {w for w in wanted if "__pycache__" not in w}
dist = Path(sys.argv[1])
(wheel,) = dist.glob("resify-*.whl")
(sdist,) = dist.glob("resify-*.tar.gz")
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as tar:
    in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
bad = False
for label, names in (("wheel", in_wheel), ("sdist", in_sdist)):
    missing = sorted(wanted - names)
    if missing:
        bad = True
        print(
            f"check_dist: the {label} lacks {len(missing)} file(s) of resify/: {', '.join(missing[:8])}",
            file=sys.stderr,
        )
if bad:
    sys.exit(1)
print(f"check_dist: wheel and sdist each carry all {len(wanted)} files of resify/")
