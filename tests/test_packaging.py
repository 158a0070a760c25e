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


def test_in_memory_paths_run_without_soundfile(tmp_path):
    # The GPU image has no soundfile: training, export, streaming and the kernels must import,
    # and an in-memory stream decode, without it; reading a file then says what is missing.
    import subprocess
    import sys

    script = tmp_path / "nosf.py"
    script.write_text(
        "import sys\n"
        "sys.modules['soundfile'] = None  # import soundfile -> ImportError\n"
        "import torch\n"
        "import sparse_rnnt.export, sparse_rnnt.kernels, sparse_rnnt.streaming, sparse_rnnt.training.trainer\n"
        "from sparse_rnnt.data.audio import load_audio\n"
        "from sparse_rnnt.errors import UserError\n"
        "from sparse_rnnt.model import build_model, model_config\n"
        "from sparse_rnnt.streaming import StreamingDecoder\n"
        "model = build_model(model_config('tiny', transformer_num_layers=1), 12, verbose=False).eval()\n"
        "result = StreamingDecoder(model, None).transcribe(0.1 * torch.randn(8000))\n"
        "assert result.audio_s == 0.5, result.audio_s\n"
        "try:\n"
        "    load_audio('x.flac')\n"
        "except UserError as e:\n"
        "    assert 'needs the soundfile package' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_every_csrc_source_is_package_data():
    # The extensions compile from the installed package's csrc/ (sparse_rnnt.csrc): a source that
    # no package-data pattern matches would be missing from a wheel, and its build would fail.
    from fnmatch import fnmatch

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["sparse_rnnt.csrc"]
    sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))
    assert {"bitmap_spmm.cu", "cpu_spmm.cpp"} <= set(sources)
    assert [s for s in sources if not any(fnmatch(s, pat) for pat in patterns)] == []
