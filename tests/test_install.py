"""``pip install .`` outside the Makefile: a built wheel installs and works from another directory.

The wheel is built from a copy of the source (nothing is written into the checkout), installed with
``--no-deps`` into a fresh venv that sees this environment's packages (torch is not installed again),
and imported from an unrelated working directory: every file of ``rotfn/`` (modules and package data
such as the calibration text) must be in the installed package, and the ``rotfn`` command must run.
"""

import pathlib
import shutil
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = """
import pathlib, sys
import rotfn, rotfn.learn, rotfn._demo
here = pathlib.Path(rotfn.__file__).resolve().parent
assert str(here).startswith(sys.prefix), (here, sys.prefix)  # the installed copy, not the checkout
print(here)
print(len(rotfn.learn.calibration_text()))
batches = rotfn.learn.calibration(lambda s: list(s.encode()), seq_len=64, batch_size=2, n_batches=2)
print(tuple(batches[0]["input_ids"].shape))
"""


def _files(package: pathlib.Path) -> set[str]:
    return {p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _run(argv, **kw):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False, **kw)
    assert done.returncode == 0, f"{argv[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_with_its_package_data_and_runs_from_another_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "rotfn", src / "rotfn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(src)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("rotfn-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # this interpreter is itself a venv: let the new one see its packages too
        site = pathlib.Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
        (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed, chars, shape = _run([str(python), "-c", CHECK], cwd=elsewhere).splitlines()
    assert int(chars) > 10_000 and shape == "(2, 64)"
    missing = _files(ROOT / "rotfn") - _files(pathlib.Path(installed))
    assert not missing, f"files of rotfn/ missing from the wheel (pyproject package-data?): {sorted(missing)}"
    assert "demo" in _run([str(venv / "bin" / "rotfn"), "--help"], cwd=elsewhere)
