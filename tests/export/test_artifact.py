"""Export round trips: the artifact's outputs equal the masked model's; tampering is caught."""

import json

import pytest
import torch

from sparse_rnnt.cli import main
from sparse_rnnt.errors import UserError
from sparse_rnnt.export import ExportOptions, export_checkpoint, load_artifact
from sparse_rnnt.export.artifact import probe_logits, relative_error
from sparse_rnnt.export.formats import project_2to4
from sparse_rnnt.training.inference import load_recognizer
from sparse_rnnt.training.trainer import Trainer
from tests.training.test_prune import _prune_cfg, dense_run  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def pruned(dense_run, tmp_path_factory):  # noqa: F811
    """{"adaptive": unstructured single mask, "nm": 2:4-trained IMP, "dynamic": per-language}."""
    from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
    from sparse_rnnt.pruning.scope import ScopeConfig, select_parameters

    root = tmp_path_factory.mktemp("export_runs")
    # Dynamic pathways starts from different per-language masks (as from LTH masks).
    params = select_parameters(load_recognizer(dense_run).model, ScopeConfig())
    g = torch.Generator().manual_seed(0)
    LanguageMasks({lang: MaskSet({n: torch.rand(p.shape, generator=g) < 0.9 for n, p in params.items()})
                   for lang in ("en", "fr")}).save(root / "init.safetensors")
    runs = {}
    for key, method, extra in (
        ("adaptive", "adaptive", {}),
        ("nm", "imp", {"pruning.granularity": "{kind: nm, n: 2, m: 4}", "pruning.levels": "[0.5]",
                       "pruning.schedule": "oneshot"}),
        ("dynamic", "dynamic-pathways", {"pruning.init_masks": str(root / "init.safetensors"),
                                         "pruning.levels": "[0.5]", "pruning.target_sparsity": 0.5}),
    ):
        cfg = _prune_cfg(dense_run, method, **{"train.max_steps": 3, **extra})
        Trainer(cfg, root / key, init_checkpoint=dense_run).run()
        runs[key] = root / key
    return runs


def _masked_ref(run, language=None):
    rec = load_recognizer(run)
    with rec.masked(language):
        return probe_logits(rec.model, torch.device("cpu"))


@pytest.mark.parametrize("fmt", ["dense", "2:4", "bsr", "bitmap"])
def test_single_pathway_round_trip(fmt, pruned, tmp_path):
    run = pruned["nm"] if fmt == "2:4" else pruned["adaptive"]
    manifest = export_checkpoint(run, tmp_path / "a", ExportOptions(fmt=fmt, language="en"))
    art = load_artifact(tmp_path / "a")
    err = relative_error(probe_logits(art.model, torch.device("cpu")), _masked_ref(run))
    assert err <= 1e-5
    assert manifest["verification"]["max_relative_error"]["en"] == pytest.approx(err, abs=1e-7)
    layers = manifest["layers"]
    rec = load_recognizer(run)
    kept = sum(int(m.sum()) for m in rec.masks.as_dict().values())
    assert manifest["sizes"]["kept"] == kept
    if fmt == "2:4":  # masks trained with 2:4 granularity lose nothing
        assert all(info["lost_l1"] == 0.0 for info in layers.values())
        # values [N, K/2] + 1 bit per weight
        assert manifest["sizes"]["2:4_bytes"] == sum(
            p.numel() // 2 * 4 + p.shape[0] * ((p.shape[1] + 7) // 8)
            for n, p in rec.model.named_parameters() if n in layers)
    if fmt == "bitmap":  # kept values + 1 bit per weight + one int32 offset per 128-weight tile
        assert manifest["sizes"]["bitmap_bytes"] == sum(
            int(rec.masks[n].sum()) * 4 + p.shape[0] * (-(-p.shape[1] // 32)) * 4 + p.shape[0] * (-(-p.shape[1] // 128)) * 4
            for n, p in rec.model.named_parameters() if n in layers)
        assert manifest["sizes"]["bitmap_bytes"] < manifest["sizes"]["dense_bytes"]
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["weight_format"] == fmt and set(on_disk["files"]) >= {"weights.safetensors", "config.json"}


def test_unstructured_mask_projected_to_2to4_reports_loss_and_is_refused(pruned, tmp_path):
    rec = load_recognizer(pruned["adaptive"])
    _, w = next((n, p.detach()) for n, p in rec.model.named_parameters() if n in rec.masks)
    keep, lost = project_2to4(w)
    groups = w.abs().reshape(w.shape[0], -1, 4)
    top2 = groups.sort(dim=-1, descending=True).values[..., :2].sum()
    assert lost == pytest.approx(float(1 - top2 / groups.sum()), rel=1e-5)  # independent: top-2 per group
    assert bool((keep.reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    with pytest.raises(UserError, match=r"export refused.*differ.*--granularity 2:4.*--tolerance"):
        export_checkpoint(pruned["adaptive"], tmp_path / "b", ExportOptions(fmt="2:4"))
    assert not (tmp_path / "b").exists()
    manifest = export_checkpoint(pruned["adaptive"], tmp_path / "c", ExportOptions(fmt="2:4", tolerance=10.0))
    assert any(info["lost_l1"] > 0 for info in manifest["layers"].values())


def test_multilingual_artifact_switches_pathway_without_reloading(pruned, tmp_path):
    run = pruned["dynamic"]
    for fmt in ("dense", "bitmap"):
        export_checkpoint(run, tmp_path / fmt, ExportOptions(fmt=fmt, multilingual=True))
        art = load_artifact(tmp_path / fmt)
        assert art.languages == ["en", "fr"]
        outs = {}
        for lang in ("fr", "en", "fr"):
            art.set_language(lang)
            outs[lang] = probe_logits(art.model, torch.device("cpu"))
            assert relative_error(outs[lang], _masked_ref(run, lang)) <= 1e-5
        rec = load_recognizer(run)
        assert not rec.language_masks["en"].equal(rec.language_masks["fr"])
        assert not torch.allclose(outs["en"], outs["fr"])
        with pytest.raises(UserError, match="no pathway"):
            art.set_language("it")


def test_tampered_artifacts_give_clear_errors(pruned, tmp_path):
    export_checkpoint(pruned["adaptive"], tmp_path / "a", ExportOptions())
    art_dir = tmp_path / "a"
    manifest = json.loads((art_dir / "manifest.json").read_text())

    def rewrite(m):
        (art_dir / "manifest.json").write_text(json.dumps(m))

    (art_dir / "cmvn.safetensors").rename(art_dir / "cmvn.bak")
    with pytest.raises(UserError, match=r"missing file cmvn\.safetensors"):
        load_artifact(art_dir)
    (art_dir / "cmvn.bak").rename(art_dir / "cmvn.safetensors")
    rewrite({**manifest, "files": {**manifest["files"], "../outside": {"sha256": "0"}}})
    with pytest.raises(UserError, match="outside the artifact directory"):
        load_artifact(art_dir)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(art_dir / "weights.safetensors"))
    key = next(k for k in tensors if k.startswith("sparse/"))
    tensors[key] = tensors[key][:-1].contiguous()  # wrong shape
    save_file(tensors, str(art_dir / "weights.safetensors"))
    with pytest.raises(UserError, match="SHA-256"):
        rewrite(manifest)
        load_artifact(art_dir)
    from sparse_rnnt.io import sha256_file

    files = {**manifest["files"], "weights.safetensors": {"sha256": sha256_file(art_dir / "weights.safetensors")}}
    rewrite({**manifest, "files": files})
    with pytest.raises(UserError, match=r"corrupt artifact weights.*shape"):
        load_artifact(art_dir)


def test_export_cli(pruned, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for opt in ("--checkpoint", "--language", "--format", "--out", "--all-languages", "--dtype", "--tolerance"):
        assert opt in text
    assert main(["export", "--checkpoint", str(pruned["dynamic"]), "--out", str(tmp_path / "x")]) == 2
    assert "--language" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(pruned["adaptive"]), "--out", str(tmp_path / "x"),
                 "--language", "it"]) == 2
    assert "not trained on 'it'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", "--checkpoint", str(pruned["dynamic"]), "--out", str(tmp_path / "y"),
                 "--language", "fr"]) == 0
    assert "verified" in capsys.readouterr().out


def _full_utterance_text(art, wave, beam_width=0):
    """Reference: the whole utterance through the artifact model, batched greedy decoding (or
    beam search of ``beam_width``)."""
    from sparse_rnnt.data.features import LogMel
    from sparse_rnnt.model.decoding import beam_search, greedy_search

    feats = art.cmvn.normalize(LogMel(art.features)(wave))
    lengths = torch.tensor([feats.shape[0]])
    with torch.inference_mode():
        if beam_width:
            tokens = beam_search(art.model, feats[None], lengths, beam_width=beam_width)[0]
        else:
            tokens = greedy_search(art.model, feats[None], lengths)[0]
    return art.tokenizer.decode(tokens)


def _lower_blank_bias(art_dir, by=3.0):
    """Make the barely trained model emit tokens (so the comparison is not between empty
    strings): lower the joiner's blank logit in the stored weights and re-hash the file."""
    from safetensors.torch import load_file, save_file

    from sparse_rnnt.io import sha256_file

    path = art_dir / "weights.safetensors"
    tensors = load_file(str(path))
    bias = tensors["dense/rnnt.joiner.linear.bias"]
    bias[-1] -= by  # blank is the last symbol
    save_file(tensors, str(path))
    manifest = json.loads((art_dir / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"]["sha256"] = sha256_file(path)
    (art_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("multilingual", [False, True])
def test_stream_cli_equals_full_utterance_decoding(multilingual, pruned, tiny_manifests, tmp_path, capsys):
    from sparse_rnnt.data.manifest import load_split
    from sparse_rnnt.streaming.files import read_wave

    run = pruned["dynamic"]
    opts = ExportOptions(multilingual=True) if multilingual else ExportOptions(language="fr")
    export_checkpoint(run, tmp_path / "art", opts)
    _lower_blank_bias(tmp_path / "art")
    utts = [u for u in load_split(tiny_manifests, "test") if u.language == "fr"][:3]
    art = load_artifact(tmp_path / "art")
    art.set_language("fr")
    expected = [_full_utterance_text(art, read_wave(u.audio)) for u in utts]
    assert any(expected)  # the model emits text: the comparison is not between empty strings
    args = ["stream", "--artifact", str(tmp_path / "art"), *[u.audio for u in utts], "--chunk-ms", "70"]
    if multilingual:
        assert main(args) == 2  # several pathways: the language must be named
        assert "--language" in capsys.readouterr().err
        args += ["--language", "fr"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    finals = [line for line in out if "(audio " in line]
    assert len(finals) == 3
    for line, u, text in zip(finals, utts, expected, strict=True):
        assert line.startswith(f"{u.audio}: {text}  (audio ")
    assert "latency p50" in out[-1]


def test_stream_cli_beam_equals_full_utterance_beam(pruned, tmp_path, tiny_manifests, capsys):
    from sparse_rnnt.data.manifest import load_split
    from sparse_rnnt.streaming.files import read_wave

    export_checkpoint(pruned["dynamic"], tmp_path / "art", ExportOptions(language="fr"))
    _lower_blank_bias(tmp_path / "art")
    utts = [u for u in load_split(tiny_manifests, "test") if u.language == "fr"][:2]
    art = load_artifact(tmp_path / "art")
    expected = [_full_utterance_text(art, read_wave(u.audio), beam_width=3) for u in utts]
    assert any(expected)
    args = ["stream", "--artifact", str(tmp_path / "art"), *[u.audio for u in utts], "--chunk-ms", "90",
            "--decoding", "beam", "--beam-width", "3", "--quiet"]
    assert main(args) == 0
    finals = [line for line in capsys.readouterr().out.splitlines() if "(audio " in line]
    for line, u, text in zip(finals, utts, expected, strict=True):
        assert line.startswith(f"{u.audio}: {text}  (audio ")
    with pytest.raises(SystemExit):
        main([*args[:-3], "--beam-width", "0"])
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["bsr", "bitmap"])
def test_small_row_layer_runs_the_triton_kernel(fmt):
    # On CUDA, exported bsr/bitmap layers run the small-row kernels; here the same module runs
    # the Triton kernel in the interpreter against the masked dense product.
    from sparse_rnnt.export.formats import SmallRowExported
    from sparse_rnnt.kernels.small_row import BitmapWeight, BsrWeight

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 53, generator=g), torch.randn(37, generator=g)
    mask = torch.rand(37, 53, generator=g) < 0.3
    packed = BsrWeight.from_dense(w, mask, blocksize=(4, 4)) if fmt == "bsr" else BitmapWeight.from_dense(w, mask)
    dense = packed.to_dense()
    layer = SmallRowExported(fmt, packed, b, "triton", torch.float32)
    x = torch.randn(3, 5, 53, generator=g)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dense, b), rtol=1e-5, atol=1e-5)
    if fmt == "bitmap":
        torch.testing.assert_close(dense, w * mask)


def _two_of_four(n, k, g, dtype=torch.float32, device="cpu"):
    w = torch.randn(n, k, generator=g)
    top = w.reshape(n, k // 4, 4).abs().topk(2, dim=-1).indices
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k)
    return (w * keep).to(device, dtype)


def test_semi_structured_backend_choice(pruned, tmp_path, tiny_manifests, capsys):
    # The 2:4 backend is a load-time choice: every value loads (on CPU the layers run dense, so
    # outputs are the same), bad values are refused at each entry point.
    from sparse_rnnt.data.manifest import load_split
    from sparse_rnnt.export.formats import SemiStructuredExported
    from sparse_rnnt.streaming.files import stream_files

    export_checkpoint(pruned["nm"], tmp_path / "a", ExportOptions(fmt="2:4", language="en"))
    ref = probe_logits(load_artifact(tmp_path / "a").model, torch.device("cpu"))
    for choice in ("cutlass", "cusparselt"):
        art = load_artifact(tmp_path / "a", semi_structured=choice)
        assert relative_error(probe_logits(art.model, torch.device("cpu")), ref) == 0.0
    with pytest.raises(ValueError, match="semi_structured"):
        load_artifact(tmp_path / "a", semi_structured="cublas")
    g = torch.Generator().manual_seed(0)
    w = _two_of_four(6, 8, g)
    with pytest.raises(ValueError, match="semi_structured"):
        SemiStructuredExported(w, None, "cublas")
    audio = [u.audio for u in load_split(tiny_manifests, "test")][:1]
    with pytest.raises(UserError, match="--semi-structured"):
        stream_files(tmp_path / "a", audio, semi_structured="cublas")
    assert main(["stream", "--artifact", str(tmp_path / "a"), *audio, "--semi-structured", "cutlass", "--quiet"]) == 0
    assert "(audio " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["stream", "--artifact", str(tmp_path / "a"), *audio, "--semi-structured", "cublas"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "cutlass", "cusparselt"])
def test_cuda_semi_structured_layer_equals_the_dense_product(backend):
    # Each of torch's 2:4 backends against F.linear with the same (2:4) weight, in bf16; the
    # tolerance is the bf16 product's own error against float64, times 4.
    from sparse_rnnt.export.formats import SemiStructuredExported

    g = torch.Generator().manual_seed(1)
    w = _two_of_four(2048, 512, g, torch.bfloat16, "cuda")
    b = torch.randn(2048, generator=g).to("cuda", torch.bfloat16)
    layer = SemiStructuredExported(w, b, backend)
    if layer.runtime == "dense-fallback":
        pytest.skip(f"torch's {backend} 2:4 backend is not available here")
    assert layer.runtime.startswith("semi-structured")
    for rows in (1, 5, 32, 64):
        x = torch.randn(rows, 512, generator=g).to("cuda", torch.bfloat16)
        exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
        dense = torch.nn.functional.linear(x, w, b)
        err = (layer(x).double() - exact).abs().max().item()
        assert err <= 4 * (dense.double() - exact).abs().max().item() + 1e-2, (rows, err)
