"""pipelines.fastpath: the one switch with simulated GPUs, CUDA-graph compile modes refused, the warm-up cases and
their compile counts on the tiny model (dynamo with the eager backend: the same graphs and recompiles as inductor,
without generating code), and the persistent compile cache."""

from __future__ import annotations

import os

import PIL.Image
import pytest
import torch

from pipelines import fastpath
from pipelines.fastpath import (
    FastPathError,
    WarmUpCase,
    check_compile_mode,
    choose_fast_path,
    parse_warm_up,
)
from pipelines.runtime import RuntimeOptions, plan_runtime

H100, L40S, A100, T4 = (9, 0), (8, 9), (8, 0), (7, 5)


@pytest.mark.parametrize(
    ("setting", "capability", "explicit", "expected"),
    [
        ("auto", H100, set(), (None, None, None)),  # off until a GPU run shows it pays
        ("off", H100, set(), (None, None, None)),
        ("on", H100, set(), ("fp8", "_native_cudnn", True)),
        ("on", L40S, set(), ("fp8", "_native_cudnn", True)),
        ("on", A100, set(), (None, "_native_cudnn", True)),  # no fp8 before 8.9
        ("on", T4, set(), (None, None, True)),  # no cuDNN attention before 8.0
        ("on", None, set(), (None, None, None)),  # the CPU
        ("on", H100, {"quantization"}, (None, "_native_cudnn", True)),  # explicit settings win
        ("on", H100, {"attention_backend", "compile"}, ("fp8", None, None)),
    ],
)
def test_the_one_switch_per_gpu(setting, capability, explicit, expected):
    fast = choose_fast_path(setting, capability, explicit)
    assert (fast.quantization, fast.attention_backend, fast.compile) == expected
    assert fast.active == any(v is not None for v in expected)
    assert fast.reason


def test_the_reasons_say_why():
    assert "off until a GPU run" in choose_fast_path("auto", H100, set()).reason
    assert "fp8 needs 8.9" in choose_fast_path("on", A100, set()).reason
    assert "quantization as configured" in choose_fast_path("on", H100, {"quantization"}).reason
    with pytest.raises(FastPathError, match="fast_path must be one of"):
        choose_fast_path("yes", H100, set())


def test_options_set_explicitly_are_those_away_from_their_defaults_or_named():
    assert RuntimeOptions(fast_path="on").explicitly_set() == frozenset()
    assert RuntimeOptions(quantization="int8", compile=True).explicitly_set() == {"quantization", "compile"}
    assert RuntimeOptions(explicit=frozenset({"compile"})).explicitly_set() == {"compile"}


def test_settings_name_what_the_operator_set(monkeypatch, tmp_path):
    from server.config import Settings

    monkeypatch.setenv("FLUX2_COMPILE", "0")  # explicitly off, though it is the default value
    options = Settings(fast_path="on", data_dir=tmp_path).runtime_options()
    assert "compile" in options.explicitly_set() and "quantization" not in options.explicitly_set()
    assert options.compile_cache_dir == str(tmp_path / "compile-cache")


def test_the_fast_path_is_applied_before_planning_and_reported(tiny_weights, monkeypatch):
    """On a simulated H100 the switch turns fp8, cuDNN attention and compile on; an explicit setting keeps its
    value; on this CPU nothing applies."""
    from pipelines import runtime

    runtime_ = plan_runtime(RuntimeOptions(fast_path="on"), tiny_weights, "cpu", torch.float32)
    assert runtime_.fast_path.reason.startswith("on, but no CUDA GPU")
    assert (runtime_.plan.quantization, runtime_.options.compile) == ("none", False)

    monkeypatch.setattr(runtime, "gpu_capability", lambda device: H100)
    options = runtime.with_fast_path(
        RuntimeOptions(fast_path="on", compile=False, explicit=frozenset({"compile"})),
        choose_fast_path("on", H100, {"compile"}),
    )
    assert (options.quantization, options.attention_backend, options.compile) == ("fp8", "_native_cudnn", False)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_that_record_cuda_graphs_are_refused(mode, tiny_weights):
    with pytest.raises(FastPathError, match="CUDA graphs"):
        check_compile_mode(mode)
    with pytest.raises(FastPathError, match="thread-local"):
        plan_runtime(RuntimeOptions(compile=True, compile_mode=mode), tiny_weights, "cpu", torch.float32)


@pytest.mark.parametrize("mode", [None, "default", "max-autotune-no-cudagraphs"])
def test_compile_modes_without_cuda_graphs_pass(mode):
    check_compile_mode(mode)


def test_warm_up_cases_parse_and_refuse():
    assert parse_warm_up("1,4") == [WarmUpCase(1), WarmUpCase(4)]
    assert parse_warm_up(" 2:turbo , 4:edit:high") == [WarmUpCase(2, "turbo"), WarmUpCase(4, "edit", "high")]
    assert parse_warm_up("") == []
    assert parse_warm_up("1,adapters", ("flash",)) == [WarmUpCase(1), WarmUpCase(1, "flash")]
    assert parse_warm_up("1,adapters,levels") == [WarmUpCase(1)]  # no adapter loaded (or one fused), no level
    levels = parse_warm_up("levels", levels=("regular", "high"))
    assert levels == [WarmUpCase(1, "edit", "regular"), WarmUpCase(4, "edit", "regular"), WarmUpCase(1, "edit", "high")]
    assert parse_warm_up("0:flash") == [WarmUpCase(0, "flash")]  # text to image: no reference
    assert WarmUpCase(0).label == "0 references, 1024 px, edit"
    for bad in ("-1", "5", "1:nope", "1:turbo:high", "1:edit:ultra", "x", "1:edit:none:9"):
        with pytest.raises(FastPathError, match="warm-up case"):
            parse_warm_up(bad)
    assert WarmUpCase(4, "edit", "high").label == "4 references, 1024 px, edit, acceleration high"


@pytest.fixture
def eager_compile(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(fastpath, "WARM_UP_SIZE", 256)  # the tiny VAE at 1024 px is most of a CPU's time
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_default_warm_up_leaves_nothing_to_recompile(tiny_weights, eager_compile, tmp_path, monkeypatch):
    """The default warm-up compiles at one reference, recompiles once at four (dynamo then marks the sequence
    length dynamic), once on the turbo adapter (peft's state is guarded) and once at the first acceleration level
    (the cache hooks); requests with two references at another size, on the base weights, the adapter or a level,
    compile nothing more."""
    from pipelines import EditCall, load_editor

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    options = RuntimeOptions(memory_mode="full", compile=True, compile_cache_dir=str(tmp_path / "cache"))
    editor = load_editor(tiny_weights, "cpu", options=options)
    warm = editor.capabilities().as_dict()["fast_path"]["warm_up"]
    cases = ["1 reference, 256 px, edit", "4 references, 256 px, edit", "1 reference, 256 px, flash"]
    cases += ["1 reference, 256 px, edit, acceleration regular", "4 references, 256 px, edit, acceleration regular"]
    cases += ["1 reference, 256 px, edit, acceleration high"]
    assert [w["case"] for w in warm] == cases  # flash: a profile of the turbo adapter, loaded unfused
    assert all(w["graphs_compiled"] > 0 for w in warm[:5])  # the first shape, then dynamic, the adapter, the cache
    assert all(w["seconds"] > 0 for w in warm)
    assert editor.capabilities().as_dict()["fast_path"]["compile_seconds"] == pytest.approx(
        sum(w["seconds"] for w in warm)
    )
    assert editor.capabilities().as_dict()["fast_path"]["compile_cache_dir"] == str((tmp_path / "cache").resolve())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cache").resolve())

    before = fastpath.compiled_graphs()
    images = [PIL.Image.new("RGB", (96, 64), (9, 9, 9))] * 2
    editor.edit(EditCall(images=images, prompt="p", width=320, height=192, num_inference_steps=4))
    editor.edit(EditCall(images=images, prompt="p", width=320, height=192, profile="turbo"))
    call = EditCall(images=images, prompt="p", width=320, height=192, num_inference_steps=28, acceleration="high")
    editor.edit(call)
    assert fastpath.compiled_graphs() == before


def test_without_the_warm_up_a_new_reference_count_recompiles_in_the_request(tiny_weights, eager_compile):
    """What the warm-up saves: warmed up at one reference only, a four-reference request and the first request
    on the adapter compile."""
    from pipelines import EditCall, load_editor

    options = RuntimeOptions(memory_mode="full", compile=True, compile_warm_up="1", compile_cache_dir=None)
    editor = load_editor(tiny_weights, "cpu", options=options)
    before = fastpath.compiled_graphs()
    images = [PIL.Image.new("RGB", (96, 64), (9, 9, 9))] * 4
    editor.edit(EditCall(images=images, prompt="p", width=256, height=192, num_inference_steps=4))
    assert fastpath.compiled_graphs() > before
    before = fastpath.compiled_graphs()
    editor.edit(EditCall(images=images, prompt="p", width=256, height=192, profile="turbo"))
    assert fastpath.compiled_graphs() > before


@pytest.fixture
def simulated_gpu(monkeypatch):
    """One GPU of compute capability 9.0 with `free` GiB free, and FLUX.2 [dev]'s sizes in bf16 (checks that ask
    CUDA answer as that GPU would)."""
    from pipelines import memory, quantization, runtime
    from pipelines.memory import ComponentSizes, GiB

    free = {"gib": 141}
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(memory, "free_gpu_bytes", lambda: [free["gib"] * GiB])
    monkeypatch.setattr(memory, "fp8_capable", lambda device: True)
    monkeypatch.setattr(quantization, "fp8_capable", lambda device: True)
    monkeypatch.setattr(runtime, "gpu_capability", lambda device: H100)
    sizes = ComponentSizes(transformer=int(60 * GiB), text_encoder=int(44.7 * GiB), vae=int(0.16 * GiB))
    monkeypatch.setattr(runtime, "component_sizes", lambda weights, dtype: sizes)
    monkeypatch.setattr(memory, "host_memory", lambda: (512 * GiB, 512 * GiB))  # host RAM is not what's tested
    return free


def test_the_fast_path_plans_fp8_resident_on_an_h200(tiny_weights, simulated_gpu):
    planned = plan_runtime(RuntimeOptions(fast_path="on"), tiny_weights, None, torch.bfloat16)
    assert (planned.plan.mode, planned.plan.quantization) == ("full", "fp8")
    assert (planned.options.attention_backend, planned.options.compile) == ("_native_cudnn", True)
    assert planned.describe()["fast_path"]["active"] is True


def test_the_fast_path_leaves_fp8_where_it_would_stream_the_transformer(tiny_weights, simulated_gpu):
    """24 GB: fp8 (30 GiB) would be streamed; the configured `auto` keeps an int4 transformer resident."""
    simulated_gpu["gib"] = 24
    options = RuntimeOptions(fast_path="on", quantization="auto", memory_reserve_gb=4, explicit=frozenset())
    planned = plan_runtime(options, tiny_weights, None, torch.bfloat16)
    assert (planned.plan.mode, planned.plan.quantization) == ("offload-text-encoder", "int4")
    assert "fp8 not used" in planned.fast_path.reason and planned.options.compile is True
    simulated_gpu["gib"] = 16  # streamed either way: fp8 streams half the bytes of bf16, so it stays
    planned = plan_runtime(RuntimeOptions(fast_path="on"), tiny_weights, None, torch.bfloat16)
    assert (planned.plan.mode, planned.plan.quantization) == ("group-offload", "fp8")
