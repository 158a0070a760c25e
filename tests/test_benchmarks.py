from pathlib import Path

import pytest
import torch

from benchmarks.env import environment


def test_environment_records_machine_versions_commit_and_date():
    env = environment()
    for key in ("date", "commit", "cpu", "cpu_count", "gpu", "torch", "torchaudio", "triton", "cuda"):
        assert key in env
    assert env["torch"].startswith("2.11")
    assert len(env["commit"]) >= 7


def test_kernel_benchmark_targets_are_ratios_of_rows_in_one_run():
    from benchmarks.kernels import summarize

    rows = [
        {"bench": "masked_linear fwd+bwd", "shape": "s", "dtype": "bfloat16", "provider": "cublas", "ms": 2.0},
        {"bench": "masked_linear fwd+bwd", "shape": "s", "dtype": "bfloat16", "provider": "triton", "ms": 2.1},
        {"bench": "masked_linear fwd+bwd", "shape": "s", "dtype": "bfloat16", "provider": "unfused", "ms": 2.1},
        {"bench": "rerank", "shape": "10", "dtype": "float32", "provider": "triton", "ms": 3.0},
        {"bench": "rerank", "shape": "10", "dtype": "float32", "provider": "floor", "ms": 1.0},
        {"bench": "rerank", "shape": "10", "dtype": "float32", "provider": "kthvalue", "ms": 600.0},
        {"bench": "train_step", "shape": "t", "provider": "torch", "ms": 10.0, "overhead_at_100": 0.01},
    ]
    got = {(t["bench"], t["ratio"]): (t["value"], t["met"]) for t in summarize(rows)}
    assert got[("masked_linear fwd+bwd", "triton / cublas time")] == (2.1 / 2.0, True)
    assert got[("masked_linear fwd+bwd", "unfused / triton time (speed-up over unfused)")] == (1.0, False)
    assert got[("rerank", "triton / floor time")] == (3.0, False)
    assert got[("rerank", "kthvalue / triton time")] == (200.0, True)
    assert ("rerank", "topk / triton time") not in got  # no topk row: no ratio invented
    assert got[("train_step", "re-rank overhead at n=100")] == (0.01, True)


def test_kernel_benchmark_runs_on_cpu(tmp_path):
    import json

    from benchmarks.kernels import main

    assert main(["--device", "cpu", "--quick", "--sections", "train_step,masked_linear", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert result["environment"]["torch"].startswith("2.11")
    step = next(r for r in result["rows"] if r["bench"] == "train_step")
    assert step["provider"] == "torch" and step["ms"] > 0 and step["rerank_ms"] > 0
    assert step["step_ms_rerank_every_100"] == step["ms"] + step["rerank_ms"] / 100
    assert step["dense_step_ms"] > 0 and step["masked_vs_dense"] == step["ms"] / step["dense_step_ms"]
    providers = {r["provider"] for r in result["rows"] if r["bench"].startswith("masked_linear")}
    assert providers == {"dense", "unfused", "dense-autocast", "unfused-autocast"}
    assert all(r["host_ms"] is None for r in result["rows"] if r["bench"].startswith("masked_linear"))
    header = (tmp_path / "kernels-cpu.csv").read_text().splitlines()[0]
    assert header.startswith("bench,shape,provider,ms")


def test_kernel_benchmark_saves_each_section_as_it_ends(tmp_path, monkeypatch):
    # A GPU session's time limit can kill the benchmark mid-run: the sections done must be on disk.
    import json

    import benchmarks.kernels as kb

    def killed(device, quick):
        assert json.loads((tmp_path / "kernels-cpu.json").read_text())["sections_done"] == ["masked_linear"]
        raise KeyboardInterrupt  # stands for the timeout's kill

    monkeypatch.setattr(kb.bench_rerank, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        kb.main(["--device", "cpu", "--quick", "--sections", "masked_linear,rerank", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert result["sections_done"] == ["masked_linear"]
    assert {r["bench"] for r in result["rows"]} == {"masked_linear fwd", "masked_linear bwd", "masked_linear fwd+bwd",
                                                    "masked_linear autocast fwd+bwd"}
    assert (tmp_path / "kernels-cpu.csv").read_text().startswith("bench,shape,provider,ms")


def test_host_time_per_call():
    import time

    from benchmarks.timing import host_ms

    calls = []

    def slow() -> None:
        calls.append(1)
        time.sleep(0.003)

    ms = host_ms(slow, "cpu", repeat=5)
    assert len(calls) == 6 and 3.0 <= ms < 30.0  # one untimed call first, then 5 timed


def test_graph_timing_needs_cuda():
    from benchmarks.timing import graph_ms

    assert graph_ms([lambda: None], "cpu") is None
    assert graph_ms([], "cuda") is None


def test_graph_timing_is_per_call_and_none_when_capture_fails_cpu():
    # CPU counterpart of the CUDA test below: the same arithmetic over a stand-in capture that
    # replays the calls in order (each sleeps 2 ms), timed on the host.
    import time

    from benchmarks.timing import median_ms, per_call_ms

    ran = []

    def call():
        ran.append(1)
        time.sleep(0.002)

    def capture(calls):
        return lambda: [fn() for fn in calls]

    def timer(replay):
        return median_ms(replay, "cpu", repeat=3, warmup=0)

    one, four = per_call_ms([call], capture, timer), per_call_ms([call] * 4, capture, timer)
    assert len(ran) == 3 + 12  # every replay ran every captured call
    assert 2.0 <= one < 20.0 and 2.0 <= four < 20.0 and four < 2 * one  # per call, not per replay
    assert per_call_ms([call], lambda calls: None, timer) is None  # cannot be captured
    assert per_call_ms([], capture, timer) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_timing_is_per_call_and_skips_what_cannot_be_captured():
    from benchmarks.timing import graph_ms, median_ms

    a = torch.randn(2048, 2048, device="cuda")
    one = graph_ms([lambda: a @ a], "cuda")
    four = graph_ms([lambda: a @ a] * 4, "cuda")
    eager = median_ms(lambda: a @ a, "cuda")
    assert one is not None and four is not None
    assert 0.5 * one < four < 1.5 * one and four < 1.5 * eager  # per call, not per graph
    assert graph_ms([lambda: a.sum().item()], "cuda") is None  # a host sync cannot be captured


def test_stream_rows_compare_with_dense_in_the_same_step_mode(monkeypatch):
    # The H100 table once put bitmap in graph mode at 3.8x dense, against dense *eager*; against
    # dense in graph mode it was slower. Timings stand in for _run_streams: p50 by hand.
    import benchmarks.stream as bs

    p50 = {("dense", "eager"): 30.0, ("dense", "cuda-graph"): 5.0, ("bitmap", "eager"): 40.0,
           ("bitmap", "cuda-graph"): 8.0, ("linear-free", "eager"): 20.0, ("linear-free", "cuda-graph"): 4.0}

    def build(size, fmt, device, dtype):
        if fmt == "2:4":
            raise RuntimeError("cannot build here")
        return fmt, None, 1000, {"layer": fmt}

    def run(model, device, n, seconds, step_mode):
        if model == "bsr":
            raise RuntimeError("builds, cannot run here (CUTLASS 2:4 on the H100)")
        ms = p50[(model, step_mode)] * (1 + n / 100)
        return {"p50_s": ms / 1e3, "p99_s": ms / 1e3, "encoder_p50_s": ms / 2e3, "compute_s_per_audio_s": 0.1, "mean_batch": n,
                "steps": 13.0, "window_steps": 13.0}

    monkeypatch.setattr(bs, "_build", build)
    monkeypatch.setattr(bs, "_run_streams", run)
    monkeypatch.setattr(bs, "_bandwidth_gbps", lambda device: 1.0)
    rows = bs.bench("cpu", quick=True, cuda_graphs=True, streams=(1, 32),
                    formats=("2:4", "bsr", "bitmap", "linear-free"))
    got = {(r["format"], r["streams"], r["step_mode"]): r["speedup_vs_dense_p50"] for r in rows if "p50_ms" in r}
    assert got[("bitmap", 32, "cuda-graph")] == pytest.approx(5.0 / 8.0)
    assert got[("bitmap", 1, "eager")] == pytest.approx(30.0 / 40.0)
    assert got[("dense", 32, "cuda-graph")] == pytest.approx(1.0)
    assert got[("linear-free", 32, "cuda-graph")] == pytest.approx(5.0 / 4.0)  # the ceiling row
    errors = [(r["format"], r.get("streams"), r.get("step_mode")) for r in rows if "error" in r]
    assert errors == [("2:4", None, None), *[("bsr", n, m) for n in (1, 32) for m in ("eager", "cuda-graph")]]


def test_stream_auto_rows_choose_at_each_stream_count_on_a_fresh_model(monkeypatch):
    # "<fmt>+auto" rows: --layer-runtime auto chosen at the row's own stream count, each count on
    # a model built afresh (the choice replaces layers in place); the row records the choice and
    # counts the dense copies in its bytes.
    import benchmarks.stream as bs

    built, chose = [], []

    def build(size, fmt, device, dtype):
        built.append(fmt)
        return [fmt, len(built)], None, 1000, {"layer": fmt}

    def choose(model, streams):
        chose.append((tuple(model), streams))
        return {"layers_sparse": 1, "layers_dense_auto": 2, "auto_extra_bytes": 500, "auto_runtimes": ["cublas-auto", "cuda"]}

    def run(model, device, n, seconds, step_mode):
        ms = 10.0 if model[0] == "dense" else 8.0
        return {"p50_s": ms / 1e3, "p99_s": ms / 1e3, "encoder_p50_s": ms / 2e3, "compute_s_per_audio_s": 0.1, "mean_batch": n,
                "steps": 13.0, "window_steps": 13.0}

    monkeypatch.setattr(bs, "_build", build)
    monkeypatch.setattr(bs, "_auto_choose", choose)
    monkeypatch.setattr(bs, "_run_streams", run)
    monkeypatch.setattr(bs, "_bandwidth_gbps", lambda device: 1.0)
    rows = bs.bench("cpu", quick=True, cuda_graphs=True, streams=(1, 32), formats=("bitmap+auto",))
    assert built == ["dense", "bitmap", "bitmap"]
    assert chose == [(("bitmap", 2), 1), (("bitmap", 3), 32)]
    auto = [r for r in rows if r["format"] == "bitmap+auto"]
    assert [(r["streams"], r["step_mode"]) for r in auto] == [(1, "eager"), (1, "cuda-graph"), (32, "eager"),
                                                              (32, "cuda-graph")]
    for r in auto:
        assert r["layers_dense_auto"] == 2 and r["layers_sparse"] == 1 and r["weight_bytes"] == 1500
        assert r["runtimes"] == ["cublas-auto", "cuda"] and "auto_runtimes" not in r
        assert r["speedup_vs_dense_p50"] == pytest.approx(10.0 / 8.0)
    # On the CPU, bsr and bitmap layers run the C++ kernel and can be chosen against dense; 2:4
    # layers run dense there, so 2:4+auto would compare dense with itself.
    assert "bitmap+auto" in bs.all_formats("cuda") and "2:4+auto" in bs.all_formats("cuda")
    assert {"bsr+auto", "bitmap+auto"} <= set(bs.all_formats("cpu")) and "2:4+auto" not in bs.all_formats("cpu")


def test_stream_repeats_interleave_rounds_and_report_medians_and_spread(monkeypatch):
    # --repeats 3: each model built once, the table run in 3 rounds (dense, bsr, dense, bsr, ...),
    # a row's timings the median of its rounds, and each round's ratio to dense recorded. The
    # machine drifts slower every call here; within a round, bsr is 20% faster than dense.
    import benchmarks.stream as bs

    built, order = [], []
    clock = iter(range(100))

    def build(size, fmt, device, dtype):
        built.append(fmt)
        return fmt, None, 1000, {"layer": fmt}

    def run(model, device, n, seconds, step_mode):
        order.append(model)
        drift = 1 + 0.1 * next(clock)
        ms = (10.0 if model == "dense" else 8.0) * drift
        return {"p50_s": ms / 1e3, "p99_s": 2 * ms / 1e3, "encoder_p50_s": ms / 2e3, "compute_s_per_audio_s": 0.1, "mean_batch": n,
                "steps": 13.0, "window_steps": 13.0}

    monkeypatch.setattr(bs, "_build", build)
    monkeypatch.setattr(bs, "_run_streams", run)
    monkeypatch.setattr(bs, "_bandwidth_gbps", lambda device: 1.0)
    rows = bs.bench("cpu", quick=True, streams=(4,), formats=("bsr",), repeats=3)
    assert built == ["dense", "bsr"]
    assert order == ["dense", "bsr"] * 3
    dense, bsr = rows
    assert dense["p50_runs_ms"] == pytest.approx([10.0, 12.0, 14.0])  # calls 0, 2, 4
    assert bsr["p50_runs_ms"] == pytest.approx([8.8, 10.4, 12.0])  # calls 1, 3, 5
    assert dense["p50_ms"] == pytest.approx(12.0) and bsr["p50_ms"] == pytest.approx(10.4)
    assert bsr["p99_ms"] == pytest.approx(20.8)
    assert bsr["speedup_runs"] == pytest.approx([10 / 8.8, 12 / 10.4, 14 / 12.0])
    assert bsr["speedup_vs_dense_p50"] == pytest.approx(12.0 / 10.4)
    with pytest.raises(ValueError):
        bs.bench("cpu", quick=True, repeats=0)
    with pytest.raises(SystemExit):
        bs.main(["--device", "cpu", "--repeats", "0"])


def test_stream_table_is_saved_after_each_format_and_takes_chosen_sizes(monkeypatch, tmp_path):
    # A device lease can cut the table off: the file must hold every format measured so far
    # ("complete": false), and --sizes must run only the sizes named (paper-187m alone, say).
    import json

    import benchmarks.stream as bs

    built, saved = [], []

    def build(size, fmt, device, dtype):
        built.append((size, fmt))
        return fmt, None, 1000, {"layer": fmt}

    def run(model, device, n, seconds, step_mode):
        if model == "bitmap":
            raise KeyboardInterrupt  # the lease's limit, mid-table
        ms = {"dense": 10.0, "2:4": 8.0, "bsr": 5.0, "linear-free": 4.0}[model]
        return {"p50_s": ms / 1e3, "p99_s": ms / 1e3, "encoder_p50_s": ms / 2e3, "compute_s_per_audio_s": 0.1, "mean_batch": n,
                "steps": 13.0, "window_steps": 13.0}

    real_write = bs.atomic_write_json

    def write(path, obj):
        saved.append(json.loads(json.dumps(obj)))
        real_write(path, obj)

    monkeypatch.setattr(bs, "_build", build)
    monkeypatch.setattr(bs, "_run_streams", run)
    monkeypatch.setattr(bs, "_bandwidth_gbps", lambda device: 1.0)
    monkeypatch.setattr(bs, "atomic_write_json", write)
    with pytest.raises(KeyboardInterrupt):
        bs.main(["--device", "cpu", "--sizes", "small", "--streams", "2", "--out-dir", str(tmp_path)])
    assert {size for size, _ in built} == {"small"}
    assert [len(s["rows"]) for s in saved] == [1, 2, 3]  # dense, 2:4, bsr; bitmap never finished
    on_disk = json.loads((tmp_path / "stream-cpu.json").read_text())
    assert on_disk["complete"] is False and [r["format"] for r in on_disk["rows"]] == ["dense", "2:4", "bsr"]
    assert on_disk["rows"][2]["speedup_vs_dense_p50"] == pytest.approx(2.0)
    monkeypatch.setattr(bs, "_run_streams", lambda model, device, n, seconds, step_mode: run(
        "bsr" if model == "bitmap" else model, device, n, seconds, step_mode))
    monkeypatch.setattr(bs, "_auto_choose", lambda model, n: {"layers_sparse": 1, "layers_dense_auto": 0,
                                                              "auto_extra_bytes": 0, "auto_runtimes": ["cpu"]})
    assert bs.main(["--device", "cpu", "--sizes", "small", "--streams", "2", "--out-dir", str(tmp_path)]) == 0
    on_disk = json.loads((tmp_path / "stream-cpu.json").read_text())
    assert on_disk["complete"] is True and [r["format"] for r in on_disk["rows"]] == [
        "dense", "2:4", "bsr", "bitmap", "bsr+auto", "bitmap+auto", "linear-free"]
    with pytest.raises(SystemExit):
        bs.main(["--device", "cpu", "--sizes", "huge", "--out-dir", str(tmp_path)])
    # --formats: the formats named, after dense (every ratio's baseline) whether named or not
    built.clear()
    assert bs.main(["--device", "cpu", "--sizes", "small", "--streams", "2", "--formats", "linear-free,bsr",
                    "--out-dir", str(tmp_path)]) == 0
    assert built == [("small", "dense"), ("small", "linear-free"), ("small", "bsr")]
    on_disk = json.loads((tmp_path / "stream-cpu.json").read_text())
    assert on_disk["rows"][1]["speedup_vs_dense_p50"] == pytest.approx(10.0 / 4.0)
    for bad in ("bitmap,nope", "2:4-cutlass", ","):  # unknown; CUDA-only on cpu; empty
        with pytest.raises(SystemExit):
            bs.main(["--device", "cpu", "--formats", bad, "--out-dir", str(tmp_path)])


def test_stream_rows_say_how_many_steps_their_p99_is_over(monkeypatch, capsys):
    # A row's p99 comes from the steps of a few seconds of audio (13 on CPU, 25 on CUDA): about
    # its maximum. Every row records that count, from the real run (warm-up steps excluded), and
    # the printed table labels its p99 with it.
    import benchmarks.stream as bs

    model, _, _, _ = bs._build("tiny", "dense", "cpu", torch.float32)
    stats = bs._run_streams(model, "cpu", 2, 0.5)  # 8000 samples: 51 frames -> 48 -> 3 chunks
    assert stats["window_steps"] == stats["steps"] == 3 and stats["mean_batch"] == 2
    assert stats["audio_s"] == pytest.approx(1.0)  # two streams of 0.5 s, not the warm-up's

    def run(model, device, n, seconds, step_mode):
        ms = 10.0 if model == "dense" else 8.0
        return {"p50_s": ms / 1e3, "p99_s": ms / 1e3, "encoder_p50_s": ms / 2e3, "rtf": 0.1,
                "compute_s_per_audio_s": 0.1, "mean_batch": n, "steps": 13.0, "window_steps": 13.0}

    monkeypatch.setattr(bs, "_build", lambda size, fmt, device, dtype: (fmt, None, 1000, {"layer": fmt}))
    monkeypatch.setattr(bs, "_run_streams", run)
    monkeypatch.setattr(bs, "_bandwidth_gbps", lambda device: 1.0)
    rows = bs.bench("cpu", quick=True, streams=(1,), formats=("bsr",))
    assert [r["timed_steps"] for r in rows] == [13, 13]
    assert all(r["compute_s_per_audio_s"] == 0.1 for r in rows)
    text = bs.table(rows)
    assert "p99 ms (n=13)" in text and "bsr" in text


@pytest.mark.parametrize("step_mode", ["eager", "static"])
def test_stream_load_test_small_on_cpu(step_mode):
    from benchmarks.stream import load_test

    result = load_test("cpu", minutes=0.05, n_streams=3, step_mode=step_mode, compare=0)  # every stream
    assert result["identical_to_alone"] == {"s0": True, "s1": True, "s2": True} and result["step_mode"] == step_mode
    assert result["p99_ms"] >= result["p50_ms"] > 0
    assert len(result["memory"]) >= 2 and all(m["bytes"] > 0 for m in result["memory"])


def test_load_test_feeds_until_the_redecodes_fill_the_bound():
    # By hand: 1000 s bound, re-decodes of 2 streams at 0.25 s per chunk (0.75 s per fed chunk
    # with the 1.5x margin), 90% cap (values exact in binary).
    from benchmarks.stream import keep_feeding

    assert keep_feeding(0.0, 0, 0.25, 2, 1000.0)
    assert keep_feeding(150.0, 999, 0.25, 2, 1000.0)  # 150 + 750 = 900 <= 900
    assert not keep_feeding(150.5, 999, 0.25, 2, 1000.0)
    assert keep_feeding(0.0, 1199, 0.25, 2, 1000.0) and not keep_feeding(0.0, 1200, 0.25, 2, 1000.0)
    assert keep_feeding(899.0, 10**6, 0.0, 0, 1000.0)  # nothing to re-decode: the cap alone


@pytest.mark.parametrize("allowed", [0, 4])
def test_load_test_bound_on_cpu(monkeypatch, allowed):
    # The bound's plumbing, with the timing rule replaced by "feed `allowed` more chunks" (timed
    # rules are not for unit tests): feeding stops there (the first chunk always goes in), the
    # run is marked truncated, and the streams are compared with decoding alone over what was fed.
    import benchmarks.stream as bs

    asked = []

    def rule(elapsed_s, fed_ticks, step_alone_s, compare, max_wall_s):
        asked.append((fed_ticks, compare, max_wall_s, step_alone_s > 0))
        return fed_ticks <= allowed

    monkeypatch.setattr(bs, "keep_feeding", rule)
    result = bs.load_test("cpu", minutes=0.3, n_streams=3, max_wall_s=50.0, step_mode="static", compare=0)
    assert result["truncated"]
    assert result["minutes_fed"] == pytest.approx((allowed + 1) * bs.CHUNK / 16000 / 60)
    assert result["identical_to_alone"] == {"s0": True, "s1": True, "s2": True}
    assert asked[0] == (1, 3, 50.0, True) and asked[-1][0] == allowed + 1


def test_stream_load_test_bf16_one_bucket_on_cpu():
    # bf16, static steps at one batch size (min_batch = max_batch = streams), the single-stream
    # re-decodes too: the same tokens as decoding alone, which eager bf16 steps do not promise.
    from benchmarks.stream import load_test

    result = load_test("cpu", minutes=0.2, n_streams=8, dtype=torch.bfloat16, step_mode="static")
    assert result["dtype"] == "bfloat16" and result["min_batch"] == 8
    assert result["identical_to_alone"] == {"s0": True, "s7": True}


def test_window_size_simulation_matches_the_kernels(caplog):
    # The simulation behind the README's window sizes counts what the kernels count (their
    # DEBUG log), at a size where the window select samples (44 tiles of 4096).
    import logging

    from benchmarks.window_size import simulate
    from sparse_rnnt.kernels.rerank import rerank_masks_into

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        ws = {f"w{i}": torch.randn(r, c, generator=g).to(dtype) for i, (r, c) in enumerate([(100, 1000), (57, 1000),
                                                                                               (23, 999)])}
        for s in (0.3, 0.7):
            sim = simulate(list(ws.values()), s)
            out = {k: torch.empty(w.shape, dtype=torch.uint8) for k, w in ws.items()}
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="sparse_rnnt.kernels.rerank.window"):
                rerank_masks_into(ws, s, out, algorithm="window", tile=4096)
            counted = [r.args[0] for r in caplog.records if r.getMessage().endswith("units in the window")]
            assert sim["holds"] and sim["samples"] >= 64 and counted == [sim["window"]]


def test_bracket_share_simulation_matches_the_kernels():
    # The simulation behind the README's bracket shares picks the bracket the kernels pick (a
    # plan's sampled pass 1 at tiles of 256, so that a small size spans enough chunks), on dense
    # and on pruned weights, and says whether it holds as the plan's path does.
    from benchmarks.bracket_share import simulate
    from sparse_rnnt.kernels.rerank import RerankPlan

    g = torch.Generator().manual_seed(1)
    ws = {f"w{i}": torch.randn(r, c, generator=g) * (i + 1) for i, (r, c) in enumerate([(40, 300), (17, 299)])}
    for s in (0.3, 0.7, 0.7):  # the last on what the one before left: 70% zeros
        sim = simulate(list(ws.values()), s, tile=256)
        out = {k: torch.empty(w.shape, dtype=torch.uint8) for k, w in ws.items()}
        plan = RerankPlan(ws, s, out, apply=True, tile=256, warm_start=False, bracket=True)
        plan.run()
        sel = plan._select
        assert sim["bracket"] == [int(sel.blo[0]), int(sel.bhi[0])] and sim["fine_span"][0] == int(sel.flo[0])
        assert sim["fine_holds"] == (not sel.last_fine_missed)
        assert sim["holds"] and plan.last_path == "bracket"
        assert 0 < sim["atomic_share"] < sim["atomic_share_without"]


def test_single_benchmark_command_line(capsys):
    import json

    from benchmarks.rows_cli import print_rows

    seen = []

    def run(device, quick):
        seen.append((device, quick))
        return [{"provider": "a", "ms": 1.5}, {"provider": "b", "ms": 2.0}]

    print_rows(run, "demo", ["--device", "cpu", "--quick"])
    assert seen == [("cpu", True)]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    env = lines[0]["environment"]  # the machine and versions first, as every result file records
    assert {"commit", "date", "torch", "triton"} <= set(env) and lines[1:] == run("cpu", True)


def test_gpu_session_failures_print_as_they_happen(tmp_path):
    # gpu_session.sh sets SPARSE_RNNT_FAILURES_NOW=1: the reason of a failure must be in the
    # output before pytest's end-of-run summary (which a wall-clock bound may cut off).
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_one.py").write_text("def test_fails():\n    assert 2 + 2 == 5, 'why: arithmetic'\n\n"
                                          "def test_passes():\n    assert True\n")
    root = Path(__file__).resolve().parents[1]
    # keep the caller's path: on the GPU image soundfile (tests.conftest needs it) comes from there
    env = {**os.environ, "SPARSE_RNNT_FAILURES_NOW": "1",
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:randomly",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    out = run.stdout
    assert run.returncode == 1 and "--- FAILED" in out, out[-3000:] + run.stderr[-3000:]
    early = out.index("--- FAILED")
    assert "why: arithmetic" in out[early:] and early < out.index("short test summary")
    assert "test_passes" not in out[early:out.index("---\n", early + 3)]


# 40 s on 2 cores: make test-slow runs it; run it before a GPU session spends device time.
@pytest.mark.slow
def test_gpu_session_script_rehearsal_on_cpu(tmp_path):
    # The GPU session script with DEVICE=cpu: every benchmark step's command line, the deadline
    # bookkeeping and the output files, before any device time is spent on them. (Its test step
    # is the pytest run above; it leaves this test out, which would recurse.)
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "PYTHON": sys.executable, "DEADLINE_S": "300",
           "STEPS": "kernels small_row profile stream load", "KERNEL_ARGS": "--quick --sections masked_linear",
           "PROFILE_ARGS": "--sizes 128000 --algorithms plan-warm --dtypes float32",
           "STREAM_ARGS": "--quick --streams 2", "LOAD_MINUTES": "0.02"}
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    log = (tmp_path / "session.log").read_text()
    for name in ("kernels", "small_row", "profile", "stream", "load"):
        assert f"=== {name} rc=0" in log, log[-3000:]
    kernels = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert {r["provider"] for r in kernels["rows"]} == {"dense", "unfused", "dense-autocast", "unfused-autocast"}
    small = [json.loads(line) for line in (tmp_path / "small-row-cpu.jsonl").read_text().splitlines()]
    assert "environment" in small[0] and small[1:] and all(r["bench"] == "small_row_linear" for r in small[1:])
    profile = [json.loads(line) for line in (tmp_path / "rerank-profile-cpu.jsonl").read_text().splitlines()]
    assert "environment" in profile[0] and [(r["shape"], r["path"]) for r in profile[1:]] == [("128000", "warm")]
    stream = json.loads((tmp_path / "stream-cpu.json").read_text())
    assert {r["streams"] for r in stream["rows"] if "streams" in r} == {2}
    load = json.loads((tmp_path / "load" / "stream-cpu.json").read_text())["load"]
    assert load["step_mode"] == "static" and load["identical_to_alone"] == {"s0": True, "s63": True}


@pytest.mark.parametrize("args", [["--dtypes", "float64"], ["--copies", "x"], ["--copies", "0,16"]])
def test_rerank_profile_refuses_bad_options(args, capsys):
    from benchmarks.profile_rerank import main

    with pytest.raises(SystemExit):
        main(["--device", "cpu", *args])
    assert "error: --" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["atomic", "plan", "plan-warm", "plan-full"])
def test_rerank_profile_on_cpu(algorithm):
    # The profile's plumbing at a small size (no CUDA activity on CPU: device time 0, host ops
    # listed); the same call ran on the H100 (benchmarks/results/h100-2026-11-26-lease2/).
    from benchmarks.profile_rerank import profile

    row = profile(128000, torch.float32, "cpu", algorithm, calls=2)  # 8 tensors of 16 x 1000
    assert row["algorithm"] == algorithm and row["shape"] == "128000"
    assert row["wall_ms"] > 0 and row["device_ms"] == 0.0 and row["launches"] == 0.0
    assert row["host_top"] and all(e["self_ms"] >= 0 for e in row["host_top"])
    # Which select the plan's last call took (16 tiles: too few for a sampled bracket).
    assert row["path"] == {"atomic": None, "plan": "full", "plan-warm": "warm", "plan-full": "full"}[algorithm]
    if algorithm.startswith("plan"):  # the copies sweep: recorded as the plan used them
        assert row["hist_copies"] == 1  # the interpreter's default choice
        assert profile(128000, torch.float32, "cpu", algorithm, calls=1, hist_copies=3)["hist_copies"] == 3
    else:
        assert row["hist_copies"] is None
        with pytest.raises(ValueError, match="plan"):
            profile(128000, torch.float32, "cpu", algorithm, calls=1, hist_copies=3)


def test_linear_free_rows_replace_exactly_the_layers_the_formats_convert():
    # The ceiling row is only a ceiling if it frees the same layers a sparse format converts,
    # costs nothing there, and still decodes (shapes and dtypes right through the model).
    import benchmarks.stream as bs

    dense, masks, _, runtimes = bs._build("tiny", "dense", "cpu", torch.float32)
    free, free_masks, nbytes, free_runtimes = bs._build("tiny", "linear-free", "cpu", torch.float32)
    assert set(free_masks) == set(masks) == set(runtimes) == set(free_runtimes) and nbytes == 0
    for name in masks:
        layer = free.get_submodule(name.removesuffix(".weight"))
        ref = dense.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, bs.FreeLinear)
        assert (layer.in_features, layer.out_features) == (ref.in_features, ref.out_features)
    assert not any(isinstance(m, bs.FreeLinear) for m in dense.modules())
    layer = free.get_submodule(next(iter(masks)).removesuffix(".weight"))
    x = torch.randn(3, 5, layer.in_features)
    y = layer(x)
    assert y.shape == (3, 5, layer.out_features) and y.dtype == x.dtype
    assert not y[..., :-1].any() and bool((y[..., -1] == 1).all())
    # The joiner's output is freed too, and its argmax is blank (the last symbol): the freed
    # model emits nothing, where the dense one emits (random weights), so its decoding loop does
    # no more work than any format's. Zeros alone would emit symbol 0 at every step.
    from sparse_rnnt.streaming import StreamingDecoder

    emitted = {}
    for name, model in (("dense", dense), ("free", free)):
        dec = StreamingDecoder(model, None)
        s = dec.open()
        dec.accept(s, 0.1 * torch.randn(2560 * 4, generator=torch.Generator().manual_seed(0)))
        while dec.step([s]):
            pass
        emitted[name] = len(dec.finish([s])[0].tokens)
    assert emitted["free"] == 0 < emitted["dense"], emitted


def test_gpu_test_selection_collects_without_the_cpu_only_packages():
    # The GPU image has no soundfile, espeakng-loader or jiwer. A conftest that imported the MLS
    # fixture at module level once failed the whole CUDA test step there (2026-11-27) before a
    # test ran. Collect what gpu_session.sh collects, with those packages made unimportable.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "for m in ('soundfile', 'espeakng_loader', 'jiwer'): sys.modules[m] = None\n"
        "import pytest\n"
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/kernels', "
        "'tests/test_cuda.py', 'tests/export', 'tests/streaming', 'tests/training/test_distributed.py', "
        "'tests/test_benchmarks.py', 'tests/pruning/test_methods.py']))\n"
    )
    root = Path(__file__).resolve().parents[1]
    sh = (root / "benchmarks" / "gpu_session.sh").read_text()
    for target in ("tests/kernels", "tests/test_cuda.py", "tests/export", "tests/streaming",
                   "tests/training/test_distributed.py", "tests/test_benchmarks.py", "tests/pruning/test_methods.py"):
        assert target in sh  # the selection above is the script's
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_stream_auto_choose_on_real_small_row_layers():
    # _auto_choose unmocked, on the tiny model with small-row layers on the reference backend:
    # every sparse layer is either kept or run dense, and the bytes follow the dense copies.
    import benchmarks.stream as bs
    from sparse_rnnt.export.autoselect import sparse_layers
    from tests.export.test_autoselect import _sparse_tiny

    model, ref = _sparse_tiny()
    got = bs._auto_choose(model, 2)
    assert got["layers_sparse"] + got["layers_dense_auto"] == len(ref)
    assert len(sparse_layers(model)) == got["layers_sparse"]
    # every layer of this model is smaller compressed than dense (test_autoselect checks it)
    assert (got["auto_extra_bytes"] > 0) == (got["layers_dense_auto"] > 0)


def _session_dry_run(tmp_path, **env_vars):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in {
        "STEPS", "DEADLINE_S", "TESTS_BUDGET", "TESTS_K", "KERNEL_ARGS", "PROFILE_BUDGET", "STREAM_BUDGET",
        "STREAM_ARGS", "PLAN"}}
    env.update({"OUT": str(tmp_path / "out"), "DEVICE": "cuda", "PYTHON": sys.executable, "DRY_RUN": "1", **env_vars})
    return subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_gpu_session_plans_expand_to_the_documented_calls(tmp_path):
    # The planned calls are presets (PLAN=next-1, next-2, next-3), so a session with a GPU runs what
    # docs/gpu-sessions.md plans without retyping eight variables; DRY_RUN shows each step's
    # budget and command line without running it.
    run = _session_dry_run(tmp_path, PLAN="next-1")
    assert run.returncode == 0, run.stderr
    steps = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert list(steps) == ["tests", "kernels", "profile", "stream"]
    assert steps["tests"].split()[1] == "150" and "-k cuda and (auto_runtimes or rerank or plan) " in steps["tests"]
    assert steps["kernels"].endswith(f"--sections rerank --out-dir {tmp_path / 'out'}")
    assert "--device cuda" in steps["kernels"] and "--cuda-graphs" in steps["stream"]
    assert steps["profile"].split()[1] == "90"
    assert "--sizes base --streams 1,32 --formats bsr+auto,bitmap+auto --repeats 2" in steps["stream"]
    run = _session_dry_run(tmp_path, PLAN="next-2")
    assert run.returncode == 0, run.stderr
    (load,) = run.stdout.splitlines()
    # 330 s deadline: the load step's wall bound is what is left less 40 s, at most 300 s
    assert load.startswith("load ") and "--load-minutes 10 " in load
    wall = int(load.split("--max-wall-s ")[1].split()[0])
    assert 280 <= wall <= 290  # less the seconds the script itself took before the step
    run = _session_dry_run(tmp_path, PLAN="next-3")
    assert run.returncode == 0, run.stderr
    (stream,) = run.stdout.splitlines()
    assert stream.startswith("stream 280 ") and "--sizes base --streams 8,64 " in stream
    # a variable set by hand wins over the preset
    run = _session_dry_run(tmp_path, PLAN="next-1", STEPS="kernels")
    assert [line.split()[0] for line in run.stdout.splitlines()] == ["kernels"]
    run = _session_dry_run(tmp_path, PLAN="next-9")
    assert run.returncode == 2 and "unknown PLAN 'next-9'" in run.stderr and not run.stdout
    # a dry run writes nothing (no log, no gpu.txt), even as DEVICE=cuda on a machine without one
    assert not (tmp_path / "out").exists()


def test_benchmark_clis_refuse_bad_options_and_unwritable_outputs_before_the_work(tmp_path, capsys):
    # An unknown --sections name ran nothing and overwrote kernels-<device>.json with no rows; a
    # misspelt --algorithms name ran a cold plan under its label; an output under a file failed
    # with a traceback after the work (minutes of device time).
    import benchmarks.host_launch as hl
    import benchmarks.kernels as bk
    import benchmarks.pipeline as bp
    import benchmarks.profile_rerank as pr
    import benchmarks.stream as bs

    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (bk.main, ["--device", "cpu", "--sections", "rerank,bogus", "--out-dir", str(tmp_path / "k")], "--sections: choose from"),
        (bk.main, ["--device", "cpu", "--sections", "rerank", "--out-dir", str(afile / "x")], "cannot write results there"),
        (pr.main, ["--device", "cpu", "--algorithms", "plan-wram"], "--algorithms: unknown plan-wram"),
        (pr.main, ["--device", "cpu", "--sizes", "abc"], "--sizes must be comma-separated integers"),
        (bs.main, ["--device", "cpu", "--out-dir", str(afile / "s")], "cannot write results there"),
        (hl.main, ["--out", str(afile / "h.json")], "cannot write results there"),
        (bp.main, ["--device", "cpu", "--out", str(afile / "p.json")], "cannot write results there"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "k").exists()


def test_hypothesis_text_benchmark_rows(capsys):
    # The harness checks the incremental text against the whole decode itself (it asserts), and
    # its command line prints the machine first, then one row per length.
    import json

    import benchmarks.hypothesis_text as ht

    rows = ht.run([40, 200], rounds=1, appends=3)
    assert [r["tokens"] for r in rows] == [40, 200]
    for r in rows:
        assert r["whole_us"] > 0 and r["incremental_us"] > 0
        assert r["speedup"] == pytest.approx(r["whole_us"] / r["incremental_us"])
    assert ht.main(["--tokens", "30"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "environment" in lines[0] and lines[1]["tokens"] == 30
    with pytest.raises(SystemExit):
        ht.main(["--tokens", "x"])
