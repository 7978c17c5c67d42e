"""The wheel and the editable install both expose tmkt.export, tmkt.runtime and tmkt.hw_profiles."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"tmkt.export": "export", "tmkt.runtime": "runtime", "tmkt.hw_profiles": "hw_profiles"}


def _declared_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_directory_is_declared():
    declared = set(_declared_packages())
    found = {"tmkt." + ".".join(p.parent.relative_to(ROOT / "tmkt").parts) if p.parent != ROOT / "tmkt" else "tmkt"
             for p in (ROOT / "tmkt").rglob("__init__.py")}
    for pkg, folder in MAPPED.items():
        found |= {pkg + ("." + ".".join(p.parent.relative_to(ROOT / folder).parts) if p.parent != ROOT / folder else "")
                  for p in (ROOT / folder).rglob("__init__.py")}
    assert found == declared


def test_editable_install_maps_root_folders():
    import tmkt.export
    import tmkt.hw_profiles
    import tmkt.runtime

    for mod, folder in [(tmkt.export, "export"), (tmkt.runtime, "runtime"), (tmkt.hw_profiles, "hw_profiles")]:
        assert Path(mod.__file__).resolve().parent == ROOT / folder


def test_wheel_contains_and_imports_mapped_packages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("tmkt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in MAPPED:
        assert pkg.replace(".", "/") + "/__init__.py" in names
    tomls = [n for n in names if n.startswith("tmkt/hw_profiles/") and n.endswith(".toml")]
    assert tomls == sorted(n for n in names if n.startswith("tmkt/hw_profiles/") and n.endswith(".toml"))
    assert len(tomls) == len(list((ROOT / "hw_profiles").glob("*.toml")))
    assert not any(n.startswith(("export/", "runtime/", "hw_profiles/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    # The wheel's copy goes first on sys.path: the path finder answers before the editable finder.
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r});"
        "import tmkt.export, tmkt.runtime, tmkt.hw_profiles, tmkt.commands;"
        "print(tmkt.export.__file__); print(tmkt.runtime.__file__); print(tmkt.hw_profiles.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    for line in out.split():
        assert Path(line).resolve().is_relative_to(target.resolve())
