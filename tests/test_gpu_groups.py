"""Grouping GPUs for `serve --gpus ... [--parallel context]` (pipelines.gpu_groups): pure planning, no GPU."""

import json

import pytest

from pipelines.gpu_groups import GpuPlanError, attention_heads, parse_gpus, plan_groups


def test_replicas_one_model_per_gpu():
    plan = plan_groups("0,1,2,3", available=8)
    assert plan.groups == [["cuda:0"], ["cuda:1"], ["cuda:2"], ["cuda:3"]]
    assert plan.parallel == "none"
    assert plan.to_json()["requests_at_once"] == 4


def test_all_means_every_visible_gpu():
    assert parse_gpus("all", 3) == [0, 1, 2]
    assert plan_groups("all", available=2).devices == ["cuda:0", "cuda:1"]


def test_eight_gpus_in_two_context_parallel_groups_of_four():
    plan = plan_groups("all", available=8, parallel="context", group_size=4)
    assert plan.groups == [[f"cuda:{i}" for i in range(4)], [f"cuda:{i}" for i in range(4, 8)]]
    assert plan.kind == "ulysses"
    assert "2 context-parallel group(s) of 4" in plan.describe()
    assert "12 of 48 attention heads per GPU" in plan.describe()


def test_context_parallel_group_defaults_to_every_listed_gpu():
    assert plan_groups("2,3", available=4, parallel="context").groups == [["cuda:2", "cuda:3"]]


@pytest.mark.parametrize(
    ("gpus", "available", "parallel", "size", "reason"),
    [
        ("all", 0, "none", None, "no GPU is visible"),
        ("0,4", 4, "none", None, "GPU 4 is not there (4 visible (0-3))"),
        ("0,0", 4, "none", None, "names a GPU twice"),
        ("zero", 4, "none", None, "takes 'all' or GPU indices"),
        ("0,1", 2, "tensor", None, "--parallel takes one of none, context"),
        ("0,1", 2, "none", 2, "--group-size applies to --parallel context"),
        ("0", 1, "context", None, "groups of at least 2 GPUs"),
        ("all", 8, "context", 3, "8 GPU(s) don't split into context-parallel groups of 3"),
        ("all", 5, "context", 5, "5 devices don't divide 48"),
    ],
)
def test_refused_with_reason(gpus, available, parallel, size, reason):
    with pytest.raises(GpuPlanError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        plan_groups(gpus, available, parallel, size)


def test_ring_refused_with_the_measured_reason():
    with pytest.raises(GpuPlanError, match="return_lse"):
        plan_groups("0,1", 2, "context", kind="ring")


def test_multi_gpu_memory_mode_conflicts_with_several_gpus():
    with pytest.raises(GpuPlanError, match="text encoder on a second GPU"):
        plan_groups("0,1", 2, memory_mode="multi-gpu")
    assert plan_groups("0", 2, memory_mode="multi-gpu").groups == [["cuda:0"]]


def test_cpu_devices_for_tests():
    assert plan_groups("0,1", 2, device_type="cpu").groups == [["cpu"], ["cpu"]]


def test_heads_read_from_the_weights(tmp_path):
    assert attention_heads(None) == 48
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    assert attention_heads(tmp_path) == 2
    with pytest.raises(GpuPlanError, match="4 devices don't divide 2"):
        plan_groups("all", 4, "context", heads=attention_heads(tmp_path))


def doctor(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`flux2-server doctor ...` in this process (the parser and command `flux2-server` runs), without FLUX2_*."""
    import os

    from server.cli import build_parser

    for name in [k for k in os.environ if k.startswith("FLUX2_")]:
        monkeypatch.delenv(name)
    parsed = build_parser().parse_args(["doctor", *args])
    code = parsed.func(parsed)
    return code, capsys.readouterr().out


def test_doctor_shows_the_group_plan_on_simulated_gpus(capsys, monkeypatch):
    simulated = ("--json", "--gpu-memory", "80", "--gpus", "8", "--host-memory", "512")
    code, out = doctor(
        capsys, monkeypatch, *simulated, "--use-gpus", "all", "--parallel", "context", "--group-size", "4"
    )
    report = json.loads(out)
    assert code == 0
    assert report["gpu_groups"]["groups"] == [[f"cuda:{i}" for i in range(4)], [f"cuda:{i}" for i in range(4, 8)]]
    assert report["gpu_groups"]["requests_at_once"] == 2
    assert report["hardware"]["gpus"] == 8
    assert report["plan"]["mode"] == "full"  # sized for one GPU: each rank holds a whole model, no multi-gpu split
    code, out = doctor(capsys, monkeypatch, *simulated, "--use-gpus", "0,1,2", "--parallel", "context")
    assert json.loads(out)["gpu_groups"] == {"refused": "Ulysses splits the prompt's 512 tokens evenly: 3 devices "
                                             "don't divide 512"}  # fmt: skip


def test_doctor_text_report_has_a_gpu_groups_row(capsys, monkeypatch):
    code, out = doctor(capsys, monkeypatch, "--gpu-memory", "80", "--gpus", "2", "--use-gpus", "0,1")
    assert code == 0
    assert "gpu groups" in out and "2 replica(s), one model per device, 2 request(s) at once: cuda:0; cuda:1" in out
