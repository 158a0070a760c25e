"""pyproject lists every package folder (kernels/ is mapped to sparse_rnnt.kernels, so the list is explicit)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {"sparse_rnnt.kernels": "kernels", "sparse_rnnt.csrc": "csrc"}
    found = set()
    for init in ROOT.glob("sparse_rnnt/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for top in ("kernels", "csrc"):
        for init in ROOT.glob(f"{top}/**/__init__.py"):
            found.add(".".join(("sparse_rnnt", *init.parent.relative_to(ROOT).parts)))
    assert listed == found
