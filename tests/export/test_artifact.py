"""Export round trips: the artifact's outputs equal the masked model's; tampering is caught."""

import json

import pytest
import torch

from sparse_rnnt.cli import main
from sparse_rnnt.errors import UserError
from sparse_rnnt.export import ExportOptions, export_checkpoint, load_artifact
from sparse_rnnt.export.artifact import DTYPES, probe_logits, relative_error
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


@pytest.mark.parametrize(("fmt", "key", "value"), [
    ("bitmap", "tile", float("inf")), ("bitmap", "tile", 16.0), ("bitmap", "tile", 0), ("bitmap", "tile", None),
    ("bsr", "block", [16.0, 16.0]), ("bsr", "block", "16x16"), ("bsr", "block", [0, 16]), ("bsr", "block", [4]),
])
def test_bad_layer_tile_or_block_in_the_manifest_is_refused(fmt, key, value, pruned, tmp_path):
    export_checkpoint(pruned["adaptive"], tmp_path / "a", ExportOptions(fmt=fmt, block=(3, 5)))
    load_artifact(tmp_path / "a")  # sound as written

    def edit(m):
        name = sorted(m["layers"])[0]
        m["layers"][name][key] = value
    _rewrite_manifest(tmp_path / "a", edit)
    with pytest.raises(UserError, match=rf"bad manifest: {fmt} layer '.*' needs .*\"{key}\""):
        load_artifact(tmp_path / "a")


@pytest.mark.parametrize("fmt", ["dense", "bsr", "bitmap"])
def test_encode_drops_non_finite_pruned_weights(fmt):
    from sparse_rnnt.export.formats import decode, encode

    g = torch.Generator().manual_seed(3)
    w, keep = torch.randn(6, 20, generator=g), torch.rand(6, 20, generator=g) < 0.5
    keep[1, 3] = keep[4, 0] = False
    w[1, 3], w[4, 0] = float("inf"), float("nan")
    parts, info = encode(fmt, w, keep, block=(2, 4))
    layer = decode(fmt, parts, (6, 20), info, None, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 20, generator=g)
    torch.testing.assert_close(layer(x), x @ w.masked_fill(~keep, 0).T)


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
    out = capsys.readouterr().out
    assert "verified" in out and "2:4 projection" not in out
    # 2:4 from an unstructured mask: the loss the projection costs is printed, from the manifest
    assert main(["export", "--checkpoint", str(pruned["adaptive"]), "--out", str(tmp_path / "z"),
                 "--format", "2:4", "--tolerance", "10"]) == 0
    proj = json.loads((tmp_path / "z" / "manifest.json").read_text())["projection"]
    assert (f"2:4 projection: dropped {proj['lost_l1']:.2%} of the masked weights' L1 magnitude "
            f"(worst layer {proj['worst_layer']}: {proj['worst_lost_l1']:.2%})") in capsys.readouterr().out


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
    # --layer-runtime auto: single-language only; this artifact is dense, so nothing is left to
    # choose and the text is the same (bitmap artifacts: test_cpu_sparse_choice_at_every_entry_point).
    if multilingual:
        assert main([*args, "--layer-runtime", "auto"]) == 2
        assert "single-language" in capsys.readouterr().err
    else:
        assert main([*args, "--layer-runtime", "auto", "--quiet"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "layer runtimes (auto): 0 sparse layers kept their kernel, 0 run their dense weight (+0.0 MB of memory)"
        finals = [line for line in out if "(audio " in line]
        for line, u, text in zip(finals, utts, expected, strict=True):
            assert line.startswith(f"{u.audio}: {text}  (audio ")


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


def test_stream_auto_runtimes_probe_the_decoding_that_will_run(pruned, tmp_path, tiny_manifests, monkeypatch):
    # A beam runs the predictor and joiner on up to beam-width rows: --layer-runtime auto times
    # the layers at the shapes of the decoding asked for, not greedy's.
    import sparse_rnnt.export.autoselect as autoselect
    from sparse_rnnt.data.manifest import load_split
    from sparse_rnnt.streaming.files import stream_files

    export_checkpoint(pruned["dynamic"], tmp_path / "art", ExportOptions(language="fr"))
    utt = next(u for u in load_split(tiny_manifests, "test") if u.language == "fr")
    seen, chose = [], []
    real, real_choose = autoselect.probe_rows, autoselect.choose_layer_runtimes
    monkeypatch.setattr(autoselect, "probe_rows", lambda *a, **k: seen.append(k) or real(*a, **k))
    monkeypatch.setattr(autoselect, "choose_layer_runtimes", lambda *a, **k: chose.append(k) or real_choose(*a, **k))
    for decoding, width in (("beam", 3), ("greedy", 4)):
        stream_files(tmp_path / "art", [utt.audio], decoding=decoding, beam_width=width,
                     layer_runtime="auto")
    assert [(k["decoding"], k["beam_width"]) for k in seen] == [("beam", 3), ("greedy", 4)]
    # Without --cuda-graphs the layers run eagerly: timed as eager calls, launches included.
    assert [k.get("graphs") for k in chose] == [False, False]


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


def test_semi_structured_backend_refused_where_torch_cannot_run_it():
    # CPU counterpart of the CUDA test below: the capability rule alone (torch's CUTLASS 2:4
    # kernels failed every product on an H100, 9.0, after converting without complaint).
    from sparse_rnnt.export.formats import semi_structured_unsupported

    assert semi_structured_unsupported("cutlass", (8, 0)) is None
    assert semi_structured_unsupported("cutlass", (8, 9)) is None
    for cap in ((9, 0), (10, 0), (7, 5)):
        assert "8.x" in semi_structured_unsupported("cutlass", cap)
    assert all(semi_structured_unsupported(b, (9, 0)) is None for b in ("auto", "cusparselt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "cutlass", "cusparselt"])
def test_cuda_semi_structured_layer_equals_the_dense_product(backend):
    # Each of torch's 2:4 backends against F.linear with the same (2:4) weight, in bf16; the
    # tolerance is the bf16 product's own error against float64, times 4.
    from sparse_rnnt.export.formats import SemiStructuredExported, semi_structured_unsupported

    g = torch.Generator().manual_seed(1)
    w = _two_of_four(2048, 512, g, torch.bfloat16, "cuda")
    b = torch.randn(2048, generator=g).to("cuda", torch.bfloat16)
    if semi_structured_unsupported(backend, torch.cuda.get_device_capability()) is not None:
        with pytest.raises(UserError, match=r"compute capability 8\.x"):  # on Hopper: refused, not a crash later
            SemiStructuredExported(w, b, backend)
        return
    layer = SemiStructuredExported(w, b, backend)
    if layer.runtime == "dense-fallback":
        # torch's to_sparse_semi_structured ("auto") uses cuSPARSELt unless CUTLASS is forced; a
        # build without it falls back by design. Any other fallback is a conversion that broke.
        if backend in ("auto", "cusparselt") and not torch.backends.cusparselt.is_available():
            pytest.skip(f"this torch build has no cuSPARSELt for the {backend} 2:4 backend")
        pytest.fail(f"the {backend} 2:4 conversion fell back to dense on a GPU that supports it")
    assert layer.runtime.startswith("semi-structured")
    for rows in (1, 5, 32, 64):
        x = torch.randn(rows, 512, generator=g).to("cuda", torch.bfloat16)
        exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
        dense = torch.nn.functional.linear(x, w, b)
        err = (layer(x).double() - exact).abs().max().item()
        assert err <= 4 * (dense.double() - exact).abs().max().item() + 1e-2, (rows, err)


# ------------------------------------------------------------------ per-language pathways


def _pathway_ref(run, language, project_2to4_in=None):
    """Independent reference: probe logits of the dense model with every in-scope weight set to
    ``θ ⊙ m_L`` by hand, in float32. ``project_2to4_in``: a dtype; then keep the 2 largest |w|
    of each group of 4 (ranked in that dtype, ties to the lower index), as a 2:4 export must."""
    import copy

    rec = load_recognizer(run)
    model = copy.deepcopy(rec.model)
    masks = rec.language_masks[language]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                w = p * masks[name].to(p.dtype)
                if project_2to4_in is not None:
                    groups = w.reshape(w.shape[0], -1, 4)
                    # Ranked as stored: values equal after rounding keep the lower index.
                    rank = torch.sort(-groups.to(project_2to4_in).abs().float(), dim=-1, stable=True)
                    top = rank.indices[..., :2]
                    w = torch.zeros_like(groups).scatter_(-1, top, groups.gather(-1, top)).reshape(w.shape)
                p.copy_(w)
    return probe_logits(model, torch.device("cpu"))


def _rewrite_manifest(art_dir, edit):
    path = art_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _rehash(art_dir, *names):
    from sparse_rnnt.io import sha256_file

    def edit(m):
        for name in names:
            m["files"][name]["sha256"] = sha256_file(art_dir / name)
    _rewrite_manifest(art_dir, edit)


def _edit_weights(art_dir, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(art_dir / "weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(art_dir / "weights.safetensors"))
    _rehash(art_dir, "weights.safetensors")


def _cuda_dtype_rule(model):
    """Hooks that raise, as CUDA's layer_norm does (the CPU kernel accepts it), when a norm gets
    an input whose dtype differs from its weight's. (The predictor's LSTM is torchaudio's, built
    from linear layers, whose dtype rule the CPU enforces already.)"""
    def check(mod, args):
        if args[0].dtype != mod.weight.dtype:
            raise RuntimeError(f"LayerNorm: input {args[0].dtype}, weight {mod.weight.dtype}")
    hooked = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert hooked
    return hooked


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["dense", "bsr", "bitmap", "2:4"])
def test_language_pathway_round_trip(fmt, dtype, pruned, tmp_path):
    # A per-language run stores a dense θ and one mask per language, so (unlike single-mask
    # runs, whose θ is already zero outside the mask) a format that dropped the mask would
    # show. The artifact must compute θ ⊙ m_L, built here by hand.
    run = pruned["dynamic"]
    ref = _pathway_ref(run, "fr")
    unmasked = probe_logits(load_recognizer(run).model, torch.device("cpu"))
    assert relative_error(unmasked, ref) > 0.05  # the mask matters on the probe
    tol = 1e-5 if dtype == "float32" else 2e-2
    rec = load_recognizer(run)
    if fmt == "2:4":
        groups = [m.reshape(m.shape[0], -1, 4).sum(-1) for m in rec.language_masks["fr"].as_dict().values()]
        assert any(bool((g > 2).any()) for g in groups)  # these masks are not 2:4: refused
        with pytest.raises(UserError, match=r"export refused.*format 2:4"):
            export_checkpoint(run, tmp_path / "a", ExportOptions(fmt=fmt, language="fr", dtype=dtype))
        assert not (tmp_path / "a").exists()
        # Accepting the loss: the artifact holds the 2:4 projection of θ ⊙ m_L, nothing else.
        export_checkpoint(run, tmp_path / "a", ExportOptions(fmt=fmt, language="fr", dtype=dtype, tolerance=10.0))
        ref = _pathway_ref(run, "fr", project_2to4_in=DTYPES[dtype])
    else:
        export_checkpoint(run, tmp_path / "a", ExportOptions(fmt=fmt, language="fr", dtype=dtype))
    art = load_artifact(tmp_path / "a")
    assert art.languages == ["fr"] and not art.multilingual
    _cuda_dtype_rule(art.model)  # bf16 layers hand float32 back to the norms (CUDA needs it)
    out = probe_logits(art.model, torch.device("cpu"))
    assert relative_error(out, ref) <= tol
    assert relative_error(out, _pathway_ref(run, "en")) > 10 * tol  # and not another pathway


@pytest.mark.parametrize("multilingual", [False, True])
def test_low_precision_artifact_keeps_the_rest_of_the_model_in_float32(multilingual, pruned, tmp_path):
    """--dtype applies to the exported linear layers only: norms, embeddings and biases are
    stored and loaded as the checkpoint's float32 values, bit for bit."""
    from safetensors.torch import load_file

    run = pruned["dynamic"]
    opts = ExportOptions(fmt="bitmap", dtype="bfloat16", **({"multilingual": True} if multilingual else
                                                            {"language": "fr"}))
    manifest = export_checkpoint(run, tmp_path / "a", opts)
    params = dict(load_recognizer(run).model.named_parameters())
    stored = {k[len("dense/"):]: v for k, v in load_file(str(tmp_path / "a" / "weights.safetensors")).items()
              if k.startswith("dense/")}
    assert set(stored) == set(params) - set(manifest["layers"])
    assert any("norm" in n for n in stored) and any("embedding" in n for n in stored)
    for name, t in stored.items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, params[name].detach()), name
    art = load_artifact(tmp_path / "a")
    norms = [(n, m) for n, m in art.model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    for n, m in norms:
        assert torch.equal(m.weight.detach(), params[f"{n}.weight"].detach()), n
    # An artifact of the earlier layout (norms in --dtype) is refused by its version.
    _rewrite_manifest(tmp_path / "a", lambda m: m.update(version=1))
    with pytest.raises(UserError, match=r"manifest\.json: unsupported artifact version 1"):
        load_artifact(tmp_path / "a")


def test_multilingual_artifact_loads_in_its_dtype(pruned, tmp_path):
    run = pruned["dynamic"]
    export_checkpoint(run, tmp_path / "f32", ExportOptions(fmt="bitmap", multilingual=True))
    export_checkpoint(run, tmp_path / "bf16", ExportOptions(fmt="bitmap", multilingual=True, dtype="bfloat16"))
    f32, bf16 = load_artifact(tmp_path / "f32"), load_artifact(tmp_path / "bf16")
    _cuda_dtype_rule(bf16.model)
    assert bf16.manifest["dtype"] == "bfloat16"
    assert len(bf16._layers) > 0
    for layer in bf16._layers.values():
        assert layer.weight.dtype == torch.bfloat16
        assert layer.bias is None or layer.bias.dtype == torch.bfloat16
    for lang in ("en", "fr"):
        f32.set_language(lang)
        bf16.set_language(lang)
        ref = _pathway_ref(run, lang)
        out = probe_logits(bf16.model, torch.device("cpu"))
        assert relative_error(out, ref) <= 2e-2
        # bf16 arithmetic, not float32 in disguise
        assert relative_error(out, probe_logits(f32.model, torch.device("cpu"))) > 1e-5


def test_multilingual_artifact_of_a_model_with_a_ctc_head(tiny_manifests, tmp_path):
    """The CTC head is a linear layer outside the pruning scope: every pathway keeps it whole."""
    from sparse_rnnt.config import config_from_tree
    from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
    from sparse_rnnt.pruning.scope import ScopeConfig, select_parameters
    from tests.training.test_prune import _dense_overrides

    over = {**_dense_overrides(tiny_manifests), "model.ctc_weight": 0.3, "train.max_steps": 2}
    dense = tmp_path / "dense"
    Trainer(config_from_tree({}, [f"{k}={v}" for k, v in over.items()]), dense).run()
    model = load_recognizer(dense).model
    assert model.ctc_head is not None
    params = select_parameters(model, ScopeConfig())
    assert "ctc_head.weight" not in params
    g = torch.Generator().manual_seed(0)
    LanguageMasks({lang: MaskSet({n: torch.rand(p.shape, generator=g) < 0.9 for n, p in params.items()})
                   for lang in ("en", "fr")}).save(tmp_path / "init.safetensors")
    cfg = _prune_cfg(dense, "dynamic-pathways", **{
        "train.max_steps": 2, "pruning.init_masks": str(tmp_path / "init.safetensors"),
        "pruning.levels": "[0.5]", "pruning.target_sparsity": 0.5})
    Trainer(cfg, tmp_path / "dyn", init_checkpoint=dense).run()
    export_checkpoint(tmp_path / "dyn", tmp_path / "art", ExportOptions(fmt="bitmap", multilingual=True))
    art = load_artifact(tmp_path / "art")
    for lang in ("en", "fr"):
        art.set_language(lang)
        assert relative_error(probe_logits(art.model, torch.device("cpu")), _masked_ref(tmp_path / "dyn", lang)) <= 1e-5
    stored = LanguageMasks.load(tmp_path / "art" / "masks.safetensors")
    assert all(bool(stored[lang]["ctc_head.weight"].all()) for lang in ("en", "fr"))


def test_multilingual_artifact_needs_a_language(pruned, tmp_path):
    from sparse_rnnt.streaming import StreamingDecoder

    run = pruned["dynamic"]
    export_checkpoint(run, tmp_path / "ml", ExportOptions(multilingual=True))
    art = load_artifact(tmp_path / "ml")
    assert art.language is None
    with pytest.raises(ValueError, match="no pathway selected"):
        probe_logits(art.model, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a language"), art.pathway(None):
        pass
    dec = StreamingDecoder.from_artifact(art)
    with pytest.raises(ValueError, match="language"):  # the decoder's mask hook is art.pathway
        dec.open()
    with art.pathway("fr"):
        assert relative_error(probe_logits(art.model, torch.device("cpu")), _pathway_ref(run, "fr")) <= 1e-5
    dec.open(language="en")
    with pytest.raises(ValueError, match="needs a language"), art.pathway(None):  # not "the last one set"
        pass
    # A single-pathway artifact keeps working without a language.
    export_checkpoint(run, tmp_path / "fr", ExportOptions(language="fr"))
    single = load_artifact(tmp_path / "fr")
    with single.pathway(None):
        assert relative_error(probe_logits(single.model, torch.device("cpu")), _pathway_ref(run, "fr")) <= 1e-5
    StreamingDecoder.from_artifact(single).open()


def test_multilingual_masks_file_is_required_and_checked(pruned, tmp_path):
    import shutil

    from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet

    base = tmp_path / "ml"
    export_checkpoint(pruned["dynamic"], base, ExportOptions(multilingual=True))

    def copy(name):
        shutil.copytree(base, tmp_path / name)
        return tmp_path / name

    # Left out of the manifest (its hash unchecked), then swapped: refused.
    d = copy("unlisted")
    _rewrite_manifest(d, lambda m: m["files"].pop("masks.safetensors"))
    lm = LanguageMasks.load(d / "masks.safetensors")
    LanguageMasks({"en": lm["fr"], "fr": lm["en"]}).save(d / "masks.safetensors")
    with pytest.raises(UserError, match=r"manifest\.json: the manifest lists files .* exactly .*masks\.safetensors"):
        load_artifact(d)
    # Listed but modified: the hash catches it.
    d = copy("swapped")
    LanguageMasks({"en": lm["fr"], "fr": lm["en"]}).save(d / "masks.safetensors")
    with pytest.raises(UserError, match=r"masks\.safetensors: corrupt or modified"):
        load_artifact(d)
    # An extra listed file (with its right hash) is refused too.
    d = copy("extra")
    (d / "notes.txt").write_text("x")
    _rewrite_manifest(d, lambda m: m["files"].update({"notes.txt": {"sha256": ""}}))
    _rehash(d, "notes.txt")
    with pytest.raises(UserError, match=r"lists files .*notes\.txt.* exactly"):
        load_artifact(d)
    # A mask of the wrong shape, [N, K-1] (the row packing is the same bytes for most K).
    d = copy("shape")
    name = lm.names[0]

    def shrink(ms):
        masks = ms.as_dict()
        masks[name] = masks[name][:, :-1].contiguous()
        return MaskSet(masks)

    LanguageMasks({lang: shrink(lm[lang]) for lang in lm.languages}).save(d / "masks.safetensors")
    _rehash(d, "masks.safetensors")
    n, k = lm["en"][name].shape
    with pytest.raises(UserError, match=rf"masks\.safetensors: mask '{name}' has shape \[{n}, {k - 1}\], "
                                        rf"its layer's weight \[{n}, {k}\]"):
        load_artifact(d)


def test_tampered_config_and_sizes_give_clear_errors(pruned, tmp_path):
    import shutil

    from sparse_rnnt.data.features import GlobalCMVN
    from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig

    base = tmp_path / "a"
    export_checkpoint(pruned["adaptive"], base, ExportOptions(language="en"))
    cases = 0

    def variant(edit):
        nonlocal cases
        cases += 1
        d = tmp_path / f"v{cases}"
        shutil.copytree(base, d)
        edit(d)
        return d

    def edit_config(fn):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            fn(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
            _rehash(d, "config.json")
        return edit

    expected = [
        (lambda d: _rewrite_manifest(d, lambda m: m.update(layers=sorted(m["layers"]))),
         r"manifest\.json: bad manifest: layers must be an object"),
        (lambda d: _rewrite_manifest(d, lambda m: m.update(languages="en")),
         r"manifest\.json: bad manifest: languages"),
        (lambda d: _rewrite_manifest(d, lambda m: m.update(multilingual="false")),
         r"manifest\.json: bad manifest: multilingual"),
        (lambda d: _rewrite_manifest(d, lambda m: m["files"].update({"config.json": "abc"})),
         r"manifest\.json: bad manifest: files"),
        (edit_config(lambda c: c.update(model=[])), r"config\.json: bad artifact config \('model' must be an object"),
        (edit_config(lambda c: c.update(features=None)), r"config\.json: bad artifact config \('features'"),
        (edit_config(lambda c: c["features"].update(n_mels=40)),
         r"config\.json: features\.n_mels is 40 but the model's input_dim is 80"),
        (edit_config(lambda c: (c["features"].update(n_mels=40), c["model"].update(input_dim=40))),
         r"cmvn\.safetensors: 80 bins, but config\.json has features\.n_mels 40"),
    ]
    for edit, message in expected:
        with pytest.raises(UserError, match=message):
            load_artifact(variant(edit))

    # A well-formed CMVN file of 40 bins under an 80-mel config.
    def small_cmvn(d):
        GlobalCMVN(mean=torch.zeros(40), std=torch.ones(40)).save(d / "cmvn.safetensors")
        _rehash(d, "cmvn.safetensors")
    with pytest.raises(UserError, match=r"cmvn\.safetensors: 40 bins, but config\.json has features\.n_mels 80"):
        load_artifact(variant(small_cmvn))

    # Statistics that are not finite, or a negative std, written past GlobalCMVN's own checks.
    from safetensors.torch import save_file

    from sparse_rnnt.data.features import _CMVN_FORMAT

    def bad_cmvn(field, value):
        def edit(d):
            stats = {"mean": torch.zeros(80), "std": torch.ones(80)}
            stats[field][3] = value
            save_file(stats, str(d / "cmvn.safetensors"), metadata={"format": _CMVN_FORMAT, "count": "10"})
            _rehash(d, "cmvn.safetensors")
        return edit
    for field, value in (("mean", float("nan")), ("std", float("inf")), ("std", -1.0)):
        with pytest.raises(UserError, match=r"cmvn\.safetensors: CMVN mean and std must be finite"):
            load_artifact(variant(bad_cmvn(field, value)))

    # A valid tokenizer with fewer symbols than the model's outputs.
    def small_tokenizer(d):
        Tokenizer.train(["ab ba aab"], TokenizerConfig(vocab_size=0, model_type="char"), tmp_path / "small.model")
        shutil.copyfile(tmp_path / "small.model", d / "tokenizer.model")
        _rehash(d, "tokenizer.model")
    n_model = json.loads((base / "config.json").read_text())["num_symbols"]
    n_tok = Tokenizer.train(["ab ba aab"], TokenizerConfig(vocab_size=0, model_type="char"),
                            tmp_path / "count.model").num_symbols
    assert n_tok != n_model
    with pytest.raises(UserError, match=rf"tokenizer\.model: {n_tok} symbols .* the model has {n_model}"):
        load_artifact(variant(small_tokenizer))


def test_artifact_members_must_not_be_symlinks(pruned, tmp_path):
    import os
    import shutil

    export_checkpoint(pruned["adaptive"], tmp_path / "base", ExportOptions(language="en"))
    outside = tmp_path / "outside_cmvn.safetensors"
    shutil.copyfile(tmp_path / "base" / "cmvn.safetensors", outside)
    # Same bytes (the hash matches), but the file lives outside the artifact directory.
    d = tmp_path / "out_link"
    shutil.copytree(tmp_path / "base", d)
    (d / "cmvn.safetensors").unlink()
    os.symlink(outside, d / "cmvn.safetensors")
    with pytest.raises(UserError, match=r"cmvn\.safetensors: is a symbolic link"):
        load_artifact(d)
    # A manifest that is a link (to a valid manifest elsewhere) is refused as well.
    d = tmp_path / "manifest_link"
    shutil.copytree(tmp_path / "base", d)
    shutil.copyfile(d / "manifest.json", tmp_path / "manifest_elsewhere.json")
    (d / "manifest.json").unlink()
    os.symlink(tmp_path / "manifest_elsewhere.json", d / "manifest.json")
    with pytest.raises(UserError, match=r"manifest\.json: is a symbolic link"):
        load_artifact(d)
    # The artifact directory itself may be reached through a link.
    os.symlink(tmp_path / "base", tmp_path / "dir_link")
    assert load_artifact(tmp_path / "dir_link").languages == ["en"]


def test_unexpected_weight_tensors_are_refused(pruned, tmp_path):
    import shutil

    base = tmp_path / "a"
    export_checkpoint(pruned["adaptive"], base, ExportOptions(fmt="bitmap", language="en"))
    layer = sorted(json.loads((base / "manifest.json").read_text())["layers"])[0]
    bias = "dense/rnnt.joiner.linear.bias"
    cases = [
        (lambda t: t.update({"other/x": torch.zeros(1)}), r"unexpected tensor 'other/x'"),
        (lambda t: t.update({f"sparse/{layer}/extra": torch.zeros(3)}), rf"unexpected tensor 'sparse/{layer}/extra'"),
        (lambda t: t.update({bias: t[bias].to(torch.int64)}), rf"tensor '{bias}' is torch\.int64, expected torch\.float32"),
        (lambda t: t[bias].__setitem__(0, float("nan")), rf"tensor '{bias}' holds NaN"),
        (lambda t: t[f"sparse/{layer}/values"].__setitem__(0, float("inf")),
         rf"tensor 'sparse/{layer}/values' holds NaN or infinite"),
        (lambda t: t.pop(bias), rf"missing tensor '{bias}'"),
    ]
    for i, (edit, message) in enumerate(cases):
        d = tmp_path / f"v{i}"
        shutil.copytree(base, d)
        _edit_weights(d, edit)
        with pytest.raises(UserError, match=rf"weights\.safetensors: {message}"):
            load_artifact(d)


def test_hostile_model_sizes_are_refused_before_the_model_is_built(pruned, tmp_path, monkeypatch):
    """A config.json rehashed to describe a model far larger than the weights file (a million
    layers, a huge FFN) is refused from the file's header and a meta-device build: the real model,
    whose allocation and initialisation would take minutes or exhaust memory, is never built."""
    import shutil

    import sparse_rnnt.export.artifact as artifact_mod

    base = tmp_path / "a"
    export_checkpoint(pruned["adaptive"], base, ExportOptions(fmt="bitmap", language="en"))
    real = artifact_mod.EmformerRNNT
    built = []

    def recording(cfg, num_symbols):
        if torch.empty(0).device.type != "meta":
            built.append(cfg)
        return real(cfg, num_symbols)
    monkeypatch.setattr(artifact_mod, "EmformerRNNT", recording)

    layer = sorted(json.loads((base / "manifest.json").read_text())["layers"])[0]
    cases = [
        (lambda c: c["model"].update(transformer_num_layers=10**6),
         r"config\.json: bad artifact config \(1000000 transformer and \d+ LSTM layers, but weights\.safetensors "
         r"holds only \d+ tensors\)"),
        (lambda c: c["model"].update(transformer_ffn_dim=4 * 10**6),
         r"weights\.safetensors: corrupt artifact weights \(\S+ has shape \[[\d, ]+\] \((stored|manifest)\), the "
         r"model of config\.json needs \[4000000(, \d+)?\]\)"),
        (lambda c: c["model"].update(symbol_embedding_dim=3 * 10**6),
         r"weights\.safetensors: corrupt artifact weights \(rnnt\.\S+ has shape \[\d+, \d+\] \(stored\)"),
    ]
    for i, (edit, message) in enumerate(cases):
        d = tmp_path / f"v{i}"
        shutil.copytree(base, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        _rehash(d, "config.json")
        with pytest.raises(UserError, match=message):
            load_artifact(d)
    # An exported layer whose manifest shape disagrees with the model is refused from the meta build too.
    d = tmp_path / "layer"
    shutil.copytree(base, d)
    _rewrite_manifest(d, lambda m: m["layers"][layer].update(shape=[7, 9]))
    with pytest.raises(UserError, match=rf"corrupt artifact weights \({layer} has shape \[7, 9\] \(manifest\)"):
        load_artifact(d)
    assert built == []
    assert load_artifact(base).languages == ["en"]  # the sound artifact still builds its model once
    assert len(built) == 1


def test_device_errors_are_not_called_corrupt_weights(pruned, tmp_path):
    art_dir = tmp_path / "a"
    export_checkpoint(pruned["adaptive"], art_dir, ExportOptions(language="en"))
    assert load_artifact(art_dir, device="auto").model.rnnt.joiner.linear.weight.device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^device cuda:99: (CUDA is not available|this machine has \d+ CUDA)"):
        load_artifact(art_dir, device="cuda:99")
    # Export resolves "auto" before any work and records the device it verified on.
    manifest = export_checkpoint(pruned["adaptive"], tmp_path / "b", ExportOptions(language="en", device="auto"))
    assert manifest["verification"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^device cuda:99: "):
        export_checkpoint(pruned["adaptive"], tmp_path / "c", ExportOptions(language="en", device="cuda:99"))
    assert not (tmp_path / "c").exists()


def test_bad_block_is_refused_for_every_format_before_work():
    # Every export encodes BSR for the manifest's size table, whatever its format.
    for fmt in ("dense", "bitmap", "bsr"):
        for block in ((512, 16), (16.0, 16), (0, 4), (4,)):
            with pytest.raises(UserError, match=r"--block must be two integers in \[1, 256\]"):
                ExportOptions(fmt=fmt, block=block).validate()
    ExportOptions(fmt="bsr", block=(256, 1)).validate()


def test_lossless_2to4_refusal_names_the_dtype_not_the_mask(pruned, tmp_path):
    # A 2:4-trained mask loses nothing in the projection: a refusal at a tight tolerance is the
    # dtype's rounding, and names no worst layer.
    with pytest.raises(UserError) as e:
        export_checkpoint(pruned["nm"], tmp_path / "a",
                          ExportOptions(fmt="2:4", language="en", dtype="float16", tolerance=1e-9))
    assert "float16 rounding" in str(e.value) and "not trained as 2:4" not in str(e.value)
    assert not (tmp_path / "a").exists()
    manifest = export_checkpoint(pruned["nm"], tmp_path / "b", ExportOptions(fmt="2:4", language="en"))
    assert manifest["projection"]["lost_l1"] == 0 and manifest["projection"]["worst_layer"] is None


def test_refused_export_leaves_no_directories_and_out_is_checked(pruned, tmp_path, monkeypatch):
    import os

    run = pruned["adaptive"]
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="export refused"):  # an unstructured mask as 2:4
        export_checkpoint(run, tmp_path / "kept" / "p1" / "p2" / "art", ExportOptions(fmt="2:4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # made by the user: stays
    assert list((tmp_path / "kept").iterdir()) == []

    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for out in (".", "x/.."):
        with pytest.raises(UserError, match=r"name the new artifact directory itself, not '\.' or '\.\.'"):
            export_checkpoint(run, out, ExportOptions())
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(UserError, match=r"link is a symbolic link"):
        export_checkpoint(run, tmp_path / "link", ExportOptions())
    assert list((tmp_path / "target").iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile exists and is not a directory"):
        export_checkpoint(run, tmp_path / "afile", ExportOptions())
    with pytest.raises(UserError, match=r"afile is not a directory"):
        export_checkpoint(run, tmp_path / "afile" / "sub", ExportOptions())
    assert (tmp_path / "afile").read_text() == "x"
    # A successful export keeps the parents it made.
    export_checkpoint(run, tmp_path / "n1" / "n2" / "art", ExportOptions(language="en"))
    assert (tmp_path / "n1" / "n2" / "art" / "manifest.json").is_file()


def test_masked_backend_is_a_load_parameter(pruned, tmp_path, caplog):
    import logging

    export_checkpoint(pruned["dynamic"], tmp_path / "ml", ExportOptions(multilingual=True))
    with caplog.at_level(logging.INFO, logger="sparse_rnnt.export.artifact"):
        auto = load_artifact(tmp_path / "ml")
    records = [r for r in caplog.records if "masked linear" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "'torch'" in records[0].getMessage()  # auto on CPU: the torch reference
    assert auto.masked_backend == "torch"
    assert set(auto.runtimes().values()) == {"masked-linear-torch"}
    triton = load_artifact(tmp_path / "ml", backend="triton")
    assert set(triton.runtimes().values()) == {"masked-linear-triton"}
    # One layer through the Triton kernel (interpreter on CPU) against θ ⊙ m_fr by hand.
    rec = load_recognizer(pruned["dynamic"])
    params = dict(rec.model.named_parameters())
    name = sorted(triton._layers)[0]
    triton.set_language("fr")
    layer = triton._layers[name]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = params[name] * rec.language_masks["fr"][name]
    b = params[name.removesuffix("weight") + "bias"]
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch"):
        load_artifact(tmp_path / "ml", backend="cuda")


def test_2to4_projection_loss_is_totalled_and_named_in_the_refusal(pruned, tmp_path):
    # The total is Σ|dropped| / Σ|θ ⊙ m| over every layer, here from the top 2 |w| of each group of 4.
    rec = load_recognizer(pruned["adaptive"])
    dropped = kept_l1 = 0.0
    worst = (0.0, None)
    for name, p in rec.model.named_parameters():
        if name not in rec.masks:
            continue
        w = (p.detach() * rec.masks[name]).double().abs().reshape(p.shape[0], -1, 4)
        lost = float(w.sum() - w.sort(dim=-1, descending=True).values[..., :2].sum())
        dropped, kept_l1 = dropped + lost, kept_l1 + float(w.sum())
        worst = max(worst, (lost / float(w.sum()), name), key=lambda t: t[0])
    total = dropped / kept_l1
    assert total > 0.01
    with pytest.raises(UserError, match=rf"format 2:4, dtype float32\); the 2:4 projection dropped "
                                        rf"{100 * total:.2f}% of the masked weights' L1 magnitude \(worst layer "
                                        rf"{worst[1]}: {100 * worst[0]:.2f}%\); a mask not trained as 2:4"):
        export_checkpoint(pruned["adaptive"], tmp_path / "b", ExportOptions(fmt="2:4"))
    manifest = export_checkpoint(pruned["adaptive"], tmp_path / "c", ExportOptions(fmt="2:4", tolerance=10.0))
    assert manifest["projection"]["lost_l1"] == pytest.approx(total, rel=1e-6)
    assert manifest["projection"]["worst_layer"] == worst[1]
    assert manifest["projection"]["worst_lost_l1"] == pytest.approx(worst[0], rel=1e-6)
    nm = export_checkpoint(pruned["nm"], tmp_path / "d", ExportOptions(fmt="2:4", language="en"))
    assert nm["projection"]["lost_l1"] == 0.0  # trained as 2:4: nothing dropped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(600)  # a cold compile cache autotunes every layer shape: over 120 s on the H100
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_multilingual_artifact_equals_its_masked_model(dtype, pruned, tmp_path, monkeypatch):
    # The whole multilingual artifact on CUDA, its layers through the Triton masked-linear kernels,
    # per language against θ ⊙ m_L by hand (CPU float32). The CPU counterparts are
    # test_multilingual_artifact_loads_in_its_dtype and the backend test above (interpreter).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the LSTM: full fp32, as the reference
    run = pruned["dynamic"]
    export_checkpoint(run, tmp_path / "ml", ExportOptions(fmt="bitmap", multilingual=True, dtype=dtype))
    art = load_artifact(tmp_path / "ml", device="cuda", backend="triton")
    assert set(art.runtimes().values()) == {"masked-linear-triton"}
    tol = 1e-4 if dtype == "float32" else 2e-2
    outs = {}
    for lang in ("fr", "en"):
        art.set_language(lang)
        outs[lang] = probe_logits(art.model, torch.device("cuda")).cpu()
        assert relative_error(outs[lang], _pathway_ref(run, lang)) <= tol
    assert relative_error(outs["en"], _pathway_ref(run, "fr")) > 10 * tol


def test_bitmap_layers_on_cuda_take_the_triton_kernel_above_8_rows(monkeypatch):
    # Routing only (the kernels have their own tests): the CUDA extension up to 8 rows, the
    # Triton kernel above, as measured on the H100; other runtimes unchanged.
    from types import SimpleNamespace

    import sparse_rnnt.kernels.small_row as small_row
    from sparse_rnnt.export.formats import (
        CUDA_BITMAP_MAX_ROWS,
        SmallRowExported,
        bitmap_backend_for,
    )

    seen = []

    def fake(x, w, bias, backend):
        seen.append((x.shape[:-1].numel(), backend))
        return x.new_zeros(*x.shape[:-1], 5)

    monkeypatch.setattr(small_row, "bitmap_linear", fake)
    layer = SmallRowExported("bitmap", SimpleNamespace(shape=(5, 7)), None, "cuda", torch.float32)
    for shape in ((1, 7), (8, 7), (3, 3, 7), (64, 7), (130, 7)):
        assert layer(torch.zeros(shape)).shape == (*shape[:-1], 5)
    assert seen == [(1, "cuda"), (8, "cuda"), (9, "triton"), (64, "triton"), (130, "triton")]
    assert CUDA_BITMAP_MAX_ROWS == 8
    assert bitmap_backend_for("triton", 1) == "triton" and bitmap_backend_for("torch", 100) == "torch"


@pytest.mark.skipif(__import__("shutil").which("c++") is None and __import__("shutil").which("g++") is None,
                    reason="no C++ compiler to build the CPU kernel")
def test_cpu_sparse_choice_at_every_entry_point(pruned, tmp_path, tiny_manifests, capsys):
    # How bitmap layers run on the CPU is a load-time choice: the C++ kernel ("kernel", and "auto"
    # where it builds) or the decompressed weight ("dense"), same logits; export's verification
    # takes it too and records it per layer; multilingual artifacts ignore it; bad values are
    # refused at each entry point.
    from sparse_rnnt.data.manifest import load_split
    from sparse_rnnt.streaming.files import stream_files

    main(["export", "--checkpoint", str(pruned["adaptive"]), "--out", str(tmp_path / "k"), "--format", "bitmap",
          "--language", "en"])
    main(["export", "--checkpoint", str(pruned["adaptive"]), "--out", str(tmp_path / "d"), "--format", "bitmap",
          "--language", "en", "--cpu-sparse", "dense"])
    recorded = {d: {v["runtime"] for v in json.loads((tmp_path / d / "manifest.json").read_text())["layers"].values()}
                for d in ("k", "d")}
    assert recorded == {"k": {"cpu"}, "d": {"torch"}}
    logits = {}
    for choice, runtime in (("kernel", "cpu"), ("auto", "cpu"), ("dense", "torch")):
        art = load_artifact(tmp_path / "k", cpu_sparse=choice)
        assert set(art.runtimes().values()) == {runtime}, choice
        logits[choice] = probe_logits(art.model, torch.device("cpu"))
    assert relative_error(logits["kernel"], logits["dense"]) < 1e-5
    assert torch.equal(logits["kernel"], logits["auto"])
    multi = tmp_path / "multi"
    export_checkpoint(pruned["dynamic"], multi, ExportOptions(fmt="bitmap", multilingual=True))
    assert "cpu" not in set(load_artifact(multi, cpu_sparse="kernel").runtimes().values())
    with pytest.raises(ValueError, match="cpu_sparse"):
        load_artifact(tmp_path / "k", cpu_sparse="fast")
    with pytest.raises(UserError, match="--cpu-sparse"):
        ExportOptions(fmt="bitmap", language="en", cpu_sparse="fast").validate()
    audio = [u.audio for u in load_split(tiny_manifests, "test")][:1]
    with pytest.raises(UserError, match="--cpu-sparse"):
        stream_files(tmp_path / "k", audio, cpu_sparse="fast")
    capsys.readouterr()
    assert main(["stream", "--artifact", str(tmp_path / "k"), *audio, "--cpu-sparse", "dense", "--quiet"]) == 0
    assert "(audio " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["stream", "--artifact", str(tmp_path / "k"), *audio, "--cpu-sparse", "fast"])
