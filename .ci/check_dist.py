"""CI: the sdist holds every source a CUDA build needs, and the wheel built from it holds the
package as users import it (``vidkern.kernels``, the extension; no top-level ``kernels``)."""
import pathlib
import sys
import tarfile
import zipfile

dist = pathlib.Path(sys.argv[1])
(sdist,) = dist.glob("vidkern-*.tar.gz")
(wheel,) = dist.glob("vidkern-*.whl")
root = pathlib.Path(__file__).resolve().parents[1]
with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
need = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "constraints.txt"}
need |= {str(p.relative_to(root)) for pattern in ("csrc/*.cu", "csrc/*.h", "csrc/*.cpp", "csrc/emulated/*.cpp",
                                                  "kernels/*.py", "vidkern/**/*.py", "tests/*.py")
         for p in root.glob(pattern)}
missing = sorted(need - names)
with zipfile.ZipFile(wheel) as z:
    files = z.namelist()
problems = [f"sdist lacks {m}" for m in missing]
if not any(f.startswith("vidkern/_C") and f.endswith(".so") for f in files):
    problems.append("wheel lacks the CUDA extension vidkern/_C*.so")
# every module of the source tree, as users import it (a package left out of setup.py is caught here)
modules = {str(p.relative_to(root)) for p in root.glob("vidkern/**/*.py")}
modules |= {"vidkern/kernels/" + p.name for p in root.glob("kernels/*.py")}
problems += [f"wheel lacks {m}" for m in sorted(modules - set(files))]
if "vidkern/py.typed" not in files:
    problems.append("wheel lacks vidkern/py.typed (PEP 561 marker)")
for data in ("vidkern/work/sass_sm90.json",):     # the work model's table of the compiled kernels
    if data not in names:
        problems.append(f"sdist lacks {data}")
    if data not in files:
        problems.append(f"wheel lacks {data}")
if any(f.startswith("kernels/") for f in files):
    problems.append("wheel ships a top-level 'kernels' package")
for p in problems:
    print("check_dist:", p)
print(f"check_dist: {sdist.name} ({len(names)} files), {wheel.name} ({len(files)} files): "
      + ("ok" if not problems else f"{len(problems)} problems"))
sys.exit(1 if problems else 0)
