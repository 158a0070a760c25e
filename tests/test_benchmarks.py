from benchmarks.env import environment


def test_environment_records_machine_versions_commit_and_date():
    env = environment()
    for key in ("date", "commit", "cpu", "cpu_count", "gpu", "torch", "torchaudio", "triton", "cuda"):
        assert key in env
    assert env["torch"].startswith("2.11")
    assert len(env["commit"]) >= 7
